"""Fixtures for ridley's end-to-end tests: a small network of namespaces joined by a
bridge (our own test hosts), traffic peers inside them, and the real daemon on the real
kernel, observed through its file exporter (OTLP/JSON)."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RIDLEY = pathlib.Path(os.environ.get("RIDLEY_BIN", ROOT / "target" / "debug" / "ridley"))
PEER = ROOT / "tests" / "peer.py"
ON_CI = os.environ.get("CI") == "true"

BRIDGE = "rdlt-br"
# name -> (IPv4, IPv6) of each test host (a network namespace on the bridge).
HOSTS = {
    "a": ("10.231.0.1", "fd00:231::1"),
    "b": ("10.231.0.2", "fd00:231::2"),
    "c": ("10.231.0.3", "fd00:231::3"),
}
# On the bridge's subnet, but no host answers it: connects there time out.
SILENT_V4 = "10.231.0.99"


def ns(host):
    return f"rdlt-{host}"


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def kernel_unavailable():
    if os.geteuid() != 0:
        return "needs root (eBPF and network namespaces)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "needs a kernel with BTF (/sys/kernel/btf/vmlinux)"
    if not RIDLEY.exists():
        return f"{RIDLEY} is not built (run `make test`)"
    return None


@pytest.fixture(scope="session", autouse=True)
def kernel():
    reason = kernel_unavailable()
    if reason:
        # On CI a kernel test that cannot run is a failure, never a skip.
        if ON_CI:
            pytest.fail(f"end-to-end tests cannot run on CI: {reason}")
        pytest.skip(reason)


def teardown_network():
    for host in HOSTS:
        sh("ip", "netns", "del", ns(host), check=False)
        sh("ip", "link", "del", f"rdlt-{host}h", check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


@pytest.fixture(scope="session")
def network(kernel):
    teardown_network()
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "link", "set", BRIDGE, "up")
    for host, (v4, v6) in HOSTS.items():
        name = ns(host)
        sh("ip", "netns", "add", name)
        sh("ip", "link", "add", f"rdlt-{host}h", "type", "veth", "peer", "name", "eth0", "netns", name)
        sh("ip", "link", "set", f"rdlt-{host}h", "master", BRIDGE, "up")
        sh("ip", "-n", name, "addr", "add", f"{v4}/24", "dev", "eth0")
        sh("ip", "-n", name, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        sh("ip", "-n", name, "link", "set", "lo", "up")
    yield HOSTS
    teardown_network()


class Peers:
    """Traffic peers in namespaces; every process started is ended by its pid."""

    def __init__(self):
        self.procs = []

    def _spawn(self, host, *args, stdin=None):
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns(host), sys.executable, str(PEER), *map(str, args)],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.procs.append(proc)
        return proc

    def server(self, host, addr, port, reply=0, reset=False):
        args = ["serve", "--addr", addr, "--port", port, "--reply", reply]
        if reset:
            args.append("--reset")
        proc = self._spawn(host, *args)
        line = proc.stdout.readline().strip()
        assert line == "listening", f"server did not start: {line} {proc.stderr.read()}"
        return proc

    def connect(self, host, addr, port, send=0, count=1, timeout=10.0):
        proc = self._spawn(host, "connect", "--addr", addr, "--port", port, "--send", send,
                           "--count", count, "--timeout", timeout)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        return out.splitlines()

    def hold(self, host, addr, port, before, send):
        """A connection that sends `before` bytes now and `send` bytes on release()."""
        proc = self._spawn(host, "connect", "--addr", addr, "--port", port, "--hold",
                           "--before", before, "--send", send, stdin=subprocess.PIPE)
        assert proc.stdout.readline().strip() == "connected", proc.stderr.read()
        return proc

    def send_then_pause(self, host, addr, port, send):
        """A connection that sends `send` bytes, then waits open until release()."""
        proc = self._spawn(host, "connect", "--addr", addr, "--port", port, "--send", send,
                           "--pause-after-send", stdin=subprocess.PIPE)
        assert proc.stdout.readline().strip() == "sent", proc.stderr.read()
        return proc

    @staticmethod
    def release(proc):
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        return out.splitlines()

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def peers(network):
    p = Peers()
    yield p
    p.stop()


class Ridley:
    """The daemon with a file exporter writing OTLP/JSON to `out`."""

    def __init__(self, workdir, interval="1s", idle_timeout="5m"):
        self.out = workdir / "metrics.jsonl"
        self.log_path = workdir / "ridley.log"
        config = workdir / "ridley.yaml"
        config.write_text(
            "receivers:\n"
            "  ebpf:\n"
            f"    collection_interval: {interval}\n"
            f"    idle_timeout: {idle_timeout}\n"
            "exporters:\n"
            "  file:\n"
            f"    path: {self.out}\n"
            "service:\n"
            "  pipelines:\n"
            "    metrics:\n"
            "      receivers: [ebpf]\n"
            "      exporters: [file]\n"
        )
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(RIDLEY), "run", "--config", str(config)],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "NO_COLOR": "1", "RUST_BACKTRACE": "0"})
        deadline = time.monotonic() + 60
        while "capture started" not in self.log_path.read_text():
            assert self.proc.poll() is None, f"ridley exited:\n{self.log_path.read_text()}"
            assert time.monotonic() < deadline, f"ridley not ready:\n{self.log_path.read_text()}"
            time.sleep(0.05)

    def batches(self):
        if not self.out.exists():
            return []
        return [Batch(json.loads(line)) for line in self.out.read_text().splitlines() if line]

    def wait_for(self, predicate, timeout=20):
        """Waits for a batch satisfying `predicate`; returns it."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            batches = self.batches()
            for batch in batches[seen:]:
                if predicate(batch):
                    return batch
            seen = len(batches)
            time.sleep(0.1)
        raise AssertionError(f"no batch matched within {timeout}s; last: {self.batches()[-1:]}")

    def stop(self):
        """SIGINT: the daemon flushes a final batch and exits 0. Returns that batch."""
        if self.proc.poll() is None:
            # Let the last FIN/ACK exchanges of the test's connections finish.
            time.sleep(0.3)
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
        self.log.close()
        assert self.proc.returncode == 0, self.log_path.read_text()
        return self.batches()[-1]


@pytest.fixture
def ridley(network, tmp_path):
    started = []

    def start(**kwargs):
        r = Ridley(tmp_path, **kwargs)
        started.append(r)
        return r

    yield start
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def _value(any_value):
    if "stringValue" in any_value:
        return any_value["stringValue"]
    if "intValue" in any_value:
        return int(any_value["intValue"])
    raise AssertionError(f"unexpected attribute value {any_value}")


class Batch:
    """One OTLP/JSON export request as written by the file exporter."""

    def __init__(self, doc):
        self.doc = doc
        (rm,) = doc["resourceMetrics"]
        self.resource = {a["key"]: _value(a["value"]) for a in rm["resource"]["attributes"]}
        (sm,) = rm["scopeMetrics"]
        self.metrics = {m["name"]: m for m in sm["metrics"]}

    def points(self, name):
        metric = self.metrics.get(name)
        if metric is None:
            return []
        data = metric.get("sum") or metric.get("histogram")
        out = []
        for p in data.get("dataPoints", []):
            attrs = {a["key"]: _value(a["value"]) for a in p.get("attributes", [])}
            out.append((attrs, p))
        return out

    def links(self):
        return sorted({(a["client.address"], a["server.address"], a["server.port"])
                       for a, _ in self.points("ridley.link.connections.active")})

    def link(self, client, server, port):
        """Everything the batch says about one link, as plain numbers."""
        def match(attrs):
            return (attrs.get("client.address"), attrs.get("server.address"),
                    attrs.get("server.port")) == (client, server, port)

        def ints(name, extra=None):
            found = {}
            for attrs, p in self.points(name):
                if match(attrs):
                    found[attrs.get(extra) if extra else None] = int(p["asInt"])
            return found

        def hist_count(name):
            counts = [int(p["count"]) for attrs, p in self.points(name) if match(attrs)]
            return counts[0] if counts else None

        active = ints("ridley.link.connections.active")
        if not active:
            return None
        attrs = next(a for a, _ in self.points("ridley.link.connections.active") if match(a))
        bytes_ = ints("ridley.link.bytes", "network.io.direction")
        return {
            "network.type": attrs["network.type"],
            "network.transport": attrs["network.transport"],
            "opened": ints("ridley.link.connections.opened").get(None, 0),
            "active": active[None],
            "failed": ints("ridley.link.connections.failed", "error.type"),
            "transmit": bytes_.get("transmit", 0),
            "receive": bytes_.get("receive", 0),
            "retransmits": ints("ridley.link.retransmits").get(None, 0),
            "connect_count": hist_count("ridley.link.connect.duration"),
            "rtt_count": hist_count("ridley.link.rtt"),
        }

    def losses(self):
        return {attrs["reason"]: int(p["asInt"]) for attrs, p in self.points("ridley.receiver.losses")}
