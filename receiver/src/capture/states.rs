//! Walks the sockets that have state in `SOCK_STATES`, in every network namespace at
//! once: the walks between full walks. The `ridley_walk_states` program is never
//! attached; each walk runs it (`BPF_PROG_TEST_RUN`) once per `WALK_CHUNK_BUCKETS`
//! buckets of `SOCK_STATE_KEYS` and drains the records of each run from `WALK_RECORDS`
//! before the next, so the ring never holds more than one run's records.
//!
//! A program run on demand, not an iterator over the map's elements
//! (`iter/bpf_map_elem`), which some kernels refuse to every program while loading the
//! other iterators.
use std::os::fd::{AsFd, OwnedFd};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, RingBuf};
use ridley_ebpf::{SockRecord, WALK_CHUNK_BUCKETS};

use super::sys::run_with_context;
use crate::capture::parse_record;

/// The walks between full walks.
pub(super) struct StateWalker {
    /// The walk program, duplicated so that the walker does not borrow the `Ebpf`.
    program: OwnedFd,
    records: RingBuf<MapData>,
    buckets: u32,
}

impl StateWalker {
    pub(super) fn new(program: OwnedFd, records: RingBuf<MapData>, buckets: u32) -> Self {
        StateWalker {
            program,
            records,
            buckets,
        }
    }

    /// Appends the records of every socket with state whose counters changed since the
    /// walk that last reported it.
    pub(super) fn walk(&mut self, out: &mut Vec<SockRecord>) -> Result<()> {
        for first in (0..self.buckets).step_by(WALK_CHUNK_BUCKETS as usize) {
            run_with_context(self.program.as_fd(), &[u64::from(first)])
                .with_context(|| format!("running the state walk from bucket {first}"))?;
            while let Some(item) = self.records.next() {
                if item.len() != SockRecord::SIZE {
                    bail!(
                        "the state walk wrote {} bytes, not a {}-byte record",
                        item.len(),
                        SockRecord::SIZE
                    );
                }
                out.extend(parse_record(&item));
            }
        }
        Ok(())
    }
}
