//! The `ebpf` receiver: captures TCP links in the kernel and emits one cumulative
//! [`LinkBatch`] per `collection_interval`.
//!
//! One task owns the aggregation: it drains close records as they arrive (so the ring
//! buffer never fills waiting for a tick) and, each interval, walks the live sockets,
//! collects the links and sends them. Nothing is shared with exporters but the batch.
//! A new connection that may have been translated (NAT) waits for the interval's
//! conntrack lookups before it is counted, so that its link names the real ends.
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use aya::maps::{MapData, RingBuf};
use config::ComponentSection;
use serde::Deserialize;
use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;

use ridley_ebpf::{SockRecord, flags};

use crate::{
    aggregate::{Aggregator, AggregatorConfig, Now, is_connected},
    capture::{
        Capture, CgroupPaths, MapSizes, RecordExt, RecordKind, SocketState, Walk,
        conntrack::{NatAnswer, NatReader},
        host_netns, parse_record, wall_minus_monotonic_ns,
    },
    component::key_error,
    component::{BatchSender, BuildContext, Receiver},
    model::{LinkBatch, Losses},
    nat::{NatResolver, Pending},
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EbpfConfig {
    /// How often live connections are read and a batch is emitted.
    #[serde(with = "humantime_serde")]
    pub collection_interval: Duration,
    /// A link with no open connection and no change for this long is dropped, so that
    /// series of links that stopped talking (deleted pods) do not live forever.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections tracked at once in the kernel (per-socket state and client endpoints).
    /// Memory is allocated per open connection, up to this bound.
    pub max_connections: u32,
    /// Bytes of the ring buffer carrying close records (power of two, >= 4096); a
    /// number or a size such as `256KiB`.
    #[serde(deserialize_with = "config::byte_size")]
    pub ring_buffer_size: u64,
    /// Connection attempts kept per link per interval, for service-graph span pairs
    /// (0: none). The rest are counted, and the kept ones carry the sampling ratio.
    pub span_pairs_per_link: usize,
    /// Links kept at most. Beyond it, new links are counted together in one overflow
    /// series (`otel.metric.overflow = true`) and the `link_limit` loss reason: memory and
    /// export size stay bounded under a port scan.
    pub max_links: usize,
    /// Count clients with public (globally routable) addresses as one `external` client
    /// per server address and port, so that an internet-facing server is a few links,
    /// not one per visitor. Private, loopback, link-local, CGNAT and ULA addresses, and
    /// `keep_client_ranges`, keep their own links.
    pub group_public_clients: bool,
    /// Client ranges never grouped (CIDRs): partners named by `external_names`, or a
    /// cluster whose pods have public addresses.
    pub keep_client_ranges: Vec<String>,
    /// UDP links from connected UDP sockets. Off by default: the send and receive hooks
    /// run for every socket operation of the host, and keep-alive HTTP measured about 5 %
    /// fewer requests per second with them attached (see the README's benchmark).
    pub udp_links: bool,
    /// UDP flows (client, server address and port) the kernel counts per interval, in
    /// each of its two preallocated tables (per entry: about 64 bytes plus 32 per CPU);
    /// datagrams of flows beyond it are counted as `udp_flow_table_full`.
    pub max_udp_flows: u32,
    /// Report ready although the capture is partial (a privilege missing, network
    /// namespaces that cannot be walked). Off: a partial capture fails readiness.
    pub allow_partial_capture: bool,
    /// Real ends of translated connections, read from the kernel's conntrack table.
    pub conntrack: ConntrackConfig,
    /// Where the kernel programs keep per-socket state: `auto` (a table keyed by socket
    /// cookie where the kernel gives tracing programs cookies and compare-and-exchange,
    /// 5.12 and later; a hash table keyed by socket address before), `array` (once
    /// called `storage`) or `table` to choose.
    pub socket_state: SocketState,
}

/// Connections to a translated address (a Service's ClusterIP DNAT'd by kube-proxy)
/// are counted under the backend that answered; servers reached through a masquerading
/// namespace of this host under the real client. Needs `CAP_NET_ADMIN`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    pub enabled: bool,
    /// Conntrack lookups per interval at most (one per new connection to a translated
    /// address, one per new destination per minute otherwise). Beyond it connections
    /// keep the address dialled and are counted as `nat_lookup_limit`; close records
    /// waiting for a lookup (144 bytes each) are bounded by it too.
    pub max_lookups_per_interval: usize,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        ConntrackConfig {
            enabled: true,
            max_lookups_per_interval: 16_384,
        }
    }
}

impl Default for EbpfConfig {
    fn default() -> Self {
        EbpfConfig {
            collection_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_connections: 65536,
            ring_buffer_size: 256 * 1024,
            span_pairs_per_link: 10,
            max_links: 2000,
            group_public_clients: true,
            keep_client_ranges: Vec::new(),
            udp_links: false,
            max_udp_flows: 2048,
            allow_partial_capture: false,
            conntrack: ConntrackConfig::default(),
            socket_state: SocketState::Auto,
        }
    }
}

/// Upper bounds that keep every accepted value runnable: timers add these to the
/// monotonic clock, and the kernel refuses hash maps much larger than this.
const MAX_COLLECTION_INTERVAL: Duration = Duration::from_secs(3600);
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// The endpoint table is preallocated (about 80 bytes per entry): at most 80 MiB.
const MAX_CONNECTIONS: u32 = 1 << 20;
const MAX_SPAN_PAIRS_PER_LINK: usize = 1000;
const MAX_LINKS: usize = 1_000_000;
/// Each UDP flow table is preallocated with per-CPU values (about 64 bytes plus 32 per
/// CPU per entry, two tables): 65,536 entries on a 64-CPU node is 264 MiB of kernel
/// memory, the most a setting may ask for.
const MAX_UDP_FLOWS: u32 = 1 << 16;
const MAX_NAT_LOOKUPS: usize = 1_000_000;
/// Every this many intervals the addresses of this host's namespaces are read again
/// (masquerading namespaces come and go with pods).
const LOCAL_ADDRESSES_EVERY: u32 = 6;
/// Every this many walks, one reports every socket, changed or not: the table of open
/// connections is reconciled with the kernel's (a connection whose close record was lost
/// leaves it). Between full walks an idle connection costs nothing in userspace and a
/// storage lookup in the kernel. A walk after a loss or a partial walk is full anyway.
const FULL_WALK_EVERY: u32 = 60;

impl EbpfConfig {
    fn validate(&self) -> Result<()> {
        if self.collection_interval < Duration::from_millis(100)
            || self.collection_interval > MAX_COLLECTION_INTERVAL
        {
            return Err(key_error(
                "collection_interval",
                format!(
                    "must be from 100ms to 1h, got {}",
                    humantime::format_duration(self.collection_interval)
                ),
            ));
        }
        if self.idle_timeout < self.collection_interval || self.idle_timeout > MAX_IDLE_TIMEOUT {
            return Err(key_error(
                "idle_timeout",
                format!(
                    "must be from collection_interval to 7d, got {}",
                    humantime::format_duration(self.idle_timeout)
                ),
            ));
        }
        if self.max_connections == 0 || self.max_connections > MAX_CONNECTIONS {
            return Err(key_error(
                "max_connections",
                format!(
                    "must be from 1 to {MAX_CONNECTIONS}, got {}",
                    self.max_connections
                ),
            ));
        }
        if self.max_links == 0 || self.max_links > MAX_LINKS {
            return Err(key_error(
                "max_links",
                format!("must be from 1 to {MAX_LINKS}, got {}", self.max_links),
            ));
        }
        if self.max_udp_flows == 0 || self.max_udp_flows > MAX_UDP_FLOWS {
            return Err(key_error(
                "max_udp_flows",
                format!(
                    "must be from 1 to {MAX_UDP_FLOWS} (udp_links: false turns UDP off), got {}",
                    self.max_udp_flows
                ),
            ));
        }
        let lookups = self.conntrack.max_lookups_per_interval;
        if lookups == 0 || lookups > MAX_NAT_LOOKUPS {
            return Err(key_error(
                "conntrack.max_lookups_per_interval",
                format!(
                    "must be from 1 to {MAX_NAT_LOOKUPS} (conntrack.enabled: false turns lookups off), got {lookups}"
                ),
            ));
        }
        for range in &self.keep_client_ranges {
            range.parse::<ipnet::IpNet>().map_err(|e| {
                key_error(
                    "keep_client_ranges",
                    format!("{range:?} is not a CIDR: {e}"),
                )
            })?;
        }
        if self.span_pairs_per_link > MAX_SPAN_PAIRS_PER_LINK {
            return Err(key_error(
                "span_pairs_per_link",
                format!(
                    "must be at most {MAX_SPAN_PAIRS_PER_LINK}, got {}",
                    self.span_pairs_per_link
                ),
            ));
        }
        if !self.ring_buffer_size.is_power_of_two()
            || self.ring_buffer_size < 4096
            || self.ring_buffer_size > 1 << 30
        {
            return Err(key_error(
                "ring_buffer_size",
                format!(
                    "must be a power of two from 4096 bytes to 1GiB, got {}",
                    self.ring_buffer_size
                ),
            ));
        }
        Ok(())
    }
}

pub fn build(cx: &BuildContext, section: ComponentSection) -> Result<Box<dyn Receiver>> {
    let id = &cx.id;
    if section.get("service_graph_metrics").is_some() {
        return Err(key_error(
            "service_graph_metrics",
            "the service graph is a processor of its own now: remove this key and list the \
             `servicegraph` processor (after k8sattributes) in a metrics pipeline",
        ));
    }
    let config: EbpfConfig = cx.parse_section(section)?;
    config.validate()?;
    Ok(Box::new(EbpfReceiver {
        config,
        id: id.to_string(),
        telemetry: cx.telemetry.clone(),
    }))
}

struct EbpfReceiver {
    config: EbpfConfig,
    id: String,
    telemetry: std::sync::Arc<crate::telemetry::Telemetry>,
}

type Events = AsyncFd<RingBuf<MapData>>;

/// How often close records are drained when the kernel has not woken us.
const DRAIN_PERIOD: Duration = Duration::from_millis(200);

/// Where records go: straight into the aggregator, or, for a new connection whose
/// address may have been translated, held until the interval's conntrack lookups.
struct Intake {
    aggregator: Aggregator,
    nat: Option<NatResolver>,
    /// Records waiting for their lookup, bounded by the resolver's lookups per interval.
    deferred: Vec<(SockRecord, Pending)>,
}

impl Intake {
    fn take(&mut self, record: &SockRecord, now: Now) {
        if let Some(nat) = self.nat.as_mut() {
            let keyed_now = match record.record_kind() {
                Some(RecordKind::ConnectFailed) => true,
                Some(RecordKind::Closed) => record.flags & flags::TRACKED != 0,
                _ => false,
            };
            if keyed_now && self.aggregator.is_new(record) {
                if let Some(pending) = nat.lookup_for(record, now.mono) {
                    self.deferred.push((*record, pending));
                    return;
                }
            }
        }
        self.aggregator.apply_event(record, now);
    }
}

/// Applies every close record waiting in the ring buffer (an entry holds one record or
/// a CPU's batch of them).
fn drain(events: &mut RingBuf<MapData>, intake: &mut Intake) {
    let now = Now::current();
    while let Some(item) = events.next() {
        for record in item.chunks_exact(SockRecord::SIZE).filter_map(parse_record) {
            intake.take(&record, now);
        }
    }
}

async fn drain_when_ready(events: &mut Events, intake: &mut Intake) -> Result<()> {
    let mut guard = events
        .readable_mut()
        .await
        .context("polling the ring buffer")?;
    drain(guard.get_inner_mut(), intake);
    guard.clear_ready();
    Ok(())
}

struct CaptureLoop {
    capture: Capture,
    events: Events,
    intake: Intake,
    /// The conntrack reader, when lookups are enabled.
    nat_reader: Option<NatReader>,
    intervals: u32,
    /// The last conntrack failure, to log only changes.
    last_nat_error: Option<String>,
    last_losses: Losses,
    cgroups: CgroupPaths,
    /// Namespaces skipped by the previous walk, to log only changes.
    last_skipped: usize,
    /// The next walk must report every socket (see `FULL_WALK_EVERY`).
    next_walk_full: bool,
    walks_since_full: u32,
    namespace_skipped: u64,
    telemetry: std::sync::Arc<crate::telemetry::Telemetry>,
    /// The receiver's id: its losses in the telemetry registry.
    id: String,
}

/// Asks conntrack about `pending` (nothing to ask: no answers).
async fn ask(reader: &NatReader, pending: &[Pending]) -> Result<Vec<NatAnswer>> {
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    reader
        .lookup(pending.iter().map(|p| p.query.clone()).collect())
        .await
}

impl CaptureLoop {
    /// Walks live sockets (draining close records meanwhile), applies the walk and
    /// returns the batch for this interval.
    async fn collect(&mut self) -> Result<LinkBatch> {
        let full = self.next_walk_full || self.walks_since_full + 1 >= FULL_WALK_EVERY;
        if full {
            // A burst (a storm of closes, a walk of every socket) raises the heap's
            // high-water mark; without this its freed pages stay resident for good.
            crate::capture::release_freed_memory();
        }
        // Until a walk succeeds, the next one is full: a failed read may have consumed
        // changes that the kernel will not report again.
        self.next_walk_full = true;
        let walk = {
            let walk = self.capture.walk(full);
            tokio::pin!(walk);
            loop {
                tokio::select! {
                    result = &mut walk => break result?,
                    drained = drain_when_ready(&mut self.events, &mut self.intake) => drained?,
                }
            }
        };
        // Every close up to the end of the walk is in the buffer now.
        drain(self.events.get_mut(), &mut self.intake);
        let udp = self.capture.drain_udp().await?;
        let now = Now::current();
        self.intake.aggregator.apply_udp(&udp, now);
        self.note_skipped_namespaces(&walk);
        self.translate(&walk, now).await;
        self.intake
            .aggregator
            .apply_walk(&walk.records, now, walk.full, walk.skipped == 0);
        self.walks_since_full = if walk.full {
            0
        } else {
            self.walks_since_full + 1
        };
        let mut losses = self.capture.kernel_losses()?;
        // A lost close record leaves a connection in the table that only a full walk can
        // find gone (a missed transition may have been one); a namespace not seen may
        // have hidden changes.
        self.next_walk_full = walk.skipped > 0
            || losses.ringbuf_full != self.last_losses.ringbuf_full
            || losses.events_missed != self.last_losses.events_missed
            || losses.socket_state_unavailable != self.last_losses.socket_state_unavailable;
        self.intake.aggregator.add_losses(&mut losses);
        losses.namespace_skipped = self.namespace_skipped;
        if let Some(nat) = &self.intake.nat {
            losses.nat_unresolved = nat.unresolved;
            losses.nat_lookup_limit = nat.over_limit;
        }
        if losses != self.last_losses {
            tracing::warn!(
                ?losses,
                "data lost since start; raise ring_buffer_size, max_connections, max_udp_flows or conntrack.max_lookups_per_interval"
            );
            self.last_losses = losses;
        }
        tracing::debug!(
            full = walk.full,
            namespaces = walk.namespaces,
            sockets = walk.records.len(),
            open = self.intake.aggregator.open_connections(),
            closed_unseen = self.intake.aggregator.closed_unknown(),
            "collected"
        );
        if walk.full {
            // Its own target, so that it can be turned on alone:
            // `RIDLEY_LOG=info,ridley::memory=debug`.
            tracing::debug!(
                target: "ridley::memory",
                tables = ?self.intake.aggregator.table_sizes(),
                heap_in_use_and_free = ?crate::capture::heap_usage(),
                "memory"
            );
        }
        let mut batch = LinkBatch::new(now.wall);
        batch.links = self.intake.aggregator.collect(now);
        batch.cgroups = self
            .cgroups
            .paths(batch.links.iter().map(|(key, _)| key.client_cgroup));
        self.telemetry.record_losses(&self.id, losses);
        Ok(batch)
    }

    /// Looks up in conntrack the new connections of this round (held close records and
    /// the walk's new connections), then applies the held records with what was found.
    /// A failed lookup leaves connections under the address dialled; it is logged once
    /// per distinct failure and counted for translated destinations.
    async fn translate(&mut self, walk: &Walk, now: Now) {
        let (Some(nat), Some(reader)) = (self.intake.nat.as_mut(), self.nat_reader.as_ref()) else {
            return;
        };
        if self.intervals.is_multiple_of(LOCAL_ADDRESSES_EVERY) {
            match reader.local_addresses().await {
                Ok(addresses) => nat.set_local_addresses(addresses),
                Err(e) => tracing::warn!("reading the addresses of this host's namespaces: {e:#}"),
            }
        }
        self.intervals = self.intervals.wrapping_add(1);
        // The held records are applied below, after the lookups, whatever they found.
        let (held, mut pending): (Vec<SockRecord>, Vec<Pending>) =
            std::mem::take(&mut self.intake.deferred)
                .into_iter()
                .unzip();
        let aggregator = &self.intake.aggregator;
        pending.extend(
            walk.records
                .iter()
                .filter(|r| {
                    r.flags & flags::TRACKED != 0 && is_connected(r.state) && aggregator.is_new(r)
                })
                .filter_map(|r| nat.lookup_for(r, now.mono)),
        );
        let (probes, waiting) = nat.split_probes(pending, now.mono);
        let probe_answers = ask(reader, &probes).await;
        // Then the other connections of the destinations the probes found translated.
        let rest = match &probe_answers {
            Ok(found) => NatResolver::after_probes(&probes, found, waiting),
            Err(_) => waiting,
        };
        let rest_answers = match &probe_answers {
            Ok(_) => ask(reader, &rest).await,
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        };
        let failure = probe_answers
            .as_ref()
            .err()
            .or(rest_answers.as_ref().err())
            .map(|e| format!("{e:#}"));
        match failure {
            // A round without lookups proves nothing.
            None if !probes.is_empty() && self.last_nat_error.take().is_some() => {
                tracing::info!("conntrack lookups work again");
            }
            None => {}
            Some(why) if self.last_nat_error.as_ref() != Some(&why) => {
                let hint = if why.contains("not permitted") {
                    " (ctnetlink needs CAP_NET_ADMIN)"
                } else {
                    ""
                };
                tracing::warn!(
                    "conntrack lookups failed ({why}): translated connections keep the address dialled{hint}"
                );
                self.last_nat_error = Some(why);
            }
            Some(_) => {}
        }
        let mut translations = nat.translations(&probes, probe_answers.ok().as_deref(), now.mono);
        translations.extend(nat.translations(&rest, rest_answers.ok().as_deref(), now.mono));
        nat.start_interval(now.mono);
        self.intake.aggregator.set_translations(translations);
        for record in &held {
            self.intake.aggregator.apply_event(record, now);
        }
    }

    /// Namespaces the walk could not see make the capture partial: said once per change
    /// at WARN, counted as a loss, and shown by health_check.
    fn note_skipped_namespaces(&mut self, walk: &Walk) {
        self.namespace_skipped += walk.skipped as u64;
        if walk.skipped == self.last_skipped {
            return;
        }
        if walk.skipped == 0 {
            tracing::info!("every network namespace walked again");
            self.telemetry.set_capture_problem("namespaces", None);
        } else {
            let why = walk.first_skip.clone().unwrap_or_default();
            tracing::warn!(
                skipped = walk.skipped,
                walked = walk.namespaces,
                "capture is partial: network namespaces could not be walked (first: {why})"
            );
            self.telemetry.set_capture_problem(
                "namespaces",
                Some(format!(
                    "{} network namespaces could not be walked: {why}",
                    walk.skipped
                )),
            );
        }
        self.last_skipped = walk.skipped;
    }
}

#[async_trait]
impl Receiver for EbpfReceiver {
    async fn run(
        self: Box<Self>,
        out: BatchSender,
        ready: tokio::sync::oneshot::Sender<()>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let config = self.config;
        let telemetry = self.telemetry;
        telemetry.accept_partial_capture(config.allow_partial_capture);
        let problems = crate::capture::privilege_problems();
        for problem in &problems {
            tracing::warn!("capture will be partial: {problem}");
        }
        if !problems.is_empty() {
            telemetry.set_capture_problem("privileges", Some(problems.join("; ")));
        }
        let sizes = MapSizes {
            max_connections: config.max_connections,
            socket_state: config.socket_state,
            // Validated to be at most 1 GiB.
            ring_buffer_bytes: config.ring_buffer_size as u32,
            udp_flows: if config.udp_links {
                config.max_udp_flows
            } else {
                0
            },
        };
        // Parsing kernel BTF and verifying programs takes a while: off the async workers.
        let (capture, events) = tokio::task::spawn_blocking(move || Capture::load(sizes))
            .await
            .context("loading the eBPF programs")??;
        // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as
        // long as the AsyncFd (which owns the ring buffer) lives.
        let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("registering the ring buffer: {e}"))?;
        let conntrack = config.conntrack.enabled
            && {
                let capable = crate::capture::can_read_conntrack();
                if !capable {
                    tracing::warn!(
                        "conntrack lookups off: CAP_NET_ADMIN is missing; connections to translated addresses (Service ClusterIPs) keep the address dialled"
                    );
                }
                capable
            };
        let nat_reader = if conntrack {
            Some(NatReader::spawn()?)
        } else {
            None
        };
        let mut collector = CaptureLoop {
            capture,
            events,
            nat_reader,
            intervals: 0,
            last_nat_error: None,
            intake: Intake {
                nat: config.conntrack.enabled.then(|| {
                    NatResolver::new(host_netns(), config.conntrack.max_lookups_per_interval)
                }),
                deferred: Vec::new(),
                aggregator: Aggregator::new(AggregatorConfig {
                    idle_timeout: config.idle_timeout,
                    samples_per_link: config.span_pairs_per_link,
                    wall_minus_monotonic_ns: wall_minus_monotonic_ns(),
                    host_netns: host_netns(),
                    max_links: config.max_links,
                    group_public_clients: config.group_public_clients,
                    keep_client_ranges: config
                        .keep_client_ranges
                        .iter()
                        .filter_map(|r| r.parse().ok())
                        .collect(),
                }),
            },
            cgroups: CgroupPaths::new(),
            last_losses: Losses::default(),
            last_skipped: 0,
            next_walk_full: true,
            walks_since_full: 0,
            namespace_skipped: 0,
            telemetry,
            id: self.id.clone(),
        };
        // The first walk sets the baseline of connections that predate the programs.
        collector.collect().await?;
        tracing::info!(
            open_connections = collector.intake.aggregator.open_connections(),
            interval = ?config.collection_interval,
            "capture started"
        );
        let _ = ready.send(());

        let period = config.collection_interval;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The kernel wakes us only when the ring is a quarter full; below that, records
        // wait at most this long.
        let mut drain_timer = tokio::time::interval(DRAIN_PERIOD);
        drain_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                drained = drain_when_ready(&mut collector.events, &mut collector.intake) => drained?,
                _ = drain_timer.tick() => drain(collector.events.get_mut(), &mut collector.intake),
                _ = ticker.tick() => out.send(collector.collect().await?),
            }
        }
        // Flush: what happened since the last tick is not lost on the way out.
        out.send_final(collector.collect().await?).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Box<dyn Receiver>> {
        let cx = BuildContext {
            role: crate::component::Role::Receiver,
            id: "ebpf".parse().unwrap(),
            signals: vec![config::Signal::Metrics],
            pipelines: 1,
            telemetry: Default::default(),
        };
        crate::components::build_receiver(&cx, serde_norway::from_str(yaml).unwrap())
    }

    #[test]
    fn defaults_and_durations() {
        let config: EbpfConfig =
            serde_norway::from_str("collection_interval: 2s\nidle_timeout: 1m\n").unwrap();
        let sized: EbpfConfig = serde_norway::from_str("ring_buffer_size: 1MiB\n").unwrap();
        assert_eq!(sized.ring_buffer_size, 1 << 20);
        assert_eq!(config.collection_interval, Duration::from_secs(2));
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.max_connections, 65536);
        assert_eq!(config.ring_buffer_size, 262144);
        assert_eq!(config.span_pairs_per_link, 10);
    }

    #[test]
    fn values_that_could_not_run_are_rejected() {
        let cases = [
            (
                "collection_interval: 10000000000000000000s",
                "receivers.ebpf.collection_interval: must be from 100ms to 1h, got 316880878140years 3months 14days 10h 5m 52s",
            ),
            (
                "idle_timeout: 30d",
                "receivers.ebpf.idle_timeout: must be from collection_interval to 7d, got 30days",
            ),
            (
                "max_connections: 4294967295",
                "receivers.ebpf.max_connections: must be from 1 to 1048576, got 4294967295",
            ),
            (
                "span_pairs_per_link: 100000",
                "receivers.ebpf.span_pairs_per_link: must be at most 1000, got 100000",
            ),
            (
                "conntrack: {max_lookups_per_interval: 0}",
                "receivers.ebpf.conntrack.max_lookups_per_interval: must be from 1 to 1000000 (conntrack.enabled: false turns lookups off), got 0",
            ),
        ];
        for (yaml, expected) in cases {
            let err = format!("{:#}", parse(yaml).err().expect(yaml));
            assert_eq!(err, expected, "{yaml}");
        }
    }

    #[test]
    fn invalid_values_are_rejected_with_the_component_named() {
        let err = format!("{:#}", parse("ring_buffer_size: 5000").err().unwrap());
        assert_eq!(
            err,
            "receivers.ebpf.ring_buffer_size: must be a power of two from 4096 bytes to 1GiB, got 5000"
        );
        let err = format!("{:#}", parse("colection_interval: 1s").err().unwrap());
        assert!(
            err.starts_with(
                "receivers.ebpf.colection_interval: unknown field `colection_interval`"
            ),
            "{err}"
        );
        assert!(
            err.ends_with("(did you mean `collection_interval`?)"),
            "{err}"
        );
    }
}
