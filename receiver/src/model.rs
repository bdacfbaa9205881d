//! The data that flows through the pipeline: links and their cumulative statistics,
//! and the hash tables that hold them (`FastMap`, `FastSet`, `shrink_after_burst!`).
//! OTLP is produced from this in `encode/`, never here.
use std::{
    fmt,
    net::IpAddr,
    time::{Duration, SystemTime},
};

/// Hash tables keyed by what the kernel reports (addresses, ports, links), touched per
/// close record or per link per interval: foldhash instead of the standard library's
/// SipHash, which was a third of the daemon's time per record under a storm of short
/// connections. Seeded at random (a secret per process and a seed per table, as
/// hashbrown's default): a remote peer cannot choose ports or addresses that land in one
/// bucket without the seed. foldhash is meant to be minimally DoS-resistant, not
/// cryptographic; the tables' sizes are bounded by `max_links` and the other limits
/// whatever the hash.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Capacity no table is shrunk below (see [`shrunk_capacity`]).
pub const MIN_TABLE_CAPACITY: usize = 1024;

/// The capacity a hash table should be cut to once a burst is over, if any. A table
/// keeps the capacity of its highest point: after a storm of 50,000 connections or a
/// port scan it would keep megabytes for good. A table using under a quarter of its
/// capacity is cut to twice its entries, never below `MIN_TABLE_CAPACITY`, so a steady
/// load never shrinks and regrows. The aggregator checks at each full walk (once a
/// minute at the default interval), the NAT resolver each interval, when its answers
/// expire.
pub fn shrunk_capacity(len: usize, capacity: usize) -> Option<usize> {
    let target = (2 * len).max(MIN_TABLE_CAPACITY);
    (capacity > 2 * target).then_some(target)
}

/// Cuts each table given (a `FastMap`, `FastSet` or any std hash table) to
/// [`shrunk_capacity`] when it applies.
macro_rules! shrink_after_burst {
    ($($table:expr),+ $(,)?) => {
        $(if let Some(capacity) = $crate::model::shrunk_capacity($table.len(), $table.capacity()) {
            $table.shrink_to(capacity);
        })+
    };
}
pub(crate) use shrink_after_burst;

/// One end of a link: an address, as the receiver sees it, or a workload that the
/// addresses of its replicas were merged into (by `k8sattributes` without
/// `keep_pod_detail`), named by [`LinkBatch::workloads`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Address(IpAddr),
    /// An index into the batch's `workloads`.
    Workload(u32),
}

impl Peer {
    /// The address of an address end.
    pub fn address(&self) -> Option<IpAddr> {
        match self {
            Peer::Address(addr) => Some(*addr),
            Peer::Workload(_) => None,
        }
    }
}

/// `network.transport` of a link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    #[default]
    Tcp,
    /// Connected UDP sockets: the connecting end is the client.
    Udp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// A link: a client talking to a server port. The client's ephemeral port is never part
/// of it, so every connection between the same two ends and port is one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkKey {
    pub client: Peer,
    pub server: Peer,
    pub server_port: u16,
    /// The cgroup v2 id of the client process when its address is shared: a client in
    /// the host's network namespace (host-network pods, host processes). 0 otherwise.
    pub client_cgroup: u64,
    /// `network.type`: IPv6 (IPv4-mapped IPv6 counts as IPv4).
    pub ipv6: bool,
    pub transport: Transport,
    /// The address and port the client dialled, when the kernel translated them to the
    /// server's (DNAT of a Service address, read from conntrack).
    pub dialed: Option<(IpAddr, u16)>,
}

impl LinkKey {
    /// The one series that counts everything beyond the receiver's link limit (the
    /// OpenTelemetry SDK's cardinality-limit convention: `otel.metric.overflow = true`).
    /// No real link has an unspecified server address and port 0.
    pub const OVERFLOW: LinkKey = LinkKey {
        client: Peer::Address(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        server: Peer::Address(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        server_port: 0,
        client_cgroup: 0,
        ipv6: false,
        transport: Transport::Tcp,
        dialed: None,
    };

    /// A TCP link between two addresses, as the receiver counts it.
    pub fn between(client: IpAddr, server: IpAddr, server_port: u16, client_cgroup: u64) -> Self {
        LinkKey {
            client: Peer::Address(client),
            server: Peer::Address(server),
            server_port,
            client_cgroup,
            ipv6: server.is_ipv6(),
            transport: Transport::Tcp,
            dialed: None,
        }
    }

    /// A UDP link between two addresses.
    pub fn udp(client: IpAddr, server: IpAddr, server_port: u16, client_cgroup: u64) -> Self {
        LinkKey {
            transport: Transport::Udp,
            ..Self::between(client, server, server_port, client_cgroup)
        }
    }

    pub fn is_overflow(&self) -> bool {
        *self == Self::OVERFLOW
    }

    /// The client end stands for every public address that talked to this server port
    /// (see the receiver's `group_public_clients`): exported as `external`.
    pub fn client_is_grouped(&self) -> bool {
        matches!(self.client, Peer::Address(addr) if addr.is_unspecified()) && !self.is_overflow()
    }

    /// `network.type`: `ipv4` or `ipv6`.
    pub fn network_type(&self) -> &'static str {
        if self.ipv6 { "ipv6" } else { "ipv4" }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Address(IpAddr::V6(addr)) => write!(f, "[{addr}]"),
            Peer::Address(addr) => write!(f, "{addr}"),
            Peer::Workload(n) => write!(f, "workload#{n}"),
        }
    }
}

impl fmt::Display for LinkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}:{}", self.client, self.server, self.server_port)
    }
}

/// Why a connection failed: the `error.type` attribute of `ridley.link.connections.failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureReason {
    /// The connect was answered with a RST.
    Refused,
    /// An established connection ended with a RST, sent or received.
    Reset,
    /// The connect got no answer before it was given up, or an established connection
    /// timed out retransmitting.
    Timeout,
}

impl FailureReason {
    pub const ALL: [FailureReason; 3] = [
        FailureReason::Refused,
        FailureReason::Reset,
        FailureReason::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Refused => "refused",
            FailureReason::Reset => "reset",
            FailureReason::Timeout => "timeout",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds (seconds) shared by the connect-duration and RTT histograms: from 50 µs
/// (same-host) to 10 s (SYN retries), dense where datacenter latencies are.
pub const LATENCY_BOUNDS_S: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// An explicit-bucket histogram over [`LATENCY_BOUNDS_S`].
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// `LATENCY_BOUNDS_S.len() + 1` buckets; the last is (10 s, +inf).
    pub bucket_counts: [u64; LATENCY_BOUNDS_S.len() + 1],
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            bucket_counts: [0; LATENCY_BOUNDS_S.len() + 1],
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Histogram {
    pub fn record(&mut self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = LATENCY_BOUNDS_S
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BOUNDS_S.len());
        self.bucket_counts[bucket] += 1;
        self.count += 1;
        self.sum += seconds;
        self.min = self.min.min(seconds);
        self.max = self.max.max(seconds);
    }

    /// Adds another histogram over the same bounds.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.bucket_counts.iter_mut().zip(other.bucket_counts) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// What was recorded since `earlier`, a previous state of the same histogram.
    /// (Extremes cannot be subtracted: the delta keeps this state's.)
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let mut delta = self.clone();
        for (b, before) in delta.bucket_counts.iter_mut().zip(earlier.bucket_counts) {
            *b = b.saturating_sub(before);
        }
        delta.count = self.count.saturating_sub(earlier.count);
        delta.sum = (self.sum - earlier.sum).max(0.0);
        if delta.count == 0 {
            delta.min = f64::INFINITY;
            delta.max = f64::NEG_INFINITY;
        }
        delta
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// One connection attempt seen during an interval: the raw material of a
/// service-graph span pair.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionSample {
    /// When the handshake started (SYN sent, or received on the server's host).
    pub start: SystemTime,
    /// The handshake, or the attempt until it failed.
    pub duration: Duration,
    pub failure: Option<FailureReason>,
}

/// What a link did during the last interval (reset after each collection).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IntervalActivity {
    /// Connection attempts (opened, failed, reset) during the interval.
    pub attempts: u64,
    /// A uniform sample of at most the configured number of those attempts.
    pub samples: Vec<ConnectionSample>,
    /// Payload moved during the interval.
    pub carried_traffic: bool,
    /// The most recent smoothed RTT sample of the interval.
    pub last_rtt: Option<Duration>,
}

/// Cumulative statistics of one link since `start_time`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkStats {
    /// When this link was first seen (the start of its cumulative series).
    pub start_time: SystemTime,
    /// Payload bytes client -> server.
    pub bytes_transmit: u64,
    /// Payload bytes server -> client.
    pub bytes_receive: u64,
    /// Connections that completed the handshake.
    pub opened: u64,
    /// Failed connections by [`FailureReason`].
    failed: [u64; 3],
    /// Connections open at the last collection.
    pub active: u64,
    /// Segments retransmitted by the reporting end.
    pub retransmits: u64,
    /// UDP datagrams client -> server and server -> client.
    pub datagrams_transmit: u64,
    pub datagrams_receive: u64,
    pub connect_duration: Histogram,
    pub rtt: Histogram,
    /// The last interval only, not cumulative.
    pub interval: IntervalActivity,
    /// Seen from the server's socket only (the client is not on this host).
    pub reported_by_server: bool,
}

impl LinkStats {
    pub fn new(start_time: SystemTime) -> Self {
        LinkStats {
            start_time,
            bytes_transmit: 0,
            bytes_receive: 0,
            opened: 0,
            failed: [0; 3],
            active: 0,
            retransmits: 0,
            datagrams_transmit: 0,
            datagrams_receive: 0,
            connect_duration: Histogram::default(),
            rtt: Histogram::default(),
            interval: IntervalActivity::default(),
            reported_by_server: false,
        }
    }

    /// The cumulative part alone (no interval samples): what a processor keeps of a
    /// link between batches to add only what is new.
    pub fn cumulative(&self) -> LinkStats {
        LinkStats {
            start_time: self.start_time,
            bytes_transmit: self.bytes_transmit,
            bytes_receive: self.bytes_receive,
            opened: self.opened,
            failed: self.failed,
            active: self.active,
            retransmits: self.retransmits,
            datagrams_transmit: self.datagrams_transmit,
            datagrams_receive: self.datagrams_receive,
            connect_duration: self.connect_duration.clone(),
            rtt: self.rtt.clone(),
            interval: IntervalActivity::default(),
            reported_by_server: self.reported_by_server,
        }
    }

    pub fn failed(&self, reason: FailureReason) -> u64 {
        self.failed[reason.index()]
    }

    pub fn failed_total(&self) -> u64 {
        self.failed.iter().sum()
    }

    pub fn add_failure(&mut self, reason: FailureReason) {
        self.failed[reason.index()] += 1;
    }

    /// Adds what a member link did since its `before` state (nothing before: all of
    /// it), keeping this link's own cumulative series continuous when members come and
    /// go. `active` and the interval are not cumulative: the caller sums those.
    pub fn add_since(&mut self, now: &LinkStats, before: Option<&LinkStats>) {
        let zero = LinkStats::new(now.start_time);
        let before = before
            .filter(|b| b.start_time == now.start_time)
            .unwrap_or(&zero);
        self.bytes_transmit += now.bytes_transmit.saturating_sub(before.bytes_transmit);
        self.bytes_receive += now.bytes_receive.saturating_sub(before.bytes_receive);
        self.opened += now.opened.saturating_sub(before.opened);
        for i in 0..self.failed.len() {
            self.failed[i] += now.failed[i].saturating_sub(before.failed[i]);
        }
        self.retransmits += now.retransmits.saturating_sub(before.retransmits);
        self.datagrams_transmit += now
            .datagrams_transmit
            .saturating_sub(before.datagrams_transmit);
        self.datagrams_receive += now
            .datagrams_receive
            .saturating_sub(before.datagrams_receive);
        self.connect_duration
            .merge(&now.connect_duration.since(&before.connect_duration));
        self.rtt.merge(&now.rtt.since(&before.rtt));
    }
}

/// Kernel-side and receiver-side losses, cumulative since start. Exported as
/// `ridley.receiver.losses` so that an incomplete count is never silent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// Close records dropped because the ring buffer was full.
    pub ringbuf_full: u64,
    /// Sockets whose state the kernel could not store (its slots in the state table
    /// full, or the table build's hash full); such a connection is counted without its
    /// open, from the full walks.
    pub socket_state_unavailable: u64,
    /// Client endpoints not recorded (the link may be reported from both ends).
    pub endpoint_table_full: u64,
    /// UDP datagrams not counted: their flow did not fit in the kernel's flow table.
    pub udp_flow_table_full: u64,
    /// Kernel memory reads that failed.
    pub read_errors: u64,
    /// Program runs the kernel skipped because the same program was already running
    /// on that CPU (a softirq's TCP state change interrupting it: the programs'
    /// `recursion_misses`, counted from 6.7). A missed transition can cost a connection its open, its
    /// bytes since the last walk, or the single report of a local connection; each
    /// change makes the next walk a full one, which finds connections whose close was
    /// missed.
    pub events_missed: u64,
    /// Connection records counted in the overflow series because the link limit was
    /// reached (not lost, but no longer told apart by link).
    pub link_limit: u64,
    /// Connections that vanished between two walks without a close record.
    pub close_lost: u64,
    /// Network namespaces a walk could not enter or read (missing privileges, a
    /// failure inside the namespace): their live connections were not seen that time.
    pub namespace_skipped: u64,
    /// Connections to a translated (DNAT) address whose conntrack entry was gone or
    /// could not be read: counted under the address dialled, not the backend.
    pub nat_unresolved: u64,
    /// Connections not looked up in conntrack because the interval's lookups were
    /// used up (`conntrack.max_lookups_per_interval`): counted under the address dialled.
    pub nat_lookup_limit: u64,
}

impl Losses {
    /// Both counts added, reason by reason (losses of several receivers).
    pub fn plus(self, other: &Losses) -> Losses {
        Losses {
            ringbuf_full: self.ringbuf_full + other.ringbuf_full,
            socket_state_unavailable: self.socket_state_unavailable
                + other.socket_state_unavailable,
            endpoint_table_full: self.endpoint_table_full + other.endpoint_table_full,
            udp_flow_table_full: self.udp_flow_table_full + other.udp_flow_table_full,
            read_errors: self.read_errors + other.read_errors,
            events_missed: self.events_missed + other.events_missed,
            link_limit: self.link_limit + other.link_limit,
            close_lost: self.close_lost + other.close_lost,
            namespace_skipped: self.namespace_skipped + other.namespace_skipped,
            nat_unresolved: self.nat_unresolved + other.nat_unresolved,
            nat_lookup_limit: self.nat_lookup_limit + other.nat_lookup_limit,
        }
    }

    pub fn entries(&self) -> [(&'static str, u64); 11] {
        [
            ("ringbuf_full", self.ringbuf_full),
            ("socket_state_unavailable", self.socket_state_unavailable),
            ("endpoint_table_full", self.endpoint_table_full),
            ("udp_flow_table_full", self.udp_flow_table_full),
            ("read_error", self.read_errors),
            ("event_missed", self.events_missed),
            ("link_limit", self.link_limit),
            ("close_lost", self.close_lost),
            ("namespace_skipped", self.namespace_skipped),
            ("nat_unresolved", self.nat_unresolved),
            ("nat_lookup_limit", self.nat_lookup_limit),
        ]
    }
}

/// Who a link end is: the `service.name` of its span resource and service-graph
/// node, plus resource attributes. Enrichment processors fill this in; without them an
/// end is named by its address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndIdentity {
    pub service_name: String,
    pub attributes: Vec<(String, String)>,
}

/// One end of a link as identities are keyed: its address, the server port for a
/// server end, the cgroup for a client end whose address is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndRef {
    pub addr: IpAddr,
    pub port: Option<u16>,
    pub cgroup: u64,
}

impl EndRef {
    /// The client end of an address link (a workload end is named by the batch).
    pub fn client(key: &LinkKey) -> Option<Self> {
        Some(EndRef {
            addr: key.client.address()?,
            port: None,
            cgroup: key.client_cgroup,
        })
    }

    /// The server end of an address link.
    pub fn server(key: &LinkKey) -> Option<Self> {
        Some(EndRef {
            addr: key.server.address()?,
            port: Some(key.server_port),
            cgroup: 0,
        })
    }

    /// The address alone.
    pub fn address(addr: IpAddr) -> Self {
        EndRef {
            addr,
            port: None,
            cgroup: 0,
        }
    }
}

/// The name of a grouped client end (public addresses, see `LinkKey::client_is_grouped`).
pub const GROUPED_CLIENT_NAME: &str = "external";

/// One edge of the service graph: every link between two services, cumulative since
/// `start` (see the `servicegraph` processor).
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceGraphEdge {
    pub client: String,
    pub client_namespace: String,
    pub server: String,
    pub server_namespace: String,
    /// The edge that counts everything past the processor's edge limit.
    pub overflow: bool,
    pub start: SystemTime,
    /// Connection attempts: opened, refused and timed-out connects.
    pub requests: u64,
    /// Refused, reset and timed out.
    pub failed: u64,
    /// Handshake durations.
    pub durations: Histogram,
}

/// What a receiver emits once per collection interval.
#[derive(Clone, Debug)]
pub struct LinkBatch {
    /// The collection time of every point in the batch.
    pub time: SystemTime,
    /// Every live (not yet expired) link, cumulative.
    pub links: Vec<(LinkKey, LinkStats)>,
    /// Identities of link ends (filled by processors): by address, server port (where
    /// one address hosts several servers) and client cgroup (see `LinkKey`).
    pub ends: std::collections::HashMap<EndRef, EndIdentity>,
    /// Paths of the client cgroups in `links`, relative to the cgroup v2 root.
    pub cgroups: std::collections::HashMap<u64, String>,
    /// The service graph's edges, when a `servicegraph` processor ran: exported as the
    /// `traces_service_graph_*` series.
    pub service_graph: Vec<ServiceGraphEdge>,
    /// The workloads that `Peer::Workload` ends name, by index.
    pub workloads: Vec<EndIdentity>,
    /// The Service behind each translated address and port a link dialled
    /// (`LinkKey::dialed`), filled by processors: exported as `server.k8s.service.name`.
    pub dialed_services: std::collections::HashMap<(IpAddr, u16), String>,
}

impl LinkBatch {
    pub fn new(time: SystemTime) -> Self {
        LinkBatch {
            time,
            links: Vec::new(),
            ends: Default::default(),
            cgroups: Default::default(),
            service_graph: Vec::new(),
            workloads: Vec::new(),
            dialed_services: Default::default(),
        }
    }

    /// What is known of the client end of `key`: a workload's identity, or what
    /// processors found out about its address.
    pub fn client_identity(&self, key: &LinkKey) -> Option<&EndIdentity> {
        match key.client {
            Peer::Workload(n) => self.workloads.get(n as usize),
            Peer::Address(_) => self.ends.get(&EndRef::client(key)?),
        }
    }

    /// What is known of the server end of `key`: by address and port (one address may
    /// host several servers), else by address.
    pub fn server_identity(&self, key: &LinkKey) -> Option<&EndIdentity> {
        match key.server {
            Peer::Workload(n) => self.workloads.get(n as usize),
            Peer::Address(addr) => self
                .ends
                .get(&EndRef::server(key)?)
                .or_else(|| self.ends.get(&EndRef::address(addr))),
        }
    }

    /// The `service.name` of each end: its identity, else the address.
    pub fn end_names(&self, key: &LinkKey) -> (EndIdentity, EndIdentity) {
        let or_address = |identity: Option<&EndIdentity>, peer: Peer| {
            identity.cloned().unwrap_or_else(|| EndIdentity {
                service_name: match peer {
                    Peer::Address(addr) if addr.is_unspecified() => GROUPED_CLIENT_NAME.to_owned(),
                    Peer::Address(addr) => addr.to_string(),
                    Peer::Workload(n) => format!("workload#{n}"),
                },
                attributes: Vec::new(),
            })
        };
        (
            or_address(self.client_identity(key), key.client),
            or_address(self.server_identity(key), key.server),
        )
    }
}

/// What flows through a pipeline to its exporters: the links of an interval, or (in
/// metrics pipelines) ridley's own telemetry, read from the registry after them.
#[derive(Clone, Copy)]
pub enum Data<'a> {
    /// A batch of links, with its encodings built once for every exporter.
    Links(&'a crate::encode::Encoded),
    Telemetry(&'a crate::telemetry::TelemetrySnapshot),
}

/// A batch with one link `10.0.0.1 -> 10.0.0.2:80`, for tests of what is built from
/// batches.
#[cfg(test)]
pub fn one_link_batch(time: SystemTime, stats: LinkStats) -> LinkBatch {
    let mut batch = LinkBatch::new(time);
    batch.links = vec![(
        LinkKey::between(
            "10.0.0.1".parse().expect("an address"),
            "10.0.0.2".parse().expect("an address"),
            80,
            0,
        ),
        stats,
    )];
    batch
}
