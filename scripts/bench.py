#!/usr/bin/env python3
"""Connection-storm benchmark for ridley (prints figures; asserts nothing about speed).

Two network namespaces joined by a veth pair. Phase 1: SHORT short connections
(100 bytes up, 50 down). Phase 2: LONG long-lived connections held open together,
each carrying ROUNDS request/response exchanges. Bounded in count and in time.

Prints: mean ns per kernel program run (kernel.bpf_stats_enabled), the daemon's CPU
seconds and peak RSS, kernel map memory at its peak, and whether ridley's counts match.
"""
import argparse
import asyncio
import json
import os
import pathlib
import resource
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RIDLEY = ROOT / "target" / "release" / "ridley"
SERVER_NS, CLIENT_NS = "rdlb-srv", "rdlb-cli"
SERVER_IP, CLIENT_IP = "10.232.0.1", "10.232.0.2"
SHORT_PORT, LONG_PORT = 7001, 7002
TIME_LIMIT_S = 300


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---- traffic roles, run inside the namespaces -------------------------------------

async def serve():
    raise_fd_limit()

    async def handle(reader, writer):
        try:
            while True:
                data = await reader.readexactly(100)
                if data[:1] == b"q":  # short connection: one exchange, then close
                    writer.write(b"s" * 50)
                    await writer.drain()
                    break
                writer.write(b"s" * 50)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    servers = [await asyncio.start_server(handle, SERVER_IP, port, backlog=4096)
               for port in (SHORT_PORT, LONG_PORT)]
    print("listening", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


async def short_storm(count, concurrency):
    sem = asyncio.Semaphore(concurrency)

    async def one():
        async with sem:
            reader, writer = await asyncio.open_connection(SERVER_IP, SHORT_PORT)
            writer.write(b"q" * 100)
            await writer.drain()
            await reader.readexactly(50)
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(one() for _ in range(count)))


async def long_lived(count, rounds):
    raise_fd_limit()
    conns = []
    for i in range(0, count, 200):
        conns += await asyncio.gather(*(asyncio.open_connection(SERVER_IP, LONG_PORT)
                                        for _ in range(min(200, count - i))))
    print("open", flush=True)
    for _ in range(rounds):
        for _, writer in conns:
            writer.write(b"l" * 100)
        await asyncio.gather(*(w.drain() for _, w in conns))
        await asyncio.gather(*(r.readexactly(50) for r, _ in conns))
        await asyncio.sleep(1)
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)


# ---- measurement ------------------------------------------------------------------

def proc_stats(pid):
    """CPU seconds, peak RSS and current RSS (bytes) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    mem = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                mem[key] = int(value.split()[0]) * 1024
    return cpu, mem["VmHWM"], mem["VmRSS"]


def bpftool(*args):
    return json.loads(sh("bpftool", "--json", *args).stdout)


def ridley_programs():
    # Only ridley loads programs named ridley_*; the benchmark runs one daemon.
    return [e for e in bpftool("prog", "show") if e.get("name", "").startswith("ridley_")]


def ridley_maps():
    """Kernel memory of the maps the daemon's programs use, by name."""
    ids = {i for e in ridley_programs() for i in e.get("map_ids", [])}
    return {m["name"]: m.get("bytes_memlock", 0) for m in bpftool("map", "show") if m["id"] in ids}


def prog_costs():
    return {e["name"]: (e["run_cnt"], e["run_time_ns"]) for e in ridley_programs()
            if e.get("run_cnt")}


def setup_network():
    teardown_network()
    sh("ip", "netns", "add", SERVER_NS)
    sh("ip", "netns", "add", CLIENT_NS)
    sh("ip", "link", "add", "rdlb0", "netns", SERVER_NS, "type", "veth", "peer", "name", "rdlb1",
       "netns", CLIENT_NS)
    for ns, dev, ip in ((SERVER_NS, "rdlb0", SERVER_IP), (CLIENT_NS, "rdlb1", CLIENT_IP)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # A storm of short connections leaves TIME_WAIT sockets: let ports be reused.
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w",
           "net.ipv4.ip_local_port_range=10000 65000")


def teardown_network():
    sh("ip", "netns", "del", SERVER_NS, check=False)
    sh("ip", "netns", "del", CLIENT_NS, check=False)


def in_ns(ns, *args, **kwargs):
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, __file__, *args],
                            stdout=subprocess.PIPE, text=True, **kwargs)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--short", type=int, default=20_000)
    parser.add_argument("--long", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--role", choices=["serve", "short", "long"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "serve":
        return asyncio.run(serve())
    if args.role == "short":
        return asyncio.run(short_storm(args.short, 64))
    if args.role == "long":
        return asyncio.run(long_lived(args.long, args.rounds))

    if not RIDLEY.exists():
        sys.exit(f"{RIDLEY} missing: run `make bench`")
    deadline = time.monotonic() + TIME_LIMIT_S
    setup_network()
    sh("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=1")
    work = pathlib.Path(tempfile.mkdtemp(prefix="ridley-bench-"))
    out = work / "metrics.jsonl"
    (work / "ridley.yaml").write_text(
        "receivers:\n  ebpf:\n    collection_interval: 1s\n"
        f"exporters:\n  file:\n    path: {out}\n"
        "service:\n  pipelines:\n    metrics:\n      receivers: [ebpf]\n      exporters: [file]\n")
    log = open(work / "ridley.log", "w")
    daemon = subprocess.Popen([str(RIDLEY), "run", "--config", str(work / "ridley.yaml")],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    procs = [daemon]
    try:
        while "capture started" not in (work / "ridley.log").read_text():
            if daemon.poll() is not None or time.monotonic() > deadline:
                sys.exit((work / "ridley.log").read_text())
            time.sleep(0.05)
        server = in_ns(SERVER_NS, "--role", "serve")
        procs.append(server)
        assert server.stdout.readline().strip() == "listening"

        t0 = time.monotonic()
        short = in_ns(CLIENT_NS, "--role", "short", "--short", str(args.short))
        procs.append(short)
        short.wait(timeout=max(1, deadline - time.monotonic()))
        short_s = time.monotonic() - t0

        long_ = in_ns(CLIENT_NS, "--role", "long", "--long", str(args.long), "--rounds",
                      str(args.rounds))
        procs.append(long_)
        assert long_.stdout.readline().strip() == "open"
        time.sleep(2.5)  # at least two collections with every connection open
        peak_maps = ridley_maps()
        long_.wait(timeout=max(1, deadline - time.monotonic()))
        time.sleep(2)
        costs = prog_costs()
        cpu, peak_rss, rss = proc_stats(daemon.pid)
        daemon.send_signal(signal.SIGINT)
        daemon.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        sh("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=0")
        teardown_network()

    last = json.loads(out.read_text().splitlines()[-1])
    metrics = {m["name"]: m for m in last["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]}

    def total(name, port, direction=None):
        n = 0
        for p in metrics[name]["sum"]["dataPoints"]:
            attrs = {a["key"]: a["value"] for a in p["attributes"]}
            if int(attrs["server.port"]["intValue"]) != port:
                continue
            if direction and attrs["ridley.link.direction"]["stringValue"] != direction:
                continue
            n += int(p["asInt"])
        return n

    print(f"ridley benchmark: {args.short} short connections ({short_s:.1f} s), "
          f"then {args.long} long-lived x {args.rounds} exchanges")
    for name, (cnt, ns) in sorted(costs.items()):
        print(f"  kernel program {name:<16} runs {cnt:>9}  mean {ns / cnt:8.0f} ns/run")
    print(f"  daemon CPU            {cpu:.2f} s")
    print(f"  daemon RSS            {rss / 2**20:.1f} MiB after the storm, "
          f"{peak_rss / 2**20:.1f} MiB peak (startup BTF parsing)")
    print(f"  kernel map memory     {sum(peak_maps.values()) / 2**20:.2f} MiB at peak "
          f"({', '.join(f'{k} {v / 2**10:.0f} KiB' for k, v in sorted(peak_maps.items()))})")
    short_opened = total("ridley.link.connections.opened", SHORT_PORT)
    long_opened = total("ridley.link.connections.opened", LONG_PORT)
    long_bytes = total("ridley.link.bytes", LONG_PORT, "client_to_server")
    print(f"  counted: short opened {short_opened}/{args.short}, long opened "
          f"{long_opened}/{args.long}, long bytes client->server {long_bytes}/"
          f"{args.long * args.rounds * 100}")
    losses = {(p["attributes"][0]["value"]["stringValue"]): int(p["asInt"])
              for p in metrics["ridley.receiver.losses"]["sum"]["dataPoints"]}
    print(f"  losses: {losses}")


if __name__ == "__main__":
    main()
