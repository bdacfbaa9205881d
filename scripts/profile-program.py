#!/usr/bin/env python3
"""Where the state-change program's time goes, by helper and by source line.

Runs the benchmark's storm of short connections (both ends on this host, see bench.py)
against the release daemon under `perf record -a -g`, then splits the samples that fall
in `ridley_inet_sock_set_state`:

- by the kernel path that ran the program (connect, the handshake's end, a close, ...),
- by what was running: a helper (socket cookie, ring buffer, clock, cgroup) or the
  program's own instructions,
- the program's own instructions by source line, through the JIT line table the kernel
  keeps for the loaded program (`bpf_prog_info.jited_line_info`; this machine's bpftool
  has no disassembler, so the table is read with bpf(2) directly).

A profile, not a benchmark: perf's sampling slows every program run down (the mean per
run is several times the benchmark's), so read shares, not nanoseconds. Needs root,
perf and bpftool. Usage: python3 scripts/profile-program.py [--count N] [--top N]
"""
import argparse
import bisect
import collections
import ctypes
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402  (the storm, the network and the daemon's start)

PROGRAM = "ridley_inet_sock_set_state"
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
SYS_BPF = 321  # x86_64
# Offsets in `struct bpf_prog_info` (include/uapi/linux/bpf.h).
INFO_LINE_INFO_COUNT = 148
INFO_JITED_LINE_INFO, INFO_JITED_LINE_INFO_COUNT, INFO_JITED_LINE_INFO_SIZE = 160, 168, 176

PLUMBING = ("bpf_trace_run", "__traceiter_", "__bpf_trace_", "inet_sk_state_store",
            "inet_sk_set_state", "__bpf_prog_enter", "bpf_trampoline")
HELPERS = (
    ("bpf_get_socket", "socket cookie"),
    ("ringbuf", "ring buffer"),
    ("ktime", "clock"),
    ("cgroup_id", "cgroup id"),
    ("skc_to_tcp_sock", "socket cast"),
)


def bpf(cmd, attr):
    """bpf(2) with `attr` as its attribute union; returns the call's result."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(bytes(attr), 128)
    result = libc.syscall(SYS_BPF, cmd, buf, 128)
    if result < 0:
        raise OSError(ctypes.get_errno(), f"bpf({cmd})")
    return result


def prog_info(fd, info):
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, len(info), ctypes.addressof(info)))


def jited_line_starts(prog_id):
    """Offsets from the program's start at which each line-info entry's code begins."""
    fd = bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("<I", prog_id))
    try:
        info = ctypes.create_string_buffer(256)
        prog_info(fd, info)
        (count,) = struct.unpack_from("<I", info, INFO_LINE_INFO_COUNT)
        starts = (ctypes.c_uint64 * count)()
        info = ctypes.create_string_buffer(256)
        struct.pack_into("<I", info, INFO_JITED_LINE_INFO_COUNT, count)
        struct.pack_into("<I", info, INFO_JITED_LINE_INFO_SIZE, 8)
        struct.pack_into("<Q", info, INFO_JITED_LINE_INFO, ctypes.addressof(starts))
        prog_info(fd, info)
    finally:
        os.close(fd)
    # The main function's entries come first, at rising addresses; a subprogram's (in
    # an image of its own) start over lower or far away, so the table ends there.
    offsets = [0]
    for address in starts[1:]:
        offset = address - starts[0]
        if offset < offsets[-1] or offset > 1 << 20:
            break
        offsets.append(offset)
    return offsets


def source_lines(prog_id):
    """The line-info entries' source lines, in order (bpftool prints one per entry). A
    line of inlined library code (`ptr::read_volatile`, say) is shown with the last line
    of the program's own source before it in the code."""
    out = bench.sh("bpftool", "prog", "dump", "xlated", "id", str(prog_id), "linum").stdout
    lines, context = [], "?"
    for line in out.splitlines():
        if line.startswith(";"):
            text, _, where = line[1:].partition("[file:")
            file, _, rest = where.partition(" line_num:")
            name, number = pathlib.Path(file).name, rest.split()[0]
            if name == "ridley-ebpf.rs":
                context = f"{name}:{number}  {text.strip()}"
                lines.append(context)
            else:
                lines.append(f"{name}:{number}  (after {context})")
    return lines


def samples(perf_data):
    """Call chains (leaf first) as (symbol, offset) pairs."""
    out = subprocess.run(["perf", "script", "-i", perf_data, "-F", "ip,sym,symoff"],
                         capture_output=True, text=True, check=True).stdout
    for block in out.split("\n\n"):
        chain = []
        for row in block.strip().splitlines():
            parts = row.split()
            if len(parts) < 2:
                continue
            sym, _, off = parts[1].partition("+")
            chain.append((sym, int(off, 16) if off else 0))
        if chain:
            yield chain


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=30_000, help="connections in the storm")
    parser.add_argument("--top", type=int, default=15, help="source lines to print")
    parser.add_argument("--by-path", action="store_true",
                        help="also split each kernel path's samples by part and source line")
    args = parser.parse_args()
    if not bench.RIDLEY.exists():
        sys.exit(f"{bench.RIDLEY} missing: run `cargo build --release`")
    for tool, package in (("perf", "linux-perf"), ("bpftool", "bpftool")):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} missing: apt-get install {package}")
    bench.raise_fd_limit()
    bench.setup_network()
    procs = bench.Procs()
    with tempfile.TemporaryDirectory(prefix="ridley-profile-") as tmp:
        work = pathlib.Path(tmp)
        perf_data = str(work / "perf.data")
        try:
            bench.start_ridley(procs, work)
            prog_id = bench.ridley_prog_ids()[PROGRAM]
            starts, lines = jited_line_starts(prog_id), source_lines(prog_id)
            perf = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "10000", "-o", perf_data],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            bench.storm_costs(work, procs, args.count, set())
            perf.send_signal(2)
            perf.wait(timeout=60)
        finally:
            procs.end()
        by_path, by_part, by_line = (collections.Counter() for _ in range(3))
        path_detail = collections.defaultdict(collections.Counter)
        total = 0
        for chain in samples(perf_data):
            at = next((i for i, (sym, _) in enumerate(chain) if sym.endswith(PROGRAM)), None)
            if at is None:
                continue
            total += 1
            # Past the tracepoint's plumbing, the TCP function that changed the state
            # (and, for tcp_done, the one that called it).
            callers = [sym for sym, _ in chain[at + 1:] if not sym.startswith(PLUMBING)]
            path = " <- ".join(callers[:2] if callers[:1] == ["tcp_done"] else callers[:1]) or "?"
            by_path[path] += 1
            below = [sym for sym, _ in chain[:at]]
            part = next((name for key, name in HELPERS if any(key in s for s in below)), None)
            if part is None and below:
                part = f"other: {below[-1]}"
            if part is None:
                part = "the program's own instructions"
                index = bisect.bisect_right(starts, chain[at][1]) - 1
                by_line[lines[index] if 0 <= index < len(lines) else "?"] += 1
                path_detail[path][lines[index] if 0 <= index < len(lines) else "?"] += 1
            else:
                path_detail[path][part] += 1
            by_part[part] += 1
    if not total:
        sys.exit("no samples in the program")
    print(f"{total} samples in {PROGRAM}\n\nby the kernel path that ran it:")
    for name, n in by_path.most_common(8):
        print(f"  {100 * n / total:5.1f} %  {name}")
    print("\nby what ran:")
    for name, n in by_part.most_common():
        print(f"  {100 * n / total:5.1f} %  {name}")
    print(f"\nthe program's own instructions, top {args.top} source lines (share of all samples):")
    for name, n in by_line.most_common(args.top):
        print(f"  {100 * n / total:5.1f} %  {name}")
    if args.by_path:
        for path, n in by_path.most_common(6):
            print(f"\n{path}: {100 * n / total:.1f} % of all samples, its top {args.top}:")
            for name, m in path_detail[path].most_common(args.top):
                print(f"  {100 * m / total:5.1f} %  {name}")


if __name__ == "__main__":
    main()
