//! Turns kernel socket records into links with exact cumulative counters.
//!
//! Two inputs, both [`SockRecord`]s: close records from the ring buffer (final counters
//! of a connection) and a walk of every live socket once per interval (current counters).
//! A connection is identified by its `struct sock` address and open time; the table
//! keeps, per connection, what has already been added to its link, so each byte is
//! counted once whichever input sees it first or last.
//!
//! Pure logic over plain records: no kernel, no clock reads, no I/O.
use std::{
    net::{IpAddr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use ridley_ebpf::{SockRecord, UdpFlowCounts, UdpFlowKey, flags, tcp_state};

use crate::{
    capture::{OpenedAs, RecordExt, RecordKind},
    model::{
        ConnectionSample, FailureReason, FastMap, FastSet, LinkKey, LinkStats, Losses, Peer,
        shrink_after_burst,
    },
    nat::Translation,
};

const ECONNREFUSED: u16 = 111;
const ECONNRESET: u16 = 104;
const EPIPE: u16 = 32;
const ETIMEDOUT: u16 = 110;

/// `struct sock` address plus open time: addresses are reused, open times are not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    sk: u64,
    start_ns: u64,
}

impl ConnId {
    pub fn of(rec: &SockRecord) -> Self {
        ConnId {
            sk: rec.sk,
            start_ns: rec.start_ns,
        }
    }
}

/// SocketBytes counters of one socket, SYN and FIN removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SocketBytes {
    sent: u64,
    received: u64,
    retransmits: u64,
}

impl SocketBytes {
    /// The kernel's `bytes_acked` / `bytes_received` count SYN and FIN as one byte each.
    /// SYN is already in the baseline taken at ESTABLISHED; FIN is removed here:
    /// ours when it was sent (a closing state) and acknowledged (`ALL_ACKED`),
    /// the peer's when it arrived (`SOCK_DONE`).
    fn of(rec: &SockRecord) -> Self {
        let fin_sent = matches!(
            rec.state,
            tcp_state::FIN_WAIT1
                | tcp_state::FIN_WAIT2
                | tcp_state::CLOSING
                | tcp_state::LAST_ACK
                | tcp_state::TIME_WAIT
        );
        let fin_acked = fin_sent && rec.flags & flags::ALL_ACKED != 0;
        let peer_fin = rec.flags & flags::PEER_FIN != 0;
        SocketBytes {
            sent: rec.bytes_acked.saturating_sub(u64::from(fin_acked)),
            received: rec.bytes_received.saturating_sub(u64::from(peer_fin)),
            retransmits: u64::from(rec.total_retrans),
        }
    }

    /// What the handshake left in the counters, recorded by the kernel at ESTABLISHED.
    fn baseline(rec: &SockRecord) -> Self {
        SocketBytes {
            sent: u64::from(rec.base_bytes_acked),
            received: u64::from(rec.base_bytes_received),
            retransmits: u64::from(rec.base_total_retrans),
        }
    }

    fn since(self, earlier: SocketBytes) -> SocketBytes {
        // Counters only grow for one connection; a smaller value means a stale read of a
        // socket being torn down, which must not count backwards.
        SocketBytes {
            sent: self.sent.saturating_sub(earlier.sent),
            received: self.received.saturating_sub(earlier.received),
            retransmits: self.retransmits.saturating_sub(earlier.retransmits),
        }
    }

    fn max(self, other: SocketBytes) -> SocketBytes {
        SocketBytes {
            sent: self.sent.max(other.sent),
            received: self.received.max(other.received),
            retransmits: self.retransmits.max(other.retransmits),
        }
    }
}

/// Which end of the link the reporting socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Client,
    Server,
}

pub fn ip(addr: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// `host_netns`: the host's network namespace, whose client addresses are shared by
/// every host process and host-network pod: there the client's cgroup tells them apart.
fn link_of(rec: &SockRecord, end: End, host_netns: u32) -> LinkKey {
    match end {
        End::Client => LinkKey::between(
            ip(rec.local_addr),
            ip(rec.remote_addr),
            rec.remote_port,
            if rec.netns == host_netns {
                rec.cgroup_id
            } else {
                0
            },
        ),
        End::Server => LinkKey::between(ip(rec.remote_addr), ip(rec.local_addr), rec.local_port, 0),
    }
}

/// The link of a connection whose address was translated (see `nat`): a client counted
/// under the backend that answered, with the address it dialled kept; a server under
/// its real client.
fn translated(mut key: LinkKey, end: End, translation: Option<&Translation>) -> LinkKey {
    match (end, translation) {
        (End::Client, Some(Translation::Backend(backend))) => {
            if let Peer::Address(dialed) = key.server {
                key.dialed = Some((dialed, key.server_port));
            }
            key.server = Peer::Address(backend.ip());
            key.server_port = backend.port();
        }
        (End::Server, Some(Translation::Client(client))) => {
            key.client = Peer::Address(*client);
        }
        _ => {}
    }
    key
}

/// A globally routable address: not private, loopback, link-local, carrier-grade NAT
/// (100.64.0.0/10), unique-local IPv6 (fc00::/7) or unspecified.
fn is_public(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// An endpoint as seen across the host, by the loopback rule the kernel program applies
/// too (`EndpointKey::new`).
fn endpoint(addr: [u8; 16], port: u16, netns: u32) -> (IpAddr, u16, u32) {
    let key = ridley_ebpf::EndpointKey::new(addr, port, netns);
    (ip(key.addr), key.port, key.netns)
}

struct Conn {
    link: LinkKey,
    end: End,
    /// What has been added to the link so far (absolute counter values).
    counted: SocketBytes,
    /// The walk generation that last saw it.
    seen: u64,
}

/// Live connections and the links they add up to.
pub struct Aggregator {
    conns: FastMap<ConnId, Conn>,
    links: FastMap<LinkKey, Link>,
    /// Connections closed since the last walk was applied: a walk that ran while they
    /// closed may still list them, and must not bring them back.
    closed_since_walk: FastSet<ConnId>,
    /// Connections left to their local peer's report: decided once, when both ends are
    /// in one walk, and kept, because a later walk of changed sockets may list one end
    /// without the other.
    left_to_peer: FastSet<ConnId>,
    /// Local ends of counted client connections the kernel could not record as local
    /// (`ENDPOINT_UNRECORDED`): their servers on this host report too, and a server first
    /// seen in a later walk than its client is left to the client. One entry per such
    /// counted connection, removed with it.
    unrecorded_clients: FastMap<(IpAddr, u16, u32), ConnId>,
    walk_generation: u64,
    idle_timeout: Duration,
    close_lost: u64,
    /// Close records of sockets never seen open (opened before start and closed before
    /// the first walk, or reported by the other, local, end).
    closed_unknown: u64,
    /// Connection samples kept per link per interval (for service-graph spans).
    samples_per_link: usize,
    /// Wall-clock time minus the kernel's monotonic clock, in ns.
    wall_minus_monotonic_ns: i128,
    /// State of the sampling PRNG (xorshift64*): statistical, not secret.
    /// Reservoir sampling of connection attempts: the process's one random source.
    rng: fastrand::Rng,
    host_netns: u32,
    max_links: usize,
    group_public_clients: bool,
    keep_client_ranges: Vec<ipnet::IpNet>,
    /// Records counted in the overflow series (the link limit was reached).
    link_limit_hits: u64,
    /// What conntrack said about connections about to be keyed (see `nat`); used once,
    /// when the connection is first counted, then dropped.
    translations: FastMap<ConnId, Translation>,
}

/// Sampling knobs and the clock the kernel's timestamps are converted with.
#[derive(Clone, Debug)]
pub struct AggregatorConfig {
    pub idle_timeout: Duration,
    pub samples_per_link: usize,
    /// Wall-clock time minus CLOCK_MONOTONIC, in ns (see `capture::wall_minus_monotonic_ns`).
    pub wall_minus_monotonic_ns: i128,
    /// Inode of the host's network namespace (`/proc/1/ns/net`).
    pub host_netns: u32,
    /// Links kept at most; beyond it, new links are counted in [`LinkKey::OVERFLOW`].
    pub max_links: usize,
    /// Group public client addresses into one client per server port.
    pub group_public_clients: bool,
    /// Client ranges never grouped (public ranges of partners, clusters on public IPs).
    pub keep_client_ranges: Vec<ipnet::IpNet>,
}

struct Link {
    stats: LinkStats,
    /// Connections in `conns` counted in this link, kept as they come and go: with
    /// 50,000 idle connections, recounting them every interval was a tenth of the
    /// daemon's time.
    open: u64,
    /// Monotonic time any counter of the link last changed: expiry must not follow a
    /// wall clock that can be stepped back (or forward) under us.
    last_change: Duration,
}

impl Link {
    /// Counts a connection attempt and keeps `sample` in the link's uniform sample of
    /// this interval (reservoir sampling, `random` the draw, `max` the sample's size).
    fn offer_sample(&mut self, sample: Option<ConnectionSample>, random: u64, max: usize) {
        let interval = &mut self.stats.interval;
        interval.attempts += 1;
        let Some(sample) = sample else { return };
        if interval.samples.len() < max {
            interval.samples.push(sample);
        } else if max > 0 {
            let slot = (random % interval.attempts) as usize;
            if slot < max {
                interval.samples[slot] = sample;
            }
        }
    }

    /// A connection seen opening: counted, with its handshake's duration.
    fn record_open(&mut self, rec: &SockRecord) {
        self.stats.opened += 1;
        if rec.established_ns > rec.start_ns {
            self.stats
                .connect_duration
                .record(Duration::from_nanos(rec.established_ns - rec.start_ns));
        }
    }

    fn add_payload(&mut self, end: End, delta: SocketBytes) {
        if delta == SocketBytes::default() {
            return;
        }
        let stats = &mut self.stats;
        let (transmit, receive) = match end {
            End::Client => (delta.sent, delta.received),
            End::Server => (delta.received, delta.sent),
        };
        stats.bytes_transmit += transmit;
        stats.bytes_receive += receive;
        stats.retransmits += delta.retransmits;
        stats.interval.carried_traffic |= transmit + receive > 0;
    }

    fn record_rtt(&mut self, rec: &SockRecord) {
        // srtt_us is kept multiplied by 8; 0 means no RTT sample yet.
        if rec.srtt_us_x8 > 0 {
            let rtt = Duration::from_nanos(u64::from(rec.srtt_us_x8) * 1000 / 8);
            self.stats.rtt.record(rtt);
            self.stats.interval.last_rtt = Some(rtt);
        }
    }

    /// One of its connections is gone from `conns`.
    fn leave(&mut self) {
        debug_assert!(self.open > 0, "a link left by more connections than it had");
        self.open = self.open.saturating_sub(1);
    }
}

/// The two clocks of one moment: wall time for what is exported, monotonic time (since
/// an arbitrary fixed point) for what is measured, such as idleness.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub wall: SystemTime,
    pub mono: Duration,
}

impl Now {
    pub fn current() -> Self {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let origin = *ORIGIN.get_or_init(std::time::Instant::now);
        Now {
            wall: SystemTime::now(),
            mono: origin.elapsed(),
        }
    }
}

impl Aggregator {
    pub fn new(config: AggregatorConfig) -> Self {
        Aggregator {
            conns: FastMap::default(),
            links: FastMap::default(),
            closed_since_walk: FastSet::default(),
            left_to_peer: FastSet::default(),
            unrecorded_clients: FastMap::default(),
            walk_generation: 0,
            idle_timeout: config.idle_timeout,
            close_lost: 0,
            closed_unknown: 0,
            samples_per_link: config.samples_per_link,
            wall_minus_monotonic_ns: config.wall_minus_monotonic_ns,
            rng: fastrand::Rng::new(),
            host_netns: config.host_netns,
            max_links: config.max_links,
            group_public_clients: config.group_public_clients,
            keep_client_ranges: config.keep_client_ranges,
            link_limit_hits: 0,
            translations: FastMap::default(),
        }
    }

    /// Whether a record's connection has not been counted in a link yet: only such a
    /// connection's link can still be translated.
    pub fn is_new(&self, rec: &SockRecord) -> bool {
        let id = ConnId::of(rec);
        !self.conns.contains_key(&id) && !self.left_to_peer.contains(&id)
    }

    /// Translations for the records applied next (replacing any left unused). A server
    /// end whose real client reports the connection is left to it like any other.
    pub fn set_translations(&mut self, mut translations: FastMap<ConnId, Translation>) {
        translations.retain(|id, translation| {
            let left = *translation == Translation::LeftToClient;
            if left {
                self.left_to_peer.insert(*id);
            }
            !left
        });
        self.translations = translations;
    }

    /// The link a connection is first counted in, translated when conntrack said so.
    fn key_of(&mut self, rec: &SockRecord, end: End) -> LinkKey {
        let translation = if self.translations.is_empty() {
            None
        } else {
            self.translations.remove(&ConnId::of(rec))
        };
        self.admit(translated(
            link_of(rec, end, self.host_netns),
            end,
            translation.as_ref(),
        ))
    }

    /// The link a connection's records are counted in: its own, with a public client
    /// grouped, or the overflow series once `max_links` links exist. This is what bounds
    /// the receiver's memory under a port scan or an internet-facing server.
    fn admit(&mut self, mut key: LinkKey) -> LinkKey {
        if let Peer::Address(client) = key.client {
            if self.group_public_clients
                && is_public(client)
                && !self
                    .keep_client_ranges
                    .iter()
                    .any(|net| net.contains(&client))
            {
                key.client = Peer::Address(match client {
                    IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                });
                key.client_cgroup = 0;
            }
        }
        if self.links.len() < self.max_links || self.links.contains_key(&key) {
            return key;
        }
        self.link_limit_hits += 1;
        LinkKey::OVERFLOW
    }

    fn wall_time(&self, monotonic_ns: u64) -> SystemTime {
        let wall = i128::from(monotonic_ns) + self.wall_minus_monotonic_ns;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(wall.max(0) as u64)
    }

    /// A connection attempt for a link's sample, and the reservoir's draw for it. Only
    /// connections seen opening have timestamps.
    fn sample_of(
        &mut self,
        rec: &SockRecord,
        failure: Option<FailureReason>,
    ) -> (Option<ConnectionSample>, u64) {
        let end_ns = if rec.established_ns != 0 {
            rec.established_ns
        } else {
            rec.ts_ns
        };
        let sample = (rec.start_ns != 0 && end_ns >= rec.start_ns).then(|| ConnectionSample {
            start: self.wall_time(rec.start_ns),
            duration: Duration::from_nanos(end_ns - rec.start_ns),
            failure,
        });
        (sample, self.rng.u64(..))
    }

    fn link_mut(&mut self, key: LinkKey, now: Now) -> &mut Link {
        let link = self.links.entry(key).or_insert_with(|| Link {
            stats: LinkStats::new(now.wall),
            open: 0,
            last_change: now.mono,
        });
        link.last_change = now.mono;
        link
    }

    /// A record from the ring buffer: a connection closed, or a connect failed.
    pub fn apply_event(&mut self, rec: &SockRecord, now: Now) {
        match rec.record_kind() {
            Some(RecordKind::ConnectFailed) => {
                let reason = if rec.sk_err == ECONNREFUSED {
                    FailureReason::Refused
                } else {
                    // No answer before the kernel (ETIMEDOUT) or the application gave up.
                    FailureReason::Timeout
                };
                let key = self.key_of(rec, End::Client);
                let (sample, random) = self.sample_of(rec, Some(reason));
                let max = self.samples_per_link;
                let link = self.link_mut(key, now);
                link.offer_sample(sample, random, max);
                link.stats.add_failure(reason);
            }
            Some(RecordKind::Closed) => self.apply_close(rec, now),
            Some(RecordKind::Live) | None => {}
        }
    }

    fn apply_close(&mut self, rec: &SockRecord, now: Now) {
        let id = ConnId::of(rec);
        self.closed_since_walk.insert(id);
        if self.left_to_peer.remove(&id) {
            return;
        }
        let final_payload = SocketBytes::of(rec);
        let failure = close_failure(rec);
        // Whether the connection was counted by an earlier walk, or opened and closed
        // between two walks (the whole connection is in this record).
        let (key, end, counted, opened_here) = match self.conns.remove(&id) {
            Some(conn) => {
                if conn.end == End::Client && rec.flags & flags::ENDPOINT_UNRECORDED != 0 {
                    self.unrecorded_clients.remove(&endpoint(
                        rec.local_addr,
                        rec.local_port,
                        rec.netns,
                    ));
                }
                (conn.link, conn.end, conn.counted, false)
            }
            None if !self.unrecorded_clients.is_empty()
                && rec.opened_as() == OpenedAs::Server
                && self.unrecorded_clients.contains_key(&endpoint(
                    rec.remote_addr,
                    rec.remote_port,
                    rec.netns,
                )) =>
            {
                // The server of a client counted from a walk: the client reports it.
                return;
            }
            None if rec.flags & flags::TRACKED != 0 => {
                let end = if rec.opened_as() == OpenedAs::Server {
                    End::Server
                } else {
                    End::Client
                };
                (self.key_of(rec, end), end, SocketBytes::baseline(rec), true)
            }
            None => {
                self.closed_unknown += 1;
                return;
            }
        };
        // An open sampled in an earlier walk is not offered again; a reset is an
        // attempt of its own.
        let offer = (opened_here || failure.is_some()).then(|| self.sample_of(rec, failure));
        let max = self.samples_per_link;
        // One lookup of the link for all of the record.
        let link = self.link_mut(key, now);
        if let Some((sample, random)) = offer {
            link.offer_sample(sample, random, max);
        }
        if opened_here {
            link.record_open(rec);
        } else {
            link.leave();
        }
        // A close is a change of the link even when it carried no new bytes.
        link.stats.reported_by_server = end == End::Server;
        link.add_payload(end, final_payload.since(counted));
        link.record_rtt(rec);
        if let Some(reason) = failure {
            link.stats.add_failure(reason);
        }
    }

    /// A walk of the live sockets of every network namespace: listeners and the
    /// connections whose counters changed since they were last reported, or every
    /// socket when `full`. Only a full walk that is `complete` (every namespace walked)
    /// can tell that a connection vanished: one missing from any other walk is idle, or
    /// lives in a namespace that was not seen.
    pub fn apply_walk(&mut self, records: &[SockRecord], now: Now, full: bool, complete: bool) {
        self.walk_generation += 1;
        let generation = self.walk_generation;

        // Listeners give connections that predate the programs their role.
        let listeners: FastSet<(u32, u16, IpAddr)> = records
            .iter()
            .filter(|r| r.state == tcp_state::LISTEN)
            .map(|r| (r.netns, r.local_port, ip(r.local_addr)))
            .collect();
        let is_server = |r: &SockRecord| {
            let local = ip(r.local_addr);
            let any = match local {
                IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            listeners.contains(&(r.netns, r.local_port, local))
                || listeners.contains(&(r.netns, r.local_port, any))
                || listeners.contains(&(r.netns, r.local_port, IpAddr::V6(Ipv6Addr::UNSPECIFIED)))
        };
        let end_of = |r: &SockRecord| -> End {
            match r.opened_as() {
                OpenedAs::Client => End::Client,
                OpenedAs::Server => End::Server,
                OpenedAs::Unknown if is_server(r) => End::Server,
                OpenedAs::Unknown => End::Client,
            }
        };
        // Local client ends, so that a server socket whose client is on this host is
        // left to the client's report (each link once). The kernel does this for
        // connections it saw open; this covers the ones that predate it.
        let client_endpoints: FastSet<(IpAddr, u16, u32)> = records
            .iter()
            .filter(|r| is_connected(r.state) && end_of(r) == End::Client)
            .map(|r| endpoint(r.local_addr, r.local_port, r.netns))
            .collect();
        // Peers of the server sockets that report their link themselves: seen opening
        // (exact from the handshake) and not told by the kernel that the client is local.
        // A client socket on this host that the kernel could not track (its table was
        // full) is then left to that server: a full table may lose data, never count a
        // connection from both ends.
        let reported_by_local_server: FastSet<(IpAddr, u16, u32)> = records
            .iter()
            .filter(|r| {
                is_connected(r.state)
                    && r.opened_as() == OpenedAs::Server
                    && r.flags & flags::TRACKED != 0
            })
            .map(|r| endpoint(r.remote_addr, r.remote_port, r.netns))
            .collect();

        for rec in records {
            if !is_connected(rec.state) {
                continue;
            }
            let id = ConnId::of(rec);
            if self.closed_since_walk.contains(&id) || self.left_to_peer.contains(&id) {
                continue;
            }
            let now_payload = SocketBytes::of(rec);
            if let Some(conn) = self.conns.get_mut(&id) {
                conn.seen = generation;
                let delta = now_payload.since(conn.counted);
                conn.counted = conn.counted.max(now_payload);
                let (key, end) = (conn.link, conn.end);
                let link = self.link_mut(key, now);
                link.add_payload(end, delta);
                link.record_rtt(rec);
                continue;
            }
            let end = end_of(rec);
            let tracked = rec.flags & flags::TRACKED != 0;
            // An untracked end whose local peer reports the connection is left to it; so
            // is a client whose server could not be told that it is local.
            let peer_reports = match end {
                End::Server => {
                    let client = endpoint(rec.remote_addr, rec.remote_port, rec.netns);
                    (!tracked && client_endpoints.contains(&client))
                        // Its client was counted in an earlier walk, without this end.
                        || (tracked
                            && !self.unrecorded_clients.is_empty()
                            && self.unrecorded_clients.contains_key(&client))
                }
                End::Client => {
                    (!tracked || rec.flags & flags::ENDPOINT_UNRECORDED != 0)
                        && reported_by_local_server.contains(&endpoint(
                            rec.local_addr,
                            rec.local_port,
                            rec.netns,
                        ))
                }
            };
            if peer_reports {
                self.left_to_peer.insert(id);
                continue;
            }
            let key = self.key_of(rec, end);
            if end == End::Client && tracked && rec.flags & flags::ENDPOINT_UNRECORDED != 0 {
                self.unrecorded_clients
                    .insert(endpoint(rec.local_addr, rec.local_port, rec.netns), id);
            }
            let offer = tracked.then(|| self.sample_of(rec, None));
            let max = self.samples_per_link;
            let link = self.link_mut(key, now);
            let counted = match offer {
                Some((sample, random)) => {
                    link.offer_sample(sample, random, max);
                    link.record_open(rec);
                    SocketBytes::baseline(rec)
                }
                // Opened before the programs were attached: count from now on.
                None => now_payload,
            };
            link.stats.reported_by_server = end == End::Server;
            link.add_payload(end, now_payload.since(counted));
            link.record_rtt(rec);
            link.open += 1;
            self.conns.insert(
                id,
                Conn {
                    link: key,
                    end,
                    counted: counted.max(now_payload),
                    seen: generation,
                },
            );
        }

        self.closed_since_walk.clear();
        // Translations are for the records of this round only.
        self.translations.clear();
        if !(full && complete) {
            return;
        }
        // Seen before, absent from a walk of every socket, and no close record: the
        // record was lost.
        let mut lost = Vec::new();
        self.conns.retain(|_, conn| {
            let live = conn.seen == generation;
            if !live {
                lost.push(conn.link);
            }
            live
        });
        let seen: FastSet<ConnId> = records.iter().map(ConnId::of).collect();
        self.left_to_peer.retain(|id| seen.contains(id));
        let conns = &self.conns;
        self.unrecorded_clients
            .retain(|_, id| conns.contains_key(id));
        self.close_lost += lost.len() as u64;
        for key in lost {
            self.link_mut(key, now).leave();
        }
        shrink_after_burst!(
            self.conns,
            self.links,
            self.closed_since_walk,
            self.left_to_peer,
            self.unrecorded_clients,
        );
    }

    /// Adds what the kernel's UDP flows carried since the last drain: each flow's
    /// connected end is the client, so a UDP link is reported once, by the client's node.
    pub fn apply_udp(&mut self, flows: &[(UdpFlowKey, UdpFlowCounts)], now: Now) {
        for (flow, counts) in flows {
            let cgroup = if flow.netns == self.host_netns {
                flow.cgroup_id
            } else {
                0
            };
            let key = self.admit(LinkKey::udp(
                ip(flow.client_addr),
                ip(flow.server_addr),
                flow.server_port,
                cgroup,
            ));
            let stats = &mut self.link_mut(key, now).stats;
            stats.bytes_transmit += counts.sent_bytes;
            stats.bytes_receive += counts.received_bytes;
            stats.datagrams_transmit += counts.sent_datagrams;
            stats.datagrams_receive += counts.received_datagrams;
            stats.interval.carried_traffic = true;
        }
    }

    /// The cumulative state of every link, after expiring links idle for `idle_timeout`
    /// with no open connection.
    pub fn collect(&mut self, now: Now) -> Vec<(LinkKey, LinkStats)> {
        let idle_timeout = self.idle_timeout;
        self.links.retain(|_, link| {
            link.open > 0 || now.mono.saturating_sub(link.last_change) < idle_timeout
        });
        let mut out: Vec<(LinkKey, LinkStats)> = self
            .links
            .iter_mut()
            .map(|(key, link)| {
                if link.stats.active != link.open {
                    link.stats.active = link.open;
                    link.last_change = now.mono;
                }
                let mut stats = link.stats.clone();
                stats.interval = std::mem::take(&mut link.stats.interval);
                (*key, stats)
            })
            .collect();
        out.sort_by_key(|(key, _)| *key);
        out
    }

    /// Receiver-side losses (the kernel's are read from its counters).
    pub fn add_losses(&self, losses: &mut Losses) {
        losses.close_lost = self.close_lost;
        losses.link_limit = self.link_limit_hits;
    }

    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// Close records of sockets never seen open (self-telemetry for debugging).
    pub fn closed_unknown(&self) -> u64 {
        self.closed_unknown
    }

    /// Entries and capacity of each table, for the debug log: a hash table's capacity
    /// follows its highest point and is kept, so a burst shows here after it is gone.
    pub fn table_sizes(&self) -> TableSizes {
        TableSizes {
            conns: (self.conns.len(), self.conns.capacity()),
            links: (self.links.len(), self.links.capacity()),
            closed_since_walk: (
                self.closed_since_walk.len(),
                self.closed_since_walk.capacity(),
            ),
            left_to_peer: (self.left_to_peer.len(), self.left_to_peer.capacity()),
            unrecorded_clients: (
                self.unrecorded_clients.len(),
                self.unrecorded_clients.capacity(),
            ),
        }
    }
}

/// (entries, capacity) of the aggregator's tables (see [`Aggregator::table_sizes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSizes {
    pub conns: (usize, usize),
    pub links: (usize, usize),
    pub closed_since_walk: (usize, usize),
    pub left_to_peer: (usize, usize),
    pub unrecorded_clients: (usize, usize),
}

/// Established (data can flow) states: the ones whose counters belong to a link.
pub fn is_connected(state: u8) -> bool {
    matches!(
        state,
        tcp_state::ESTABLISHED
            | tcp_state::FIN_WAIT1
            | tcp_state::FIN_WAIT2
            | tcp_state::CLOSE_WAIT
            | tcp_state::CLOSING
            | tcp_state::LAST_ACK
    )
}

/// How an established connection ended, when it did not end well.
fn close_failure(rec: &SockRecord) -> Option<FailureReason> {
    match rec.sk_err {
        ECONNRESET | EPIPE => return Some(FailureReason::Reset),
        ETIMEDOUT => return Some(FailureReason::Timeout),
        _ => {}
    }
    // Leaving ESTABLISHED or CLOSE_WAIT straight for CLOSE, without a FIN exchange, is
    // an abortive close: this end sent a RST (SO_LINGER 0, unread data, abort).
    matches!(rec.state, tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT)
        .then_some(FailureReason::Reset)
}

/// An IPv4 address as the kernel records it (IPv4-mapped IPv6), for tests.
#[cfg(test)]
pub(crate) fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12..].copy_from_slice(&a);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MIN_TABLE_CAPACITY, shrunk_capacity};
    use ridley_ebpf::{kind, role};

    const T0: u64 = 1_000_000_000;

    #[test]
    fn loopback_endpoints_are_per_namespace_and_others_per_host() {
        let mapped = |v4: [u8; 4]| {
            let mut a = [0u8; 16];
            a[10] = 0xff;
            a[11] = 0xff;
            a[12..].copy_from_slice(&v4);
            a
        };
        let mut v6_loopback = [0u8; 16];
        v6_loopback[15] = 1;
        assert_eq!(endpoint(mapped([127, 0, 0, 2]), 80, 7).2, 7);
        assert_eq!(endpoint(v6_loopback, 80, 7).2, 7);
        assert_eq!(
            endpoint(mapped([10, 0, 0, 1]), 80, 7),
            ("10.0.0.1".parse().unwrap(), 80, 0)
        );
        // 128.0.0.1 is not loopback, whatever its first bits.
        assert_eq!(endpoint(mapped([128, 0, 0, 1]), 80, 7).2, 0);
    }

    fn config(idle_secs: u64) -> AggregatorConfig {
        AggregatorConfig {
            idle_timeout: Duration::from_secs(idle_secs),
            samples_per_link: 2,
            // Monotonic 0 is wall-clock 1_700_000_000 s.
            wall_minus_monotonic_ns: 1_700_000_000 * 1_000_000_000,
            host_netns: 1,
            max_links: 100,
            group_public_clients: true,
            keep_client_ranges: vec!["203.0.113.0/24".parse().unwrap()],
        }
    }

    /// A tracked client socket 10.0.0.1:40000 -> 10.0.0.2:80, established with the
    /// kernel's handshake baseline (SYN acked = 1 byte, nothing received).
    fn client(sk: u64) -> SockRecord {
        SockRecord {
            sk,
            start_ns: T0,
            established_ns: T0 + 250_000,
            local_addr: v4([10, 0, 0, 1]),
            remote_addr: v4([10, 0, 0, 2]),
            local_port: 40000,
            remote_port: 80,
            netns: 7,
            role: role::CLIENT,
            flags: flags::TRACKED,
            base_bytes_acked: 1,
            base_bytes_received: 0,
            bytes_acked: 1,
            srtt_us_x8: 8 * 300,
            ..SockRecord::default()
        }
    }

    fn live(mut rec: SockRecord, acked: u64, received: u64) -> SockRecord {
        rec.kind = kind::LIVE;
        rec.state = tcp_state::ESTABLISHED;
        rec.bytes_acked = acked;
        rec.bytes_received = received;
        rec
    }

    /// A normal active close from FIN_WAIT2: our FIN acked, the peer's FIN received.
    fn closed(mut rec: SockRecord, payload_sent: u64, payload_received: u64) -> SockRecord {
        rec.kind = kind::CLOSED;
        rec.state = tcp_state::FIN_WAIT2;
        rec.bytes_acked = u64::from(rec.base_bytes_acked) + payload_sent + 1;
        rec.bytes_received = u64::from(rec.base_bytes_received) + payload_received + 1;
        rec.flags |= flags::ALL_ACKED | flags::PEER_FIN;
        rec
    }

    fn key() -> LinkKey {
        LinkKey::between(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            80,
            0,
        )
    }

    /// UDP flows add to their link drain after drain; the client's cgroup is kept only
    /// in the host's network namespace, so two containers of one pod are one link.
    #[test]
    fn udp_flows_add_up_per_link_and_keep_the_cgroup_only_on_the_host() {
        let mut agg = Aggregator::new(config(300));
        let flow = |netns: u32, cgroup: u64| UdpFlowKey {
            client_addr: v4([10, 0, 0, 1]),
            server_addr: v4([10, 0, 0, 53]),
            cgroup_id: cgroup,
            netns,
            server_port: 53,
            _pad: 0,
        };
        let counts = |n: u64| UdpFlowCounts {
            sent_datagrams: n,
            sent_bytes: 40 * n,
            received_datagrams: n,
            received_bytes: 120 * n,
        };
        agg.apply_udp(
            &[(flow(7, 100), counts(2)), (flow(7, 200), counts(1))],
            at(1),
        );
        agg.apply_udp(
            &[(flow(1, 100), counts(3)), (flow(7, 100), counts(4))],
            at(2),
        );
        let links = agg.collect(at(2));
        let pod = LinkKey::udp(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.53".parse().unwrap(),
            53,
            0,
        );
        let host = LinkKey {
            client_cgroup: 100,
            ..pod
        };
        let find = |key: LinkKey| {
            let (_, s) = links.iter().find(|(k, _)| *k == key).expect("the link");
            (
                s.datagrams_transmit,
                s.bytes_transmit,
                s.datagrams_receive,
                s.bytes_receive,
            )
        };
        assert_eq!(links.len(), 2);
        assert_eq!(find(pod), (7, 280, 7, 840));
        assert_eq!(find(host), (3, 120, 3, 360));
        assert_eq!(pod.transport, crate::model::Transport::Udp);
    }

    fn at(secs: u64) -> Now {
        Now {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs),
            mono: Duration::from_secs(secs),
        }
    }

    #[test]
    fn short_connection_counts_payload_without_syn_and_fin() {
        let mut agg = Aggregator::new(config(60));
        agg.apply_event(&closed(client(1), 1000, 250), at(1));
        let links = agg.collect(at(1));
        assert_eq!(links.len(), 1);
        let (k, s) = &links[0];
        assert_eq!(*k, key());
        assert_eq!(
            (s.bytes_transmit, s.bytes_receive, s.opened, s.active),
            (1000, 250, 1, 0)
        );
        assert_eq!(s.failed_total(), 0);
        assert_eq!(s.connect_duration.count, 1);
        assert_eq!(s.connect_duration.sum, 0.00025);
        assert_eq!(s.rtt.count, 1);
        assert_eq!(s.rtt.sum, 0.0003);
    }

    #[test]
    fn long_connection_is_counted_by_walks_then_close_without_double_counting() {
        let mut agg = Aggregator::new(config(60));
        agg.apply_walk(&[live(client(1), 1 + 100, 40)], at(1), true, true);
        let s = agg.collect(at(1))[0].1.clone();
        assert_eq!(
            (s.bytes_transmit, s.bytes_receive, s.opened, s.active),
            (100, 40, 1, 1)
        );

        agg.apply_walk(&[live(client(1), 1 + 300, 90)], at(2), true, true);
        let s = agg.collect(at(2))[0].1.clone();
        assert_eq!(
            (s.bytes_transmit, s.bytes_receive, s.opened, s.active),
            (300, 90, 1, 1)
        );

        agg.apply_event(&closed(client(1), 350, 95), at(3));
        agg.apply_walk(&[], at(3), true, true);
        let s = agg.collect(at(3))[0].1.clone();
        assert_eq!(
            (s.bytes_transmit, s.bytes_receive, s.opened, s.active),
            (350, 95, 1, 0)
        );
        assert_eq!(agg.close_lost, 0);
    }

    /// A burst of connections grows the tables; once the burst has closed and expired,
    /// a full walk gives the memory back, and a steady table is left as it is.
    #[test]
    fn tables_give_their_capacity_back_after_a_burst() {
        let mut agg = Aggregator::new(config(60));
        let burst: Vec<SockRecord> = (1..=20_000u64)
            .map(|sk| {
                let mut rec = live(client(sk), 1 + 10, 5);
                rec.local_port = 20_000 + (sk % 40_000) as u16;
                rec.remote_port = 1 + (sk % 50) as u16;
                rec
            })
            .collect();
        agg.apply_walk(&burst, at(1), true, true);
        let grown = agg.table_sizes();
        assert_eq!((grown.conns.0, grown.links.0), (20_000, 50));
        assert!(grown.conns.1 >= 20_000);

        for rec in &burst {
            agg.apply_event(&closed(*rec, 10, 5), at(2));
        }
        agg.apply_walk(&[], at(2), true, true);
        let after = agg.table_sizes();
        assert_eq!(after.conns.0, 0);
        assert!(after.conns.1 < 2 * MIN_TABLE_CAPACITY, "{after:?}");
        // The burst's bytes were all counted before its tables were cut.
        let links = agg.collect(at(2));
        assert_eq!(links.iter().map(|(_, s)| s.opened).sum::<u64>(), 20_000);
        assert_eq!(
            links.iter().map(|(_, s)| s.bytes_transmit).sum::<u64>(),
            200_000
        );

        // Steady: 3,000 open connections stay put through full walks (no shrink and
        // regrow every minute).
        let steady = &burst[..3_000];
        agg.apply_walk(steady, at(3), true, true);
        let before = agg.table_sizes().conns.1;
        agg.apply_walk(steady, at(4), true, true);
        assert_eq!(agg.table_sizes().conns, (3_000, before));
    }

    #[test]
    fn shrunk_capacity_cuts_only_tables_used_under_a_quarter() {
        assert_eq!(shrunk_capacity(0, 1_792), None);
        assert_eq!(shrunk_capacity(0, 3_584), Some(MIN_TABLE_CAPACITY));
        assert_eq!(shrunk_capacity(2_000, 7_168), None);
        assert_eq!(shrunk_capacity(2_000, 28_672), Some(4_000));
    }

    #[test]
    fn walk_racing_a_close_does_not_resurrect_the_connection() {
        let mut agg = Aggregator::new(config(60));
        // The close record arrives while the walk that still listed the socket runs.
        agg.apply_event(&closed(client(1), 10, 20), at(1));
        agg.apply_walk(&[live(client(1), 1 + 10, 20)], at(1), true, true);
        let s = agg.collect(at(1))[0].1.clone();
        assert_eq!(
            (s.bytes_transmit, s.bytes_receive, s.opened, s.active),
            (10, 20, 1, 0)
        );
    }

    #[test]
    fn server_end_reports_with_directions_swapped() {
        let mut agg = Aggregator::new(config(60));
        let mut server = client(2);
        server.role = role::SERVER;
        server.local_addr = v4([10, 0, 0, 2]);
        server.local_port = 80;
        server.remote_addr = v4([10, 0, 0, 1]);
        server.remote_port = 40000;
        server.base_bytes_acked = 0;
        // Passive close from LAST_ACK: FIN acked, peer FIN received.
        let mut rec = closed(server, 250, 1000);
        rec.state = tcp_state::LAST_ACK;
        agg.apply_event(&rec, at(1));
        let (k, s) = agg.collect(at(1))[0].clone();
        assert_eq!(k, key());
        assert_eq!((s.bytes_transmit, s.bytes_receive), (1000, 250));
        assert!(s.reported_by_server);
    }

    #[test]
    fn failures_are_classified() {
        let mut agg = Aggregator::new(config(60));
        let mut refused = client(1);
        refused.kind = kind::CONNECT_FAILED;
        refused.state = tcp_state::SYN_SENT;
        refused.sk_err = ECONNREFUSED;
        agg.apply_event(&refused, at(1));
        let mut timeout = refused;
        timeout.sk = 2;
        timeout.sk_err = ETIMEDOUT;
        agg.apply_event(&timeout, at(1));
        let mut reset = closed(client(3), 5, 0);
        reset.state = tcp_state::ESTABLISHED;
        reset.flags = flags::TRACKED;
        reset.bytes_acked = 1 + 5; // no FIN: aborted
        reset.bytes_received = 0;
        reset.sk_err = ECONNRESET;
        agg.apply_event(&reset, at(1));
        let s = agg.collect(at(1))[0].1.clone();
        assert_eq!(s.failed(FailureReason::Refused), 1);
        assert_eq!(s.failed(FailureReason::Timeout), 1);
        assert_eq!(s.failed(FailureReason::Reset), 1);
        assert_eq!(s.opened, 1, "only the reset connection was established");
        assert_eq!(s.bytes_transmit, 5);
    }

    #[test]
    fn abortive_close_without_error_is_a_reset() {
        let mut rec = closed(client(1), 0, 0);
        rec.state = tcp_state::ESTABLISHED;
        assert_eq!(close_failure(&rec), Some(FailureReason::Reset));
        rec.state = tcp_state::FIN_WAIT2;
        assert_eq!(close_failure(&rec), None);
    }

    #[test]
    fn preexisting_connection_counts_from_first_walk_with_role_from_listener() {
        let mut agg = Aggregator::new(config(60));
        // Server side of a connection opened before start: no role, no baseline.
        let mut server = live(SockRecord::default(), 5000, 7000);
        server.sk = 9;
        server.local_addr = v4([10, 0, 0, 2]);
        server.local_port = 80;
        server.remote_addr = v4([10, 0, 0, 1]);
        server.remote_port = 40000;
        server.netns = 3;
        let mut listener = SockRecord {
            state: tcp_state::LISTEN,
            local_port: 80,
            netns: 3,
            ..SockRecord::default()
        };
        listener.local_addr = v4([0, 0, 0, 0]);
        agg.apply_walk(&[listener, server], at(1), true, true);
        let s = agg.collect(at(1))[0].1.clone();
        assert_eq!(agg.collect(at(1))[0].0, key());
        assert_eq!(
            (s.bytes_transmit, s.bytes_receive, s.opened, s.active),
            (0, 0, 0, 1)
        );

        server.bytes_acked += 30; // server -> client
        server.bytes_received += 20; // client -> server
        agg.apply_walk(&[listener, server], at(2), true, true);
        let s = agg.collect(at(2))[0].1.clone();
        assert_eq!((s.bytes_transmit, s.bytes_receive), (20, 30));
    }

    /// Both live ends of 10.0.0.1:40000 -> 10.0.0.2:80 on this host, in namespaces 1 and
    /// 2, untracked, with the given (acked, received) counters.
    fn local_pair(client: (u64, u64), server: (u64, u64)) -> (SockRecord, SockRecord) {
        let mut c = live(SockRecord::default(), client.0, client.1);
        c.sk = 1;
        c.local_addr = v4([10, 0, 0, 1]);
        c.local_port = 40000;
        c.remote_addr = v4([10, 0, 0, 2]);
        c.remote_port = 80;
        c.netns = 1;
        let mut s = live(SockRecord::default(), server.0, server.1);
        s.sk = 2;
        s.local_addr = c.remote_addr;
        s.local_port = 80;
        s.remote_addr = c.local_addr;
        s.remote_port = 40000;
        s.netns = 2;
        (c, s)
    }

    /// A `local_pair` end the kernel saw opening, in `role`.
    fn seen_opening(mut rec: SockRecord, role: u8, flags: u8) -> SockRecord {
        rec.role = role;
        rec.flags = flags;
        rec.start_ns = T0;
        rec.established_ns = T0 + 1000;
        // The handshake's SYN, as the kernel's counters include it.
        rec.base_bytes_acked = 1;
        rec.base_bytes_received = 1;
        rec
    }

    /// The listener of `local_pair`'s server.
    fn local_pair_listener() -> SockRecord {
        SockRecord {
            state: tcp_state::LISTEN,
            local_port: 80,
            netns: 2,
            local_addr: v4([10, 0, 0, 2]),
            ..SockRecord::default()
        }
    }

    #[test]
    fn preexisting_pair_on_one_host_is_reported_once_by_the_client() {
        let mut agg = Aggregator::new(config(60));
        let (c, s) = local_pair((10, 10), (10, 10));
        let listener = local_pair_listener();
        agg.apply_walk(&[c, s, listener], at(1), true, true);
        assert_eq!(agg.open_connections(), 1);
        assert_eq!(agg.collect(at(1))[0].0, key());
    }

    #[test]
    fn untracked_client_of_a_tracked_local_server_is_left_to_the_server() {
        // The client's socket did not fit the kernel's table; its server's did, and saw
        // no local client endpoint: the server reports, the client must not as well.
        let mut agg = Aggregator::new(config(60));
        let (c, s) = local_pair((501, 1), (1, 501));
        let s = seen_opening(s, role::SERVER, flags::TRACKED);
        agg.apply_walk(&[c, s], at(1), true, true);
        assert_eq!(agg.open_connections(), 1);
        let links = agg.collect(at(1));
        assert_eq!(links.len(), 1);
        assert_eq!(links[0].0, key());
        assert_eq!(
            links[0].1.bytes_transmit, 500,
            "the client's 500 bytes, counted once"
        );
    }

    /// A client the kernel could not record as local, counted from a walk that did not
    /// see its server yet (the server's handshake had not completed): the server, first
    /// seen in the next walk and at its close, is left to the client; counted once.
    #[test]
    fn server_seen_after_its_unrecorded_client_is_left_to_the_client() {
        let mut agg = Aggregator::new(config(60));
        let (c, s) = local_pair((501, 1), (1, 501));
        let c = seen_opening(c, role::CLIENT, flags::TRACKED | flags::ENDPOINT_UNRECORDED);
        let s = seen_opening(s, role::SERVER, flags::TRACKED);
        agg.apply_walk(&[c], at(1), false, true);
        agg.apply_walk(&[s], at(2), false, true);
        assert_eq!(agg.open_connections(), 1);
        agg.apply_event(&closed(s, 1, 500), at(3));
        agg.apply_event(&closed(c, 500, 1), at(3));
        assert_eq!(agg.open_connections(), 0);
        let links = agg.collect(at(3));
        assert_eq!(links.len(), 1, "{links:?}");
        assert_eq!(links[0].0, key());
        assert_eq!(links[0].1.opened, 1);
        assert_eq!(
            (links[0].1.bytes_transmit, links[0].1.bytes_receive),
            (500, 1),
            "the client's bytes, once"
        );
        assert!(agg.unrecorded_clients.is_empty());
    }

    #[test]
    fn links_beyond_the_limit_go_to_the_overflow_series() {
        let mut config = config(60);
        config.max_links = 3;
        let mut agg = Aggregator::new(config);
        // A scan: one client, 10 closed ports.
        for port in 0..10u16 {
            let mut refused = client(u64::from(port) + 1);
            refused.kind = kind::CONNECT_FAILED;
            refused.state = tcp_state::SYN_SENT;
            refused.established_ns = 0;
            refused.sk_err = 111;
            refused.remote_port = 1000 + port;
            agg.apply_event(&refused, at(1));
        }
        let links = agg.collect(at(1));
        assert_eq!(links.len(), 4, "3 links and the overflow series");
        let overflow = links
            .iter()
            .find(|(k, _)| k.is_overflow())
            .expect("overflow");
        assert_eq!(overflow.1.failed(FailureReason::Refused), 7);
        let total: u64 = links
            .iter()
            .map(|(_, s)| s.failed(FailureReason::Refused))
            .sum();
        assert_eq!(total, 10, "nothing lost, only grouped");
        let mut losses = Losses::default();
        agg.add_losses(&mut losses);
        assert_eq!(losses.link_limit, 7);
    }

    #[test]
    fn public_clients_are_grouped_per_server_port_unless_kept() {
        let mut agg = Aggregator::new(config(60));
        let server_of = |sk: u64, peer: [u8; 4]| {
            let mut rec = closed(client(sk), 10, 20);
            rec.role = role::SERVER;
            rec.local_addr = v4([10, 0, 0, 2]);
            rec.local_port = 443;
            rec.remote_addr = v4(peer);
            rec.remote_port = 50000;
            rec
        };
        for (sk, peer) in [
            (1, [8, 8, 8, 8]),
            (2, [1, 1, 1, 1]),
            (3, [203, 0, 113, 5]),
            (4, [10, 9, 9, 9]),
            (5, [100, 64, 0, 1]),
        ] {
            agg.apply_event(&server_of(sk, peer), at(1));
        }
        let clients: Vec<String> = agg
            .collect(at(1))
            .iter()
            .map(|(k, s)| format!("{}:{}", k.client, s.opened))
            .collect();
        assert_eq!(
            clients,
            ["0.0.0.0:2", "10.9.9.9:1", "100.64.0.1:1", "203.0.113.5:1"]
        );
    }

    #[test]
    fn a_socket_left_to_its_peer_is_not_counted_against_the_link_limit() {
        let mut config = config(60);
        config.max_links = 1;
        let mut agg = Aggregator::new(config);
        let mut other = closed(client(9), 1, 1);
        other.remote_port = 443;
        agg.apply_event(&other, at(1));
        let (c, mut s) = local_pair((501, 1), (1, 501));
        s.role = role::SERVER;
        s.flags = flags::TRACKED;
        for t in 1..=3 {
            // The untracked client is skipped every walk; only the server is admitted,
            // once, into the overflow series.
            agg.apply_walk(&[c, s], at(t), true, true);
        }
        let mut losses = Losses::default();
        agg.add_losses(&mut losses);
        assert_eq!(losses.link_limit, 1);
        assert_eq!(agg.open_connections(), 1);
    }

    #[test]
    fn idle_expiry_follows_the_monotonic_clock_not_the_wall_clock() {
        let mut agg = Aggregator::new(config(30));
        agg.apply_event(&closed(client(1), 10, 20), at(1));
        // The wall clock is stepped back a day, then forward a day: neither is idleness.
        let mut back = at(20);
        back.wall -= Duration::from_secs(86_400);
        assert_eq!(agg.collect(back).len(), 1);
        let mut forward = at(25);
        forward.wall += Duration::from_secs(86_400);
        assert_eq!(agg.collect(forward).len(), 1);
        assert!(
            agg.collect(at(31)).is_empty(),
            "30 s of monotonic idleness expires it"
        );
    }

    #[test]
    fn vanished_connection_is_counted_as_lost_and_idle_links_expire() {
        let mut agg = Aggregator::new(config(30));
        agg.apply_walk(&[live(client(1), 11, 0)], at(0), true, true);
        agg.apply_walk(&[], at(10), true, true);
        assert_eq!(agg.close_lost, 1);
        let links = agg.collect(at(10));
        assert_eq!(links[0].1.active, 0);
        // Still within the idle timeout of its last change (active 1 -> 0 at t=10).
        assert_eq!(agg.collect(at(39)).len(), 1);
        assert!(agg.collect(at(40)).is_empty(), "idle for 30 s: expired");
    }

    #[test]
    fn an_idle_connection_left_out_of_a_walk_of_changed_sockets_stays_open() {
        let mut agg = Aggregator::new(config(30));
        agg.apply_walk(&[live(client(1), 1 + 100, 40)], at(0), true, true);
        // Idle: the kernel does not report it again until its counters change.
        for t in 1..5 {
            agg.apply_walk(&[], at(t * 10), false, true);
        }
        assert_eq!((agg.close_lost, agg.open_connections()), (0, 1));
        agg.apply_walk(&[live(client(1), 1 + 150, 40)], at(50), false, true);
        let links = agg.collect(at(50));
        assert_eq!(links.len(), 1, "never expired: its connection is open");
        assert_eq!(
            (links[0].1.active, links[0].1.bytes_transmit),
            (1, 150),
            "the change counted once, on top of what was counted"
        );
        // A full walk that does not list it: its close record was lost.
        agg.apply_walk(&[], at(60), true, true);
        assert_eq!((agg.close_lost, agg.open_connections()), (1, 0));
    }

    #[test]
    fn a_pair_left_to_the_client_stays_left_when_a_later_walk_lists_only_the_server() {
        let mut agg = Aggregator::new(config(60));
        let (c, s) = local_pair((10, 10), (10, 10));
        let listener = local_pair_listener();
        agg.apply_walk(&[c, s, listener], at(1), true, true);
        // Only the server's counters changed since: without its client in the walk, it
        // must still not be counted as a second link.
        let (_, s_later) = local_pair((10, 10), (10, 510));
        agg.apply_walk(&[s_later, listener], at(2), false, true);
        assert_eq!(agg.open_connections(), 1);
        let links = agg.collect(at(2));
        assert_eq!(links.len(), 1);
        assert_eq!(links[0].0, key());
    }

    #[test]
    fn link_with_open_connection_never_expires() {
        let mut agg = Aggregator::new(config(30));
        for t in 0..10 {
            agg.apply_walk(&[live(client(1), 11, 0)], at(t * 60), true, true);
            assert_eq!(agg.collect(at(t * 60)).len(), 1);
        }
    }

    #[test]
    fn interval_activity_samples_attempts_uniformly_and_resets() {
        let mut agg = Aggregator::new(config(60));
        for sk in 0..5 {
            agg.apply_event(&closed(client(sk), 10, 10), at(1));
        }
        let mut refused = client(99);
        refused.kind = kind::CONNECT_FAILED;
        refused.state = tcp_state::SYN_SENT;
        refused.sk_err = ECONNREFUSED;
        refused.established_ns = 0;
        refused.ts_ns = T0 + 1_000_000;
        agg.apply_event(&refused, at(1));
        let s = agg.collect(at(1))[0].1.clone();
        assert_eq!(s.interval.attempts, 6);
        assert_eq!(s.interval.samples.len(), 2, "capped at samples_per_link");
        assert!(s.interval.carried_traffic);
        assert_eq!(s.interval.last_rtt, Some(Duration::from_micros(300)));
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_001);
        for sample in &s.interval.samples {
            assert_eq!(sample.start, start);
            match sample.failure {
                None => assert_eq!(sample.duration, Duration::from_micros(250)),
                Some(FailureReason::Refused) => {
                    assert_eq!(sample.duration, Duration::from_millis(1))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // The next interval starts empty; cumulative counters stay.
        let s = agg.collect(at(2))[0].1.clone();
        assert_eq!(s.interval, crate::model::IntervalActivity::default());
        assert_eq!(s.opened, 5);
    }

    /// A client counted under the backend conntrack named, the address dialled kept;
    /// a server whose real client reports the connection is not counted.
    #[test]
    fn translations_apply_when_a_connection_is_first_counted() {
        let mut agg = Aggregator::new(config(300));
        let dialed = client(1);
        let mut server = client(2);
        server.role = role::SERVER;
        server.local_port = 80;
        server.remote_port = 61000;
        let backend: std::net::SocketAddr = "10.0.1.5:8080".parse().unwrap();
        agg.set_translations(FastMap::from_iter([
            (ConnId::of(&dialed), Translation::Backend(backend)),
            (ConnId::of(&server), Translation::LeftToClient),
        ]));
        agg.apply_event(&closed(dialed, 10, 3), at(1));
        agg.apply_event(&closed(server, 3, 10), at(1));
        let links = agg.collect(at(1));
        assert_eq!(links.len(), 1, "{links:?}");
        let (key, stats) = &links[0];
        assert_eq!(key.server, Peer::Address(backend.ip()));
        assert_eq!(key.server_port, 8080);
        assert_eq!(key.dialed, Some(("10.0.0.2".parse().unwrap(), 80)));
        assert_eq!(
            (stats.opened, stats.bytes_transmit, stats.bytes_receive),
            (1, 10, 3)
        );
        // Used when first counted, then dropped.
        assert!(agg.translations.is_empty());
    }

    #[test]
    fn host_network_clients_are_told_apart_by_cgroup() {
        let mut agg = Aggregator::new(config(60));
        // Netns 7: a pod's own namespace, its address is its own.
        let mut pod = closed(client(1), 1, 1);
        pod.cgroup_id = 500;
        // Netns 1 (the host's): two host processes share the address.
        let mut host_a = closed(client(2), 1, 1);
        host_a.netns = 1;
        host_a.cgroup_id = 600;
        let mut host_b = host_a;
        host_b.sk = 3;
        host_b.cgroup_id = 700;
        for rec in [pod, host_a, host_b] {
            agg.apply_event(&rec, at(1));
        }
        let cgroups: Vec<u64> = agg
            .collect(at(1))
            .iter()
            .map(|(k, _)| k.client_cgroup)
            .collect();
        assert_eq!(cgroups, vec![0, 600, 700]);
    }

    #[test]
    fn ipv6_and_mapped_addresses() {
        assert_eq!(
            ip(v4([127, 0, 0, 1])),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(ip(v6.octets()), IpAddr::V6(v6));
    }
}
