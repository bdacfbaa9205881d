//! ridley's kernel programs. Two hooks, no kprobes, no fentry:
//!
//! - `tp_btf/inet_sock_set_state` sees every TCP state change of every socket in every
//!   network namespace. It records how a connection was opened (client or server, when,
//!   with which handshake counters) in `SOCKS`, and at `TCP_CLOSE` sends one record with
//!   the final counters on the `EVENTS` ring buffer. Cost: a few map operations per
//!   connection, nothing per packet.
//! - `iter/tcp` walks the TCP sockets of one network namespace when userspace reads it,
//!   once per collection interval: live counters of long-lived connections, listeners
//!   (to give connections that predate the daemon their role) and nothing per packet.
//!
//! Kernel struct fields are read with `bpf_probe_read_kernel` at offsets userspace
//! resolved from BTF (`OFFSETS`), because aya-ebpf has no CO-RE field relocations.
//! This file must not interpret what it reads: userspace owns the accounting.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The real programs are built for bpfel-unknown-none by receiver/build.rs; this stub
    // keeps `cargo build --workspace` on the host working.
}

#[cfg(target_arch = "bpf")]
mod programs {
    use core::ffi::c_void;

    use aya_ebpf::{
        bindings::{BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
        helpers::{
            bpf_get_current_cgroup_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
            generated::bpf_seq_write,
        },
        macros::{btf_tracepoint, map},
        maps::{HashMap, PerCpuArray, RingBuf},
        programs::BtfTracePointContext,
    };
    use ridley_ebpf::{
        AF_INET, AF_INET6, EndpointKey, IPPROTO_TCP, KernelOffsets, SockRecord, SockState, counter,
        flags, kind, role, tcp_state,
    };

    // Sizes here are defaults; userspace sets them from config before loading.
    // Both hashes are allocated on demand (BPF_F_NO_PREALLOC): memory follows the number
    // of open connections, not the configured maximum. Entries cannot leak: every TCP
    // socket passes through TCP_CLOSE, where its entries are removed. A full map is
    // counted (SOCKS_FULL, ENDPOINTS_FULL), never silently ignored.
    #[map]
    static SOCKS: HashMap<u64, SockState> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

    #[map]
    static CLIENT_ENDPOINTS: HashMap<EndpointKey, u8> =
        HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

    /// One record per closed or failed connection; drained continuously by userspace.
    /// A full buffer drops the record and counts it (RINGBUF_DROPS).
    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

    #[map]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

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
        sk_protocol: 0,
        sk_err: 0,
        sk_flags: 0,
        bytes_acked: 0,
        bytes_received: 0,
        total_retrans: 0,
        srtt_us: 0,
        snd_una: 0,
        write_seq: 0,
    };

    /// Wake the reader only once this many bytes wait in `EVENTS`; userspace also drains
    /// on a short timer. Waking it for every record costs more than the record itself.
    #[unsafe(no_mangle)]
    static RINGBUF_WAKEUP_BYTES: u64 = 0;

    /// `SOCK_DONE` in `enum sock_flags`: set by `tcp_fin()` when the peer's FIN arrives.
    const SOCK_DONE_BIT: u64 = 1 << 1;

    #[inline(always)]
    fn offsets() -> KernelOffsets {
        // SAFETY: a plain read of our own read-only global; volatile so the compiler
        // keeps the values userspace writes into .rodata instead of folding the zeros.
        unsafe { core::ptr::read_volatile(&raw const OFFSETS) }
    }

    #[inline(always)]
    fn bump(index: u32) {
        if let Some(slot) = COUNTERS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe { *slot += 1 };
        }
    }

    /// Reads a `T` at `base + off` from kernel memory. A fault (the socket is being torn
    /// down, a bad offset) yields `T::default()` and is counted, never trusted.
    #[inline(always)]
    fn read<T: Default + Copy>(base: *const u8, off: u32) -> T {
        // SAFETY: bpf_probe_read_kernel validates the address; it never dereferences
        // it directly and reports a fault as an error.
        match unsafe { bpf_probe_read_kernel(base.add(off as usize) as *const T) } {
            Ok(value) => value,
            Err(_) => {
                bump(counter::READ_ERRORS);
                T::default()
            }
        }
    }

    /// Fills the addressing part of a record. IPv4 is stored IPv4-mapped (::ffff:a.b.c.d).
    #[inline(always)]
    fn read_addresses(sk: *const u8, off: &KernelOffsets, family: u16, rec: &mut SockRecord) {
        if family == AF_INET {
            let local: [u8; 4] = read(sk, off.skc_rcv_saddr);
            let remote: [u8; 4] = read(sk, off.skc_daddr);
            rec.local_addr = v4_mapped(local);
            rec.remote_addr = v4_mapped(remote);
        } else {
            rec.local_addr = read(sk, off.skc_v6_rcv_saddr);
            rec.remote_addr = read(sk, off.skc_v6_daddr);
        }
        rec.local_port = read::<u16>(sk, off.skc_num);
        rec.remote_port = u16::from_be(read::<u16>(sk, off.skc_dport));
        let net: u64 = read(sk, off.skc_net);
        rec.netns = read::<u32>(net as *const u8, off.net_ns_inum);
    }

    #[inline(always)]
    fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
        ]
    }

    /// Fills the tcp_sock counters and error state of a record.
    #[inline(always)]
    fn read_counters(sk: *const u8, off: &KernelOffsets, rec: &mut SockRecord) {
        rec.bytes_acked = read(sk, off.bytes_acked);
        rec.bytes_received = read(sk, off.bytes_received);
        rec.total_retrans = read(sk, off.total_retrans);
        rec.srtt_us_x8 = read(sk, off.srtt_us);
        rec.snd_una = read(sk, off.snd_una);
        rec.write_seq = read(sk, off.write_seq);
        rec.sk_err = read(sk, off.sk_err);
        let sk_flags: u64 = read(sk, off.sk_flags);
        if sk_flags & SOCK_DONE_BIT != 0 {
            rec.flags |= flags::PEER_FIN;
        }
    }

    #[inline(always)]
    fn copy_state(st: &SockState, rec: &mut SockRecord) {
        rec.start_ns = st.start_ns;
        rec.established_ns = st.established_ns;
        rec.base_bytes_acked = st.base_bytes_acked;
        rec.base_bytes_received = st.base_bytes_received;
        rec.base_total_retrans = st.base_total_retrans;
        rec.role = st.role;
        rec.flags |= st.flags;
        rec.cgroup_id = st.cgroup_id;
        // At TCP_CLOSE an automatically bound port has already been released.
        if rec.local_port == 0 {
            rec.local_port = st.local_port;
        }
    }

    /// The shared loopback rule (`EndpointKey::new`).
    #[inline(always)]
    fn endpoint(addr: [u8; 16], port: u16, netns: u32) -> EndpointKey {
        EndpointKey::new(addr, port, netns)
    }

    #[btf_tracepoint(function = "inet_sock_set_state")]
    pub fn ridley_inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
        let sk: *const u8 = ctx.arg(0);
        let old_state: i32 = ctx.arg(1);
        let new_state: i32 = ctx.arg(2);
        on_state_change(sk, old_state as u8, new_state as u8);
        0
    }

    #[inline(always)]
    fn on_state_change(sk: *const u8, old_state: u8, new_state: u8) {
        // Half of all transitions (FIN_WAIT*, CLOSE_WAIT, LAST_ACK, ...) and the close
        // of listeners and half-open children need nothing: leave before any read.
        let interesting = match new_state {
            tcp_state::SYN_SENT | tcp_state::SYN_RECV | tcp_state::ESTABLISHED => true,
            tcp_state::CLOSE => old_state != tcp_state::LISTEN,
            _ => false,
        };
        if !interesting {
            return;
        }
        let off = offsets();
        if read::<u16>(sk, off.sk_protocol) != IPPROTO_TCP {
            return;
        }
        let family: u16 = read(sk, off.skc_family);
        if family != AF_INET && family != AF_INET6 {
            return;
        }
        let key = sk as u64;
        match new_state {
            tcp_state::SYN_SENT => start(key, role::CLIENT),
            tcp_state::SYN_RECV => start(key, role::SERVER),
            tcp_state::ESTABLISHED => established(sk, &off, family, old_state),
            _ => closed(sk, &off, family, old_state),
        }
    }

    #[inline(always)]
    fn start(key: u64, role: u8) {
        let state = SockState {
            // SAFETY: bpf_ktime_get_ns has no preconditions.
            start_ns: unsafe { bpf_ktime_get_ns() },
            role,
            flags: flags::TRACKED,
            // SYN_SENT happens in connect(), in the calling task: its cgroup is the
            // client's. A server child is created in softirq, where it means nothing.
            cgroup_id: if role == role::CLIENT {
                // SAFETY: no preconditions.
                unsafe { bpf_get_current_cgroup_id() }
            } else {
                0
            },
            ..SockState::default()
        };
        if SOCKS.insert(&key, &state, 0).is_err() {
            bump(counter::SOCKS_FULL);
        }
    }

    #[inline(always)]
    fn established(sk: *const u8, off: &KernelOffsets, family: u16, old_state: u8) {
        let Some(st) = SOCKS.get_ptr_mut(&(sk as u64)) else {
            return;
        };
        // SAFETY: a valid pointer into our own map value, alive for this program run.
        let st = unsafe { &mut *st };
        st.established_ns = unsafe { bpf_ktime_get_ns() };
        st.base_bytes_acked = read(sk, off.bytes_acked);
        st.base_bytes_received = read(sk, off.bytes_received);
        st.base_total_retrans = read(sk, off.total_retrans);

        let mut rec = SockRecord::default();
        read_addresses(sk, off, family, &mut rec);
        st.local_port = rec.local_port;
        if old_state == tcp_state::SYN_SENT {
            // The client's ESTABLISHED precedes the server's: the server needs the client's
            // final ACK, sent only after this transition.
            let local = endpoint(rec.local_addr, rec.local_port, rec.netns);
            if CLIENT_ENDPOINTS.insert(&local, &1, 0).is_err() {
                bump(counter::ENDPOINTS_FULL);
            }
        } else if old_state == tcp_state::SYN_RECV {
            let remote = endpoint(rec.remote_addr, rec.remote_port, rec.netns);
            // SAFETY: the value is a plain u8 we only test for presence.
            if unsafe { CLIENT_ENDPOINTS.get(&remote) }.is_some() {
                st.flags |= flags::PEER_LOCAL;
            }
        }
    }

    #[inline(always)]
    fn closed(sk: *const u8, off: &KernelOffsets, family: u16, old_state: u8) {
        let key = sk as u64;
        // SAFETY: copied out at once; the entry is removed below.
        let state = unsafe { SOCKS.get(&key) }.copied();
        if let Some(st) = state {
            let _ = SOCKS.remove(&key);
            if st.flags & flags::PEER_LOCAL != 0 {
                return;
            }
        }
        // Listeners and half-open server children carry no connection of their own.
        if old_state == tcp_state::LISTEN || old_state == tcp_state::SYN_RECV {
            return;
        }
        let Some(mut entry) = EVENTS.reserve::<SockRecord>(0) else {
            bump(counter::RINGBUF_DROPS);
            if let Some(st) = state {
                forget_client_endpoint(sk, off, family, &st);
            }
            return;
        };
        let rec = entry.as_mut_ptr();
        // SAFETY: reserve() handed us exclusive, suitably aligned space for a SockRecord.
        let rec = unsafe {
            rec.write(SockRecord::default());
            &mut *rec
        };
        rec.sk = key;
        rec.ts_ns = unsafe { bpf_ktime_get_ns() };
        rec.kind = if old_state == tcp_state::SYN_SENT {
            kind::CONNECT_FAILED
        } else {
            kind::CLOSED
        };
        rec.state = old_state;
        read_addresses(sk, off, family, rec);
        read_counters(sk, off, rec);
        if let Some(st) = state {
            copy_state(&st, rec);
            if st.role == role::CLIENT && st.established_ns != 0 {
                let local = endpoint(rec.local_addr, st.local_port, rec.netns);
                let _ = CLIENT_ENDPOINTS.remove(&local);
            }
        }
        // SAFETY: plain read of our own read-only global (see offsets()).
        let threshold = unsafe { core::ptr::read_volatile(&raw const RINGBUF_WAKEUP_BYTES) };
        let wakeup = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= threshold {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        entry.submit(wakeup as u64);
    }

    #[inline(always)]
    fn forget_client_endpoint(sk: *const u8, off: &KernelOffsets, family: u16, st: &SockState) {
        if st.role == role::CLIENT && st.established_ns != 0 {
            let mut rec = SockRecord::default();
            read_addresses(sk, off, family, &mut rec);
            let _ = CLIENT_ENDPOINTS.remove(&endpoint(rec.local_addr, st.local_port, rec.netns));
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

    /// Called once per socket of the reading thread's network namespace, then once with
    /// a null socket. Writes one `SockRecord` per listener and per full socket.
    #[unsafe(no_mangle)]
    #[unsafe(link_section = "iter/tcp")]
    pub fn ridley_iter_tcp(ctx: *mut c_void) -> i32 {
        // SAFETY: the kernel passes a `struct bpf_iter__tcp *`; both loads are of
        // context fields the verifier allows.
        let (meta, sk) = unsafe {
            let ctx = &*(ctx as *const IterTcpCtx);
            (ctx.meta, ctx.sk_common)
        };
        if sk.is_null() {
            return 0;
        }
        let off = offsets();
        let state: u8 = read(sk, off.skc_state);
        // TIME_WAIT and NEW_SYN_RECV entries are mini-sockets without tcp_sock fields.
        if state == tcp_state::TIME_WAIT || state == tcp_state::NEW_SYN_RECV {
            return 0;
        }
        let family: u16 = read(sk, off.skc_family);
        if family != AF_INET && family != AF_INET6 {
            return 0;
        }
        let mut rec = SockRecord {
            sk: sk as u64,
            kind: kind::LIVE,
            state,
            // SAFETY: no preconditions.
            ts_ns: unsafe { bpf_ktime_get_ns() },
            ..SockRecord::default()
        };
        read_addresses(sk, &off, family, &mut rec);
        if state != tcp_state::LISTEN {
            read_counters(sk, &off, &mut rec);
            // SAFETY: copied out at once.
            if let Some(st) = unsafe { SOCKS.get(&(sk as u64)) } {
                copy_state(st, &mut rec);
            }
        }
        // SAFETY: meta is the kernel's iterator metadata; `rec` lives on our stack.
        unsafe {
            let seq = (*meta).seq;
            bpf_seq_write(
                seq as *mut _,
                &rec as *const SockRecord as *const c_void,
                SockRecord::SIZE as u32,
            );
        }
        0
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
