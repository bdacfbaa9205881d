//! Walks the TCP sockets of every network namespace with the `iter/tcp` program.
//! A BPF TCP iterator lists the sockets of the namespace its reader is in, so this
//! thread enters each namespace in turn and comes back to its own.
use std::{
    collections::BTreeMap,
    fs::File,
    io::Read,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use anyhow::{Context, Result, bail};
use aya::programs::Iter;

use super::{Walk, parse_record};
use ridley_ebpf::SockRecord;

/// Every distinct network namespace: one path per namespace inode. Processes'
/// namespaces (pods: their pause process holds one) and named ones (`ip netns add`).
pub(super) fn namespaces() -> BTreeMap<u64, PathBuf> {
    let mut found = BTreeMap::new();
    let mut consider = |path: PathBuf| {
        if let Ok(meta) = std::fs::metadata(&path) {
            found.entry(meta.ino()).or_insert(path);
        }
    };
    consider(PathBuf::from("/proc/self/ns/net"));
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                consider(entry.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                consider(entry.path().join("ns/net"));
            }
        }
    }
    found
}

/// Enters the namespace behind `ns`. Only this thread moves.
pub(super) fn enter(ns: &File) -> std::io::Result<()> {
    // SAFETY: setns on a valid namespace fd; affects the calling thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs the iterator in the current namespace and appends its records.
fn walk_current(iter: &mut Iter, out: &mut Vec<SockRecord>, buf: &mut Vec<u8>) -> Result<()> {
    let link = iter.attach().context("attaching iter/tcp")?;
    let link = iter.take_link(link).context("taking iter/tcp link")?;
    let file = link.into_file().context("creating the iterator")?;
    read_records(file, out, buf)
}

/// Reads one walk from an iterator and appends its records.
pub(super) fn read_records(
    mut file: File,
    out: &mut Vec<SockRecord>,
    buf: &mut Vec<u8>,
) -> Result<()> {
    buf.clear();
    file.read_to_end(buf).context("reading the iterator")?;
    if !buf.len().is_multiple_of(SockRecord::SIZE) {
        bail!(
            "iterator returned {} bytes, not a multiple of the {}-byte record",
            buf.len(),
            SockRecord::SIZE
        );
    }
    out.extend(buf.chunks_exact(SockRecord::SIZE).filter_map(parse_record));
    Ok(())
}

/// Walks every namespace it can. A namespace that cannot be entered or read is
/// skipped and reported in the result (the caller warns and counts it): one bad
/// namespace, or a missing privilege, must not stop the capture of the others. Only
/// failing to come back to our own namespace is fatal, because every later walk would
/// start from the wrong place.
pub(super) fn walk_all_namespaces(iter: &mut Iter) -> Result<Walk> {
    let home = File::open("/proc/thread-self/ns/net").context("opening own network namespace")?;
    let mut walk = Walk::default();
    let mut buf = Vec::new();
    for (inode, path) in namespaces() {
        let ns = match File::open(&path) {
            Ok(ns) => ns,
            // The namespace vanished between listing and entering (its last process
            // exited): it has no sockets left to report.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                walk.skip(format!(
                    "opening {} (namespace {inode}): {e}",
                    path.display()
                ));
                continue;
            }
        };
        // The process behind a `/proc/<pid>` path may have exited and its pid been
        // reused since the listing: that namespace is gone, and this one is another's.
        if ns.metadata().map(|m| m.ino()).ok() != Some(inode) {
            continue;
        }
        if let Err(e) = enter(&ns) {
            walk.skip(format!(
                "entering {} (namespace {inode}): {e}",
                path.display()
            ));
            continue;
        }
        let walked = walk_current(iter, &mut walk.records, &mut buf);
        enter(&home).context("returning to own network namespace")?;
        match walked {
            Ok(()) => walk.namespaces += 1,
            Err(e) => walk.skip(format!("walking sockets of {}: {e:#}", path.display())),
        }
    }
    Ok(walk)
}
