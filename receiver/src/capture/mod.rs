//! The kernel side as userspace sees it: checks what the kernel offers, loads and
//! attaches the programs, and hands out the four things the receiver reads:
//! close records (ring buffer), live-socket walks, UDP flows and the kernel loss
//! counters.
mod btf;
mod cgroups;
pub mod conntrack;
mod flush;
mod netns;
mod states;
mod sys;

pub use cgroups::{CgroupPaths, host_netns};

use std::{
    path::Path,
    sync::mpsc as std_mpsc,
    thread::{self, JoinHandle},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, Iter, ProgramFd, RawTracePoint},
};
use ridley_ebpf::{
    KernelOffsets, SockRecord, UdpFlowCounts, UdpFlowKey, WalkControl, counter, names, walk_mode,
};
use std::os::fd::AsFd;
use tokio::sync::oneshot;

use crate::model::Losses;

/// The compiled kernel programs, embedded at build time by `build.rs`: per-socket state
/// in a preallocated array keyed by socket cookie, and the same programs with it in a
/// hash table (`socket-table`).
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ridley-ebpf.o"));
static PROGRAMS_SOCKET_TABLE: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ridley-ebpf-socket-table.o"));

/// Where the kernel programs keep per-socket state (`receivers.ebpf.socket_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketState {
    /// The array from 5.12 on, the table before.
    #[default]
    Auto,
    /// A preallocated array of `2 × max_connections` slots keyed by socket cookie, a
    /// slot taken with compare-and-exchange and freed at the socket's close. Needs
    /// socket cookies in tracing programs and compare-and-exchange (both 5.12).
    /// `storage`, its name from when this build kept the state in socket-local storage,
    /// is still accepted.
    #[serde(alias = "storage")]
    Array,
    /// A hash table keyed by socket, sized from `max_connections`, entries removed at
    /// each socket's close. Between full walks, walks go through every namespace's
    /// sockets (there is no iterator over a hash table's sockets).
    Table,
}

impl SocketState {
    /// `Auto` resolved for a kernel version.
    fn resolve(self, kernel: Option<(u32, u32)>) -> SocketState {
        match self {
            SocketState::Auto if kernel.is_some_and(|v| v < STORAGE_BUILD_KERNEL) => {
                SocketState::Table
            }
            SocketState::Auto => SocketState::Array,
            chosen => chosen,
        }
    }
}

/// `WalkControl` as aya's plain-old-data, for writing into its map.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct PodWalkControl(WalkControl);
// SAFETY: WalkControl is #[repr(C)], two u32 then one u64 field, no padding, valid for
// any bits.
unsafe impl Pod for PodWalkControl {}

/// `KernelOffsets` as aya's plain-old-data, for writing into the programs' globals.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct PodOffsets(KernelOffsets);
// SAFETY: KernelOffsets is #[repr(C)], all u32 fields, no padding, valid for any bits.
unsafe impl Pod for PodOffsets {}

/// `UdpFlowKey` and `UdpFlowCounts` as aya's plain-old-data, for reading their map.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct PodFlowKey(UdpFlowKey);
// SAFETY: UdpFlowKey is #[repr(C)], byte arrays then u64, u32, u16, u16: no implicit
// padding, valid for any bits.
unsafe impl Pod for PodFlowKey {}

#[derive(Clone, Copy)]
#[repr(transparent)]
struct PodFlowCounts(UdpFlowCounts);
// SAFETY: UdpFlowCounts is #[repr(C)], four u64: no padding, valid for any bits.
unsafe impl Pod for PodFlowCounts {}

/// How long a table switch waits before the table left is read: a program run that
/// read the old index is still adding to it for at most microseconds (they never sleep).
const UDP_SWITCH_GRACE: std::time::Duration = std::time::Duration::from_millis(5);

/// The double-buffered UDP flow tables (see `UDP_FLOWS_*` in the programs).
struct UdpFlows {
    tables: [PerCpuHashMap<MapData, PodFlowKey, PodFlowCounts>; 2],
    control: Array<MapData, u32>,
    /// The table the programs add to now.
    active: u32,
}

impl UdpFlows {
    /// Switches the programs to the other table, then reads and empties the one left:
    /// every datagram since the last drain, each counted once.
    async fn drain(&mut self) -> Result<Vec<(UdpFlowKey, UdpFlowCounts)>> {
        let left = self.active;
        self.active ^= 1;
        self.control
            .set(0, self.active, 0)
            .context("switching the UDP flow table")?;
        tokio::time::sleep(UDP_SWITCH_GRACE).await;
        let table = &mut self.tables[left as usize];
        let keys = table
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .context("listing UDP flows")?;
        let mut flows = Vec::with_capacity(keys.len());
        for key in keys {
            let per_cpu = table.get(&key, 0).context("reading a UDP flow")?;
            table.remove(&key).context("deleting a UDP flow")?;
            let mut counts = UdpFlowCounts::default();
            for cpu in per_cpu.iter() {
                counts.sent_datagrams += cpu.0.sent_datagrams;
                counts.sent_bytes += cpu.0.sent_bytes;
                counts.received_datagrams += cpu.0.received_datagrams;
                counts.received_bytes += cpu.0.received_bytes;
            }
            flows.push((key.0, counts));
        }
        Ok(flows)
    }
}

/// Sizes of the kernel maps, from the receiver's config.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Entries of `CLIENT_ENDPOINTS`: established client connections at once. Per-socket
    /// state takes twice this (clients, and servers of remote clients).
    pub max_connections: u32,
    pub socket_state: SocketState,
    /// Bytes of the `EVENTS` ring buffer (a power of two, at least one page).
    pub ring_buffer_bytes: u32,
    /// Entries of each `UDP_FLOWS_*` table; 0: UDP links off (nothing attached).
    pub udp_flows: u32,
}

/// What a record reports: the user-side reading of `SockRecord::kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The socket reached `TCP_CLOSE` after being established; counters are final.
    Closed,
    /// An active open failed (`SYN_SENT` -> `TCP_CLOSE`).
    ConnectFailed,
    /// A live socket from the periodic walk.
    Live,
}

/// How a socket was opened: the user-side reading of `SockRecord::role`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenedAs {
    /// `connect()`.
    Client,
    /// Accepted from a listener.
    Server,
    /// Not seen opening (it predates the programs, or the table was full).
    Unknown,
}

/// Typed views of the kernel's plain-data record.
pub trait RecordExt {
    /// `None` for a kind this build does not know (a newer kernel program).
    fn record_kind(&self) -> Option<RecordKind>;
    fn opened_as(&self) -> OpenedAs;
}

impl RecordExt for SockRecord {
    fn record_kind(&self) -> Option<RecordKind> {
        match self.kind {
            ridley_ebpf::kind::CLOSED => Some(RecordKind::Closed),
            ridley_ebpf::kind::CONNECT_FAILED => Some(RecordKind::ConnectFailed),
            ridley_ebpf::kind::LIVE => Some(RecordKind::Live),
            _ => None,
        }
    }

    fn opened_as(&self) -> OpenedAs {
        match self.role {
            ridley_ebpf::role::CLIENT => OpenedAs::Client,
            ridley_ebpf::role::SERVER => OpenedAs::Server,
            _ => OpenedAs::Unknown,
        }
    }
}

/// Copies one record out of kernel-written bytes. Returns `None` on a short buffer.
pub fn parse_record(bytes: &[u8]) -> Option<SockRecord> {
    if bytes.len() < SockRecord::SIZE {
        return None;
    }
    // SAFETY: SockRecord is #[repr(C)] plain data valid for any bit pattern, and the
    // length was checked; read_unaligned makes no alignment assumption.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const SockRecord) })
}

/// Wall-clock time minus CLOCK_MONOTONIC (what `bpf_ktime_get_ns` reads), in ns: turns
/// kernel timestamps into span times.
pub fn wall_minus_monotonic_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let monotonic = i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec);
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    wall - monotonic
}

/// Buckets of the `CLIENT_ENDPOINTS` set for `max_connections` established clients: eight
/// slots per client (a power of two of buckets of `ENDPOINT_WAYS`). Each key has two
/// buckets to choose from, so with `max_connections` clients at once (one per bucket on
/// average) a key finding both full does not happen in practice (see
/// `ridley_ebpf::EndpointKey::place` and its tests).
fn endpoint_buckets(max_connections: u32) -> u32 {
    (max_connections.max(1).saturating_mul(8) / ridley_ebpf::ENDPOINT_WAYS)
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
}

/// The oldest kernel ridley runs on: BTF tracepoints (5.5), ring buffers (5.8),
/// `iter/tcp` and `bpf_skc_to_tcp_sock` in tracing programs (5.9), and running a raw
/// tracepoint program on a given CPU, which sends each CPU's held close records (5.10).
const MIN_KERNEL: (u32, u32) = (5, 10);
/// BPF memory charged to the memory cgroup instead of `RLIMIT_MEMLOCK`: 5.11.
const MEMCG_KERNEL: (u32, u32) = (5, 11);
/// The default build asks for socket cookies in tracing programs
/// (`bpf_get_socket_cookie`) and uses compare-and-exchange for its state table and
/// endpoint set, both 5.12: the first kernel it loads on, and where `auto` chooses it.
const STORAGE_BUILD_KERNEL: (u32, u32) = (5, 12);

/// The running kernel's `major.minor`, if it can be read.
fn running_kernel() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    kernel_version(release.trim())
}

/// Before 5.11 the kernel charges BPF maps against `RLIMIT_MEMLOCK` (often 64 KiB, or
/// 8 MiB under systemd), which the maps exceed: lift it for this process, as every BPF
/// loader does on such kernels.
fn lift_memlock_limit() -> Result<()> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the rlimit structs we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current);
        if current.rlim_cur == libc::RLIM_INFINITY {
            return Ok(());
        }
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) != 0 {
            let error = std::io::Error::last_os_error();
            bail!(
                "this kernel charges BPF maps against RLIMIT_MEMLOCK ({} bytes here) and \
                 raising it failed ({error}): run with CAP_SYS_RESOURCE or an unlimited \
                 memlock limit (`ulimit -l unlimited`, LimitMEMLOCK=infinity)",
                current.rlim_cur
            );
        }
    }
    tracing::info!(
        "raised RLIMIT_MEMLOCK from {} bytes to unlimited: kernels before 5.11 charge BPF maps against it",
        current.rlim_cur
    );
    Ok(())
}

/// `major.minor` of a kernel release string (`5.10.0-28-amd64` -> (5, 10)).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Hands freed heap memory back to the system: glibc keeps it for reuse, so the
/// daemon's resident size would otherwise stay at its highest point so far. Called
/// after startup (the BTF parses) and before every full walk (see `FULL_WALK_EVERY`):
/// once a minute at the default interval, a fraction of a millisecond each.
pub(crate) fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes of heap in use and held free by the allocator (glibc's `mallinfo2`), for the
/// debug log: where RSS grows, whether it is memory in use or memory the allocator keeps.
pub(crate) fn heap_usage() -> Option<(usize, usize)> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics; no preconditions.
        let info = unsafe { libc::mallinfo2() };
        Some((info.uordblks, info.fordblks))
    }
    #[cfg(not(target_env = "gnu"))]
    None
}

/// CLOCK_MONOTONIC in microseconds: the clock of `bpf_ktime_get_ns` and `tcp_mstamp`.
fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// What the kernel must offer, checked before anything is loaded so that the error
/// names the missing piece instead of a verifier log.
fn check_kernel() -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if let Some(version) = kernel_version(release.trim()) {
        if version < MIN_KERNEL {
            bail!(
                "kernel {} is too old: ridley needs Linux {}.{} or later (iter/tcp and \
                 socket helpers in tracing programs)",
                release.trim(),
                MIN_KERNEL.0,
                MIN_KERNEL.1
            );
        }
    }
    if !Path::new(btf::VMLINUX_BTF).exists() {
        bail!(
            "{} is missing: ridley needs a kernel built with CONFIG_DEBUG_INFO_BTF=y \
             (standard on current distributions)",
            btf::VMLINUX_BTF
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        tracing::warn!(
            "not running as root: loading eBPF needs CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN \
             (to enter network namespaces)"
        );
    }
    Ok(())
}

/// Capability bits (`include/uapi/linux/capability.h`).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
/// Inode of the initial PID namespace (`PROC_PID_INIT_INO`): the host's.
const HOST_PID_NAMESPACE_INODE: u64 = 0xEFFF_FFFC;

/// What would make the capture partial although the programs loaded: privileges that
/// the namespace walk needs, and whether the host's processes (and so the pods'
/// network namespaces) are visible at all. Each entry names what is missing and what
/// it costs.
pub fn privilege_problems() -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut problems = Vec::new();
    match effective_capabilities() {
        Some(caps) => {
            if caps & (1 << CAP_SYS_ADMIN) == 0 {
                problems.push(
                    "CAP_SYS_ADMIN is missing: other network namespaces (pods) cannot be entered, so their live connections are not walked"
                        .to_owned(),
                );
            }
            if caps & (1 << CAP_SYS_PTRACE) == 0 {
                problems.push(
                    "CAP_SYS_PTRACE is missing: the network namespaces of processes owned by other users cannot be opened"
                        .to_owned(),
                );
            }
        }
        None => problems.push("cannot read effective capabilities from /proc/self/status".into()),
    }
    match std::fs::metadata("/proc/self/ns/pid") {
        Ok(meta) if meta.ino() == HOST_PID_NAMESPACE_INODE => {}
        Ok(_) => problems.push(
            "not in the host's PID namespace (hostPID: true): pods' network namespaces are not visible"
                .to_owned(),
        ),
        Err(e) => problems.push(format!("cannot read /proc/self/ns/pid: {e}")),
    }
    problems
}

/// The process's effective capability set, as a bit mask.
fn effective_capabilities() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
}

/// Whether conntrack can be read: ctnetlink requires `CAP_NET_ADMIN` (no other
/// capability implies it).
pub fn can_read_conntrack() -> bool {
    effective_capabilities().is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// The loaded, attached programs.
pub struct Capture {
    counters: PerCpuArray<MapData, u64>,
    /// The attached tracepoint programs, for the runs the kernel skipped.
    hooks: Vec<ProgramFd>,
    walker: Walker,
    udp: Option<UdpFlows>,
}

impl Capture {
    /// Loads and attaches the programs. Returns the capture and the ring buffer of
    /// close records, which the caller drains.
    pub fn load(sizes: MapSizes) -> Result<(Self, RingBuf<MapData>)> {
        check_kernel()?;
        let kernel = running_kernel();
        if kernel.is_some_and(|v| v < MEMCG_KERNEL) {
            lift_memlock_limit()?;
        }
        let socket_state = sizes.socket_state.resolve(kernel);
        let (programs, state_note) = match socket_state {
            SocketState::Table => (
                PROGRAMS_SOCKET_TABLE,
                format!(
                    "a hash table of at most {} sockets",
                    sizes.max_connections.saturating_mul(2)
                ),
            ),
            _ => (
                PROGRAMS,
                format!(
                    "an array of {} slots keyed by socket cookie",
                    ridley_ebpf::state_table_buckets(sizes.max_connections)
                        .saturating_mul(ridley_ebpf::STATE_WAYS)
                ),
            ),
        };
        tracing::info!("per-socket state: {state_note}");
        // Kernel BTF is large (over 5 MiB on disk, about 14 MiB parsed by aya), and
        // startup is the daemon's memory peak: the offsets come from a reader that keeps
        // the file and an index (dropped at once); aya's loader parses BTF when it is
        // created, which is dropped at once too (the programs use no CO-RE relocation:
        // `.btf(None)`); then one parse serves both programs' attach. One parse is alive
        // at a time.
        let offsets = {
            let vmlinux = btf::KernelBtf::from_file(btf::VMLINUX_BTF)?;
            btf::kernel_offsets(&vmlinux).context("resolving kernel struct offsets from BTF")?
        };
        let offsets = PodOffsets(offsets);
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        let state_bucket_mask = if socket_state == SocketState::Table {
            // A hash of one entry per socket.
            loader.map_max_entries(
                names::MAP_SOCK_STATES,
                sizes.max_connections.saturating_mul(2),
            );
            0
        } else {
            let buckets = ridley_ebpf::state_table_buckets(sizes.max_connections);
            loader
                .map_max_entries(names::MAP_SOCK_STATE_KEYS, buckets)
                .map_max_entries(
                    names::MAP_SOCK_STATES,
                    buckets.saturating_mul(ridley_ebpf::STATE_WAYS),
                );
            buckets - 1
        };

        // Wake the drain when a quarter of the ring is used; a timer drains the rest.
        let wakeup_bytes = u64::from(sizes.ring_buffer_bytes / 4);
        let (endpoint_entries, endpoint_bucket_mask) = match socket_state {
            // A hash of one entry per client.
            SocketState::Table => (sizes.max_connections, 0),
            _ => {
                let buckets = endpoint_buckets(sizes.max_connections);
                (buckets, buckets - 1)
            }
        };
        let mut ebpf = loader
            .override_global(names::GLOBAL_OFFSETS, &offsets, true)
            .override_global(names::GLOBAL_RINGBUF_WAKEUP_BYTES, &wakeup_bytes, true)
            .override_global(
                names::GLOBAL_ENDPOINT_BUCKET_MASK,
                &endpoint_bucket_mask,
                true,
            )
            .override_global(names::GLOBAL_STATE_BUCKET_MASK, &state_bucket_mask, true)
            .map_max_entries(names::MAP_CLIENT_ENDPOINTS, endpoint_entries)
            .map_max_entries(names::MAP_EVENTS, sizes.ring_buffer_bytes)
            // Preallocated hash tables: one entry each when UDP is off.
            .map_max_entries(names::MAP_UDP_FLOWS[0], sizes.udp_flows.max(1))
            .map_max_entries(names::MAP_UDP_FLOWS[1], sizes.udp_flows.max(1))
            .load(programs)
            .context("loading the eBPF object (are you root, or have CAP_BPF + CAP_PERFMON?)")?;
        let kernel_btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;

        // What the programs need beyond BTF tracepoints and iterators, for the errors.
        let state_needs = match socket_state {
            SocketState::Array => {
                "socket cookies in tracing programs and compare-and-exchange, 5.12+"
            }
            _ => "bpf_skc_to_tcp_sock in tracing programs, 5.9+",
        };
        let state: &mut BtfTracePoint = program(&mut ebpf, names::PROG_STATE)?;
        state
            .load("inet_sock_set_state", &kernel_btf)
            .with_context(|| {
                format!(
                    "loading tp_btf/inet_sock_set_state (needs BTF-enabled tracepoints and {state_needs})"
                )
            })?;
        state
            .attach()
            .context("attaching tp_btf/inet_sock_set_state")?;
        let mut hooks = vec![hook_fd(state)?];
        let iter: &mut Iter = program(&mut ebpf, names::PROG_ITER)?;
        iter.load("tcp", &kernel_btf)
            .with_context(|| format!("loading iter/tcp (needs BPF iterators and {state_needs})"))?;
        let state_walker = match socket_state {
            SocketState::Array => Some(load_state_walker(
                &mut ebpf,
                ridley_ebpf::state_table_buckets(sizes.max_connections),
            )?),
            _ => None,
        };
        let udp = if sizes.udp_flows == 0 {
            tracing::info!("UDP links: off (receivers.ebpf.udp_links: false)");
            None
        } else {
            match attach_udp(&mut ebpf, &kernel_btf) {
                Ok(udp_hooks) => Some(UdpFlows {
                    tables: [
                        PerCpuHashMap::try_from(take_map(&mut ebpf, names::MAP_UDP_FLOWS[0])?)?,
                        PerCpuHashMap::try_from(take_map(&mut ebpf, names::MAP_UDP_FLOWS[1])?)?,
                    ],
                    control: Array::try_from(take_map(&mut ebpf, names::MAP_UDP_CONTROL)?)?,
                    active: 0,
                })
                .inspect(|_| hooks.extend(udp_hooks)),
                Err(e) => {
                    // UDP is an addition: TCP capture goes on without it.
                    tracing::warn!(
                        "UDP links: off, this kernel cannot run them (sock_send_length and sock_recv_length tracepoints, 6.3+): {e:#}"
                    );
                    None
                }
            }
        };
        tracing::info!(
            "hooks active: tp_btf/inet_sock_set_state, iter/tcp{}",
            if udp.is_some() {
                ", tp_btf/sock_send_length, tp_btf/sock_recv_length (UDP links)"
            } else {
                ""
            }
        );

        let events = RingBuf::try_from(take_map(&mut ebpf, names::MAP_EVENTS)?)?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, names::MAP_COUNTERS)?)?;
        let flusher = flush::CloseFlusher::load(&mut ebpf)?;
        let walker = Walker::spawn(ebpf, state_walker, flusher)?;
        drop(kernel_btf);
        release_freed_memory();
        Ok((
            Capture {
                counters,
                hooks,
                walker,
                udp,
            },
            events,
        ))
    }

    /// Walks the live TCP sockets of every network namespace on the host: every socket
    /// if `full`, else listeners and the sockets that changed since they were last
    /// reported (see `walk_mode`).
    pub async fn walk(&self, full: bool) -> Result<Walk> {
        self.walker.walk(full).await
    }

    /// What connected UDP sockets carried since the last call, by flow (nothing when
    /// UDP links are off).
    pub async fn drain_udp(&mut self) -> Result<Vec<(UdpFlowKey, UdpFlowCounts)>> {
        match self.udp.as_mut() {
            Some(udp) => udp.drain().await,
            None => Ok(Vec::new()),
        }
    }

    /// Kernel-side losses, summed over CPUs.
    pub fn kernel_losses(&self) -> Result<Losses> {
        let read = |index: u32| -> Result<u64> {
            let values = self
                .counters
                .get(&index, 0)
                .with_context(|| format!("reading kernel counter {index}"))?;
            Ok(values.iter().sum())
        };
        Ok(Losses {
            ringbuf_full: read(counter::RINGBUF_DROPS)?,
            socket_state_unavailable: read(counter::SOCK_STATE_UNAVAILABLE)?,
            endpoint_table_full: read(counter::ENDPOINTS_FULL)?,
            udp_flow_table_full: read(counter::UDP_FLOWS_FULL)?,
            read_errors: read(counter::READ_ERRORS)?,
            events_missed: self
                .hooks
                .iter()
                .map(|hook| sys::recursion_misses(hook.as_fd()))
                .sum::<std::io::Result<u64>>()
                .context("reading the programs' recursion misses")?,
            ..Losses::default()
        })
    }
}

/// A program's own descriptor (a duplicate: the program stays with the walker).
fn hook_fd(program: &BtfTracePoint) -> Result<ProgramFd> {
    program
        .fd()
        .context("an attached program has no descriptor")?
        .try_clone()
        .context("duplicating a program's descriptor")
}

/// Loads and attaches the two UDP programs; returns their descriptors.
fn attach_udp(ebpf: &mut Ebpf, kernel_btf: &aya::Btf) -> Result<Vec<ProgramFd>> {
    let mut hooks = Vec::new();
    for (name, tracepoint) in [
        (names::PROG_UDP_SEND, "sock_send_length"),
        (names::PROG_UDP_RECV, "sock_recv_length"),
    ] {
        let program: &mut BtfTracePoint = program(ebpf, name)?;
        program
            .load(tracepoint, kernel_btf)
            .with_context(|| format!("loading tp_btf/{tracepoint}"))?;
        program
            .attach()
            .with_context(|| format!("attaching tp_btf/{tracepoint}"))?;
        hooks.push(hook_fd(program)?);
    }
    Ok(hooks)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    program
        .try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// A walk between full walks: one pass over the sockets with state, all namespaces at
/// once, no namespace to enter.
/// Loads the program of the walks between full walks (the array build's), which visits
/// the sockets with state in `buckets` buckets of `SOCK_STATE_KEYS`.
fn load_state_walker(ebpf: &mut Ebpf, buckets: u32) -> Result<states::StateWalker> {
    let prog: &mut RawTracePoint = program(ebpf, names::PROG_WALK_STATES)?;
    prog.load()
        .context("loading the state walk (a raw tracepoint program)")?;
    let fd = prog
        .fd()
        .context("the state walk program has no descriptor")?
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating the state walk program's descriptor")?;
    let records = RingBuf::try_from(take_map(ebpf, names::MAP_WALK_RECORDS)?)?;
    Ok(states::StateWalker::new(fd, records, buckets))
}

/// One walk's result.
#[derive(Default)]
pub struct Walk {
    pub records: Vec<SockRecord>,
    /// Every socket was reported, changed or not (a walk of every namespace); otherwise
    /// the sockets with state that changed since they were last reported.
    pub full: bool,
    /// Namespaces walked.
    pub namespaces: usize,
    /// Namespaces that could not be entered or read.
    pub skipped: usize,
    /// Why the first skipped namespace was skipped.
    pub first_skip: Option<String>,
}

impl Walk {
    fn skip(&mut self, why: String) {
        self.skipped += 1;
        self.first_skip.get_or_insert(why);
    }
}

/// A thread of its own that serves requests one at a time, for work no async worker may
/// do: entering network namespaces (`setns` moves the calling thread only) and blocking
/// kernel reads. Requests carry their own reply channel. Dropping it ends the thread
/// (and whatever the thread owns) once the request in hand is done.
pub(crate) struct RequestThread<R: Send + 'static> {
    name: &'static str,
    requests: Option<std_mpsc::Sender<R>>,
    thread: Option<JoinHandle<()>>,
}

impl<R: Send + 'static> RequestThread<R> {
    pub(crate) fn spawn(
        name: &'static str,
        mut serve: impl FnMut(R) + Send + 'static,
    ) -> Result<Self> {
        let (tx, rx) = std_mpsc::channel::<R>();
        let thread = thread::Builder::new()
            .name(format!("ridley-{name}"))
            .spawn(move || {
                while let Ok(request) = rx.recv() {
                    serve(request);
                }
            })
            .with_context(|| format!("starting the {name} thread"))?;
        Ok(RequestThread {
            name,
            requests: Some(tx),
            thread: Some(thread),
        })
    }

    pub(crate) fn send(&self, request: R) -> Result<()> {
        self.requests
            .as_ref()
            .and_then(|tx| tx.send(request).ok())
            .ok_or_else(|| anyhow!("{} thread stopped", self.name))
    }

    /// Sends a request made around a reply channel and waits for the reply.
    pub(crate) async fn ask<T>(&self, request: impl FnOnce(oneshot::Sender<T>) -> R) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(request(tx))?;
        rx.await
            .map_err(|_| anyhow!("{} thread stopped", self.name))
    }
}

impl<R: Send + 'static> Drop for RequestThread<R> {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct WalkRequest {
    full: bool,
    reply: oneshot::Sender<Result<Walk>>,
}

/// The thread that owns the programs and walks the sockets of every network namespace.
/// Dropping the walker stops the thread, which detaches the programs.
struct Walker(RequestThread<WalkRequest>);

impl Walker {
    fn spawn(
        mut ebpf: Ebpf,
        mut state_walker: Option<states::StateWalker>,
        flusher: flush::CloseFlusher,
    ) -> Result<Self> {
        let mut control: Array<MapData, PodWalkControl> =
            Array::try_from(take_map(&mut ebpf, names::MAP_WALK_CONTROL)?)?;
        // The walks between full walks visit the cookie table's sockets; the keys of the
        // table build's hash are socket addresses it cannot read, so there they walk
        // every namespace too.
        let mut generation = 0u32;
        // Start of the last walk that succeeded: sockets quiet since are skipped.
        let mut last_start_us = 0u64;
        RequestThread::spawn("netns-walk", move |WalkRequest { full, reply }| {
            // Never 0, the generation of storage no walk has written.
            generation = generation.wrapping_add(1).max(1);
            let started_us = monotonic_us();
            let value = PodWalkControl(WalkControl {
                generation,
                quiet_before_us: if full { 0 } else { last_start_us },
                mode: if full {
                    walk_mode::FULL
                } else {
                    walk_mode::CHANGED
                },
            });
            let result = control
                .set(0, value, 0)
                .context("setting the walk control")
                .and_then(|()| match (state_walker.as_mut(), full) {
                    (Some(state_walker), false) => {
                        let mut walk = Walk::default();
                        state_walker.walk(&mut walk.records).map(|()| walk)
                    }
                    _ => program::<Iter>(&mut ebpf, names::PROG_ITER)
                        .and_then(netns::walk_all_namespaces),
                })
                .map(|mut walk| {
                    walk.full = full;
                    walk
                });
            // Every close before this point reaches the ring buffer before the reply:
            // the receiver drains it next, and a socket the walk did not see because it
            // closed must have its close record there.
            // A flush that fails (it is proven to work at startup) leaves records held
            // until their batch fills or a later flush: late, not lost.
            if let Err(e) = flusher.flush() {
                tracing::warn!("close records held on a CPU: {e:#}");
            }
            // A walk that left a namespace out does not vouch for its sockets.
            last_start_us = match &result {
                Ok(walk) if walk.skipped == 0 => started_us,
                _ => 0,
            };
            let _ = reply.send(result);
        })
        .map(Walker)
    }

    async fn walk(&self, full: bool) -> Result<Walk> {
        self.0.ask(|reply| WalkRequest { full, reply }).await?
    }
}

#[cfg(test)]
mod tests {
    use super::{
        MEMCG_KERNEL, MIN_KERNEL, STORAGE_BUILD_KERNEL, SocketState, endpoint_buckets,
        kernel_version,
    };

    /// `storage`, the array's old name, still reads as the array; unknown names are
    /// refused.
    #[test]
    fn socket_state_names_parse_and_the_old_name_is_kept() {
        let parse = |name: &str| serde_norway::from_str::<SocketState>(name);
        assert_eq!(parse("auto").unwrap(), SocketState::Auto);
        assert_eq!(parse("array").unwrap(), SocketState::Array);
        assert_eq!(parse("storage").unwrap(), SocketState::Array);
        assert_eq!(parse("table").unwrap(), SocketState::Table);
        assert!(parse("hash").is_err());
    }

    #[test]
    fn endpoint_set_has_eight_slots_per_connection_in_a_power_of_two_of_buckets() {
        assert_eq!(endpoint_buckets(65_536), 65_536);
        assert_eq!(endpoint_buckets(100_000), 131_072);
        assert_eq!(endpoint_buckets(1), 1);
        assert_eq!(endpoint_buckets(0), 1);
        assert_eq!(endpoint_buckets(1_048_576), 1_048_576);
        assert_eq!(endpoint_buckets(u32::MAX), 1 << 29);
    }

    #[test]
    fn socket_state_follows_the_kernel_unless_chosen() {
        let debian_11 = kernel_version("5.10.0-32-cloud-amd64");
        assert_eq!(SocketState::Auto.resolve(debian_11), SocketState::Table);
        // 5.11 has neither socket cookies in tracing programs nor compare-and-exchange.
        assert_eq!(
            SocketState::Auto.resolve(Some(MEMCG_KERNEL)),
            SocketState::Table
        );
        assert_eq!(
            SocketState::Auto.resolve(Some(STORAGE_BUILD_KERNEL)),
            SocketState::Array
        );
        assert_eq!(SocketState::Auto.resolve(Some((6, 18))), SocketState::Array);
        // Unreadable: the kernel will say if it cannot.
        assert_eq!(SocketState::Auto.resolve(None), SocketState::Array);
        assert_eq!(
            SocketState::Table.resolve(Some((6, 18))),
            SocketState::Table
        );
        assert_eq!(SocketState::Array.resolve(debian_11), SocketState::Array);
    }

    #[test]
    fn kernel_releases_parse_to_major_and_minor() {
        assert_eq!(kernel_version("5.10.0-28-amd64"), Some((5, 10)));
        assert_eq!(
            kernel_version("4.14.336-257.562.amzn2.x86_64"),
            Some((4, 14))
        );
        assert_eq!(kernel_version("6.18.0"), Some((6, 18)));
        assert!(kernel_version("5.8.0") < Some(MIN_KERNEL));
        assert!(kernel_version("5.9.16") < Some(MIN_KERNEL));
        assert!(kernel_version("5.10.0") >= Some(MIN_KERNEL));
        assert!(kernel_version("5.15.0-91-generic") >= Some(MIN_KERNEL));
        assert_eq!(kernel_version("garbage"), None);
    }
}
