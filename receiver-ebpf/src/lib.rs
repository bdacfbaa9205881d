//! The kernel boundary of ridley: every `#[repr(C)]` type that crosses between the
//! eBPF programs (`src/bin/ridley-ebpf.rs`, built for `bpfel-unknown-none`) and the
//! userspace daemon (`receiver`), and the constants both sides must agree on.
//!
//! This crate owns the byte layout of maps, ring-buffer events and iterator records.
//! It must stay `no_std`, dependency-free and free of logic: userspace interprets the
//! records, the kernel programs only fill them.
#![no_std]

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
/// `sk_protocol` of a TCP socket.
pub const IPPROTO_TCP: u16 = 6;
/// `sk_protocol` of a UDP socket.
pub const IPPROTO_UDP: u16 = 17;
/// `MSG_PEEK`: a receive that leaves the datagram queued (it is counted when read).
pub const MSG_PEEK: i32 = 2;
pub const AF_INET6: u16 = 10;

/// TCP states as `include/net/tcp_states.h` numbers them.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

/// Which end of a connection a socket is, decided by how it was opened.
pub mod role {
    /// Not seen opening (it existed before the programs were attached).
    pub const UNKNOWN: u8 = 0;
    /// Active open: `connect()`.
    pub const CLIENT: u8 = 1;
    /// Passive open: accepted from a listener.
    pub const SERVER: u8 = 2;
}

/// Bits of [`SockRecord::flags`] and [`SockState::flags`].
pub mod flags {
    /// The socket was seen opening: `start_ns`, `established_ns` and the baselines are set.
    pub const TRACKED: u8 = 1 << 0;
    /// The peer's FIN has been received (`SOCK_DONE`): `bytes_received` counts it.
    pub const PEER_FIN: u8 = 1 << 2;
    /// Everything written has been acknowledged (`snd_una == write_seq`), so a FIN we
    /// sent counts in `bytes_acked` (records only).
    pub const ALL_ACKED: u8 = 1 << 1;
    /// A walk has reported the socket: its `walked_*` counters are set (kernel only).
    pub const WALKED: u8 = 1 << 3;
    /// A client socket whose local end did not fit `CLIENT_ENDPOINTS`: a server socket
    /// on this host cannot know its client is local, so userspace leaves the connection
    /// to the server's report when it sees both.
    pub const ENDPOINT_UNRECORDED: u8 = 1 << 4;
}

/// What a [`SockRecord`] reports.
pub mod kind {
    /// The socket reached `TCP_CLOSE` after being established; counters are final.
    pub const CLOSED: u8 = 1;
    /// An active open went from `SYN_SENT` to `TCP_CLOSE`: the connect failed.
    pub const CONNECT_FAILED: u8 = 2;
    /// A live socket, from the periodic `iter/tcp` walk.
    pub const LIVE: u8 = 3;
}

/// Indexes of the per-CPU `COUNTERS` array: kernel-side losses, exported as self-telemetry.
pub mod counter {
    /// Events dropped because the ring buffer was full.
    pub const RINGBUF_DROPS: u32 = 0;
    /// Attempts to give a socket state that found no room (the state table's home and
    /// overflow buckets full, or the table build's hash full): at its open, and again at
    /// each full walk that meets it without state, so one socket can count many times.
    /// Such a connection is counted from the full walks, without its open; userspace
    /// makes the walk after any change a full one, which keeps such sockets seen.
    pub const SOCK_STATE_UNAVAILABLE: u32 = 1;
    /// Client endpoints not recorded because `CLIENT_ENDPOINTS` was full (the link may
    /// then be reported by both ends).
    pub const ENDPOINTS_FULL: u32 = 2;
    /// `bpf_probe_read_kernel` failures.
    pub const READ_ERRORS: u32 = 3;
    /// UDP datagrams not counted: their flow did not fit in the flow table.
    pub const UDP_FLOWS_FULL: u32 = 4;
    pub const COUNT: u32 = 5;
}

/// Names of maps and programs, shared so that neither side spells them twice.
pub mod names {
    pub const MAP_SOCK_STATES: &str = "SOCK_STATES";
    pub const MAP_SOCK_STATE_KEYS: &str = "SOCK_STATE_KEYS";
    pub const GLOBAL_STATE_BUCKET_MASK: &str = "STATE_BUCKET_MASK";
    pub const MAP_CLIENT_ENDPOINTS: &str = "CLIENT_ENDPOINTS";
    pub const MAP_EVENTS: &str = "EVENTS";
    pub const MAP_COUNTERS: &str = "COUNTERS";
    pub const MAP_WALK_CONTROL: &str = "WALK_CONTROL";
    pub const GLOBAL_OFFSETS: &str = "OFFSETS";
    pub const GLOBAL_RINGBUF_WAKEUP_BYTES: &str = "RINGBUF_WAKEUP_BYTES";
    pub const GLOBAL_ENDPOINT_BUCKET_MASK: &str = "ENDPOINT_BUCKET_MASK";
    pub const PROG_STATE: &str = "ridley_inet_sock_set_state";
    pub const PROG_ITER: &str = "ridley_iter_tcp";
    pub const PROG_WALK_STATES: &str = "ridley_walk_states";
    pub const MAP_WALK_RECORDS: &str = "WALK_RECORDS";
    pub const PROG_FLUSH_CLOSES: &str = "ridley_flush_closes";
    pub const MAP_CLOSE_BATCHES: &str = "CLOSE_BATCHES";
    pub const MAP_UDP_FLOWS: [&str; 2] = ["UDP_FLOWS_0", "UDP_FLOWS_1"];
    pub const MAP_UDP_CONTROL: &str = "UDP_CONTROL";
    pub const PROG_UDP_SEND: &str = "ridley_sock_send_length";
    pub const PROG_UDP_RECV: &str = "ridley_sock_recv_length";
}

/// Byte offsets of the kernel fields the programs read, relative to `struct sock *`
/// (which is also `struct tcp_sock *`: the sock is its first member). aya-ebpf has no
/// CO-RE field relocations, so userspace resolves these from `/sys/kernel/btf/vmlinux`
/// and writes them into the programs' read-only data before loading. That data is a
/// frozen read-only map, so the verifier knows each offset as a constant and checks every
/// load against the kernel's BTF: the programs read fields directly, with no helper call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skc_family: u32,
    pub skc_state: u32,
    /// Local port, host byte order (`skc_num`).
    pub skc_num: u32,
    /// Remote port, network byte order (`skc_dport`).
    pub skc_dport: u32,
    pub skc_rcv_saddr: u32,
    pub skc_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_v6_daddr: u32,
    /// `skc_net.net`: pointer to the socket's `struct net`.
    pub skc_net: u32,
    /// `ns.inum` inside `struct net`.
    pub net_ns_inum: u32,
    pub sk_err: u32,
    pub sk_flags: u32,
    pub bytes_acked: u32,
    pub bytes_received: u32,
    pub total_retrans: u32,
    pub srtt_us: u32,
    pub snd_una: u32,
    pub write_seq: u32,
    /// `tcp_sock.tcp_mstamp`: when the socket last sent or received a packet (us of
    /// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`).
    pub tcp_mstamp: u32,
    /// `tcp_sock.tcp_clock_cache`: ns of CLOCK_MONOTONIC when the kernel last refreshed
    /// `tcp_mstamp`; the receive path refreshes it before it processes a client's SYN-ACK.
    pub tcp_clock_cache: u32,
    pub sk_protocol: u32,
    /// `sock_common.skc_cookie`: the socket's cookie, 0 until something asks for it.
    pub skc_cookie: u32,
    /// `sock.sk_socket`: NULL for a listener's child until `accept()`.
    pub sk_socket: u32,
}

/// Per-socket state the programs keep (`SOCK_STATES`): a slot of a preallocated table
/// keyed by socket cookie, taken at the socket's first tracked transition and freed at its
/// `TCP_CLOSE` (a hash table keyed by socket address in the table build). 64 bytes: one
/// cache line of a page-aligned array, each a miss on a busy host's socket path, where the
/// tables are far bigger than the caches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockState {
    /// The socket's address, for the walks of the table (which have no socket pointer of
    /// their own); checked against the socket's cookie before anything read through it
    /// is reported.
    pub sk: u64,
    /// When the open started: `SYN_SENT` (client) or the child socket's `ESTABLISHED` (server;
    /// the same instant as its `SYN_RECV`).
    pub start_ns: u64,
    /// When it reached `ESTABLISHED`; 0 until then.
    pub established_ns: u64,
    /// cgroup v2 id of the task that called `connect()` (clients only; 0 otherwise):
    /// tells apart clients that share an address (host-network pods, host processes).
    pub cgroup_id: u64,
    /// `bytes_acked` at `ESTABLISHED`: the handshake's share (its SYN, and any Fast Open
    /// data), subtracted from later reads. Under 4 GiB by far (saturated if not).
    pub base_bytes_acked: u32,
    /// `bytes_received` at `ESTABLISHED`.
    pub base_bytes_received: u32,
    /// The low 32 bits of the counters as the last walk reported them: a socket whose
    /// counters and state did not change since is not reported again (see
    /// [`WalkControl`]). Only compared for a change: a socket whose counters all moved by
    /// exact multiples of 2^32 (2^16 retransmits) since its last report, and nothing
    /// else, waits for its next change, close or full walk to be reported.
    pub walked_bytes_acked: u32,
    pub walked_bytes_received: u32,
    /// Where a client's local end sits in the `CLIENT_ENDPOINTS` set (socket-storage
    /// build): `bucket * ENDPOINT_WAYS + way + 1`; 0 when not recorded.
    pub endpoint_slot: u32,
    /// The low 16 bits of `WalkControl::generation` of the walk that last reported the
    /// socket. Two generations 65,536 walks apart read as one: the socket is then
    /// reported again, never skipped.
    pub walked_generation: u16,
    pub walked_total_retrans: u16,
    /// `total_retrans` at `ESTABLISHED`: the handshake's retransmitted SYNs (or SYN-ACKs),
    /// a few at most (saturated at 65,535).
    pub base_total_retrans: u16,
    /// Local port at `ESTABLISHED`, host byte order. The kernel releases an
    /// automatically bound port (`inet_put_port`) before the `TCP_CLOSE` transition, so
    /// `skc_num` reads 0 there: the close path uses this copy to remove the client's
    /// `CLIENT_ENDPOINTS` entry and to report the client port.
    pub local_port: u16,
    pub role: u8,
    pub flags: u8,
    pub walked_state: u8,
    pub _pad: u8,
}

/// What the next `iter/tcp` walk reports: value of the one-entry `WALK_CONTROL` array,
/// written by userspace before each walk.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WalkControl {
    /// Changes with every walk. The kernel re-runs the program for a socket whose record
    /// did not fit the read buffer (the record is discarded and shown again in the next
    /// read): a socket already reported in this generation is reported again, never
    /// skipped as unchanged.
    pub generation: u32,
    /// A [`walk_mode`] value.
    pub mode: u32,
    /// When the previous walk started (us of CLOCK_MONOTONIC; 0 if none to trust). Every
    /// counter a walk reports changes only with a packet, and a packet refreshes
    /// `tcp_mstamp`: a socket whose last packet is older than this was visited by the
    /// previous walk after its last change, so it is skipped before its storage is looked
    /// up (the lookup's cache misses are most of the cost of an idle socket).
    pub quiet_before_us: u64,
}

pub mod walk_mode {
    /// Only sockets whose counters or state changed since they were last reported,
    /// sockets never reported, and listeners: an idle connection costs one storage
    /// lookup and a few loads per walk.
    pub const CHANGED: u32 = 0;
    /// Every socket: userspace reconciles its table (connections whose close record was
    /// lost) and starts over after a walk it could not read.
    pub const FULL: u32 = 1;
}

/// The local end of an established client socket, as `CLIENT_ENDPOINTS` knows it (the
/// key of its hash in the socket-table build, hashed to an [`EndpointKey::place`] in
/// the set of the socket-storage build), looked up by a server socket's remote end to
/// tell that both ends are on this host.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// IPv6 or IPv4-mapped IPv6 address.
    pub addr: [u8; 16],
    /// Network namespace inode for loopback addresses (each namespace has its own
    /// 127.0.0.1), 0 otherwise (addresses are unique across the host's namespaces).
    pub netns: u32,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl EndpointKey {
    /// The one loopback rule both sides apply: loopback addresses (127.0.0.0/8 as
    /// IPv4-mapped, and ::1) exist once per network namespace, so they need the namespace
    /// to identify an endpoint; any other address is unique on the host.
    #[inline(always)]
    pub fn new(addr: [u8; 16], port: u16, netns: u32) -> Self {
        EndpointKey {
            addr,
            netns: if Self::is_loopback(&addr) { netns } else { 0 },
            port,
            _pad: 0,
        }
    }

    /// Whether `addr` (IPv6 or IPv4-mapped) is a loopback address: the only kind whose
    /// key holds the namespace.
    #[inline(always)]
    pub fn is_loopback(addr: &[u8; 16]) -> bool {
        let v4_loopback = addr[10] == 0xff && addr[11] == 0xff && addr[12] == 127;
        let v6_loopback = addr[..15].iter().all(|b| *b == 0) && addr[15] == 1;
        v4_loopback || v6_loopback
    }
}

/// Slots per bucket of `SOCK_STATE_KEYS`: 7 socket cookies and the bucket's overflow
/// count, one 64-byte cache line.
pub const STATE_WAYS: u32 = 7;

/// Overflow buckets a socket whose home bucket is full may take a slot in, each a
/// different hash of its cookie.
pub const OVERFLOW_SPAN: u32 = 4;

/// Consecutive socket cookies whose home buckets follow each other from one random start
/// (64 buckets, one 4 KiB page of the table).
pub const COOKIES_PER_RUN: u64 = 128;

/// Consecutive socket cookies that share a home bucket (one cache line of keys, and
/// neighbouring lines of states). Two, not more: with four, a table of `max_connections`
/// sockets held while short ones churn past them found no room for about one socket in
/// 100,000 (the tests), because homes filled in fours.
pub const COOKIES_PER_BUCKET: u64 = 2;

/// One bucket of `SOCK_STATE_KEYS` (the default build): the cookies of the sockets whose
/// state sits in the matching slots of `SOCK_STATES` (`bucket * STATE_WAYS + way`); 0 is
/// a free slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StateBucket {
    pub cookies: [u64; STATE_WAYS as usize],
    /// Sockets whose home is this bucket but whose state sits in their overflow bucket:
    /// a lookup that misses here looks there only while this is not 0.
    pub overflowed: u64,
}

/// Fewest buckets of `SOCK_STATE_KEYS` (1,792 slots, 170 KiB with the states): with a
/// small `max_connections` the endpoint set is what fills, and the connections it turns
/// away are still tracked, from their server end.
pub const MIN_STATE_BUCKETS: u32 = 256;

/// Buckets of `SOCK_STATE_KEYS` one run of `ridley_walk_states` visits: the walks
/// between full walks are `buckets / WALK_CHUNK_BUCKETS` runs (a `bpf()` call each).
pub const WALK_CHUNK_BUCKETS: u32 = 16;

/// Size of `WALK_RECORDS`: one run's records at most, each with the ring's 8-byte
/// header, in a power of two of pages.
pub const WALK_RECORDS_BYTES: u32 = 64 * 1024;
const _: () =
    assert!(WALK_CHUNK_BUCKETS * STATE_WAYS * (SockRecord::SIZE as u32 + 8) <= WALK_RECORDS_BYTES);

/// Buckets of `SOCK_STATE_KEYS` for `max_connections`: one per two connections, a power
/// of two, so at least 3.5 slots per connection (for the clients, and the servers of
/// remote clients), and at least `MIN_STATE_BUCKETS`. With `max_connections` sockets at
/// once, one finding its home and all its overflow buckets full does not happen in
/// practice (see the tests; at 1.75 slots per connection about one in 600 did).
pub fn state_table_buckets(max_connections: u32) -> u32 {
    max_connections
        .div_ceil(2)
        .max(MIN_STATE_BUCKETS)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
}

/// The home bucket of a socket cookie in a table of `mask + 1` buckets (a power of two).
///
/// The kernel hands out cookies in increasing order (in per-CPU batches), so a storm's
/// sockets have nearly consecutive cookies: `COOKIES_PER_BUCKET` of them share a home,
/// and the next ones take the next bucket, a page of the table per `COOKIES_PER_RUN`
/// sockets instead of a random line (a cache and TLB miss) per socket. Each run starts
/// at a random bucket (Fibonacci hashing of the run's number: one multiplication), so
/// that the sockets that stay (every sixteenth of a churn, say) spread over the table
/// instead of landing on the same buckets run after run.
#[inline(always)]
pub fn home_bucket(cookie: u64, mask: u32) -> u32 {
    let run_start = ((cookie / COOKIES_PER_RUN).wrapping_mul(GOLDEN_RATIO_64) >> 32) as u32;
    run_start.wrapping_add(((cookie % COOKIES_PER_RUN) / COOKIES_PER_BUCKET) as u32) & mask
}

/// 2^64 divided by the golden ratio: Fibonacci hashing's multiplier.
const GOLDEN_RATIO_64: u64 = 0x9e37_79b9_7f4a_7c15;

/// The `nth` (< `OVERFLOW_SPAN`) overflow bucket of a socket cookie: independent hashes,
/// because the home buckets of neighbouring runs fill together, and so would the
/// neighbours of a crowded bucket.
#[inline(always)]
pub fn overflow_bucket(cookie: u64, nth: u32, mask: u32) -> u32 {
    mix64(cookie ^ (u64::from(nth) + 1).wrapping_mul(GOLDEN_RATIO_64)) as u32 & mask
}

/// Slots per bucket of the `CLIENT_ENDPOINTS` set: 8 fingerprints, one 64-byte cache line.
pub const ENDPOINT_WAYS: u32 = 8;

/// Consecutive port numbers of one address whose home is the same `CLIENT_ENDPOINTS`
/// bucket: two of a client's connections in a row (the kernel's step of two). Not more:
/// with eight, homes filled in fours, and 500 pods' 65,536 client ends no longer all
/// found room in a set of `max_connections` buckets (the tests).
pub const PORTS_PER_BUCKET: u32 = 4;

/// One bucket of the `CLIENT_ENDPOINTS` set (socket-storage build): fingerprints of the
/// local ends of established client sockets; 0 is a free slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EndpointBucket {
    pub slots: [u64; ENDPOINT_WAYS as usize],
}

/// Where an [`EndpointKey`] sits in the `CLIENT_ENDPOINTS` set: its fingerprint (what a
/// slot holds) and the two buckets it may take a slot in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointPlace {
    /// A 64-bit hash of the whole key, never 0 (a free slot). Two live endpoints share a
    /// fingerprint with a probability of about one in 2^64 per pair.
    pub fingerprint: u64,
    /// The home bucket, then the overflow bucket. A client takes a free slot in the
    /// first, else in the second; a server looks in both. With two choices a key finds no
    /// room only when both are full, which at the set's size (8 slots per
    /// `max_connections`, one key per bucket on average when full) does not happen in
    /// practice (see the tests); with one choice, about one key in 50,000 found its bucket
    /// full at 1.5 keys per bucket.
    pub buckets: [u32; 2],
}

impl EndpointKey {
    /// The key's place in a set of `mask + 1` buckets (a power of two).
    ///
    /// The home bucket is a hash of the address plus the port divided by
    /// `PORTS_PER_BUCKET`, so a client's successive connections, which the kernel gives
    /// nearby ports (`__inet_hash_connect` steps by two, plus small random increments),
    /// share a bucket two at a time and take the next buckets after: a storm of short
    /// connections touches a new line of the set every other connection, in the same few
    /// pages, instead of a random line of a table of megabytes per connection, each a
    /// cache and TLB miss. The overflow bucket is a hash of the whole key, so that a
    /// crowded stretch spills anywhere. murmur3's 64-bit finaliser mixes each address
    /// word in, so that nearby addresses land far apart; the fingerprint mixes in the
    /// namespace and port last.
    #[inline(always)]
    pub fn place(&self, mask: u32) -> EndpointPlace {
        let a = &self.addr;
        let high = u64::from_le_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
        let low = u64::from_le_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
        let address = mix64(mix64(high ^ GOLDEN_RATIO_64) ^ low);
        // 48 bits: two keys of different addresses share a fingerprint only if their
        // address hashes differ in exactly these bits (about one in 2^64 per pair).
        let namespace_and_port = (u64::from(self.netns) << 16) | u64::from(self.port);
        let hash = mix64(address ^ namespace_and_port);
        let fingerprint = if hash == 0 { 1 } else { hash };
        let home = ((address >> 32) as u32).wrapping_add(u32::from(self.port) / PORTS_PER_BUCKET);
        EndpointPlace {
            fingerprint,
            buckets: [home & mask, fingerprint as u32 & mask],
        }
    }
}

/// murmur3's 64-bit finaliser.
#[inline(always)]
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// One socket's view, sent on the ring buffer ([`kind::CLOSED`], [`kind::CONNECT_FAILED`])
/// and written by the `iter/tcp` program ([`kind::LIVE`]). Counters are raw kernel values;
/// userspace subtracts baselines, SYN and FIN.
///
/// 120 bytes, so that with the ring buffer's 8-byte header a close record is exactly two
/// cache lines of the (page-aligned) ring: each record the kernel writes is two lines the
/// reader last touched, not three or four. The narrower fields hold what the kernel keeps
/// for them without loss (see each).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockRecord {
    /// `struct sock` address: with `start_ns`, identifies a connection.
    pub sk: u64,
    pub start_ns: u64,
    pub established_ns: u64,
    /// When the record was written (`bpf_ktime_get_ns`, CLOCK_MONOTONIC): walk records,
    /// and close records of connections never established (a failed connect: the end of
    /// its attempt). 0 in other close records: an established connection's attempt
    /// ended at `established_ns`, and nothing reads a close's time.
    pub ts_ns: u64,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// IPv6 or IPv4-mapped IPv6.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// The handshake's baselines, as [`SockState`] keeps them (saturated, never wrapped).
    pub base_bytes_acked: u32,
    pub base_bytes_received: u32,
    pub netns: u32,
    pub total_retrans: u32,
    /// Smoothed RTT in 1/8 microseconds, as `tcp_sock.srtt_us` keeps it.
    pub srtt_us_x8: u32,
    /// `sk_err` at the time of the record (positive errno, e.g. 111 = ECONNREFUSED; all
    /// fit 16 bits).
    pub sk_err: u16,
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    /// See [`SockState::base_total_retrans`].
    pub base_total_retrans: u16,
    pub kind: u8,
    /// For `CLOSED`/`CONNECT_FAILED`, the state the socket left; for `LIVE`, its state.
    pub state: u8,
    pub role: u8,
    pub flags: u8,
    /// See [`SockState::cgroup_id`].
    pub cgroup_id: u64,
}

impl SockRecord {
    pub const SIZE: usize = core::mem::size_of::<SockRecord>();
}

/// Close records per batch: one ring buffer write per this many closes on a CPU.
pub const CLOSE_BATCH_RECORDS: usize = 32;

/// Close records one CPU has written and not yet sent to the ring buffer (the
/// `CLOSE_BATCHES` per-CPU map). Writing a record into a line this CPU just wrote is a
/// cache hit; reserving ring buffer space per record cost a lock, the ring's positions
/// and two to four lines the reader last touched, for each close. A full batch is sent
/// at once; userspace has each CPU send what it holds after every walk
/// (`flush_closes`), so every close before that is in the ring when it drains.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CloseBatch {
    /// Nonzero while a program on this CPU is changing the batch. Only programs on this
    /// CPU touch it, and one that interrupts another (a flush run from an interrupt, a
    /// close in a softirq that interrupted a flush) sees the flag and leaves the batch
    /// alone.
    pub busy: u32,
    /// Records held, in `records[..count]`.
    pub count: u32,
    pub records: [SockRecord; CLOSE_BATCH_RECORDS],
}

/// What the flush program returns (`flush_closes`).
pub mod flush_result {
    /// The batch was sent or empty.
    pub const DONE: u32 = 0;
    /// A program on that CPU was changing the batch: try again.
    pub const BUSY: u32 = 1;
}

/// A UDP flow as the kernel aggregates it: a connected socket's local end (the client)
/// and the address and port it is connected to (the server). The client's port is not
/// part of it: every socket of one client to one server port is one flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpFlowKey {
    /// IPv4 as IPv4-mapped IPv6, as everywhere.
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    /// The sending or receiving task's cgroup v2 id (userspace keeps it only for
    /// clients in the host's network namespace, as for TCP).
    pub cgroup_id: u64,
    pub netns: u32,
    pub server_port: u16,
    pub _pad: u16,
}

/// What a flow carried since its entry was created, on one CPU (the tables are per-CPU:
/// userspace sums the CPUs' values). Userspace drains a table and deletes its entries
/// once per interval (see `UDP_FLOWS_*` in the programs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpFlowCounts {
    pub sent_datagrams: u64,
    pub sent_bytes: u64,
    pub received_datagrams: u64,
    pub received_bytes: u64,
}

// The layouts are part of the contract: a change here must be deliberate on both sides.
const _: () = assert!(core::mem::size_of::<SockRecord>() == 120);
const _: () = assert!(core::mem::size_of::<SockState>() == 64);
const _: () = assert!(core::mem::size_of::<CloseBatch>() == 8 + 120 * CLOSE_BATCH_RECORDS);
const _: () = assert!(core::mem::size_of::<StateBucket>() == 64);
const _: () = assert!(core::mem::size_of::<WalkControl>() == 16);
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 24);
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 92);
const _: () = assert!(core::mem::size_of::<UdpFlowKey>() == 48);
const _: () = assert!(core::mem::size_of::<UdpFlowCounts>() == 32);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::{
        COOKIES_PER_BUCKET, COOKIES_PER_RUN, ENDPOINT_WAYS, EndpointKey, OVERFLOW_SPAN, STATE_WAYS,
        home_bucket, overflow_bucket, state_table_buckets,
    };
    use std::{collections::VecDeque, vec};

    /// Sockets that find both their buckets full in a state table sized for
    /// `max_connections`, as the programs claim slots (the first free one of the home
    /// bucket, else of the overflow buckets in turn): cookies come in order, and each socket
    /// lives for `lifetime(cookie)` more claims (`None`: for the whole run).
    fn states_without_room(
        cookies: impl Iterator<Item = u64>,
        lifetime: impl Fn(u64) -> Option<usize>,
        max_connections: u32,
    ) -> u32 {
        let buckets = state_table_buckets(max_connections);
        let mut used = vec![0_u32; buckets as usize];
        // (claims left, bucket) of the sockets that will close.
        let mut closing: VecDeque<(usize, u32)> = VecDeque::new();
        let mut without_room = 0;
        for (n, cookie) in cookies.enumerate() {
            while closing.front().is_some_and(|(at, _)| *at <= n) {
                let (_, bucket) = closing.pop_front().unwrap();
                used[bucket as usize] -= 1;
            }
            let mask = buckets - 1;
            let candidates = [home_bucket(cookie, mask)]
                .into_iter()
                .chain((0..OVERFLOW_SPAN).map(|nth| overflow_bucket(cookie, nth, mask)));
            let Some(bucket) = candidates
                .into_iter()
                .find(|b| used[*b as usize] < STATE_WAYS)
            else {
                without_room += 1;
                continue;
            };
            used[bucket as usize] += 1;
            if let Some(life) = lifetime(cookie) {
                closing.push_back((n + life, bucket));
            }
        }
        without_room
    }

    /// At the table's size for `max_connections`, every socket finds room: that many
    /// held at once with consecutive cookies, or scattered among a million short
    /// connections (one in 16 held), or all held while short ones churn past them.
    /// Overfilled, sockets do find no room (counted by the kernel,
    /// SOCK_STATE_UNAVAILABLE), so the harness can fail.
    #[test]
    fn states_find_room_up_to_max_connections() {
        let max = 65_536;
        assert_eq!(states_without_room(1..=u64::from(max), |_| None, max), 0);
        let one_in_16 = |c: u64| if c.is_multiple_of(16) { None } else { Some(64) };
        assert_eq!(
            states_without_room(1..=16 * u64::from(max), one_in_16, max),
            0
        );
        let held_then_churn = |c: u64| {
            if c <= u64::from(max) {
                None
            } else {
                Some(1_000)
            }
        };
        assert_eq!(states_without_room(1..=1_000_000, held_then_churn, max), 0);
        assert!(states_without_room(1..=8 * u64::from(max), |_| None, max) > 0);
    }

    /// A storm's consecutive cookies share home buckets two at a time and take the next
    /// buckets after, a run of 64 buckets (one page of the table) at a time; the next run
    /// starts elsewhere.
    #[test]
    fn consecutive_cookies_take_consecutive_buckets() {
        let mask = state_table_buckets(65_536) - 1;
        let first = 1_024;
        assert!(first % COOKIES_PER_RUN == 0);
        let home = |cookie| home_bucket(cookie, mask);
        for cookie in first..first + COOKIES_PER_RUN {
            let step = ((cookie - first) / COOKIES_PER_BUCKET) as u32;
            assert_eq!(home(cookie), home(first).wrapping_add(step) & mask);
        }
        assert_eq!(home(first + 1), home(first));
        assert_ne!(home(first + 2), home(first));
        let last = first + COOKIES_PER_RUN - 1;
        assert_eq!(home(last), home(first).wrapping_add(63) & mask);
        assert_ne!(home(last + 1), home(last).wrapping_add(1) & mask);
        let runs: std::collections::BTreeSet<u32> = (0..64)
            .map(|run| home(first + run * COOKIES_PER_RUN))
            .collect();
        assert_eq!(runs.len(), 64, "runs start apart");
        let overflow: std::vec::Vec<u32> = (0..OVERFLOW_SPAN)
            .map(|nth| overflow_bucket(first, nth, mask))
            .collect();
        assert!(overflow.iter().all(|b| *b != home(first)), "{overflow:?}");
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
        ]
    }

    /// Endpoints that find both their buckets full when `keys` go into a set of
    /// `buckets`, each taking the first free slot of its first bucket, else of its
    /// second, as the kernel does.
    fn overflow(keys: impl Iterator<Item = EndpointKey>, buckets: u32) -> u32 {
        let mut used = vec![0_u32; buckets as usize];
        let mut overflow = 0;
        for key in keys {
            let [first, second] = key.place(buckets - 1).buckets;
            if used[first as usize] < ENDPOINT_WAYS {
                used[first as usize] += 1;
            } else if used[second as usize] < ENDPOINT_WAYS {
                used[second as usize] += 1;
            } else {
                overflow += 1;
            }
        }
        overflow
    }

    /// Every port of one address after another, as one busy client opens them.
    fn consecutive(clients: u32) -> impl Iterator<Item = EndpointKey> {
        (0..clients).map(|i| EndpointKey::new(v4([10, 0, (i >> 16) as u8, 7]), i as u16, 0))
    }

    /// `clients` spread over `pods` addresses of one /16, each using a stretch of the
    /// ephemeral range with the kernel's step of two, from a different offset.
    fn pods(clients: u32, pods: u32) -> impl Iterator<Item = EndpointKey> {
        (0..clients).map(move |i| {
            let pod = i % pods;
            let port = 32_768 + (pod * 7_919 + (i / pods) * 2) % 28_232;
            EndpointKey::new(v4([10, 1, (pod >> 8) as u8, pod as u8]), port as u16, 0)
        })
    }

    /// At the set's size for `max_connections` (one bucket each) every endpoint finds
    /// room, at one and a half times that too, whether one client uses every port or
    /// many pods use stretches of theirs; at twice, one client still does, and of 5,000
    /// pods' ends at most one in 10,000 finds both its buckets full (the kernel counts
    /// it, ENDPOINTS_FULL). With one choice of bucket (as `[first, first]`) consecutive
    /// keys overflowed at 1.5 per bucket (a few per 50,000).
    #[test]
    fn endpoints_find_room_up_to_max_connections_and_beyond() {
        assert_eq!(overflow(consecutive(65_536), 65_536), 0);
        assert_eq!(overflow(consecutive(131_072), 65_536), 0);
        assert_eq!(overflow(pods(65_536, 500), 65_536), 0);
        assert_eq!(overflow(pods(98_304, 5_000), 65_536), 0);
        assert!(overflow(pods(131_072, 5_000), 65_536) <= 131_072 / 10_000);
        // Overfilled, it does overflow (and the kernel counts it, ENDPOINTS_FULL).
        assert!(overflow(pods(7 * 65_536, 5_000), 65_536) > 0);
    }

    /// A client's successive ports (the kernel's step of two) share a home bucket two at
    /// a time, and the next two take the next bucket: 128 connections in a row touch one
    /// 4 KiB page of the set. Fingerprints still differ by port.
    #[test]
    fn nearby_ports_take_nearby_buckets() {
        let mask = 65_535;
        for addr in [v4([10, 0, 0, 7]), v4([127, 0, 0, 1])] {
            let place = |port| EndpointKey::new(addr, port, 4026531840).place(mask);
            let home = |port| place(port).buckets[0];
            for port in (40_000..40_128).step_by(4) {
                assert_eq!(home(port + 2), home(port));
                assert_eq!(home(port + 4), (home(port) + 1) & mask);
                assert_ne!(place(port + 2).fingerprint, place(port).fingerprint);
            }
        }
    }

    #[test]
    fn fingerprints_tell_ends_apart_and_are_never_free_slots() {
        let fingerprint = |key: EndpointKey| key.place(u32::MAX).fingerprint;
        let a = fingerprint(EndpointKey::new(v4([10, 0, 0, 7]), 40000, 0));
        let b = fingerprint(EndpointKey::new(v4([10, 0, 0, 7]), 40001, 0));
        let c = fingerprint(EndpointKey::new(v4([10, 0, 0, 8]), 40000, 0));
        assert!(a != b && a != c && b != c);
        // Loopback exists once per namespace; other addresses are host-wide.
        let lo = |netns| fingerprint(EndpointKey::new(v4([127, 0, 0, 1]), 40000, netns));
        assert_ne!(lo(1), lo(2));
        let pod = |netns| fingerprint(EndpointKey::new(v4([10, 0, 0, 7]), 40000, netns));
        assert_eq!(pod(1), pod(2));
        assert_ne!(fingerprint(EndpointKey::default()), 0);
    }
}
