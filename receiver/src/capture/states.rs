//! Walks the sockets that have state in `SOCK_STATES`, in every network namespace at
//! once, with the `iter/bpf_map_elem` program over `SOCK_STATE_KEYS`: the walks between
//! full walks.
//!
//! aya attaches iterators without a target map, so the link is made here with the two
//! `bpf()` commands the kernel documents (`BPF_LINK_CREATE` with the map in
//! `iter_info`, then `BPF_ITER_CREATE`).
use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result};
use aya::{maps::MapData, programs::Iter};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd};
use ridley_ebpf::SockRecord;

use super::netns::read_records;

/// `union bpf_iter_link_info` with its map member set (the union is 16 bytes).
#[repr(C)]
struct IterLinkInfo {
    map_fd: u32,
    _rest: [u32; 3],
}

/// Runs one `bpf()` command that returns a new file descriptor.
fn bpf_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<OwnedFd> {
    let fd = super::sys::bpf(cmd, attr)?;
    // SAFETY: on success the command returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An iterator over `map` (one read of it is one walk).
fn open_iterator(prog: BorrowedFd<'_>, map: BorrowedFd<'_>) -> Result<File> {
    let info = IterLinkInfo {
        map_fd: map.as_raw_fd() as u32,
        _rest: [0; 3],
    };
    let mut attr = super::sys::zeroed_attr();
    // Writes to union members are safe: the `link_create` variant is the one the command
    // reads.
    attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    attr.link_create.attach_type = bpf_attach_type::BPF_TRACE_ITER as u32;
    attr.link_create.__bindgen_anon_3.__bindgen_anon_1.iter_info = &info as *const _ as u64;
    attr.link_create
        .__bindgen_anon_3
        .__bindgen_anon_1
        .iter_info_len = std::mem::size_of::<IterLinkInfo>() as u32;
    let link = bpf_fd(bpf_cmd::BPF_LINK_CREATE, &mut attr)
        .context("attaching iter/bpf_map_elem to SOCK_STATE_KEYS")?;
    // The `iter_create` variant is set.
    let mut attr = super::sys::zeroed_attr();
    attr.iter_create.link_fd = link.as_raw_fd() as u32;
    let iterator = bpf_fd(bpf_cmd::BPF_ITER_CREATE, &mut attr).context("creating the iterator")?;
    Ok(File::from(iterator))
}

/// Appends the records of every socket with state whose counters changed since the
/// walk that last reported it.
pub(super) fn walk_states(
    prog: &Iter,
    states: &MapData,
    out: &mut Vec<SockRecord>,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let prog_fd = prog.fd().context("iter/bpf_map_elem is not loaded")?;
    let file = open_iterator(prog_fd.as_fd(), states.fd().as_fd())?;
    read_records(file, out, buf)
}
