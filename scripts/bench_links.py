#!/usr/bin/env python3
"""What a link costs (prints figures; asserts nothing about speed).

A client namespace connects once to each of N closed ports of a server namespace (a
port scan: N links of one refused connection each). For each exporter and each N, the
daemon's resident memory once the links are exported, its CPU per collection interval,
and the memory per link above an idle daemon. Exporters work as in production: the
Prometheus page is scraped once per interval, `otlphttp` sends to a live receiver (a
sink that reads every request and answers 200), `otlp` to a collector that is not
there (every request queued and retried). Bounded: N connects, a fixed number of
intervals, every process ended by its pid.
"""
import argparse
import http.client
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
RIDLEY = pathlib.Path(os.environ.get("RIDLEY_BIN", ROOT / "target" / "release" / "ridley"))
INTERVAL_S = 2.0
MEASURED_INTERVALS = 5
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The same two namespaces as the connection-storm benchmark.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench import CLIENT_NS, SERVER_IP, setup_network, sh, teardown_network  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scan(first, count):
    code = (
        "import socket\n"
        f"for port in range({first}, {first + count}):\n"
        "    s = socket.socket()\n"
        "    try:\n"
        f"        s.connect(('{SERVER_IP}', port))\n"
        "    except OSError:\n"
        "        pass\n"
        "    s.close()\n"
    )
    sh("ip", "netns", "exec", CLIENT_NS, sys.executable, "-c", code)


def rss_mib(pid, field="VmRSS"):
    """Resident memory now (VmRSS) or at its peak since start (VmHWM)."""
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(field + r":\s+(\d+) kB", status).group(1)) / 1024


def cpu_s(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def exporter_config(kind, workdir, helpers, interval_s):
    """One exporter, or several joined by `+` in one pipeline (`file+prometheus+otlp`)."""
    if "+" in kind:
        parts = [exporter_config(k, workdir, helpers, interval_s) for k in kind.split("+")]
        return "".join(p[0] for p in parts), ", ".join(p[1] for p in parts)
    if kind == "file":
        return f"  file:\n    path: {workdir / 'out.jsonl'}\n", "file"
    if kind == "prometheus":
        port = free_port()
        helpers.start_scraper(port, interval_s)
        return f"  prometheus:\n    endpoint: 127.0.0.1:{port}\n", "prometheus"
    if kind == "otlphttp":
        port = helpers.start_sink()
        return f"  otlphttp:\n    endpoint: http://127.0.0.1:{port}\n", "otlphttp"
    # A collector that is not there: encoding and queueing, every request retried.
    return (f"  otlp:\n    endpoint: 127.0.0.1:{free_port()}\n    tls: {{insecure: true}}\n",
            "otlp")


class Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that reads each request whole and accepts it."""
    received = 0

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        while length:
            length -= len(self.rfile.read(min(length, 1 << 20)))
        Sink.received += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Helpers:
    """What runs beside the daemon during a measurement: the OTLP sink, the scraper."""

    def __init__(self):
        self.stop = threading.Event()
        self.threads = []
        self.sink = None
        self.scraped = 0

    def start_sink(self):
        self.sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
        self.threads.append(threading.Thread(target=self.sink.serve_forever, daemon=True))
        self.threads[-1].start()
        return self.sink.server_address[1]

    def start_scraper(self, port, interval_s):
        def scrape():
            while not self.stop.wait(interval_s):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
                        while chunk := r.read(1 << 20):
                            self.scraped += len(chunk)
                except (OSError, http.client.HTTPException):
                    pass  # the daemon stopping mid-scrape
        self.threads.append(threading.Thread(target=scrape, daemon=True))
        self.threads[-1].start()

    def end(self):
        self.stop.set()
        if self.sink:
            self.sink.shutdown()
            self.sink.server_close()


def measure(kind, links, workdir, perf=None, interval_s=INTERVAL_S, intervals=MEASURED_INTERVALS):
    helpers = Helpers()
    exporters, exporter_id = exporter_config(kind, workdir, helpers, interval_s)
    config = workdir / f"{kind.replace('+', '-')}-{links}.yaml"
    config.write_text(
        "receivers:\n  ebpf:\n"
        f"    collection_interval: {interval_s}s\n    idle_timeout: 10m\n"
        f"    max_links: {max(links, 1) + 10}\n"
        f"exporters:\n{exporters}"
        "service:\n  telemetry:\n    logs: {level: warn}\n"
        f"  pipelines:\n    metrics:\n      receivers: [ebpf]\n      exporters: [{exporter_id}]\n")
    log = open(workdir / f"{kind.replace('+', '-')}-{links}.log", "w")
    proc = subprocess.Popen([str(RIDLEY), "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=log)
    try:
        time.sleep(3)
        if links:
            scan(20000, links)
        time.sleep(2 * interval_s)  # the links are in the table and have been exported
        recorder = None
        if perf and links:
            out = pathlib.Path(perf) / f"{kind.replace('+', '-')}-{links}.perf.data"
            recorder = subprocess.Popen(["perf", "record", "-g", "-o", str(out), "-p", str(proc.pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu_before = cpu_s(proc.pid)
        time.sleep(intervals * interval_s)
        cpu_per_interval = (cpu_s(proc.pid) - cpu_before) / intervals
        if recorder:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(timeout=60)
        rss = rss_mib(proc.pid)
        peak = rss_mib(proc.pid, "VmHWM")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        helpers.end()
        (workdir / "out.jsonl").unlink(missing_ok=True)
    return rss, cpu_per_interval, peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--links", default="1000,4000")
    parser.add_argument("--exporters", default="file,prometheus,otlphttp,otlp,file+prometheus+otlp",
                        help="comma-separated; `a+b` is one pipeline with both exporters")
    parser.add_argument("--perf", metavar="DIR",
                        help="also record a CPU profile (perf record -g) of each measured run into DIR")
    args = parser.parse_args()
    if not RIDLEY.exists():
        sys.exit(f"{RIDLEY} is not built (cargo build --release)")
    setup_network()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = pathlib.Path(tmp)
            print(f"{'exporters':<22} {'links':>6} {'RSS MiB':>8} {'peak MiB':>9} {'KiB/link':>9} "
                  f"{'CPU ms/interval':>16} {'us/link/interval':>17}")
            for kind in args.exporters.split(","):
                idle_rss, idle_cpu, idle_peak = measure(kind, 0, workdir, args.perf)
                print(f"{kind:<22} {0:>6} {idle_rss:>8.1f} {idle_peak:>9.1f} {'':>9} "
                      f"{idle_cpu * 1000:>16.1f} {'':>17}")
                for links in map(int, args.links.split(",")):
                    rss, cpu, peak = measure(kind, links, workdir, args.perf)
                    per_link_kib = (rss - idle_rss) * 1024 / links
                    per_link_us = (cpu - idle_cpu) * 1e6 / links
                    print(f"{kind:<22} {links:>6} {rss:>8.1f} {peak:>9.1f} {per_link_kib:>9.1f} "
                          f"{cpu * 1000:>16.1f} {per_link_us:>17.1f}", flush=True)
    finally:
        teardown_network()


if __name__ == "__main__":
    main()
