"""Fixtures for ridley's end-to-end tests: a small network of namespaces joined by a
bridge (our own test hosts), traffic peers inside them, and the real daemon on the real
kernel, observed through its file exporter (OTLP/JSON)."""
import base64
import json
import socket
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
# This machine's own address on the bridge: a node, whose host processes and
# host-network pods share it.
HOST_V4 = "10.231.0.254"
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
    # The host itself on the test network (a node's address), for host-network clients.
    sh("ip", "addr", "add", f"{HOST_V4}/24", "dev", BRIDGE)
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

    def server(self, host, addr, port, reply=0, reset=False, close_first=False):
        args = ["serve", "--addr", addr, "--port", port, "--reply", reply]
        if reset:
            args.append("--reset")
        if close_first:
            args.append("--close-first")
        proc = self._spawn(host, *args)
        line = proc.stdout.readline().strip()
        assert line == "listening", f"server did not start: {line} {proc.stderr.read()}"
        return proc

    def connect(self, host, addr, port, send=0, count=1, timeout=10.0, read_first=False,
                abort=False, source=None):
        flags = (["--read-first"] if read_first else []) + (["--abort"] if abort else [])
        flags += ["--source", source] if source else []
        proc = self._spawn(host, "connect", "--addr", addr, "--port", port, "--send", send,
                           "--count", count, "--timeout", timeout, *flags)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        return out.splitlines()

    def udp_server(self, host, addr, port, reply=0):
        proc = self._spawn(host, "udp-serve", "--addr", addr, "--port", port, "--reply", reply)
        line = proc.stdout.readline().strip()
        assert line == "listening", f"UDP server did not start: {line} {proc.stderr.read()}"
        return proc

    def udp_query(self, host, addr, port, send=1, count=1, unconnected=False):
        """`count` queries and answers; returns the bytes answered."""
        flags = ["--unconnected"] if unconnected else []
        proc = self._spawn(host, "udp-query", "--addr", addr, "--port", port, "--send", send,
                           "--count", count, *flags)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        return int(out.split()[1])

    def scan(self, host, addr, first, last):
        """Connects once to every port from `first` to `last`; returns how many refused."""
        proc = self._spawn(host, "connect", "--addr", addr, "--port", 0, "--ports", f"{first}-{last}")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return int(out.split()[1])

    def hold_all(self, host, addr, port, count, send):
        """`count` connections open at once, `send` bytes sent on each; release() closes."""
        proc = self._spawn(host, "connect", "--addr", addr, "--port", port, "--count", count,
                           "--send", send, "--hold-all", stdin=subprocess.PIPE)
        assert proc.stdout.readline().strip() == "held", proc.stderr.read()
        return proc

    def hold(self, host, addr, port, before, send, source=None, source_port=0, keepalive=0):
        """A connection that sends `before` bytes now and `send` bytes on release();
        `keepalive`: TCP keepalive probes every that many seconds while it waits."""
        bind = ["--source", source, "--source-port", source_port] if source else []
        proc = self._spawn(host, "connect", "--addr", addr, "--port", port, "--hold",
                           "--before", before, "--send", send, "--keepalive", keepalive,
                           *bind, stdin=subprocess.PIPE)
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

    def __init__(self, workdir, interval="1s", idle_timeout="5m", receiver_extra="",
                 exporters="", pipelines=None, processors="", pipeline_processors=(), extensions="",
                 command_prefix=(), service_extra="", env=None):
        """Default: one metrics pipeline into the file exporter at `out`. `exporters`
        (YAML, indented under `exporters:`) and `pipelines` ({name: [exporter ids]})
        add more; `spans` is the file the `file/spans` exporter writes."""
        self.out = workdir / "metrics.jsonl"
        self.spans_out = workdir / "spans.jsonl"
        self.log_path = workdir / "ridley.log"
        config = workdir / "ridley.yaml"
        pipelines = pipelines or {"metrics": ["file"]}
        config.write_text(
            "receivers:\n"
            "  ebpf:\n"
            f"    collection_interval: {interval}\n"
            f"    idle_timeout: {idle_timeout}\n"
            f"{receiver_extra}"
            "exporters:\n"
            "  file:\n"
            f"    path: {self.out}\n"
            "  file/spans:\n"
            f"    path: {self.spans_out}\n"
            f"{exporters}"
            + (f"processors:\n{processors}" if processors else "")
            + (f"extensions:\n{extensions}" if extensions else "")
            + "service:\n"
            + service_extra
            + ("  extensions: [health_check]\n" if extensions else "")
            + "  pipelines:\n"
            + "".join(f"    {name}:\n      receivers: [ebpf]\n"
                      f"      processors: [{', '.join(pipeline_processors)}]\n"
                      f"      exporters: [{', '.join(ids)}]\n"
                      for name, ids in pipelines.items())
        )
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*command_prefix, str(RIDLEY), "run", "--config", str(config)],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "NO_COLOR": "1", "RUST_BACKTRACE": "0",
                                          **(env or {})})
        deadline = time.monotonic() + 60
        while "capture started" not in self.log_path.read_text():
            assert self.proc.poll() is None, f"ridley exited:\n{self.log_path.read_text()}"
            assert time.monotonic() < deadline, f"ridley not ready:\n{self.log_path.read_text()}"
            time.sleep(0.05)

    def batches(self):
        if not self.out.exists():
            return []
        # Only whole lines: the exporter may be in the middle of writing a large batch.
        complete = self.out.read_text().split("\n")[:-1]
        return batches_of([json.loads(line) for line in complete if line])

    def spans(self):
        return read_spans(self.spans_out)

    def wait_for(self, predicate, timeout=20, fresh=False):
        """Waits for a batch satisfying `predicate`; returns it. `fresh`: only batches
        written after this call count."""
        deadline = time.monotonic() + timeout
        seen = len(self.batches()) if fresh else 0
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
        batches = self.batches()
        return batches[-1] if batches else None


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
    if "boolValue" in any_value:
        return any_value["boolValue"]
    raise AssertionError(f"unexpected attribute value {any_value}")


def is_self_telemetry(doc):
    """ridley's own telemetry travels as a request of its own, after each batch of links."""
    return any(m["name"] == "ridley.receiver.losses"
               for rm in doc.get("resourceMetrics", [])
               for sm in rm.get("scopeMetrics", []) for m in sm.get("metrics", []))


def batches_of(docs):
    """One Batch per interval: a links request and the telemetry request after it."""
    grouped = []
    for doc in docs:
        if is_self_telemetry(doc) and grouped:
            grouped[-1].append(doc)
        else:
            grouped.append([doc])
    return [Batch(group) for group in grouped]


class Batch:
    """Metric points from OTLP/JSON export requests (the file exporter's lines, or what
    a collector forwarded). For each series the newest point wins."""

    def __init__(self, docs):
        self.resource = {}
        self.metrics = {}
        latest = {}
        for doc in docs:
            for rm in doc.get("resourceMetrics", []):
                resource = {a["key"]: _value(a["value"]) for a in rm.get("resource", {}).get("attributes", [])}
                if resource.get("service.name") == "ridley":
                    self.resource = resource
                for sm in rm.get("scopeMetrics", []):
                    for m in sm.get("metrics", []):
                        kind = "sum" if "sum" in m else "histogram" if "histogram" in m else None
                        if kind is None:
                            continue
                        meta = self.metrics.setdefault(m["name"], {**{k: v for k, v in m.items() if k != kind}, kind: {**m[kind], "dataPoints": []}})
                        for p in m[kind].get("dataPoints", []):
                            key = (m["name"], json.dumps(p.get("attributes", []), sort_keys=True))
                            if key not in latest or int(p["timeUnixNano"]) >= int(latest[key][1]["timeUnixNano"]):
                                latest[key] = (kind, p)
        for (name, _), (kind, p) in latest.items():
            self.metrics[name][kind]["dataPoints"].append(p)

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
            counts = [int(p.get("count", 0)) for attrs, p in self.points(name) if match(attrs)]
            return counts[0] if counts else None

        active = ints("ridley.link.connections.active")
        if not active:
            return None
        attrs = next(a for a, _ in self.points("ridley.link.connections.active") if match(a))
        bytes_ = ints("ridley.link.bytes", "ridley.link.direction")
        return {
            "network.type": attrs["network.type"],
            "network.transport": attrs["network.transport"],
            "opened": ints("ridley.link.connections.opened").get(None, 0),
            "active": active[None],
            "failed": ints("ridley.link.connections.failed", "error.type"),
            "transmit": bytes_.get("client_to_server", 0),
            "receive": bytes_.get("server_to_client", 0),
            "retransmits": ints("ridley.link.retransmits").get(None, 0),
            "connect_count": hist_count("ridley.link.connect.duration"),
            "rtt_count": hist_count("ridley.link.rtt"),
        }

    def all_points(self, name):
        """Every point of `name`, as (attributes, value) with ints decoded."""
        out = []
        for attrs, p in self.points(name):
            out.append((attrs, int(p["asInt"]) if "asInt" in p else p))
        return out

    def losses(self):
        return {attrs["reason"]: int(p["asInt"]) for attrs, p in self.points("ridley.receiver.losses")}


SPAN_KINDS = {2: "server", 3: "client", "SPAN_KIND_SERVER": "server", "SPAN_KIND_CLIENT": "client"}


def read_spans(path):
    """Spans from OTLP/JSON trace export requests, one dict each, with their resource's
    service.name. Accepts our encoding (enum ints) and protobuf's (enum names)."""
    spans = []
    if not path.exists():
        return spans
    for line in path.read_text().split("\n")[:-1]:
        doc = json.loads(line)
        for rs in doc.get("resourceSpans", []):
            resource = {a["key"]: _any(a["value"]) for a in rs.get("resource", {}).get("attributes", [])}
            for ss in rs.get("scopeSpans", []):
                for sp in ss.get("spans", []):
                    status = sp.get("status", {}).get("code", 0)
                    spans.append({
                        "service": resource["service.name"],
                        "trace": _id(sp["traceId"]),
                        "span": _id(sp["spanId"]),
                        "parent": _id(sp.get("parentSpanId", "")),
                        "kind": SPAN_KINDS.get(sp.get("kind")),
                        "name": sp["name"],
                        "start": int(sp["startTimeUnixNano"]),
                        "end": int(sp["endTimeUnixNano"]),
                        "attrs": {a["key"]: _any(a["value"]) for a in sp.get("attributes", [])},
                        "error": status in (2, "STATUS_CODE_ERROR"),
                    })
    return spans


def _id(value):
    """Trace/span ids: OTLP/JSON writes hex, protobuf's JSON mapping base64."""
    if len(value) in (0, 16, 32):
        return value.lower()
    return base64.b64decode(value).hex()


def _any(any_value):
    if "doubleValue" in any_value:
        return float(any_value["doubleValue"])
    return _value(any_value)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rotel_agent():
    import rotel
    return pathlib.Path(rotel.__file__).parent / "rotel-agent"


class Collector:
    """A real OpenTelemetry collector (rotel) on loopback, forwarding over OTLP/gRPC to a
    sink built from the official protobuf definitions, which writes what it got."""

    def __init__(self, workdir):
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.sink_port = free_port()
        self.out = workdir / "collector-received.jsonl"
        self.workdir = workdir
        self.procs = []

    @property
    def grpc_endpoint(self):
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self):
        return f"http://127.0.0.1:{self.http_port}"

    def start(self):
        sink = subprocess.Popen([sys.executable, str(ROOT / "tests" / "otlp_sink.py"), "--port",
                                 str(self.sink_port), "--out", str(self.out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(sink)
        assert sink.stdout.readline().strip() == "listening", sink.stderr.read()
        log = open(self.workdir / "rotel.log", "a")
        rotel = subprocess.Popen(
            [str(rotel_agent()), "start",
             "--otlp-grpc-endpoint", self.grpc_endpoint,
             "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}",
             "--exporter", "otlp", "--otlp-exporter-endpoint", f"http://127.0.0.1:{self.sink_port}",
             "--batch-timeout", "100ms", "--pid-file", str(self.workdir / "rotel.pid")],
            stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(rotel)
        deadline = time.monotonic() + 30
        for port in (self.grpc_port, self.http_port):
            while True:
                assert rotel.poll() is None, (self.workdir / "rotel.log").read_text()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "collector did not start"
                    time.sleep(0.05)

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []

    def docs(self):
        if not self.out.exists():
            return []
        # Only whole lines: the sink may be in the middle of writing a large request.
        complete = self.out.read_text().split("\n")[:-1]
        return [json.loads(line) for line in complete if line]

    def metrics(self):
        return Batch([d for d in self.docs() if "resourceMetrics" in d])

    def spans(self):
        return read_spans(self.out)

    def wait_for(self, predicate, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return
            time.sleep(0.2)
        raise AssertionError(f"collector never received the expected data; got {len(self.docs())} requests")


@pytest.fixture
def collector(kernel, tmp_path):
    c = Collector(tmp_path)
    yield c
    c.stop()


class KubeApi:
    """The kmock Kubernetes API emulator on loopback, driven over HTTP."""

    def __init__(self, workdir):
        self.port = free_port()
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: kmock, cluster: {{server: 'http://127.0.0.1:{self.port}'}}}}]\n"
            "users: [{name: test, user: {}}]\n"
            "contexts: [{name: test, context: {cluster: kmock, user: test}}]\n"
            "current-context: test\n")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "kmock_server.py"),
                                      "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "listening", self.proc.stderr.read()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def _call(self, method, path, body=None):
        import urllib.request
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def create(self, path, obj):
        return self._call("POST", path, obj)

    def delete(self, path):
        return self._call("DELETE", path)

    def replicaset(self, ns, name, deployment):
        return self.create(f"/apis/apps/v1/namespaces/{ns}/replicasets", {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}",
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment,
                                              "uid": f"uid-{deployment}", "controller": True}]}})

    def pod(self, ns, name, ip, owner_kind, owner, node="node-1", labels=None):
        return self.create(f"/api/v1/namespaces/{ns}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": labels or {},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner_kind, "name": owner,
                                              "uid": f"uid-{owner}", "controller": True}]},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x"}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.0.2.10"}})

    def service(self, ns, name, cluster_ip, endpoint_ips, node_port=None):
        port = {"port": 80, "protocol": "TCP", **({"nodePort": node_port} if node_port else {})}
        self.create(f"/api/v1/namespaces/{ns}/services", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": cluster_ip,
                     "clusterIPs": [cluster_ip], "ports": [port]}})
        self.create(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{name}-abcde", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": name}},
            "endpoints": [{"addresses": [ip]} for ip in endpoint_ips]})

    def node(self, name, ip, labels=None):
        self.create("/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})

    def patch_pod(self, ns, name, patch):
        import urllib.request
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/v1/namespaces/{ns}/pods/{name}",
                                     data=json.dumps(patch).encode(), method="PATCH",
                                     headers={"content-type": "application/merge-patch+json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def delete_pod(self, ns, name):
        return self.delete(f"/api/v1/namespaces/{ns}/pods/{name}")


@pytest.fixture
def kube(kernel, tmp_path):
    api = KubeApi(tmp_path)
    api.start()
    yield api
    api.stop()
