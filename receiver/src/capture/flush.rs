//! Has every CPU send the close records it holds (`CLOSE_BATCHES`) to the ring buffer.
//!
//! The state-change program writes a close record into its CPU's batch and sends the
//! batch when it is full. What a quiet CPU holds would otherwise wait for its next 31
//! closes: after each walk, the walker runs the flush program on every online CPU
//! (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_RUN_ON_CPU`: from an interrupt on that CPU, or
//! with preemption off on the caller's), so that every close before the walk's end is
//! in the ring buffer when the receiver drains it.
use std::os::fd::AsFd;

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf,
    programs::{ProgramFd, RawTracePoint},
};
use ridley_ebpf::{flush_result, names};

use super::{program, sys::run_on_cpu};

/// A flush that finds a program on that CPU changing the batch (it interrupted one) is
/// run again; that program finishes within microseconds, so this many tries apart are
/// never all busy in practice.
const MAX_TRIES: u32 = 10_000;

pub(super) struct CloseFlusher {
    program: ProgramFd,
}

impl CloseFlusher {
    /// Loads the flush program (never attached: only run on demand) and runs it once on
    /// every CPU, so that a kernel that cannot run it fails at startup, not by holding
    /// records back.
    pub(super) fn load(ebpf: &mut Ebpf) -> Result<Self> {
        let prog: &mut RawTracePoint = program(ebpf, names::PROG_FLUSH_CLOSES)?;
        prog.load()
            .context("loading the close-batch flush (a raw tracepoint program)")?;
        let fd = prog
            .fd()
            .context("the close-batch flush program has no descriptor")?
            .try_clone()
            .context("duplicating the close-batch flush program's descriptor")?;
        let flusher = CloseFlusher { program: fd };
        flusher.flush().context(
            "running the close-batch flush on each CPU (needs BPF_PROG_TEST_RUN of raw tracepoint programs on a given CPU, 5.10+)",
        )?;
        Ok(flusher)
    }

    /// Has every online CPU send the close records it holds. CPUs are read each time, so
    /// that one brought online later is included; one going offline meanwhile keeps its
    /// records until it is back.
    pub(super) fn flush(&self) -> Result<()> {
        let cpus = aya::util::online_cpus().map_err(|(path, e)| anyhow!("reading {path}: {e}"))?;
        for cpu in cpus {
            let mut tries = 0;
            loop {
                match run_on_cpu(self.program.as_fd(), cpu) {
                    Ok(flush_result::DONE) => break,
                    Ok(flush_result::BUSY) if tries < MAX_TRIES => {
                        tries += 1;
                        std::thread::yield_now();
                    }
                    Ok(flush_result::BUSY) => {
                        bail!("CPU {cpu}'s close batch was busy at each of {MAX_TRIES} tries")
                    }
                    Ok(other) => bail!("the close-batch flush returned {other} on CPU {cpu}"),
                    Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
                    Err(e) => {
                        return Err(e).with_context(|| format!("flushing CPU {cpu}'s close batch"));
                    }
                }
            }
        }
        Ok(())
    }
}
