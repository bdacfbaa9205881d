//! The `bpf()` commands aya does not wrap: running a raw tracepoint program once (on a
//! given CPU, or with a context), and a program's recursion-miss count.
use std::os::fd::{AsRawFd, BorrowedFd};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};

/// Runs one `bpf()` command; returns what it returned (a new descriptor for some).
pub(super) fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zero-initialised `bpf_attr` with the command's members set; the
    // kernel reads at most `size_of::<bpf_attr>()` bytes of it and writes only the
    // command's output members.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

/// A zeroed `bpf_attr`, the state every command starts from.
pub(super) fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is plain data; all-zero is its documented initial state.
    unsafe { std::mem::zeroed() }
}

/// Runs a raw tracepoint program once on `cpu` (`BPF_PROG_TEST_RUN` with
/// `BPF_F_TEST_RUN_ON_CPU`, no context) and returns what it returned.
pub(super) fn run_on_cpu(program: BorrowedFd<'_>, cpu: u32) -> std::io::Result<u32> {
    const BPF_F_TEST_RUN_ON_CPU: u32 = 1;
    let mut attr = zeroed_attr();
    // Writes to union members are safe: `test` is the member the command reads.
    attr.test.prog_fd = program.as_raw_fd() as u32;
    attr.test.flags = BPF_F_TEST_RUN_ON_CPU;
    attr.test.cpu = cpu;
    bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr)?;
    // SAFETY: the kernel wrote the member back on success.
    Ok(unsafe { attr.test.retval })
}

/// Runs a raw tracepoint program once on this CPU with `args` as its context (the
/// tracepoint arguments it would see) and returns what it returned.
pub(super) fn run_with_context(program: BorrowedFd<'_>, args: &[u64]) -> std::io::Result<u32> {
    let mut attr = zeroed_attr();
    // Writes to union members are safe: `test` is the member the command reads.
    attr.test.prog_fd = program.as_raw_fd() as u32;
    attr.test.ctx_in = args.as_ptr() as u64;
    attr.test.ctx_size_in = std::mem::size_of_val(args) as u32;
    bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr)?;
    // SAFETY: the kernel wrote the member back on success.
    Ok(unsafe { attr.test.retval })
}

/// How many times the kernel skipped the program because it was already running on
/// that CPU (`bpf_prog_info.recursion_misses`; counted for raw tracepoint programs from
/// 6.7, 0 on older kernels, which do not count the skips).
pub(super) fn recursion_misses(program: BorrowedFd<'_>) -> std::io::Result<u64> {
    // SAFETY: bpf_prog_info is plain data; the kernel fills what it knows of it.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = program.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
    attr.info.info = &mut info as *mut bpf_prog_info as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.recursion_misses)
}
