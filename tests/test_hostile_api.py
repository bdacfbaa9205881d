"""A Kubernetes API server that fails or never stops talking: ridley's watches back off,
say so once per resource, and cap what they read. The server here is a few lines of
Python on loopback that answers every request the same broken way."""
import collections
import http.server
import re
import threading
import time

import pytest

from conftest import free_port

RESOURCES = ("pods", "replicasets", "jobs", "services", "endpointslices", "nodes")


class BrokenApi:
    """`mode`: `error` answers 500 with a JSON Status; `endless` answers a list whose
    body never ends (stopped by the client, or after `cap` bytes); `hang` never answers
    (for 20 s at most), so that the requests counted are the watches open at once."""

    def __init__(self, tmp_path, mode, cap=256 << 20):
        self.port = free_port()
        self.requests = collections.Counter()
        self.bytes_per_response = []
        self.kubeconfig = tmp_path / "broken-kubeconfig"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: broken, cluster: {{server: 'http://127.0.0.1:{self.port}'}}}}]\n"
            "users: [{name: test, user: {}}]\n"
            "contexts: [{name: test, context: {cluster: broken, user: test}}]\n"
            "current-context: test\n")
        api = self
        self.stopping = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                resource = re.sub(r"\?.*", "", self.path).rstrip("/").split("/")[-1]
                api.requests[resource] += 1
                if mode == "hang":
                    api.stopping.wait(20)
                    return
                if mode == "error":
                    body = b'{"kind":"Status","apiVersion":"v1","status":"Failure","code":500}'
                    self.send_response(500)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("connection", "close")
                self.end_headers()
                sent = 0
                chunk = b'{"metadata":{"name":"' + b"x" * 4000 + b'"}},'
                try:
                    self.wfile.write(b'{"kind":"List","apiVersion":"v1","metadata":{},"items":[')
                    while sent < cap:
                        self.wfile.write(chunk)
                        sent += len(chunk)
                except OSError:
                    pass
                api.bytes_per_response.append(sent)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def broken_api(tmp_path):
    apis = []

    def start(mode, **kwargs):
        api = BrokenApi(tmp_path, mode, **kwargs)
        apis.append(api)
        return api

    yield start
    for api in apis:
        api.stop()


def with_broken_api(ridley, api):
    return ridley(processors=f"  k8sattributes:\n    kubeconfig: {api.kubeconfig}\n",
                  pipeline_processors=["k8sattributes"])


def tcp_buffer_limit(name):
    """The most a TCP socket's buffer grows to (`net.ipv4.tcp_rmem` / `tcp_wmem`)."""
    return int(open(f"/proc/sys/net/ipv4/{name}").read().split()[2])


def peak_rss_mib(pid):
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def test_a_failing_api_server_is_retried_with_backoff_and_logged_once(ridley, broken_api):
    api = broken_api("error")
    r = with_broken_api(ridley, api)
    time.sleep(12)
    final = r.stop()
    assert final is not None
    # Backoff from 1 s doubling (with up to 100 % jitter): 2 to 4 attempts in 12 s per
    # resource, against about 12 with a backoff that resets on every relist.
    counts = {res: api.requests[res] for res in RESOURCES}
    assert all(2 <= n <= 5 for n in counts.values()), counts
    log = r.log_path.read_text()
    assert sorted(re.findall(r'watch failing.*resource="(\w+)"', log)) == sorted(RESOURCES), log
    assert "watch recovered" not in log
    kube_lines = [line for line in log.splitlines() if "kube" in line or "watch" in line]
    assert len(kube_lines) == len(RESOURCES), kube_lines


def test_an_endless_response_is_cut_off_and_memory_stays_bounded(ridley, broken_api):
    api = broken_api("endless")
    r = with_broken_api(ridley, api)
    # Until ridley has cut a few responses (a loaded machine reads 16 MiB more slowly).
    deadline = time.monotonic() + 60
    while len(api.bytes_per_response) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    peak = peak_rss_mib(r.proc.pid)
    assert r.proc.poll() is None, "still running"
    r.stop()
    # Every response was cut by ridley well before the server's 256 MiB: at 16 MiB of
    # body, plus what sat in the two sockets' buffers, which TCP autotuning grows up to
    # the kernel's limits (32 MiB to receive, 4 MiB to send on some machines).
    assert api.bytes_per_response, "the server saw its responses end"
    buffers = tcp_buffer_limit("tcp_rmem") + tcp_buffer_limit("tcp_wmem")
    assert max(api.bytes_per_response) < (16 << 20) + buffers, api.bytes_per_response
    assert (16 << 20) + buffers < 256 << 20, "the limits leave the test its meaning"
    assert peak < 200, f"peak RSS {peak:.0f} MiB"


def test_one_watch_set_per_process_with_the_daemonset_config(ridley, broken_api):
    """The shipped DaemonSet lists k8sattributes in its metrics and its traces pipeline:
    one instance, so six watches (one per resource), not twelve."""
    api = broken_api("hang")
    r = ridley(processors=f"  k8sattributes:\n    kubeconfig: {api.kubeconfig}\n",
               pipeline_processors=["k8sattributes"],
               pipelines={"metrics": ["file"], "traces": ["file/spans"]})
    time.sleep(3)
    r.stop()
    assert dict(api.requests) == {res: 1 for res in RESOURCES}
