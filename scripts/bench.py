#!/usr/bin/env python3
"""ridley's benchmark: every figure of the README's benchmark table, side by side with the
references measured in the same run (prints figures; asserts nothing about speed).

Two network namespaces joined by a veth pair; every load is bounded in count and time
and every process is ended by its pid. Phases (`--phases`, all by default):

  kernel   a storm of short connections with three programs on `inet_sock_set_state` at
           once: ridley's, an empty raw tracepoint program (the floor) and a bpftrace
           tcplife-style script. Mean ns per run of each (kernel.bpf_stats_enabled).
  http     nginx + wrk, one request per connection and keep-alive, alternating runs
           with no daemon, ridley and the bpftrace script: median req/s relative to none.
  udp      keep-alive HTTP with UDP links on and off (alternating): req/s ratio, and the
           UDP hooks' ns per run on that TCP traffic and per datagram of connected UDP
           queries, beside an empty program on the same tracepoint.
  idle     CONNS live idle connections (default 50,000, default settings): daemon CPU at
           a 1 s interval, `iter/tcp` ns per socket visited, then all close at once:
           losses and exact counts.
  links    16,000 links at a 10 s interval, per exporter: RSS and CPU per interval.
  startup  peak RSS at startup, binary size (shipped stripped; debug info split off).
  k8s      bytes per pod and MiB for 100,000 pods (cargo bench -p k8sattrs).
  soak     SOAK minutes of storms, long-lived connections and churning links: RSS after
           warm-up and at the end.

Each phase's rows are saved in target/bench/<phase>.json; `--readme` rewrites the table
between the `bench:begin`/`bench:end` markers of README.md from the saved rows of every
phase (so a long phase, such as the soak, can be run on its own and still appear).
"""
import argparse
import asyncio
import ctypes
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
RIDLEY = pathlib.Path(os.environ.get("RIDLEY_BIN", ROOT / "target" / "release" / "ridley"))
SERVER_NS, CLIENT_NS = "rdlb-srv", "rdlb-cli"
SERVER_IP, CLIENT_IP = "10.232.0.1", "10.232.0.2"
SHORT_PORT, LONG_PORT, HTTP_PORT, UDP_PORT = 7001, 7002, 7080, 7053
# Connections per holding process: the hard open-file limit may be as low as 20,000.
PER_PROCESS = 15_000
# Buckets of the state table one run of ridley_walk_states visits (WALK_CHUNK_BUCKETS).
WALK_CHUNK_BUCKETS = 16

# A tcplife-style bpftrace script on the same tracepoint (kprobes are not assumed).
BPFTRACE_SCRIPT = r"""
tracepoint:sock:inet_sock_set_state
{
  if (args->newstate == 2 || args->newstate == 3) { @birth[args->skaddr] = nsecs; }
  if (args->newstate == 7 && @birth[args->skaddr]) {
    printf("%d %d %d %d\n", args->sport, args->dport, args->family,
           (nsecs - @birth[args->skaddr]) / 1000);
    delete(@birth[args->skaddr]);
  }
}
"""


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def raise_fd_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---- traffic roles, run inside the namespaces -------------------------------------

async def serve(ports):
    raise_fd_limit()

    async def handle(reader, writer):
        try:
            while True:
                data = await reader.readexactly(100)
                writer.write(b"s" * 50)
                await writer.drain()
                if data[:1] == b"q":  # short connection: one exchange, then close
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    servers = [await asyncio.start_server(handle, SERVER_IP, port, backlog=4096)
               for port in ports]
    print("listening", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


async def short_storm(count, concurrency, addr=SERVER_IP, port=SHORT_PORT):
    sem = asyncio.Semaphore(concurrency)

    async def one():
        async with sem:
            reader, writer = await asyncio.open_connection(addr, port)
            writer.write(b"q" * 100)
            await writer.drain()
            await reader.readexactly(50)
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(one() for _ in range(count)))


async def hold(port, count, rounds, pause_s):
    """`count` connections, `rounds` exchanges each, then held until a line on stdin,
    then all closed at once."""
    raise_fd_limit()
    conns = []
    for i in range(0, count, 500):
        conns += await asyncio.gather(*(asyncio.open_connection(SERVER_IP, port)
                                        for _ in range(min(500, count - i))))
    print("open", flush=True)
    for _ in range(rounds):
        for _, writer in conns:
            writer.write(b"l" * 100)
        await asyncio.gather(*(w.drain() for _, w in conns))
        await asyncio.gather(*(r.readexactly(50) for r, _ in conns))
        await asyncio.sleep(pause_s)
    print("exchanged", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    print("closed", flush=True)


# ---- measurement helpers ----------------------------------------------------------

def proc_stats(pid):
    """CPU seconds, peak RSS and current RSS (bytes) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    mem = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                mem[key] = int(value.split()[0]) * 1024
    return cpu, mem["VmHWM"], mem["VmRSS"]


def rss_anon(pid):
    """Anonymous resident memory (bytes): the heap and stacks, without the binary's and
    libraries' code pages (file-backed, faulted in as code first runs)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssAnon in /proc/{pid}/status")


def bpftool(*args):
    return json.loads(sh("bpftool", "--json", *args).stdout)


def prog_stats(ids):
    """{id: (runs, ns)} of the given program ids."""
    return {e["id"]: (e.get("run_cnt", 0), e.get("run_time_ns", 0))
            for e in bpftool("prog", "show") if e["id"] in ids}


def ridley_prog_ids():
    return {e["name"]: e["id"] for e in bpftool("prog", "show")
            if e.get("name", "").startswith("ridley_")}


def mean_ns(before, after, prog_id):
    runs = after[prog_id][0] - before.get(prog_id, (0, 0))[0]
    ns = after[prog_id][1] - before.get(prog_id, (0, 0))[1]
    return (ns / runs if runs else float("nan")), runs


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
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.core.somaxconn=8192")


def teardown_network():
    sh("ip", "netns", "del", SERVER_NS, check=False)
    sh("ip", "netns", "del", CLIENT_NS, check=False)


def in_ns(ns, *args, **kwargs):
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, __file__, *args],
                            stdout=subprocess.PIPE, text=True, **kwargs)


class Procs:
    """Every process a phase starts, ended by its pid when the phase ends."""

    def __init__(self):
        self.procs = []

    def add(self, proc):
        self.procs.append(proc)
        return proc

    def end(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()


def start_ridley(procs, work, extra="", exporters=None, interval="1s"):
    out = work / "metrics.jsonl"
    if exporters is None:
        exporters = (f"exporters:\n  file:\n    path: {out}\n", "file")
    (work / "ridley.yaml").write_text(
        f"receivers:\n  ebpf:\n    collection_interval: {interval}\n{extra}"
        f"{exporters[0]}"
        "service:\n  pipelines:\n    metrics:\n      receivers: [ebpf]\n"
        f"      exporters: [{exporters[1]}]\n")
    log_path = work / "ridley.log"
    log = open(log_path, "w")
    daemon = procs.add(subprocess.Popen(
        [str(RIDLEY), "run", "--config", str(work / "ridley.yaml")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"}))
    deadline = time.monotonic() + 60
    while "capture started" not in log_path.read_text():
        if daemon.poll() is not None or time.monotonic() > deadline:
            sys.exit(log_path.read_text())
        time.sleep(0.02)
    return daemon, out


def last_metrics(out):
    """The metrics of the last links batch (self-telemetry batches follow each one)."""
    lines = [l for l in out.read_text().splitlines() if "ridley.link." in l]
    last = json.loads(lines[-1])
    metrics = {}
    for rm in last["resourceMetrics"]:
        for sm in rm["scopeMetrics"]:
            for m in sm["metrics"]:
                metrics.setdefault(m["name"], []).extend(
                    (m.get("sum") or m.get("gauge") or {}).get("dataPoints", []))
    return metrics


def total(metrics, name, port, direction=None):
    n = 0
    for p in metrics.get(name, []):
        attrs = {a["key"]: a["value"] for a in p["attributes"]}
        if int(attrs.get("server.port", {}).get("intValue", -1)) != port:
            continue
        if direction and attrs["ridley.link.direction"]["stringValue"] != direction:
            continue
        n += int(p["asInt"])
    return n


def losses(metrics):
    return {p["attributes"][0]["value"]["stringValue"]: int(p["asInt"])
            for p in metrics.get("ridley.receiver.losses", []) if int(p["asInt"])}


# ---- the floor: an empty raw tracepoint program, loaded with bpf(2) ----------------

SYS_BPF = 321
BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN = 5, 17
BPF_PROG_TYPE_RAW_TRACEPOINT = 17


def load_floor_program(tracepoint="inet_sock_set_state", name="bench_floor"):
    """Attaches `r0 = 0; exit` to a raw tracepoint (inet_sock_set_state by default).
    Returns the two fds to keep open (closing them detaches) and the program's id."""
    libc = ctypes.CDLL(None, use_errno=True)
    insns = bytes.fromhex("b700000000000000" "9500000000000000")
    insns_buf = ctypes.create_string_buffer(insns)
    license_buf = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("IIQQ", attr, 0, BPF_PROG_TYPE_RAW_TRACEPOINT, 2,
                     ctypes.addressof(insns_buf), ctypes.addressof(license_buf))
    attr[48:48 + len(name)] = name.encode()  # prog_name
    prog_fd = libc.syscall(SYS_BPF, BPF_PROG_LOAD, attr, 128)
    if prog_fd < 0:
        raise OSError(ctypes.get_errno(), "loading the floor program")
    tp_name = ctypes.create_string_buffer(tracepoint.encode())
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("QI", attr, 0, ctypes.addressof(tp_name), prog_fd)
    link_fd = libc.syscall(SYS_BPF, BPF_RAW_TRACEPOINT_OPEN, attr, 128)
    if link_fd < 0:
        raise OSError(ctypes.get_errno(), "attaching the floor program")
    prog_id = next(e["id"] for e in bpftool("prog", "show") if e.get("name") == name)
    return (prog_fd, link_fd), prog_id


def start_bpftrace(procs, work):
    """The bpftrace reference, running; returns its program ids."""
    before = {e["id"] for e in bpftool("prog", "show")}
    script = work / "tcplife.bt"
    script.write_text(BPFTRACE_SCRIPT)
    proc = procs.add(subprocess.Popen(["bpftrace", str(script)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ids = {e["id"] for e in bpftool("prog", "show")} - before
        if ids:
            time.sleep(0.5)
            return proc, ids
        if proc.poll() is not None:
            sys.exit(f"bpftrace failed: {proc.stderr.read()}")
        time.sleep(0.1)
    sys.exit("bpftrace did not attach in 60 s")


# ---- phases -----------------------------------------------------------------------

def storm_costs(work, procs, short, watched):
    """Runs one storm of short connections; returns per-program (runs, ns) over it, the
    seconds it took, and the server it used."""
    server = procs.add(in_ns(SERVER_NS, "--role", "serve"))
    assert server.stdout.readline().strip() == "listening"
    before = prog_stats(watched)
    t0 = time.monotonic()
    storm = procs.add(in_ns(CLIENT_NS, "--role", "short", "--count", str(short)))
    storm.wait(timeout=600)
    took = time.monotonic() - t0
    after = prog_stats(watched)
    server.terminate()
    server.wait(timeout=30)
    return before, after, took


def phase_kernel(work, rows, short):
    """The same traffic each time: KERNEL_STORMS storms (5 by default) with ridley and the
    floor program beside it, its figure the median of their ratios (one storm's ratio
    moves by about a tenth between runs on a shared machine); then one with the table
    build, and one with the bpftrace script, each with the floor beside it (each
    program's cost is its own, but two programs' map work on one event would pollute
    each other's caches)."""
    storms = int(os.environ.get("KERNEL_STORMS", "5"))
    procs = Procs()
    try:
        fds, floor_id = load_floor_program()
        daemon, out = start_ridley(procs, work)
        state_id = ridley_prog_ids()["ridley_inet_sock_set_state"]
        cpu0 = proc_stats(daemon.pid)[0]
        per_storm, runs, took = [], 0, 0.0
        for _ in range(storms):
            before, after, seconds = storm_costs(work, procs, short, {state_id, floor_id})
            storm_ns, storm_runs = mean_ns(before, after, state_id)
            storm_floor_ns, _ = mean_ns(before, after, floor_id)
            per_storm.append((storm_ns / storm_floor_ns, storm_ns, storm_floor_ns))
            runs += storm_runs
            took += seconds
        time.sleep(2.5)
        cpu = proc_stats(daemon.pid)[0] - cpu0
        procs.end()
        metrics = last_metrics(out)
        ratio, ridley_ns, floor_ns = sorted(per_storm)[len(per_storm) // 2]
        ratios = sorted(r for r, _, _ in per_storm)
        # The same storm with per-socket state in the hash table kernels before 5.11 use.
        start_ridley(procs, work, extra="    socket_state: table\n")
        table_id = ridley_prog_ids()["ridley_inet_sock_set_state"]
        t_before, t_after, _ = storm_costs(work, procs, short, {table_id, floor_id})
        procs.end()
        table_ns, _ = mean_ns(t_before, t_after, table_id)
        table_floor_ns, _ = mean_ns(t_before, t_after, floor_id)
        bt_ns = float("nan")
        bt_floor_ns = float("nan")
        if not os.environ.get("BENCH_NO_BPFTRACE"):
            _, bt_ids = start_bpftrace(procs, work)
            bt_before, bt_after, _ = storm_costs(work, procs, short, {*bt_ids, floor_id})
            bt = [mean_ns(bt_before, bt_after, i) for i in bt_ids]
            bt_ns = sum(ns * r for ns, r in bt if r) / max([1] + [r for _, r in bt])
            bt_floor_ns, _ = mean_ns(bt_before, bt_after, floor_id)
        for fd in fds:
            os.close(fd)
    finally:
        procs.end()
    opened = total(metrics, "ridley.link.connections.opened", SHORT_PORT)
    rows.append((f"`tp_btf/inet_sock_set_state`, mean ns per run, storm of short connections (both ends on this host; the median storm's of {storms})",
                 f"{ridley_ns:.0f} ({ratio:.2f}x the floor, storms {ratios[0]:.2f}-{ratios[-1]:.2f}x; {runs:,} runs)",
                 f"empty program, same tracepoint, same storm: {floor_ns:.0f} (floor); bpftrace tcplife-style: {bt_ns:.0f} (floor beside it: {bt_floor_ns:.0f})"))
    rows.append(("the same, per-socket state in the hash table (`socket_state: table`, as on 5.10 and 5.11)",
                 f"{table_ns:.0f} ({table_ns / table_floor_ns:.1f}x the floor)",
                 f"floor beside it: {table_floor_ns:.0f}"))
    rows.append((f"{storms} storms of {short:,} short connections ({storms * short / took:,.0f}/s): daemon CPU",
                 f"{cpu / took * 100:.1f} % of a core; counted {opened:,}/{storms * short:,}, losses {losses(metrics) or 0}",
                 ""))


def wrk(url, keepalive, seconds):
    args = ["ip", "netns", "exec", CLIENT_NS, "wrk", "-t2", "-c64", f"-d{seconds}s"]
    if not keepalive:
        args += ["-H", "Connection: close"]
    out = sh(*args, url).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def start_nginx(work, procs):
    """nginx serving a 512-byte page in the server namespace; returns its URL."""
    conf = work / "nginx.conf"
    (work / "www").mkdir(exist_ok=True)
    (work / "www" / "index.html").write_text("x" * 512)
    conf.write_text(
        "worker_processes 1;\npid " + str(work / "nginx.pid") + ";\nerror_log /dev/null;\n"
        "events { worker_connections 4096; }\n"
        "http { access_log off; keepalive_requests 1000000;\n"
        f"  server {{ listen {SERVER_IP}:{HTTP_PORT} backlog=4096; root {work / 'www'}; }} }}\n")
    procs.add(subprocess.Popen(["ip", "netns", "exec", SERVER_NS, "nginx", "-c", str(conf),
                                "-g", "daemon off;"], stderr=subprocess.DEVNULL))
    time.sleep(1)
    return f"http://{SERVER_IP}:{HTTP_PORT}/index.html"


def phase_http(work, rows, runs, seconds):
    """Each round runs every mode once, in an order rotated from round to round (the
    machine drifts, and a run inherits the TIME_WAIT sockets of the one before); a
    mode's figure is the median of its per-round ratios to the no-daemon run of the same
    round, with their range beside it."""
    procs = Procs()
    modes = ("none", "ridley", "bpftrace")
    # Without the kernel's program statistics, as users run: their two clock reads per
    # program run would be charged to the agents only.
    sh("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=0")
    try:
        url = start_nginx(work, procs)
        results = {(mode, keep): [] for mode in modes for keep in (False, True)}
        for round_ in range(runs):
            order = modes[round_ % 3:] + modes[:round_ % 3]
            for mode in order:
                agent = Procs()
                try:
                    if mode == "ridley":
                        start_ridley(agent, work)
                    elif mode == "bpftrace":
                        start_bpftrace(agent, work)
                    # The agent's own start (program load, first walk) is not the load.
                    time.sleep(2)
                    for keep in (False, True):
                        results[(mode, keep)].append(wrk(url, keep, seconds))
                finally:
                    agent.end()
    finally:
        procs.end()
        sh("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=1")
    for keep, label in ((False, "short-connection HTTP (nginx, wrk, one request per connection)"),
                        (True, "keep-alive HTTP (nginx, wrk)")):
        base = results[("none", keep)]
        ratios = {m: [r / b for r, b in zip(results[(m, keep)], base)] for m in ("ridley", "bpftrace")}

        def fmt(m):
            return (f"{statistics.median(ratios[m]):.3f} "
                    f"({min(ratios[m]):.2f}-{max(ratios[m]):.2f})")
        rows.append((f"{label}, req/s vs no daemon (median of {runs} rounds, range)",
                     fmt("ridley"),
                     f"bpftrace: {fmt('bpftrace')} (no daemon: {statistics.median(base):,.0f} req/s)"))


def udp_serve(port):
    """An unconnected UDP echo server (as DNS servers are), in the server namespace."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((SERVER_IP, port))
    print("listening", flush=True)
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)


def udp_queries(port, count):
    """`count` queries of 40 bytes from one connected socket, each waiting its answer."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((SERVER_IP, port))
    for _ in range(count):
        s.send(b"q" * 40)
        s.recv(2048)
    print("done", flush=True)


def udp_spray(flows, rounds):
    """`flows` connected UDP sockets, one per server port, each sending one datagram a
    second for `rounds` seconds: that many UDP flows in every interval."""
    socks = []
    for i in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((SERVER_IP, UDP_SPRAY_PORT + i))
        socks.append(s)
    start = time.monotonic()
    for r in range(rounds):
        for s in socks:
            try:
                s.send(b"u" * 40)
            except ConnectionRefusedError:
                pass  # the ICMP answer of a port nobody listens on, reported on a later send
        time.sleep(max(0.0, start + r + 1 - time.monotonic()))
    print("done", flush=True)


UDP_SPRAY_PORT = 20000


def udp_interval_cost(work, rows, flows=1000, seconds=20):
    """What UDP flows cost the daemon per interval: CPU with `flows` flows in every
    1 s interval (drained from the kernel's tables, added to links, exported) beyond the
    same daemon idle."""
    agent = Procs()
    try:
        daemon, _ = start_ridley(agent, work, extra="    udp_links: true\n")
        time.sleep(2)
        cpu0 = proc_stats(daemon.pid)[0]
        time.sleep(seconds)
        idle = proc_stats(daemon.pid)[0] - cpu0
        spray = agent.add(in_ns(CLIENT_NS, "--role", "udp-spray", "--count", str(flows),
                                "--rounds", str(seconds)))
        cpu0 = proc_stats(daemon.pid)[0]
        assert spray.stdout.readline().strip() == "done"
        busy = proc_stats(daemon.pid)[0] - cpu0
    finally:
        agent.end()
    per_flow = (busy - idle) / (flows * seconds) * 1e6
    rows.append((f"{flows:,} UDP flows in every 1 s interval for {seconds} s: daemon CPU per flow per interval",
                 f"{per_flow:.1f} µs (table switch, read and delete, added to its link, exported by the file exporter); {busy / seconds * 100:.1f} % of a core",
                 f"same daemon idle: {idle / seconds * 100:.1f} % of a core"))


def phase_udp(work, rows, runs, seconds, queries=50_000):
    """What UDP links cost: keep-alive HTTP (all TCP: every send and receive passes the
    UDP hooks' early exit) with UDP links on and off, alternating; the hooks' cost per
    run on that TCP traffic beside an empty program on the same tracepoint; their cost
    per datagram on connected UDP queries."""
    procs = Procs()
    floor_fds, floor_id = load_floor_program("sock_send_length", "bench_udp_floor")
    try:
        url = start_nginx(work, procs)
        results = {"off": [], "on": []}
        tcp_costs = {"send": [0, 0], "recv": [0, 0], "floor": [0, 0]}
        for _ in range(runs):
            for mode in ("off", "on"):
                agent = Procs()
                try:
                    start_ridley(agent, work, extra="    udp_links: true\n" if mode == "on" else "")
                    ids = ridley_prog_ids()
                    watch = {floor_id}
                    if mode == "on":
                        watch |= {ids["ridley_sock_send_length"], ids["ridley_sock_recv_length"]}
                    before = prog_stats(watch)
                    results[mode].append(wrk(url, True, seconds))
                    after = prog_stats(watch)
                    if mode == "on":
                        for key, prog in (("send", ids["ridley_sock_send_length"]),
                                          ("recv", ids["ridley_sock_recv_length"]), ("floor", floor_id)):
                            tcp_costs[key][0] += after[prog][0] - before.get(prog, (0, 0))[0]
                            tcp_costs[key][1] += after[prog][1] - before.get(prog, (0, 0))[1]
                finally:
                    agent.end()
        ratio = statistics.median(results["on"]) / statistics.median(results["off"])
        per_run = {k: ns / n if n else float("nan") for k, (n, ns) in tcp_costs.items()}
        rows.append((f"keep-alive HTTP with UDP links on, req/s vs UDP off (median of {runs})",
                     f"{ratio:.3f}",
                     f"UDP off: {statistics.median(results['off']):,.0f} req/s"))
        rows.append(("UDP hooks on TCP traffic (keep-alive HTTP), ns per run",
                     f"send {per_run['send']:.0f}, receive {per_run['recv']:.0f}",
                     f"empty program on sock_send_length: {per_run['floor']:.0f} (floor)"))
        agent = Procs()
        try:
            start_ridley(agent, work, extra="    udp_links: true\n")
            ids = ridley_prog_ids()
            watch = {ids["ridley_sock_send_length"], ids["ridley_sock_recv_length"], floor_id}
            server = agent.add(in_ns(SERVER_NS, "--role", "udp-serve", "--port", str(UDP_PORT)))
            assert server.stdout.readline().strip() == "listening"
            before = prog_stats(watch)
            client = agent.add(in_ns(CLIENT_NS, "--role", "udp-query", "--port", str(UDP_PORT),
                                     "--count", str(queries)))
            client.wait(timeout=600)
            after = prog_stats(watch)
            send_ns, _ = mean_ns(before, after, ids["ridley_sock_send_length"])
            recv_ns, _ = mean_ns(before, after, ids["ridley_sock_recv_length"])
            floor_ns, _ = mean_ns(before, after, floor_id)
            rows.append((f"UDP hooks per datagram ({queries:,} connected queries and answers), ns per run",
                         f"send {send_ns:.0f}, receive {recv_ns:.0f}",
                         f"empty program on sock_send_length: {floor_ns:.0f} (floor)"))
        finally:
            agent.end()
        udp_interval_cost(work, rows)
    finally:
        procs.end()
        for fd in floor_fds:
            os.close(fd)


NAT_VIP, NAT_PORT = "10.96.7.1", 80


def phase_nat(work, rows, short, runs=3):
    """Short connections to a Service address DNAT'd in the client's namespace: what
    the conntrack lookups cost the daemon per connection (conntrack on vs off, runs
    alternating), and that every connection is counted, under the backend when on."""
    sh("ip", "-n", CLIENT_NS, "route", "add", "10.96.0.0/16", "dev", "rdlb1")
    rules = (f"table ip rdlb-nat {{\n chain out {{\n  type nat hook output priority -100;\n"
             f"  ip daddr {NAT_VIP} tcp dport {NAT_PORT} dnat to {SERVER_IP}:{SHORT_PORT}\n }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", CLIENT_NS, "nft", "-f", "-"], input=rules, text=True, check=True)
    results = {True: [], False: []}
    try:
        for _ in range(runs):
            for enabled in (True, False):
                procs = Procs()
                try:
                    daemon, out = start_ridley(
                        procs, work, extra=f"    conntrack:\n      enabled: {str(enabled).lower()}\n")
                    server = procs.add(in_ns(SERVER_NS, "--role", "serve"))
                    assert server.stdout.readline().strip() == "listening"
                    cpu0 = proc_stats(daemon.pid)[0]
                    t0 = time.monotonic()
                    storm = procs.add(in_ns(CLIENT_NS, "--role", "short", "--count", str(short),
                                            "--addr", NAT_VIP, "--port", str(NAT_PORT)))
                    storm.wait(timeout=600)
                    took = time.monotonic() - t0
                    time.sleep(2.5)  # two intervals: every close record applied
                    cpu = proc_stats(daemon.pid)[0] - cpu0
                    procs.end()  # the final batch is flushed
                    metrics = last_metrics(out)
                finally:
                    procs.end()
                port = SHORT_PORT if enabled else NAT_PORT
                opened = total(metrics, "ridley.link.connections.opened", port)
                results[enabled].append((cpu, took, opened, losses(metrics)))
    finally:
        sh("ip", "netns", "exec", CLIENT_NS, "nft", "delete", "table", "ip", "rdlb-nat", check=False)
        sh("ip", "-n", CLIENT_NS, "route", "del", "10.96.0.0/16", check=False)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    on = median([r[0] for r in results[True]])
    off = median([r[0] for r in results[False]])
    rate = short / median([r[1] for r in results[True]])
    counted = [r[2] for r in results[True]]
    rows.append((f"{short:,} short connections to a DNAT'd Service address (about {rate:,.0f}/s), 1 s interval, conntrack lookups on vs off (median of {runs} alternating runs)",
                 f"daemon CPU {on:.2f} s on vs {off:.2f} s off: {(on - off) / short * 1e6:.1f} µs per connection looked up; counted under the backend {min(counted):,}-{max(counted):,} of {short:,}; losses {results[True][0][3] or 0}",
                 f"off: counted under the Service address {min(r[2] for r in results[False]):,} of {short:,}"))


def phase_idle(work, rows, conns, socket_state="storage"):
    procs = Procs()
    table = socket_state == "table"
    groups = [(LONG_PORT + 10 + i, min(PER_PROCESS, conns - i * PER_PROCESS))
              for i in range((conns + PER_PROCESS - 1) // PER_PROCESS)]
    try:
        daemon, out = start_ridley(procs, work, extra=f"    socket_state: {socket_state}\n")
        iter_id = ridley_prog_ids()["ridley_iter_tcp" if table else "ridley_walk_states"]
        for port, _ in groups:
            server = procs.add(in_ns(SERVER_NS, "--role", "serve", "--port", str(port)))
            assert server.stdout.readline().strip() == "listening"
        holders = [procs.add(in_ns(CLIENT_NS, "--role", "hold", "--port", str(port), "--count",
                                   str(count), "--rounds", "1", stdin=subprocess.PIPE))
                   for port, count in groups]
        for holder in holders:
            assert holder.stdout.readline().strip() == "open"
            assert holder.stdout.readline().strip() == "exchanged"
        time.sleep(3)  # walks have reported every new connection once
        # CPU without the kernel's program statistics (their clock reads cost several
        # per cent of the walk), then the cost per visit with them.
        sh("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=0")
        cpu0 = proc_stats(daemon.pid)[0]
        time.sleep(20)
        cpu = (proc_stats(daemon.pid)[0] - cpu0) / 20
        sh("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=1")
        before = prog_stats({iter_id})
        time.sleep(10)
        after = prog_stats({iter_id})
        iter_ns, visits = mean_ns(before, after, iter_id)
        rss = proc_stats(daemon.pid)[2]
        maps = {m["name"]: m.get("bytes_memlock", 0) for m in bpftool("map", "show")
                if m.get("name") in ("SOCK_STATES", "SOCK_STATE_KEYS", "CLIENT_ENDPOINT", "EVENTS")}
        # Every connection closes at once.
        for holder in holders:
            holder.stdin.write("go\n")
            holder.stdin.flush()
        for holder in holders:
            assert holder.stdout.readline().strip() == "closed"
        time.sleep(3)
        procs.end()
        metrics = last_metrics(out)
    finally:
        procs.end()
    opened = sum(total(metrics, "ridley.link.connections.opened", port) for port, _ in groups)
    sent = sum(total(metrics, "ridley.link.bytes", port, "client_to_server") for port, _ in groups)
    # iter/tcp runs once per socket; the state walk once per WALK_CHUNK_BUCKETS buckets
    # of the state table.
    if table:
        iterator, visited = "iter/tcp", "socket"
    else:
        iterator, visited = "ridley_walk_states", "bucket"
        iter_ns, visits = iter_ns / WALK_CHUNK_BUCKETS, visits * WALK_CHUNK_BUCKETS
    variant = ", per-socket state in the hash table (as on 5.10 and 5.11)" if table else ""
    rows.append((f"{conns:,} live idle connections, default settings{variant}, 1 s interval",
                 f"{cpu * 100:.1f} % of a core, {rss / 2**20:.0f} MiB RSS; `{iterator}` {iter_ns:.0f} ns per {visited} visited ({visits / 10:,.0f} visits/s)",
                 f"kernel maps: {', '.join(f'{k} {v / 2**20:.1f} MiB' for k, v in sorted(maps.items()))}"))
    rows.append((f"all {conns:,} closing at once{variant}",
                 f"counted {opened:,}/{conns:,} opened, {sent:,}/{conns * 100:,} bytes; losses {losses(metrics) or 0}",
                 ""))


def phase_links(work, rows, links):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_links
    how = {"file": "OTLP/JSON lines appended to a file",
           "prometheus": "page scraped once per interval",
           "otlphttp": "to a live OTLP/HTTP receiver",
           "otlp": "gRPC collector down: every request queued (16 MiB bound) and retried"}
    for kind in ("file", "prometheus", "otlphttp", "otlp"):
        idle_rss, idle_cpu, _ = bench_links.measure(kind, 0, work, interval_s=10, intervals=3)
        rss, cpu, peak = bench_links.measure(kind, links, work, interval_s=10, intervals=3)
        rows.append((f"{links:,} links, {kind} exporter, 10 s interval",
                     f"{rss:.0f} MiB RSS, peak {peak:.0f} MiB ({(rss - idle_rss) * 1024 / links:.1f} KiB per link), "
                     f"{cpu / 10 * 100:.1f} % of a core ({(cpu - idle_cpu) * 1e6 / links:.1f} us per link per interval)",
                     how[kind]))


def phase_startup(work, rows):
    peaks = []
    for _ in range(3):
        procs = Procs()
        try:
            daemon, _ = start_ridley(procs, work)
            time.sleep(1)
            peaks.append(proc_stats(daemon.pid)[1])
        finally:
            procs.end()
    stripped = pathlib.Path(tempfile.mkdtemp()) / "ridley"
    sh("strip", "-o", str(stripped), str(RIDLEY))
    dwp = RIDLEY.with_name("ridley.dwp")
    rows.append(("peak RSS at startup (median of 3)", f"{statistics.median(peaks) / 2**20:.1f} MiB", ""))
    rows.append(("release binary",
                 f"{RIDLEY.stat().st_size / 2**20:.1f} MiB as built (symbols, no debug info), "
                 f"{stripped.stat().st_size / 2**20:.1f} MiB stripped (the image's)",
                 f"debug info apart: ridley.dwp {dwp.stat().st_size / 2**20:.0f} MiB" if dwp.exists() else ""))
    shutil.rmtree(stripped.parent)


def phase_k8s(rows):
    out = sh("cargo", "bench", "-q", "-p", "k8sattrs", "--bench", "memory", "--", "100000").stdout
    rows.append(("Kubernetes metadata, 100,000 pods (`cargo bench -p k8sattrs --bench memory`)",
                 "; ".join(line.strip() for line in out.splitlines() if line.strip()), ""))


def phase_soak(work, rows, minutes):
    procs = Procs()
    samples = []
    at_rest = []
    anon_at_rest = []
    storms = 0
    try:
        port = 20000
        daemon, _ = start_ridley(procs, work, extra="    idle_timeout: 1m\n", exporters=(
            "exporters:\n  prometheus:\n    endpoint: 127.0.0.1:19464\n", "prometheus"))
        server = procs.add(in_ns(SERVER_NS, "--role", "serve"))
        assert server.stdout.readline().strip() == "listening"
        holder = procs.add(in_ns(CLIENT_NS, "--role", "hold", "--count", "2000",
                                 "--rounds", str(minutes * 6), "--pause", "10", stdin=subprocess.PIPE))
        assert holder.stdout.readline().strip() == "open"
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            # At rest: a minute after the last storm, what the daemon keeps.
            at_rest.append(proc_stats(daemon.pid)[2])
            anon_at_rest.append(rss_anon(daemon.pid))
            # To the long-lived connections' port: their link never goes idle, so its
            # counters run from the start to the end of the soak.
            storm = in_ns(CLIENT_NS, "--role", "short", "--count", "3000", "--port", str(LONG_PORT))
            assert storm.wait(timeout=300) == 0, "storm failed"
            storms += 1
            # Churn: 300 new links to closed ports each minute; old ones expire (1 min).
            sh("ip", "netns", "exec", CLIENT_NS, sys.executable, "-c",
               "import socket\n"
               f"for p in range({port}, {port + 300}):\n"
               "    s = socket.socket()\n"
               "    try: s.connect(('" + SERVER_IP + "', p))\n"
               "    except OSError: pass\n"
               "    s.close()\n")
            port = 20000 + (port + 300 - 20000) % 20000
            samples.append((time.monotonic(), proc_stats(daemon.pid)[2]))
            print(f"soak minute {len(samples)}: RSS {samples[-1][1] / 2**20:.1f} MiB after the storm "
                  f"({at_rest[-1] / 2**20:.1f} MiB before it, {anon_at_rest[-1] / 2**20:.1f} MiB "
                  "of it anonymous)", flush=True)
            time.sleep(max(0, 60 - (time.monotonic() - samples[-1][0]) - 1))
        at_rest.append(proc_stats(daemon.pid)[2])
        anon_at_rest.append(rss_anon(daemon.pid))
        page = urllib.request.urlopen("http://127.0.0.1:19464/metrics", timeout=10).read().decode()
        holder.stdin.write("go\n")
        holder.stdin.flush()
    finally:
        procs.end()
    # at_rest[0] is before the first storm: the rest is one per minute, as `samples`.
    rows.append(soak_row(minutes, [rss for _, rss in samples], at_rest[1:], anon_at_rest[1:]))
    opened = prometheus_sum(page, "ridley_link_connections_opened_total", f'server_port="{LONG_PORT}"')
    lost = {m.group(1): int(float(m.group(2))) for m in re.finditer(
        r'^ridley_receiver_losses_total\{[^}]*reason="([^"]+)"[^}]*\} (\S+)$', page, re.M)}
    clients = 2000 + 3000 * storms
    rows.append((f"the soak's client connections on this host ({clients:,}, more than `max_connections`, "
                 f"65,536; plus {300 * storms:,} refused)",
                 f"counted {opened:,}/{clients:,} opened on the long-lived connections' link; "
                 f"losses {({k: v for k, v in lost.items() if v}) or 0}",
                 "from the Prometheus page at the end"))


def prometheus_sum(page, name, selector):
    """The sum of `name`'s samples on a Prometheus text page whose labels hold `selector`."""
    return sum(int(float(m.group(2))) for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", page, re.M)
               if selector in m.group(1))


def soak_row(minutes, rss, at_rest, anon_at_rest):
    """The soak's row from its RSS samples (bytes, one a minute): right after each
    minute's storm, and at rest, a minute after it (just before the next), in all and
    anonymous only. Right after a storm RSS moves by about a MiB from one sample to the
    next (records in flight, allocator caches), so beside the last sample the row gives
    the median of the last five; at rest is what the daemon keeps, and its anonymous
    part is where a leak would show (the rest is the binary's code pages, faulted in
    as code first runs and bounded by the binary's size)."""
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731

    def end_vs_warm(series):
        warm, last = series[min(2, len(series) - 1)], series[-1]
        pct = lambda b: f"{(b - warm) / warm * 100:+.1f} %"  # noqa: E731
        tail = statistics.median(series[-5:])
        return (f"{mib(warm)} MiB at minute 3, {mib(last)} MiB at the end ({pct(last)}), "
                f"median of the last five {mib(tail)} MiB ({pct(tail)})")

    return (f"{minutes}-minute soak (storms, 2,000 long-lived, 300 new links a minute)",
            f"RSS at rest (a minute after a storm): {end_vs_warm(at_rest)}; "
            f"of it anonymous (heap and mmapped blocks): {end_vs_warm(anon_at_rest)}; "
            f"right after the storms: {end_vs_warm(rss)}; max {mib(max(rss))} MiB",
            "RSS every 5 minutes, after the storm / at rest: "
            + ", ".join(f"{mib(b)}/{mib(r)}" for i, (b, r) in enumerate(zip(rss, at_rest))
                        if i % 5 == 4) + " MiB")


def ensure_tools(phases):
    need = {"http": ["wrk", "nginx", "bpftrace"], "kernel": ["bpftrace"], "udp": ["wrk", "nginx"]}
    missing = {tool for p in phases for tool in need.get(p, []) if not shutil.which(tool)}
    if missing:
        packages = {"wrk": "wrk", "nginx": "nginx-light", "bpftrace": "bpftrace"}
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                        *sorted(packages[t] for t in missing)], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


PHASES = ["kernel", "http", "udp", "nat", "idle", "idle_table", "links", "startup", "k8s", "soak"]
ROWS_DIR = ROOT / "target" / "bench"


def save_rows(phase, rows):
    ROWS_DIR.mkdir(parents=True, exist_ok=True)
    meta = {"phase": phase, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "kernel": os.uname().release, "cpus": os.cpu_count(), "rows": rows}
    (ROWS_DIR / f"{phase}.json").write_text(json.dumps(meta, indent=1))


def saved_rows():
    rows = []
    for phase in PHASES:
        path = ROWS_DIR / f"{phase}.json"
        if path.exists():
            rows += [tuple(r) for r in json.loads(path.read_text())["rows"]]
    return rows


def render(rows):
    lines = ["| figure | ridley | reference in the same run |", "|---|---|---|"]
    cell = lambda text: " ".join(str(text).split())  # noqa: E731 (one table row per line)
    lines += [f"| {cell(a)} | {cell(b)} | {cell(c)} |" for a, b, c in rows]
    return "\n".join(lines)


def update_readme(table):
    readme = ROOT / "README.md"
    text = readme.read_text()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--short", type=int, default=20_000)
    parser.add_argument("--conns", type=int, default=50_000)
    parser.add_argument("--links", type=int, default=16_000)
    parser.add_argument("--http-runs", type=int, default=9)
    parser.add_argument("--soak", type=int, default=int(os.environ.get("SOAK_MINUTES", 30)),
                        help="soak minutes (env SOAK_MINUTES)")
    parser.add_argument("--readme", action="store_true", help="rewrite the README's table")
    parser.add_argument("--role", choices=["serve", "short", "hold", "udp-serve", "udp-query", "udp-spray"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--pause", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, action="append", help=argparse.SUPPRESS)
    parser.add_argument("--addr", default=SERVER_IP, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "serve":
        return asyncio.run(serve(args.port or [SHORT_PORT, LONG_PORT]))
    if args.role == "short":
        return asyncio.run(short_storm(args.count, 64, args.addr, (args.port or [SHORT_PORT])[0]))
    if args.role == "udp-serve":
        return udp_serve((args.port or [UDP_PORT])[0])
    if args.role == "udp-spray":
        return udp_spray(args.count, args.rounds)
    if args.role == "udp-query":
        return udp_queries((args.port or [UDP_PORT])[0], args.count)
    if args.role == "hold":
        return asyncio.run(hold((args.port or [LONG_PORT])[0], args.count, args.rounds, args.pause))

    if not RIDLEY.exists():
        sys.exit(f"{RIDLEY} missing: run `make bench`")
    phases = args.phases.split(",")
    ensure_tools(phases)
    raise_fd_limit()
    setup_network()
    sh("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=1")
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="ridley-bench-") as tmp:
            work = pathlib.Path(tmp)
            for phase in phases:
                started = time.monotonic()
                before = len(rows)
                if phase == "kernel":
                    phase_kernel(work, rows, args.short)
                elif phase == "http":
                    phase_http(work, rows, args.http_runs, 5)
                elif phase == "udp":
                    phase_udp(work, rows, args.http_runs, 5)
                elif phase == "nat":
                    phase_nat(work, rows, args.short)
                elif phase == "idle":
                    phase_idle(work, rows, args.conns)
                elif phase == "idle_table":
                    phase_idle(work, rows, args.conns, socket_state="table")
                elif phase == "links":
                    phase_links(work, rows, args.links)
                elif phase == "startup":
                    phase_startup(work, rows)
                elif phase == "k8s":
                    phase_k8s(rows)
                elif phase == "soak" and args.soak > 0:
                    phase_soak(work, rows, args.soak)
                if len(rows) > before:
                    save_rows(phase, rows[before:])
                print(f"# {phase}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
                print(render(rows[-3:]) if rows else "", file=sys.stderr, flush=True)
    finally:
        sh("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=0")
        teardown_network()
    table = render(rows)
    print(table)
    if args.readme:
        update_readme(render(saved_rows()))


if __name__ == "__main__":
    main()
