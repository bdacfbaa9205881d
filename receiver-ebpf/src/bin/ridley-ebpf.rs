//! ridley's kernel programs. Three hooks, a flush and a walk, no kprobes, no fentry:
//!
//! - `tp_btf/inet_sock_set_state` sees every TCP state change of every socket in every
//!   network namespace. It records how a connection was opened (client or server, when,
//!   with which handshake counters) in a slot of `SOCK_STATES` taken under the socket's
//!   cookie, and at `TCP_CLOSE` writes one record with the final counters into its CPU's
//!   batch (`CLOSE_BATCHES`, sent to the `EVENTS` ring buffer 32 records at a time) and
//!   frees the slot. Cost: a few loads and one lookup in a warm cache line per
//!   transition, nothing per packet.
//! - `raw_tp` `ridley_flush_closes` is attached nowhere: userspace runs it on each CPU
//!   after every walk to send what that CPU's batch holds.
//! - `raw_tp` `ridley_walk_states` is attached nowhere either: once per collection
//!   interval userspace runs it over `SOCK_STATE_KEYS`, a chunk of buckets per run, to
//!   walk the sockets that have state, in every namespace at once: live counters of the
//!   connections whose counters changed since the last walk, into `WALK_RECORDS`; an
//!   idle connection costs a few reads.
//! - `iter/tcp` walks the TCP sockets of one network namespace when userspace reads it,
//!   for the full walks (the first, then every 60th): every connection, listeners (to
//!   give connections that predate the daemon their role), and state for the sockets
//!   that predate the programs.
//! - `tp_btf/sock_send_length` and `tp_btf/sock_recv_length` (when UDP is enabled) see
//!   every socket send and receive; a connected UDP socket's datagrams are added to its
//!   flow in `UDP_FLOWS_*`. Everything else (TCP above all) leaves after one load.
//!
//! Built twice from this file. By default per-socket state and the client ends are
//! lock-free preallocated tables (socket cookies in tracing programs and
//! compare-and-exchange, 5.12+). With the `socket-table` feature both are hash tables,
//! the state keyed by socket address, for 5.10 and 5.11 kernels: entries are removed at
//! `TCP_CLOSE`, which every socket with state reaches, and there is no
//! `ridley_walk_states` (the walks between full walks go through `iter/tcp` too).
//!
//! Both hooks receive BTF-typed socket pointers, so kernel fields are loaded directly at
//! offsets userspace resolved from BTF (`OFFSETS`, constants to the verifier, which checks
//! each load against the kernel's types); aya-ebpf has no CO-RE field relocations.
//! This file must not interpret what it reads: userspace owns the accounting.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// Compare-and-exchange for the lock-free sets (`compare_exchange`): the BPF instruction
// set has it (5.12+), Rust's bpfel target does not expose it as
// `AtomicU64::compare_exchange`.
#![cfg_attr(
    all(target_arch = "bpf", not(feature = "socket-table")),
    feature(core_intrinsics),
    allow(internal_features)
)]

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The real programs are built for bpfel-unknown-none by receiver/build.rs; this stub
    // keeps `cargo build --workspace` on the host working.
}

#[cfg(target_arch = "bpf")]
mod programs {
    use core::ffi::c_void;

    #[cfg(not(feature = "socket-table"))]
    use aya_ebpf::bindings::BPF_F_MMAPABLE;
    #[cfg(not(feature = "socket-table"))]
    use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_get_socket_cookie};
    #[cfg(feature = "socket-table")]
    use aya_ebpf::{bindings::BPF_F_NO_PREALLOC, maps::HashMap};
    use aya_ebpf::{
        bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
        helpers::{
            bpf_get_current_cgroup_id, bpf_ktime_get_ns,
            generated::{bpf_ringbuf_output, bpf_seq_write, bpf_skc_to_tcp_sock},
        },
        macros::{btf_tracepoint, map},
        maps::{Array, PerCpuArray, PerCpuHashMap, RingBuf},
        programs::BtfTracePointContext,
    };
    use ridley_ebpf::{
        AF_INET, AF_INET6, CLOSE_BATCH_RECORDS, CloseBatch, EndpointKey, IPPROTO_TCP, IPPROTO_UDP,
        KernelOffsets, MSG_PEEK, SockRecord, SockState, UdpFlowCounts, UdpFlowKey, WalkControl,
        counter, flags, flush_result, kind, role, tcp_state, walk_mode,
    };
    #[cfg(not(feature = "socket-table"))]
    use ridley_ebpf::{
        COOKIES_PER_BUCKET, ENDPOINT_WAYS, EndpointBucket, EndpointPlace, OVERFLOW_SPAN,
        STATE_WAYS, StateBucket, WALK_CHUNK_BUCKETS, WALK_RECORDS_BYTES, home_bucket,
        overflow_bucket,
    };

    /// Per-socket state from the first tracked transition to the socket's `TCP_CLOSE`:
    /// slot `bucket * STATE_WAYS + way` holds the state of the socket whose cookie is in
    /// way `way` of bucket `bucket` of `SOCK_STATE_KEYS`. Preallocated and keyed by the
    /// socket's cookie, so that taking a slot is one compare-and-exchange in a cache line
    /// a storm keeps warm: socket-local storage, which this replaced, allocated two
    /// objects charged to the memory cgroup and took a lock for each socket, 56 % of the
    /// state-change program's time. Sized by userspace (a power of two of buckets, one
    /// per two `max_connections`: 3.5 slots or more per connection;
    /// `STATE_BUCKET_MASK`). A socket that finds its home and overflow buckets full is
    /// counted (SOCK_STATE_UNAVAILABLE). Page-aligned (mmapable), as are
    /// `SOCK_STATE_KEYS` and `CLIENT_ENDPOINTS`: an array's values otherwise start
    /// part-way into a cache line, and each 64-byte state or bucket would span two.
    #[cfg(not(feature = "socket-table"))]
    #[map]
    static SOCK_STATES: Array<SockState> =
        Array::with_max_entries(16384 * STATE_WAYS, BPF_F_MMAPABLE);

    /// The cookies of the sockets in `SOCK_STATES`, `STATE_WAYS` to a 64-byte bucket with
    /// the bucket's overflow count; 0 is a free slot. A socket claims a free slot of its
    /// home bucket, else of its overflow bucket (`state_buckets`), with
    /// compare-and-exchange; only its own transitions (serialised by the socket lock)
    /// write it after that, and its `TCP_CLOSE` frees it. The walks between full walks
    /// iterate over this map.
    #[cfg(not(feature = "socket-table"))]
    #[map]
    static SOCK_STATE_KEYS: Array<StateBucket> = Array::with_max_entries(16384, BPF_F_MMAPABLE);

    /// Buckets of `SOCK_STATE_KEYS` minus one (a power of two minus one), set by userspace.
    #[unsafe(no_mangle)]
    static STATE_BUCKET_MASK: u32 = 0;

    /// Per-socket state where tracing programs have no socket cookies or
    /// compare-and-exchange (before 5.12): keyed by the socket's address, allocated as used (no preallocation:
    /// memory follows the sockets tracked), removed at the socket's `TCP_CLOSE`
    /// (`release_storage`). The size is a default; userspace sets it from
    /// `max_connections`. A full table is counted (SOCK_STATE_UNAVAILABLE).
    #[cfg(feature = "socket-table")]
    #[map]
    static SOCK_STATES: HashMap<u64, SockState> =
        HashMap::with_max_entries(131072, BPF_F_NO_PREALLOC);

    /// Local ends of established client sockets, so that a server socket on this host
    /// can tell its client is local (each link once): a set of `EndpointKey`
    /// fingerprints, `ENDPOINT_WAYS` slots per bucket (one cache line), two candidate
    /// buckets per key (`EndpointKey::place`). A client claims a free slot with
    /// compare-and-exchange at `ESTABLISHED` and clears it at `TCP_CLOSE` (a claimed slot
    /// is written by its owner only); a server reads its client's two buckets. No lock,
    /// no allocation, nothing to free: the hash table this replaced took a bucket lock
    /// with interrupts off for each insert and delete, about 150 ns of the program's mean
    /// per run. Fixed memory, eight slots per `max_connections` (4 MiB at the default),
    /// sized by userspace, which also sets `ENDPOINT_BUCKET_MASK`. Both buckets full is
    /// counted (ENDPOINTS_FULL); the server end then reports too.
    #[cfg(not(feature = "socket-table"))]
    #[map]
    static CLIENT_ENDPOINTS: Array<EndpointBucket> = Array::with_max_entries(32768, BPF_F_MMAPABLE);

    /// Buckets of `CLIENT_ENDPOINTS` minus one (a power of two minus one), set by userspace.
    #[unsafe(no_mangle)]
    static ENDPOINT_BUCKET_MASK: u32 = 0;

    /// Local ends of established client sockets (socket-table build: its kernels, before
    /// 5.12, have no compare-and-exchange for the set above). Preallocated: an insert and a
    /// delete per client connection then take an element from a per-CPU free list
    /// instead of the allocator, which measured 38 % of the state-change program's time
    /// (398 -> 247 ns per run); the price is the whole map's memory up front (about 5 MiB
    /// at the default size). The size is a default; userspace sets it from
    /// `max_connections`. Entries are removed at the client's `TCP_CLOSE`, which every TCP
    /// socket reaches; a full map is counted (ENDPOINTS_FULL), never silently ignored.
    #[cfg(feature = "socket-table")]
    #[map]
    static CLIENT_ENDPOINTS: HashMap<EndpointKey, u8> = HashMap::with_max_entries(65536, 0);

    /// One record per closed or failed connection; drained continuously by userspace.
    /// A full buffer drops the record and counts it (RINGBUF_DROPS).
    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

    /// The records of one run of `ridley_walk_states`, which userspace drains after each
    /// run: the ring is empty when a run starts, and one run's records fit.
    #[cfg(not(feature = "socket-table"))]
    #[map]
    static WALK_RECORDS: RingBuf = RingBuf::with_byte_size(WALK_RECORDS_BYTES, 0);

    /// One entry: this CPU's close records not yet in `EVENTS` (see `CloseBatch`). At
    /// most `CLOSE_BATCH_RECORDS` records (3,848 bytes) per CPU; empty after every walk.
    #[map]
    static CLOSE_BATCHES: PerCpuArray<CloseBatch> = PerCpuArray::with_max_entries(1, 0);

    #[map]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

    /// One entry: what the next walk reports, written by userspace.
    #[map]
    static WALK_CONTROL: Array<WalkControl> = Array::with_max_entries(1, 0);

    /// UDP flows, double-buffered: the programs add to the table `UDP_CONTROL` names;
    /// userspace switches tables once per interval, waits out the program runs that
    /// read the old index, then reads and deletes every entry of the table it left. The
    /// tables return to empty every interval; what does not fit is counted
    /// (UDP_FLOWS_FULL). Per-CPU values: a CPU adds to its own copy (no atomic adds,
    /// which this target does not have, and no cache line shared between CPUs);
    /// userspace sums them. The size is a default; userspace sets it from
    /// `max_udp_flows`.
    #[map]
    static UDP_FLOWS_0: PerCpuHashMap<UdpFlowKey, UdpFlowCounts> =
        PerCpuHashMap::with_max_entries(2048, 0);
    #[map]
    static UDP_FLOWS_1: PerCpuHashMap<UdpFlowKey, UdpFlowCounts> =
        PerCpuHashMap::with_max_entries(2048, 0);

    /// One entry: which `UDP_FLOWS_*` table the programs add to (0 or 1).
    #[map]
    static UDP_CONTROL: Array<u32> = Array::with_max_entries(1, 0);

    /// Filled in by userspace before load (see `KernelOffsets`).
    #[unsafe(no_mangle)]
    static OFFSETS: KernelOffsets = KernelOffsets {
        skc_family: 0,
        skc_state: 0,
        skc_num: 0,
        skc_dport: 0,
        skc_rcv_saddr: 0,
        skc_daddr: 0,
        skc_v6_rcv_saddr: 0,
        skc_v6_daddr: 0,
        skc_net: 0,
        net_ns_inum: 0,
        sk_err: 0,
        sk_flags: 0,
        bytes_acked: 0,
        bytes_received: 0,
        total_retrans: 0,
        srtt_us: 0,
        snd_una: 0,
        write_seq: 0,
        tcp_mstamp: 0,
        tcp_clock_cache: 0,
        sk_protocol: 0,
        skc_cookie: 0,
        sk_socket: 0,
    };

    /// Wake the reader only once this many bytes wait in `EVENTS`; userspace also drains
    /// on a short timer. Waking it for every record costs more than the record itself.
    #[unsafe(no_mangle)]
    static RINGBUF_WAKEUP_BYTES: u64 = 0;

    /// The ring buffer's header before each entry.
    const RINGBUF_HEADER_BYTES: u64 = 8;

    /// `SOCK_DONE` in `enum sock_flags`: set by `tcp_fin()` when the peer's FIN arrives.
    const SOCK_DONE_BIT: u64 = 1 << 1;

    /// The offset of one field, read on its own so that the verifier sees a load of a
    /// constant from frozen read-only data (a whole-struct copy would go through the
    /// stack and lose that).
    macro_rules! offset {
        ($field:ident) => {
            // SAFETY: a plain read of our own read-only global; volatile so that the
            // compiler keeps the values userspace writes instead of folding the zeros.
            unsafe { core::ptr::read_volatile(&raw const OFFSETS.$field) }
        };
    }

    /// Plain-data kernel-boundary types: all-zero bytes are a valid value, and the size is
    /// a whole number of 8-byte words at 8-byte alignment (checked in `zero`).
    ///
    /// # Safety
    /// Implement only for `#[repr(C)]` types of integers and arrays of them.
    unsafe trait Zeroable {}
    // SAFETY: both are `#[repr(C)]` structs of integers and integer arrays, with u64 members.
    unsafe impl Zeroable for SockState {}
    // SAFETY: as above.
    unsafe impl Zeroable for SockRecord {}

    /// Zeroes the `T` at `dst` with one 8-byte store per word. A struct literal with
    /// `..Default::default()` or `write(T::default())` compiles to a call of the BPF
    /// build's `memset`, a loop of one-byte stores (a 144-byte record took about 600
    /// instructions); volatile stores keep LLVM from turning this back into that call.
    ///
    /// # Safety
    /// `dst` must be valid for writes of a `T`.
    #[inline(always)]
    unsafe fn zero<T: Zeroable>(dst: *mut T) {
        const { assert!(core::mem::size_of::<T>() % 8 == 0 && core::mem::align_of::<T>() == 8) };
        let words = dst.cast::<u64>();
        let mut i = 0;
        while i < core::mem::size_of::<T>() / 8 {
            // SAFETY: inside `*dst` (the caller's contract), aligned to 8.
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
            i += 1;
        }
    }

    /// Zeroes `slot` in place (see `zero`) and hands it out initialised. Built in the
    /// caller's stack slot: a value returned by move is copied through the stack, which
    /// the iterators' 512 bytes do not hold twice.
    #[inline(always)]
    fn zeroed<T: Zeroable>(slot: &mut core::mem::MaybeUninit<T>) -> &mut T {
        // SAFETY: see `Zeroable`; every byte is written before `assume_init_mut`.
        unsafe {
            zero(slot.as_mut_ptr());
            slot.assume_init_mut()
        }
    }

    /// A zeroed walk record in `slot`, with the fields every walk record sets.
    #[inline(always)]
    fn live_record(
        slot: &mut core::mem::MaybeUninit<SockRecord>,
        sk: impl SockFields,
        state: u8,
    ) -> &mut SockRecord {
        let rec = zeroed(slot);
        rec.sk = sk.address();
        rec.kind = kind::LIVE;
        rec.state = state;
        rec
    }

    /// Replaces the 8-byte slot's `current` value with `new` if it still holds it; whether
    /// it did. The slots of the lock-free sets (`SOCK_STATE_KEYS`, `CLIENT_ENDPOINTS`)
    /// change hands only through this, so two programs never both think they took one.
    ///
    /// # Safety
    /// `slot` must point into a map value, valid for the program run.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    unsafe fn compare_exchange(slot: *mut u64, current: u64, new: u64) -> bool {
        // SAFETY: the caller's; the BPF instruction set has compare-and-exchange (5.12+),
        // the bpfel target does not expose it as `AtomicU64::compare_exchange`.
        unsafe {
            core::intrinsics::atomic_cxchg::<
                u64,
                { core::intrinsics::AtomicOrdering::SeqCst },
                { core::intrinsics::AtomicOrdering::Relaxed },
            >(slot, current, new)
            .1
        }
    }

    /// Takes the free (0) slot for `value`; whether it did. The plain read first spares
    /// an atomic on a slot already held.
    ///
    /// # Safety
    /// As `compare_exchange`.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    unsafe fn take_free_slot(slot: *mut u64, value: u64) -> bool {
        // SAFETY: the caller's; a slot written meanwhile reads old or new.
        unsafe { core::ptr::read_volatile(slot) == 0 && compare_exchange(slot, 0, value) }
    }

    fn bump(index: u32) {
        bump_by(index, 1);
    }

    #[inline(always)]
    fn bump_by(index: u32, n: u64) {
        if let Some(slot) = COUNTERS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe { *slot += n };
        }
    }

    /// A socket's fields at offsets userspace resolved from BTF, read one way or another:
    /// the fields and their meaning are written once, for both ways.
    trait SockFields: Copy {
        /// Loads the `T` at byte `off` of the socket.
        fn load<T: Copy + Default>(self, off: u32) -> T;

        /// The inode number of the socket's network namespace.
        fn netns(self) -> u32;

        #[inline(always)]
        fn family(self) -> u16 {
            self.load(offset!(skc_family))
        }

        #[inline(always)]
        fn state(self) -> u8 {
            self.load(offset!(skc_state))
        }

        /// Both ends of the socket. IPv4 is IPv4-mapped (::ffff:a.b.c.d).
        #[inline(always)]
        fn ends(self, family: u16) -> Ends {
            let (local_addr, remote_addr) = if family == AF_INET {
                (
                    v4_mapped(self.load(offset!(skc_rcv_saddr))),
                    v4_mapped(self.load(offset!(skc_daddr))),
                )
            } else {
                (
                    self.load(offset!(skc_v6_rcv_saddr)),
                    self.load(offset!(skc_v6_daddr)),
                )
            };
            Ends {
                local_addr,
                remote_addr,
                local_port: self.load(offset!(skc_num)),
                remote_port: u16::from_be(self.load(offset!(skc_dport))),
            }
        }

        /// The `CLIENT_ENDPOINTS` key of one of the socket's ends. The namespace is read
        /// only for a loopback address, the one kind the key keeps it for: it sits in the
        /// socket's `struct net`, a cache line the TCP path does not touch: a miss on a
        /// busy host.
        #[inline(always)]
        fn endpoint_key(self, addr: [u8; 16], port: u16) -> EndpointKey {
            let netns = if EndpointKey::is_loopback(&addr) {
                self.netns()
            } else {
                0
            };
            EndpointKey::new(addr, port, netns)
        }

        /// Fills the addressing part of a record.
        #[inline(always)]
        fn read_addresses(self, family: u16, rec: &mut SockRecord) {
            // Straight into the record: an `Ends` on the way would take stack the
            // iterators do not have.
            if family == AF_INET {
                put_v4_mapped(&mut rec.local_addr, self.load(offset!(skc_rcv_saddr)));
                put_v4_mapped(&mut rec.remote_addr, self.load(offset!(skc_daddr)));
            } else {
                rec.local_addr = self.load(offset!(skc_v6_rcv_saddr));
                rec.remote_addr = self.load(offset!(skc_v6_daddr));
            }
            rec.local_port = self.load(offset!(skc_num));
            rec.remote_port = u16::from_be(self.load(offset!(skc_dport)));
            rec.netns = self.netns();
        }

        /// Fills the tcp_sock counters and error state of a record.
        #[inline(always)]
        fn read_counters(self, rec: &mut SockRecord) {
            rec.bytes_acked = self.load(offset!(bytes_acked));
            rec.bytes_received = self.load(offset!(bytes_received));
            rec.total_retrans = self.load(offset!(total_retrans));
            rec.srtt_us_x8 = self.load(offset!(srtt_us));
            let snd_una: u32 = self.load(offset!(snd_una));
            let write_seq: u32 = self.load(offset!(write_seq));
            if snd_una == write_seq {
                rec.flags |= flags::ALL_ACKED;
            }
            let sk_err: i32 = self.load(offset!(sk_err));
            // A positive errno: all fit (see `SockRecord::sk_err`).
            rec.sk_err = sk_err.clamp(0, i32::from(u16::MAX)) as u16;
            let sk_flags: u64 = self.load(offset!(sk_flags));
            if sk_flags & SOCK_DONE_BIT != 0 {
                rec.flags |= flags::PEER_FIN;
            }
        }

        /// Whether what was read through this handle is the socket's own: always for a
        /// pointer the kernel handed the program; see `ProbedSock`.
        #[inline(always)]
        fn still_same(self) -> bool {
            true
        }

        /// The socket's address, as records carry it.
        fn address(self) -> u64;
    }

    /// A socket pointer the verifier knows as a BTF `struct sock`: the fields of
    /// `sock_common` and `sock` load directly, those of `tcp_sock` only after
    /// [`Sock::tcp`]. Most transitions need nothing else, so they skip the cast.
    #[derive(Clone, Copy)]
    struct Sock(*const u8);

    impl SockFields for Sock {
        #[inline(always)]
        fn load<T: Copy + Default>(self, off: u32) -> T {
            // SAFETY: a direct load from a BTF pointer: the verifier checks at load time
            // that `off` (a constant) and `size_of::<T>()` fall inside one field of the
            // kernel's struct, and the JIT turns a fault on a socket being torn down into
            // a zero read instead of an oops.
            unsafe { core::ptr::read_volatile(self.0.add(off as usize) as *const T) }
        }

        #[inline(always)]
        fn netns(self) -> u32 {
            let net: *const u8 = self.load(offset!(skc_net));
            let inum = offset!(net_ns_inum) as usize;
            // SAFETY: `net` is the BTF `struct net *` of the socket, loaded above; the
            // same checked, fault-tolerant direct load as `load`.
            unsafe { core::ptr::read_volatile(net.add(inum) as *const u32) }
        }

        #[inline(always)]
        fn address(self) -> u64 {
            self.0 as u64
        }
    }

    /// A socket pointer the verifier knows as a BTF `struct tcp_sock` (whose first member
    /// is the `struct sock`, and its first the `struct sock_common`).
    #[derive(Clone, Copy)]
    struct TcpSock(*const u8);

    impl SockFields for TcpSock {
        #[inline(always)]
        fn load<T: Copy + Default>(self, off: u32) -> T {
            self.sock().load(off)
        }

        #[inline(always)]
        fn netns(self) -> u32 {
            self.sock().netns()
        }

        #[inline(always)]
        fn address(self) -> u64 {
            self.sock().address()
        }
    }

    impl TcpSock {
        /// The full TCP socket behind `sk`, or `None` for anything else (a listener's
        /// request or TIME_WAIT mini-socket, another protocol).
        #[inline(always)]
        fn from_btf(sk: *const u8) -> Option<TcpSock> {
            // SAFETY: `sk` is a BTF socket pointer from the hook's context; the helper
            // checks the socket's kind and protocol and returns NULL when it is not a
            // full TCP socket.
            let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) };
            (!tp.is_null()).then_some(TcpSock(tp as *const u8))
        }

        /// The same socket, as a `struct sock`.
        #[inline(always)]
        fn sock(self) -> Sock {
            Sock(self.0)
        }
    }

    impl Sock {
        /// The socket as a `struct tcp_sock`, for its TCP counters: `None` if it is not a
        /// full TCP socket.
        #[inline(always)]
        fn tcp(self) -> Option<TcpSock> {
            TcpSock::from_btf(self.0)
        }

        /// Whether a task holds the socket: a listener's child has no `struct socket`
        /// until `accept()`.
        #[inline(always)]
        fn has_owner(self) -> bool {
            let socket: u64 = self.load(offset!(sk_socket));
            socket != 0
        }

        /// The socket's cookie, or 0 if nothing has asked for it yet. State is only ever
        /// kept under a cookie, so a socket without one has none.
        #[cfg(not(feature = "socket-table"))]
        #[inline(always)]
        fn cookie(self) -> u64 {
            self.load(offset!(skc_cookie))
        }

        /// The socket's state, created (zeroed) if `create` and absent.
        #[cfg(not(feature = "socket-table"))]
        #[inline(always)]
        fn storage(self, create: bool) -> Option<&'static mut SockState> {
            let mut cookie = self.cookie();
            if cookie == 0 {
                if !create {
                    return None;
                }
                // SAFETY: the socket is a BTF `struct sock`; the helper gives it a cookie
                // (once, atomically) and returns it. A fresh cookie has no state yet.
                cookie = unsafe { bpf_get_socket_cookie(self.0 as *mut c_void) };
                return claim_state(cookie);
            }
            match find_state(cookie) {
                Some(slot) => state_at(slot),
                None if create => claim_state(cookie),
                None => None,
            }
        }

        /// Frees the socket's state slot: called at its `TCP_CLOSE`.
        #[cfg(not(feature = "socket-table"))]
        #[inline(always)]
        fn release_storage(self) {
            let cookie = self.cookie();
            if cookie != 0 {
                if let Some(slot) = find_state(cookie) {
                    release_state(cookie, slot);
                }
            }
        }

        /// The socket's state, if it has one, and where it is held: the close frees it
        /// with `release_held` without looking it up a second time.
        #[cfg(not(feature = "socket-table"))]
        #[inline(always)]
        fn held_storage(self) -> Option<(&'static mut SockState, Held)> {
            let cookie = self.cookie();
            if cookie == 0 {
                return None;
            }
            let slot = find_state(cookie)?;
            Some((state_at(slot)?, Held { cookie, slot }))
        }

        #[cfg(not(feature = "socket-table"))]
        #[inline(always)]
        fn release_held(self, held: Held) {
            release_state(held.cookie, held.slot);
        }

        /// The socket's entry in the state table, created (zeroed) if `create` and absent.
        #[cfg(feature = "socket-table")]
        #[inline(always)]
        fn storage(self, create: bool) -> Option<&'static mut SockState> {
            let key = self.0 as u64;
            if let Some(value) = SOCK_STATES.get_ptr_mut(&key) {
                // SAFETY: the entry's value, valid until the entry is removed, which only
                // this socket's own transitions do (they are serialised by the socket
                // lock) or the daemon's exit.
                return unsafe { value.as_mut() };
            }
            if !create {
                return None;
            }
            // Full table: the insert fails and the lookup finds nothing (counted by the
            // caller).
            let mut zero_state = core::mem::MaybeUninit::uninit();
            let zero_state: &SockState = zeroed(&mut zero_state);
            let _ = SOCK_STATES.insert(&key, zero_state, BPF_NOEXIST as u64);
            // SAFETY: as above.
            SOCK_STATES
                .get_ptr_mut(&key)
                .and_then(|value| unsafe { value.as_mut() })
        }

        /// Removes the socket's entry: called at its `TCP_CLOSE`.
        #[cfg(feature = "socket-table")]
        #[inline(always)]
        fn release_storage(self) {
            let _ = SOCK_STATES.remove(&(self.0 as u64));
        }

        #[cfg(feature = "socket-table")]
        #[inline(always)]
        fn held_storage(self) -> Option<(&'static mut SockState, Held)> {
            Some((self.storage(false)?, Held))
        }

        #[cfg(feature = "socket-table")]
        #[inline(always)]
        fn release_held(self, _held: Held) {
            self.release_storage();
        }
    }

    /// Where a socket's state is held (see `Sock::held_storage`).
    #[cfg(not(feature = "socket-table"))]
    #[derive(Clone, Copy)]
    struct Held {
        cookie: u64,
        slot: Slot,
    }

    /// The table build removes an entry by its key, the socket's address.
    #[cfg(feature = "socket-table")]
    #[derive(Clone, Copy)]
    struct Held;

    /// The bucket of `SOCK_STATE_KEYS` at `bucket`.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn state_bucket(bucket: u32) -> Option<*mut StateBucket> {
        SOCK_STATE_KEYS.get_ptr_mut(bucket)
    }

    /// The cookie slot `way` of `bucket`.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn cookie_slot(bucket: *mut StateBucket, way: u32) -> *mut u64 {
        // SAFETY: `bucket` came from the map (valid while it is), `way < STATE_WAYS`.
        unsafe { (&raw mut (*bucket).cookies).cast::<u64>().add(way as usize) }
    }

    /// A slot of `SOCK_STATE_KEYS` and `SOCK_STATES`: way `way` (< STATE_WAYS) of
    /// bucket `bucket`. Kept apart, not as one index: the verifier cannot bound a way
    /// computed back from an index with `%`.
    #[cfg(not(feature = "socket-table"))]
    #[derive(Clone, Copy)]
    struct Slot {
        bucket: u32,
        way: u32,
    }

    /// Buckets of `SOCK_STATE_KEYS` minus one.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn state_mask() -> u32 {
        // SAFETY: plain read of our own read-only global (see `offset!`).
        unsafe { core::ptr::read_volatile(&raw const STATE_BUCKET_MASK) }
    }

    /// The way of the bucket `keys` that holds `cookie`.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn way_of(keys: *mut StateBucket, cookie: u64) -> Option<u32> {
        // SAFETY: slots of the bucket; a slot written meanwhile reads old or new, and only
        // the owner of a cookie writes the slot that holds it.
        (0..STATE_WAYS)
            .find(|way| unsafe { core::ptr::read_volatile(cookie_slot(keys, *way)) } == cookie)
    }

    /// Starts loading the state line `cookie` most likely has before its key line says
    /// which it is, so that the two cache misses overlap instead of following each
    /// other: way `cookie % COOKIES_PER_BUCKET` of its home bucket, where consecutive
    /// cookies sharing a home land when nothing else is there. A wrong guess costs a read
    /// of a line nothing uses.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn preload_likely_state(home: u32, cookie: u64) {
        let way = (cookie % COOKIES_PER_BUCKET) as u32;
        if let Some(st) = SOCK_STATES.get_ptr(home * STATE_WAYS + way) {
            // SAFETY: a word of a map value, valid while the map is; read only to bring
            // its line in (volatile: kept although unused).
            let _ = unsafe { core::ptr::read_volatile(&raw const (*st).start_ns) };
        }
    }

    /// The slot that holds `cookie`: in its home bucket, or, only while some socket of
    /// that home overflowed, in one of its overflow buckets.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn find_state(cookie: u64) -> Option<Slot> {
        let mask = state_mask();
        let home = home_bucket(cookie, mask);
        preload_likely_state(home, cookie);
        let home_keys = state_bucket(home)?;
        if let Some(way) = way_of(home_keys, cookie) {
            return Some(Slot { bucket: home, way });
        }
        // SAFETY: a word of the bucket, read once.
        if unsafe { core::ptr::read_volatile(&raw const (*home_keys).overflowed) } == 0 {
            return None;
        }
        for nth in 0..OVERFLOW_SPAN {
            let bucket = overflow_bucket(cookie, nth, mask);
            if let Some(way) = way_of(state_bucket(bucket)?, cookie) {
                return Some(Slot { bucket, way });
            }
        }
        None
    }

    /// Takes a free slot for `cookie` (home bucket first, then the overflow buckets) and
    /// returns its zeroed state; `None` when all are full (the caller counts it).
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn claim_state(cookie: u64) -> Option<&'static mut SockState> {
        let mask = state_mask();
        let home = home_bucket(cookie, mask);
        preload_likely_state(home, cookie);
        for nth in 0..=OVERFLOW_SPAN {
            let bucket = match nth {
                0 => home,
                _ => overflow_bucket(cookie, nth - 1, mask),
            };
            let keys = state_bucket(bucket)?;
            for way in 0..STATE_WAYS {
                // SAFETY: a slot of the bucket the map returned.
                if !unsafe { take_free_slot(cookie_slot(keys, way), cookie) } {
                    continue;
                }
                if nth != 0 {
                    // Counted in the home bucket before anyone looks: the lookups of
                    // this cookie are this socket's own, after this transition, or a
                    // walk's, which finds it through the overflow bucket's own entry.
                    overflowed_add(home, 1);
                }
                let st = state_at(Slot { bucket, way })?;
                // SAFETY: the slot is ours; the state is written whole.
                unsafe { zero(st as *mut SockState) };
                return Some(st);
            }
        }
        None
    }

    /// Frees `slot`, which holds `cookie`.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn release_state(cookie: u64, slot: Slot) {
        let Some(keys) = state_bucket(slot.bucket) else {
            return;
        };
        // SAFETY: the slot holding this socket's cookie, written by its owner only.
        unsafe { core::ptr::write_volatile(cookie_slot(keys, slot.way), 0) };
        let home = home_bucket(cookie, state_mask());
        if slot.bucket != home {
            overflowed_add(home, u64::MAX);
        }
    }

    /// Adds `delta` (wrapping: `u64::MAX` subtracts one) to a bucket's overflow count.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn overflowed_add(bucket: u32, delta: u64) {
        if let Some(keys) = state_bucket(bucket) {
            // SAFETY: an atomic add to a word of the bucket, which every CPU may update.
            unsafe {
                core::intrinsics::atomic_xadd::<
                    u64,
                    u64,
                    { core::intrinsics::AtomicOrdering::SeqCst },
                >(&raw mut (*keys).overflowed, delta);
            }
        }
    }

    /// The state in `slot` of `SOCK_STATES`.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn state_at(slot: Slot) -> Option<&'static mut SockState> {
        // SAFETY: a slot of the preallocated array, valid while the map is; its owner is
        // the socket whose cookie holds the key slot.
        SOCK_STATES
            .get_ptr_mut(slot.bucket * STATE_WAYS + slot.way)
            .and_then(|value| unsafe { value.as_mut() })
    }

    /// The addresses and ports of a socket, without the rest of a record.
    #[derive(Clone, Copy)]
    struct Ends {
        local_addr: [u8; 16],
        remote_addr: [u8; 16],
        local_port: u16,
        remote_port: u16,
    }

    /// Writes `v4` into a record's address as IPv4-mapped IPv6 (::ffff:a.b.c.d) with two
    /// 8-byte stores: assigning `v4_mapped(..)` in place compiled to a call of the BPF
    /// build's one-byte-at-a-time `memset` for the ten zero bytes.
    #[inline(always)]
    fn put_v4_mapped(dst: &mut [u8; 16], v4: [u8; 4]) {
        const _: () = assert!(core::mem::offset_of!(SockRecord, local_addr) % 8 == 0);
        const _: () = assert!(core::mem::offset_of!(SockRecord, remote_addr) % 8 == 0);
        let high = u64::from_le_bytes([0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]);
        let words = dst.as_mut_ptr().cast::<u64>();
        // SAFETY: `dst` is an address field of a `SockRecord`, 16 bytes at an 8-byte
        // aligned offset (asserted above) of a record placed at 8-byte alignment (a
        // stack slot or ring buffer space).
        unsafe {
            core::ptr::write_volatile(words, 0);
            core::ptr::write_volatile(words.add(1), high);
        }
    }

    #[inline(always)]
    fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
        ]
    }

    #[inline(always)]
    fn copy_state(st: &SockState, rec: &mut SockRecord) {
        rec.start_ns = st.start_ns;
        rec.established_ns = st.established_ns;
        rec.base_bytes_acked = st.base_bytes_acked;
        rec.base_bytes_received = st.base_bytes_received;
        rec.base_total_retrans = st.base_total_retrans;
        rec.role = st.role;
        rec.flags |= st.flags & !flags::WALKED;
        rec.cgroup_id = st.cgroup_id;
        // At TCP_CLOSE an automatically bound port has already been released.
        if rec.local_port == 0 {
            rec.local_port = st.local_port;
        }
    }

    #[inline(always)]
    fn is_ip(family: u16) -> bool {
        family == AF_INET || family == AF_INET6
    }

    #[btf_tracepoint(function = "inet_sock_set_state")]
    // The body is the attach macro's inner function: inlined, the program is one image
    // and one frame (LLVM had begun to call it once the body grew).
    #[inline(always)]
    pub fn ridley_inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
        let sk: *const u8 = ctx.arg(0);
        let old_state: i32 = ctx.arg(1);
        let new_state: i32 = ctx.arg(2);
        on_state_change(sk, old_state as u8, new_state as u8);
        0
    }

    #[inline(always)]
    fn on_state_change(sk: *const u8, old_state: u8, new_state: u8) {
        // Most transitions (SYN_RECV, FIN_WAIT*, CLOSE_WAIT, LAST_ACK, ...), the close of
        // listeners and of half-open children need nothing: leave before any read.
        let interesting = match new_state {
            tcp_state::SYN_SENT | tcp_state::ESTABLISHED => true,
            tcp_state::CLOSE => old_state != tcp_state::LISTEN && old_state != tcp_state::SYN_RECV,
            _ => false,
        };
        if !interesting {
            return;
        }
        let sock = Sock(sk);
        // MPTCP's sockets pass through this tracepoint too; only TCP's are TCP sockets.
        // The cast to `tcp_sock` (a helper call) waits until a TCP counter is read.
        let protocol: u16 = sock.load(offset!(sk_protocol));
        if protocol != IPPROTO_TCP {
            return;
        }
        let family = sock.family();
        if !is_ip(family) {
            return;
        }
        match new_state {
            tcp_state::SYN_SENT => {
                start(sock, role::CLIENT);
            }
            tcp_state::ESTABLISHED if old_state == tcp_state::SYN_RECV => {
                server_established(sock, family)
            }
            tcp_state::ESTABLISHED => {
                // A client's handshake end records its local end in `CLIENT_ENDPOINTS`:
                // located first, so that the load of its line overlaps the state's.
                let local = (old_state == tcp_state::SYN_SENT).then(|| {
                    let ends = sock.ends(family);
                    locate_endpoint(&sock.endpoint_key(ends.local_addr, ends.local_port))
                });
                if let Some(st) = sock.storage(false) {
                    if let Some(tp) = sock.tcp() {
                        established(tp, old_state, st, local);
                    }
                }
            }
            _ => closed(sock, family, old_state),
        }
    }

    #[inline(always)]
    fn start(sock: Sock, role: u8) -> Option<&'static mut SockState> {
        let Some(st) = sock.storage(true) else {
            bump(counter::SOCK_STATE_UNAVAILABLE);
            return None;
        };
        // The whole state is written: a socket can connect() again after a failure.
        // SAFETY: `st` is a valid, exclusive reference.
        unsafe { zero(st as *mut SockState) };
        st.sk = sock.address();
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        st.start_ns = unsafe { bpf_ktime_get_ns() };
        st.role = role;
        st.flags = flags::TRACKED;
        // SYN_SENT happens in connect(), in the calling task: its cgroup is the client's.
        // A server child is created in softirq, where it means nothing.
        if role == role::CLIENT {
            // SAFETY: no preconditions.
            st.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        }
        Some(st)
    }

    /// A server child socket established: created from its listener when the
    /// handshake's last ACK arrived, and processing that ACK now. It is looked at here,
    /// not at its `SYN_RECV` transition: some kernels (5.10) make that transition before
    /// they copy the child's addresses and ports, and this one after. Its client sent the
    /// ACK after its own `ESTABLISHED`, so a client on this host is already in
    /// `CLIENT_ENDPOINTS`: the client's record carries the connection, and this end keeps
    /// no state at all (no record at close, skipped by the walks). Its open starts here
    /// (the child's `SYN_RECV` is the same instant).
    #[inline(always)]
    fn server_established(sock: Sock, family: u16) {
        // A listener's child has no owner yet; a socket with one that passes through
        // SYN_RECV is a simultaneous open (both ends connect()ed): this end is a client.
        if sock.has_owner() {
            if let Some(st) = sock.storage(false) {
                if st.role == role::CLIENT && st.flags & flags::TRACKED != 0 {
                    if let Some(tp) = sock.tcp() {
                        established(tp, tcp_state::SYN_RECV, st, None);
                    }
                    return;
                }
            }
        }
        if client_is_local(sock, family) {
            // In the state table, an entry left at this address by a socket gone before
            // (see `state_for_walked_socket`) must not be taken for this one's.
            sock.release_storage();
            return;
        }
        let Some(tp) = sock.tcp() else {
            return;
        };
        if let Some(st) = start(sock, role::SERVER) {
            established(tp, tcp_state::SYN_RECV, st, None);
        }
    }

    /// Whether the remote end of `tp` is an established client socket on this host.
    #[inline(always)]
    fn client_is_local(sk: impl SockFields, family: u16) -> bool {
        let ends = sk.ends(family);
        endpoint_recorded(&sk.endpoint_key(ends.remote_addr, ends.remote_port))
    }

    /// Where `key` sits in `CLIENT_ENDPOINTS`.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn place_of(key: &EndpointKey) -> EndpointPlace {
        // SAFETY: plain read of our own read-only global (see `offset!`).
        let mask = unsafe { core::ptr::read_volatile(&raw const ENDPOINT_BUCKET_MASK) };
        key.place(mask)
    }

    /// A client's local end, ready for `record_endpoint`: its place in the set.
    #[cfg(not(feature = "socket-table"))]
    type EndpointAt = EndpointPlace;

    /// Where `key` goes in `CLIENT_ENDPOINTS`; starts loading its home bucket's line,
    /// which `record_endpoint` reads and writes after the state lookup's misses.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn locate_endpoint(key: &EndpointKey) -> EndpointAt {
        let place = place_of(key);
        if let Some(slots) = CLIENT_ENDPOINTS.get_ptr(place.buckets[0]) {
            // SAFETY: a word of a map value, valid while the map is; read only to bring
            // its line in (volatile: kept although unused).
            let _ = unsafe { core::ptr::read_volatile((&raw const (*slots).slots).cast::<u64>()) };
        }
        place
    }

    /// Records a client's local end; returns its slot for `forget_endpoint`, or 0 when
    /// both its buckets are full.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn record_endpoint(place: &EndpointAt) -> u32 {
        let EndpointPlace {
            fingerprint,
            buckets,
        } = *place;
        for bucket in buckets {
            let Some(slots) = CLIENT_ENDPOINTS.get_ptr_mut(bucket) else {
                return 0;
            };
            for way in 0..ENDPOINT_WAYS {
                // SAFETY: a slot of the bucket the lookup returned, valid while the map
                // is; a held one is read here, never written.
                let taken = unsafe {
                    let slot = (&raw mut (*slots).slots).cast::<u64>().add(way as usize);
                    take_free_slot(slot, fingerprint)
                };
                if taken {
                    return bucket * ENDPOINT_WAYS + way + 1;
                }
            }
        }
        0
    }

    /// Whether a client's local end is in the set.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn endpoint_recorded(key: &EndpointKey) -> bool {
        let EndpointPlace {
            fingerprint,
            buckets,
        } = place_of(key);
        buckets.into_iter().any(|bucket| {
            CLIENT_ENDPOINTS.get(bucket).is_some_and(|slots| {
                // SAFETY: reads of the bucket's slots; a slot written meanwhile reads
                // old or new.
                slots
                    .slots
                    .iter()
                    .any(|slot| unsafe { core::ptr::read_volatile(slot) } == fingerprint)
            })
        })
    }

    /// Frees the slot `record_endpoint` returned (its owner is the only writer).
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn forget_endpoint(_key: &EndpointKey, slot: u32) {
        let Some(index) = slot.checked_sub(1) else {
            return;
        };
        if let Some(slots) = CLIENT_ENDPOINTS.get_ptr_mut(index / ENDPOINT_WAYS) {
            // SAFETY: the slot this socket claimed, inside the bucket (way < ENDPOINT_WAYS).
            unsafe {
                let slot = (&raw mut (*slots).slots)
                    .cast::<u64>()
                    .add((index % ENDPOINT_WAYS) as usize);
                core::ptr::write_volatile(slot, 0);
            }
        }
    }

    /// A client's local end, ready for `record_endpoint`: the hash's key.
    #[cfg(feature = "socket-table")]
    type EndpointAt = EndpointKey;

    #[cfg(feature = "socket-table")]
    #[inline(always)]
    fn locate_endpoint(key: &EndpointKey) -> EndpointAt {
        *key
    }

    /// Records a client's local end; 1 when recorded, 0 when the table is full.
    #[cfg(feature = "socket-table")]
    #[inline(always)]
    fn record_endpoint(key: &EndpointAt) -> u32 {
        u32::from(CLIENT_ENDPOINTS.insert(key, &1, 0).is_ok())
    }

    #[cfg(feature = "socket-table")]
    #[inline(always)]
    fn endpoint_recorded(key: &EndpointKey) -> bool {
        // SAFETY: the value is a plain u8 we only test for presence.
        unsafe { CLIENT_ENDPOINTS.get(key) }.is_some()
    }

    #[cfg(feature = "socket-table")]
    #[inline(always)]
    fn forget_endpoint(key: &EndpointKey, _slot: u32) {
        let _ = CLIENT_ENDPOINTS.remove(key);
    }

    #[inline(always)]
    /// Records the handshake's end in the socket's state; `local`, a client's local end
    /// (located at its `ESTABLISHED` from `SYN_SENT`), goes into `CLIENT_ENDPOINTS`.
    fn established(tp: TcpSock, old_state: u8, st: &mut SockState, local: Option<EndpointAt>) {
        if st.flags & flags::TRACKED == 0 {
            return;
        }
        st.established_ns = established_at(tp, old_state, st.start_ns);
        // Saturated, never wrapped (see `SockState::base_bytes_acked`).
        let acked: u64 = tp.load(offset!(bytes_acked));
        let received: u64 = tp.load(offset!(bytes_received));
        let retrans: u32 = tp.load(offset!(total_retrans));
        st.base_bytes_acked = acked.min(u64::from(u32::MAX)) as u32;
        st.base_bytes_received = received.min(u64::from(u32::MAX)) as u32;
        st.base_total_retrans = retrans.min(u32::from(u16::MAX)) as u16;

        st.local_port = tp.load(offset!(skc_num));
        if let Some(local) = local {
            // The client's ESTABLISHED precedes the server's: the server needs the client's
            // final ACK, sent only after this transition.
            st.endpoint_slot = record_endpoint(&local);
            if st.endpoint_slot == 0 {
                st.flags |= flags::ENDPOINT_UNRECORDED;
                bump(counter::ENDPOINTS_FULL);
            }
        }
    }

    /// When the socket reached `ESTABLISHED`. A client's handshake ends in the receive
    /// path, which read the clock into `tcp_clock_cache` just before it processed the
    /// SYN-ACK: that value, a load from a line the path just wrote, instead of a helper
    /// call per connection. Anything else, or a value not after the start (never seen;
    /// a connect duration must not read 0), reads the clock.
    #[inline(always)]
    fn established_at(tp: TcpSock, old_state: u8, start_ns: u64) -> u64 {
        if old_state == tcp_state::SYN_SENT {
            let refreshed_ns: u64 = tp.load(offset!(tcp_clock_cache));
            if refreshed_ns > start_ns {
                return refreshed_ns;
            }
        }
        // SAFETY: no preconditions.
        unsafe { bpf_ktime_get_ns() }
    }

    /// A socket without state has nothing to report: the server end of a connection
    /// whose client is on this host (the client reports), a socket that predates the
    /// programs and closed before any walk saw it, or one whose state could not be stored
    /// (already counted as `SOCK_STATE_UNAVAILABLE`).
    #[inline(always)]
    fn closed(sock: Sock, family: u16, old_state: u8) {
        let Some((st, held)) = sock.held_storage() else {
            return;
        };
        let Some(tp) = sock.tcp() else {
            forget_client_endpoint(sock, family, st);
            sock.release_held(held);
            return;
        };
        // This CPU's batch, unless a program this run interrupted is changing it (then
        // the record goes to the ring buffer on its own, from the stack).
        let batch = CLOSE_BATCHES.get_ptr_mut(0).filter(|&b| {
            // SAFETY: this CPU's value, valid for the run; see `CloseBatch::busy`.
            unsafe { claim_batch(b) }
        });
        let mut spare = core::mem::MaybeUninit::<SockRecord>::uninit();
        let rec = match batch {
            // SAFETY: claimed above: no other program touches the batch until released.
            Some(b) => unsafe { next_batch_slot(b) },
            None => zeroed(&mut spare),
        };
        rec.sk = tp.0 as u64;
        // Only a connection that never got established ends its attempt here (a clock
        // read per connection saved, see `SockRecord::ts_ns`).
        if st.established_ns == 0 {
            // SAFETY: no preconditions.
            rec.ts_ns = unsafe { bpf_ktime_get_ns() };
        }
        rec.kind = if old_state == tcp_state::SYN_SENT {
            kind::CONNECT_FAILED
        } else {
            kind::CLOSED
        };
        rec.state = old_state;
        tp.read_addresses(family, rec);
        tp.read_counters(rec);
        copy_state(st, rec);
        if st.role == role::CLIENT
            && st.established_ns != 0
            && st.flags & flags::ENDPOINT_UNRECORDED == 0
        {
            let local = EndpointKey::new(rec.local_addr, st.local_port, rec.netns);
            forget_endpoint(&local, st.endpoint_slot);
        }
        st.endpoint_slot = 0;
        // Freed below; a socket that connects again starts over in `start`.
        st.flags = 0;
        match batch {
            // SAFETY: claimed above; the record in the next slot is complete.
            Some(b) => unsafe { commit_batch_slot(b) },
            None => send_records(rec, 1),
        }
        sock.release_held(held);
    }

    /// Takes this CPU's batch for the rest of the run, unless a program this one
    /// interrupted holds it.
    ///
    /// # Safety
    /// `batch` must be this CPU's `CLOSE_BATCHES` value.
    #[inline(always)]
    unsafe fn claim_batch(batch: *mut CloseBatch) -> bool {
        // SAFETY: the caller's. Volatile: an interrupting program must see the flag set
        // before anything it guards changes, and only this CPU reads it.
        unsafe {
            if core::ptr::read_volatile(&raw const (*batch).busy) != 0 {
                return false;
            }
            core::ptr::write_volatile(&raw mut (*batch).busy, 1);
        }
        true
    }

    /// # Safety
    /// `batch` must be this CPU's `CLOSE_BATCHES` value, claimed by this run.
    #[inline(always)]
    unsafe fn release_batch(batch: *mut CloseBatch) {
        // SAFETY: the caller's.
        unsafe { core::ptr::write_volatile(&raw mut (*batch).busy, 0) };
    }

    /// The zeroed record after the batch's last.
    ///
    /// # Safety
    /// `batch` must be this CPU's `CLOSE_BATCHES` value, claimed by this run.
    #[inline(always)]
    unsafe fn next_batch_slot<'a>(batch: *mut CloseBatch) -> &'a mut SockRecord {
        // SAFETY: the caller's; the batch is ours until released.
        let batch = unsafe { &mut *batch };
        // Never full here (a full batch is sent when its last record is committed);
        // the check bounds the index for the verifier.
        if batch.count as usize >= CLOSE_BATCH_RECORDS {
            flush_batch(batch);
        }
        let slot = (batch.count as usize) % CLOSE_BATCH_RECORDS;
        let rec = &mut batch.records[slot];
        // SAFETY: a record of the map value, 8-byte aligned.
        unsafe { zero(rec) };
        rec
    }

    /// Counts the record `next_batch_slot` handed out, sends the batch if that filled it
    /// and releases it.
    ///
    /// # Safety
    /// `batch` must be this CPU's `CLOSE_BATCHES` value, claimed by this run.
    #[inline(always)]
    unsafe fn commit_batch_slot(batch: *mut CloseBatch) {
        // SAFETY: the caller's.
        unsafe {
            let b = &mut *batch;
            b.count += 1;
            if b.count as usize >= CLOSE_BATCH_RECORDS {
                flush_batch(b);
            }
            release_batch(batch);
        }
    }

    /// Sends what the claimed batch holds to the ring buffer and empties it.
    #[inline(always)]
    fn flush_batch(batch: &mut CloseBatch) {
        let count = batch.count;
        if count != 0 && count as usize <= CLOSE_BATCH_RECORDS {
            send_records(&batch.records[0], count);
        }
        batch.count = 0;
    }

    /// Writes `count` consecutive records (at most a batch), from `first`, to `EVENTS` as one entry
    /// (userspace splits it); records that do not fit are counted (RINGBUF_DROPS).
    #[inline(always)]
    fn send_records(first: &SockRecord, count: u32) {
        const { assert!(CLOSE_BATCH_RECORDS.is_power_of_two()) };
        if count == 0 || count as usize > CLOSE_BATCH_RECORDS {
            return;
        }
        // `count` again, in a form the verifier can bound (1 to CLOSE_BATCH_RECORDS, a
        // power of two): it does not carry the check above over to this register.
        let count = ((count - 1) & (CLOSE_BATCH_RECORDS as u32 - 1)) + 1;
        let bytes = u64::from(count) * SockRecord::SIZE as u64;
        // SAFETY: plain read of our own read-only global (see `offset!`).
        let threshold = unsafe { core::ptr::read_volatile(&raw const RINGBUF_WAKEUP_BYTES) };
        // Wake the reader when this entry takes the backlog across a multiple of the
        // threshold, not at every entry while it stays above: each wakeup raises an
        // inter-processor interrupt (a trap to the hypervisor on a virtual machine), and
        // until the reader runs every entry would raise one. A crossing another CPU's
        // entry made first is caught at the next multiple, or by the reader's timer.
        let before = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
        let after = before + bytes + RINGBUF_HEADER_BYTES;
        let wakeup = if threshold != 0 && after / threshold > before / threshold {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        // SAFETY: `first` and the `count - 1` records after it are ours: one record, or
        // a prefix of a batch's array (`count` checked against its length above).
        let sent = unsafe {
            bpf_ringbuf_output(
                (&raw const EVENTS).cast_mut().cast(),
                (first as *const SockRecord).cast_mut().cast(),
                bytes,
                u64::from(wakeup),
            )
        };
        if sent != 0 {
            bump_by(counter::RINGBUF_DROPS, u64::from(count));
        }
    }

    /// Run by userspace on each CPU after every walk (`BPF_PROG_TEST_RUN` on that CPU,
    /// from an interrupt or with preemption off): sends the CPU's batch, so that every
    /// close before the run is in the ring buffer. Returns `flush_result::BUSY` if it
    /// interrupted a program changing the batch; userspace runs it again.
    #[unsafe(no_mangle)]
    #[unsafe(link_section = "raw_tp")]
    pub fn ridley_flush_closes(_ctx: *mut c_void) -> u32 {
        let Some(batch) = CLOSE_BATCHES.get_ptr_mut(0) else {
            return flush_result::DONE;
        };
        // SAFETY: this CPU's value, valid for the run.
        if !unsafe { claim_batch(batch) } {
            return flush_result::BUSY;
        }
        // SAFETY: claimed just now.
        unsafe {
            flush_batch(&mut *batch);
            release_batch(batch);
        }
        flush_result::DONE
    }

    #[inline(always)]
    fn forget_client_endpoint(sock: Sock, family: u16, st: &mut SockState) {
        if st.role == role::CLIENT
            && st.established_ns != 0
            && st.flags & flags::ENDPOINT_UNRECORDED == 0
        {
            let ends = sock.ends(family);
            forget_endpoint(
                &sock.endpoint_key(ends.local_addr, st.local_port),
                st.endpoint_slot,
            );
        }
        st.flags = 0;
        st.endpoint_slot = 0;
    }

    #[btf_tracepoint(function = "sock_send_length")]
    pub fn ridley_sock_send_length(ctx: BtfTracePointContext) -> i32 {
        let length: i32 = ctx.arg(1);
        if length > 0 {
            on_datagrams(ctx.arg(0), length as u64, true);
        }
        0
    }

    #[btf_tracepoint(function = "sock_recv_length")]
    pub fn ridley_sock_recv_length(ctx: BtfTracePointContext) -> i32 {
        let length: i32 = ctx.arg(1);
        let msg_flags: i32 = ctx.arg(2);
        if length > 0 && msg_flags & MSG_PEEK == 0 {
            on_datagrams(ctx.arg(0), length as u64, false);
        }
        0
    }

    /// A send or receive of `length` bytes on any socket. Every TCP send and receive of
    /// the host comes here too: the protocol is the first and, for them, only load.
    #[inline(always)]
    fn on_datagrams(sk: *const u8, length: u64, sent: bool) {
        // `sk` is the hook's BTF `struct sock *`: the same checked direct loads as for a
        // TCP socket, of `struct sock` fields only.
        let sock = Sock(sk);
        let protocol: u16 = sock.load(offset!(sk_protocol));
        if protocol != IPPROTO_UDP {
            return;
        }
        // Connected (`connect()` sets the UDP socket's state to ESTABLISHED): the peer is
        // known. An unconnected socket's peer is per datagram and not seen here.
        if sock.state() != tcp_state::ESTABLISHED {
            return;
        }
        let family = sock.family();
        if !is_ip(family) {
            return;
        }
        let ends = sock.ends(family);
        let key = UdpFlowKey {
            client_addr: ends.local_addr,
            server_addr: ends.remote_addr,
            // SAFETY: no preconditions; sends and receives run in the socket owner's task.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            netns: sock.netns(),
            server_port: ends.remote_port,
            _pad: 0,
        };
        // Copied out at once; a missing entry means table 0.
        let table = UDP_CONTROL.get(0).copied().unwrap_or(0);
        let flows = if table == 0 {
            &UDP_FLOWS_0
        } else {
            &UDP_FLOWS_1
        };
        let counts = match flows.get_ptr_mut(&key) {
            Some(counts) => counts,
            None => {
                // Another CPU may create the entry first: then ours fails and the lookup
                // finds theirs.
                let _ = flows.insert(&key, &UdpFlowCounts::default(), BPF_NOEXIST as u64);
                match flows.get_ptr_mut(&key) {
                    Some(counts) => counts,
                    None => {
                        bump(counter::UDP_FLOWS_FULL);
                        return;
                    }
                }
            }
        };
        // SAFETY: `counts` is this CPU's copy of the entry's value, valid for this run
        // and written by no one else while it runs.
        let counts = unsafe { &mut *counts };
        if sent {
            counts.sent_datagrams += 1;
            counts.sent_bytes += length;
        } else {
            counts.received_datagrams += 1;
            counts.received_bytes += length;
        }
    }

    /// `struct bpf_iter_meta`: only the first member is used.
    #[repr(C)]
    struct IterMeta {
        seq: *mut c_void,
    }

    /// `struct bpf_iter__tcp`: pointers are 8-byte slots (`__bpf_md_ptr`).
    #[repr(C)]
    struct IterTcpCtx {
        meta: *const IterMeta,
        sk_common: *const u8,
    }

    #[inline(always)]
    fn walk_control() -> WalkControl {
        // Copied out at once; a missing entry means a full walk of generation 0.
        WALK_CONTROL.get(0).copied().unwrap_or(WalkControl {
            generation: 0,
            mode: walk_mode::FULL,
            quiet_before_us: 0,
        })
    }

    /// Called once per socket of the reading thread's network namespace, then once with
    /// a null socket. Writes one `SockRecord` per listener, and per full socket whose
    /// counters changed since it was last reported (every one on a full walk; one
    /// without state only there). Server sockets whose client is on this host are left
    /// to the client's record.
    #[unsafe(no_mangle)]
    #[unsafe(link_section = "iter/tcp")]
    pub fn ridley_iter_tcp(ctx: *mut c_void) -> i32 {
        // SAFETY: the kernel passes a `struct bpf_iter__tcp *`; both loads are of
        // context fields the verifier allows.
        let (out, sk) = unsafe {
            let ctx = &*(ctx as *const IterTcpCtx);
            (Output::Seq(ctx.meta), ctx.sk_common)
        };
        if sk.is_null() {
            return 0;
        }
        // TIME_WAIT and NEW_SYN_RECV entries are mini-sockets without tcp_sock fields.
        let Some(tp) = TcpSock::from_btf(sk) else {
            return 0;
        };
        let family = tp.family();
        if !is_ip(family) {
            return 0;
        }
        let state = tp.state();
        let mut slot = core::mem::MaybeUninit::uninit();
        let rec = live_record(&mut slot, tp, state);
        if state == tcp_state::LISTEN {
            return write_record(out, tp, family, rec);
        }
        let control = walk_control();
        if skip_quiet(tp, &control) {
            return 0;
        }
        let st = match tp.sock().storage(false) {
            Some(st) => st,
            // A socket without state is left to the full walks, as the walks of the
            // state table between them leave it: those list only the sockets that changed,
            // so its local peer (a client whose endpoint another connection's close
            // forgot) may be absent from the walk that would show it first, and alone it
            // would be counted as well as by that peer.
            None if control.mode != walk_mode::FULL => return 0,
            // The server end of a local client's connection keeps no state (see
            // `server_established`); anything else without state predates the programs.
            None if client_is_local(tp, family) => return 0,
            None => match state_for_walked_socket(tp) {
                Some(st) => st,
                None => {
                    // Reported by every full walk, without its open, never dropped.
                    tp.read_counters(rec);
                    return write_record(out, tp, family, rec);
                }
            },
        };
        report_if_changed(out, tp, family, st, &control, rec)
    }

    /// State for a socket that predates the programs, so that later walks can skip it
    /// while it is idle and its close sends a record. Failing to allocate it is counted.
    ///
    /// In the state table, a walk may give state to a socket whose close transition has
    /// just run (it is still in the table the walk reads until its close completes): the
    /// entry then outlives the socket until the next socket at that address replaces it
    /// (`start`) or removes it (`server_established`).
    #[inline(always)]
    fn state_for_walked_socket(tp: TcpSock) -> Option<&'static mut SockState> {
        let Some(st) = tp.sock().storage(true) else {
            bump(counter::SOCK_STATE_UNAVAILABLE);
            return None;
        };
        st.sk = tp.address();
        Some(st)
    }

    /// Outside a full walk, a socket whose last packet predates the previous walk is
    /// skipped before its storage is looked up (see `WalkControl::quiet_before_us`).
    #[inline(always)]
    fn skip_quiet(tp: TcpSock, control: &WalkControl) -> bool {
        if control.mode == walk_mode::FULL {
            return false;
        }
        let last_packet_us: u64 = tp.load(offset!(tcp_mstamp));
        last_packet_us < control.quiet_before_us
    }

    /// Writes the socket's record unless its counters and state are those the last walk
    /// reported (outside a full walk), and remembers what it reported.
    #[inline(always)]
    fn report_if_changed(
        out: Output,
        sk: impl SockFields,
        family: u16,
        st: &mut SockState,
        control: &WalkControl,
        rec: &mut SockRecord,
    ) -> i32 {
        sk.read_counters(rec);
        let unchanged = st.flags & flags::WALKED != 0
            && st.walked_generation != control.generation as u16
            && st.walked_bytes_acked == rec.bytes_acked as u32
            && st.walked_bytes_received == rec.bytes_received as u32
            && st.walked_total_retrans == rec.total_retrans as u16
            && st.walked_state == rec.state;
        if unchanged && control.mode != walk_mode::FULL {
            return 0;
        }
        sk.read_addresses(family, rec);
        if !sk.still_same() {
            return 0;
        }
        // The low bits (see `SockState::walked_bytes_acked`).
        st.walked_generation = control.generation as u16;
        st.walked_bytes_acked = rec.bytes_acked as u32;
        st.walked_bytes_received = rec.bytes_received as u32;
        st.walked_total_retrans = rec.total_retrans as u16;
        st.walked_state = rec.state;
        st.flags |= flags::WALKED;
        copy_state(st, rec);
        emit(out, rec)
    }

    /// Run by userspace (`BPF_PROG_TEST_RUN`, never attached) for the walks between full
    /// walks, once per `WALK_CHUNK_BUCKETS` buckets of `SOCK_STATE_KEYS`, the first one
    /// the run's context (one u64): visits the sockets the programs keep state for, in
    /// every network namespace at once, where `iter/tcp` scans the host's whole
    /// connection table once per namespace; each changed one's record goes to
    /// `WALK_RECORDS`. Listeners and sockets that predate the programs are found by the
    /// full walks (which give the latter their state). A program run on demand rather than
    /// an iterator over the map's elements: some kernels refuse that iterator target.
    #[cfg(not(feature = "socket-table"))]
    #[unsafe(no_mangle)]
    #[unsafe(link_section = "raw_tp")]
    pub fn ridley_walk_states(ctx: *mut c_void) -> u32 {
        // SAFETY: userspace runs the program with an 8-byte context, which the kernel
        // checks against the program's largest context read (this one) before the run.
        let first = unsafe { *(ctx as *const u64) };
        let mask = u64::from(state_mask());
        let control = walk_control();
        for i in 0..u64::from(WALK_CHUNK_BUCKETS) {
            let bucket = first + i;
            if bucket > mask {
                break;
            }
            walk_bucket(bucket as u32, &control);
        }
        0
    }

    /// Reports the changed sockets of one bucket of `SOCK_STATE_KEYS`.
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn walk_bucket(bucket: u32, control: &WalkControl) {
        let Some(keys) = state_bucket(bucket) else {
            return;
        };
        for way in 0..STATE_WAYS {
            // SAFETY: a slot of the bucket the map returned; read once.
            let cookie = unsafe { core::ptr::read_volatile(cookie_slot(keys, way)) };
            if cookie == 0 {
                continue;
            }
            let slot = Slot { bucket, way };
            if let Some(st) = state_at(slot) {
                walk_state(cookie, slot, st, control);
            }
        }
    }

    /// Reports the socket in `slot` (which held `cookie`) if it changed since the
    /// last walk. The walk has the socket's address, not a pointer the kernel vouches
    /// for: every field is read with `bpf_probe_read_kernel`, and nothing is reported
    /// unless the socket's cookie is still the slot's after the reads (`ProbedSock`).
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn walk_state(cookie: u64, slot: Slot, st: &mut SockState, control: &WalkControl) {
        let sk = ProbedSock {
            address: st.sk,
            cookie,
        };
        if !sk.still_same() {
            // The slot changed hands since the key was read, or its socket is gone
            // without a close (a full walk gave state to a socket closing at that
            // moment): in the second case the slot still holds the cookie, and is
            // freed here (a compare-and-exchange, which fails in the first).
            release_stale_state(cookie, slot);
            return;
        }
        let family = sk.family();
        let state = sk.state();
        if state == tcp_state::CLOSE {
            // Its close record was sent, or it closed while a full walk gave it state.
            release_stale_state(cookie, slot);
            return;
        }
        if !is_ip(family) {
            return;
        }
        if control.mode != walk_mode::FULL {
            let last_packet_us: u64 = sk.load(offset!(tcp_mstamp));
            if last_packet_us < control.quiet_before_us {
                return;
            }
        }
        let mut slot = core::mem::MaybeUninit::uninit();
        let rec = live_record(&mut slot, sk, state);
        report_if_changed(Output::Ring, sk, family, st, control, rec);
    }

    /// Frees `slot` if it still holds `cookie` (see `walk_state`).
    #[cfg(not(feature = "socket-table"))]
    #[inline(always)]
    fn release_stale_state(cookie: u64, slot: Slot) {
        let Some(keys) = state_bucket(slot.bucket) else {
            return;
        };
        // SAFETY: a slot of the bucket the map returned; freed only if nobody took it
        // since the cookie was read.
        let freed = unsafe { compare_exchange(cookie_slot(keys, slot.way), cookie, 0) };
        let home = home_bucket(cookie, state_mask());
        if freed && slot.bucket != home {
            overflowed_add(home, u64::MAX);
        }
    }

    /// A socket known by its address only (in the walks of `SOCK_STATE_KEYS`). TCP
    /// sockets are freed into a slab that stays a slab of sockets for as long as the
    /// walk's RCU read section lasts (`SLAB_TYPESAFE_BY_RCU`), so the reads never fault,
    /// but the object may have become another socket: the cookie, unique to one
    /// socket's life and reset when the object is reused, tells.
    #[cfg(not(feature = "socket-table"))]
    #[derive(Clone, Copy)]
    struct ProbedSock {
        address: u64,
        cookie: u64,
    }

    #[cfg(not(feature = "socket-table"))]
    impl SockFields for ProbedSock {
        #[inline(always)]
        fn load<T: Copy + Default>(self, off: u32) -> T {
            // SAFETY: bpf_probe_read_kernel checks the address and reports a fault.
            unsafe { bpf_probe_read_kernel((self.address + u64::from(off)) as *const T) }
                .unwrap_or_else(|_| {
                    // Counted; the cookie check that follows every read then fails.
                    bump(counter::READ_ERRORS);
                    T::default()
                })
        }

        #[inline(always)]
        fn netns(self) -> u32 {
            let net: u64 = self.load(offset!(skc_net));
            let inum = net + u64::from(offset!(net_ns_inum));
            // SAFETY: as `load`.
            unsafe { bpf_probe_read_kernel(inum as *const u32) }.unwrap_or_else(|_| {
                bump(counter::READ_ERRORS);
                0
            })
        }

        #[inline(always)]
        fn still_same(self) -> bool {
            let cookie: u64 = self.load(offset!(skc_cookie));
            cookie == self.cookie
        }

        #[inline(always)]
        fn address(self) -> u64 {
            self.address
        }
    }

    /// Where a walk's records go.
    #[derive(Clone, Copy)]
    enum Output {
        /// The `iter/tcp` reader's file (`bpf_seq_write`).
        Seq(*const IterMeta),
        /// `WALK_RECORDS`, drained by userspace after each run of `ridley_walk_states`.
        #[cfg(not(feature = "socket-table"))]
        Ring,
    }

    /// Writes a finished record to the walk's output.
    #[inline(always)]
    fn emit(out: Output, rec: &mut SockRecord) -> i32 {
        // SAFETY: no preconditions.
        rec.ts_ns = unsafe { bpf_ktime_get_ns() };
        match out {
            // SAFETY: meta is the kernel's iterator metadata; `rec` lives on our stack.
            Output::Seq(meta) => unsafe {
                let seq = (*meta).seq;
                bpf_seq_write(
                    seq as *mut _,
                    rec as *const SockRecord as *const c_void,
                    SockRecord::SIZE as u32,
                );
            },
            #[cfg(not(feature = "socket-table"))]
            Output::Ring => {
                // Userspace empties the ring before each run, and one run's records
                // fit in it (`WALK_RECORDS_BYTES`): this cannot fail, and would be
                // counted (its next walk is then a full one) if it did.
                if WALK_RECORDS.output::<SockRecord>(&*rec, 0).is_err() {
                    bump(counter::RINGBUF_DROPS);
                }
            }
        }
        0
    }

    #[inline(always)]
    fn write_record(out: Output, tp: TcpSock, family: u16, rec: &mut SockRecord) -> i32 {
        tp.read_addresses(family, rec);
        emit(out, rec)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
