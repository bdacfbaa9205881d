"""What Prometheus reads, read by Prometheus itself: `promtool check metrics` on the
exposition, and a real Prometheus (Debian's package) scraping ridley, answering every
query of the shipped dashboard with the exact edges and counts of the traffic made."""
import json
import pathlib
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from conftest import HOSTS, ON_CI, ROOT, free_port

A4, _ = HOSTS["a"]
B4, _ = HOSTS["b"]
C4, _ = HOSTS["c"]
DASHBOARD = ROOT / "examples" / "otel-collector" / "grafana" / "dashboards" / "ridley.json"


@pytest.fixture(autouse=True)
def prometheus_tools():
    if shutil.which("promtool") and shutil.which("prometheus"):
        return
    if ON_CI:
        pytest.fail("promtool and prometheus are required on CI (make setup installs them)")
    pytest.skip("promtool and prometheus are not installed (make setup)")


def with_servicegraph(ridley, port):
    return ridley(exporters=f"  prometheus:\n    endpoint: 127.0.0.1:{port}\n",
                  processors="  servicegraph:\n", pipeline_processors=["servicegraph"],
                  pipelines={"metrics": ["file", "prometheus"]})


def traffic(peers):
    peers.server("a", A4, 8301, reply=40)
    assert peers.connect("b", A4, 8301, send=100, count=3) == ["received 40"] * 3
    peers.connect("c", A4, 8302, count=2)  # refused


def scrape(port):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_promtool_accepts_the_exposition(ridley, peers):
    port = free_port()
    r = with_servicegraph(ridley, port)
    traffic(peers)
    r.wait_for(lambda b: (b.link(B4, A4, 8301) or {}).get("opened") == 3)
    time.sleep(1.5)  # the next interval reaches the endpoint
    text = scrape(port)
    r.stop()
    assert "traces_service_graph_request_total" in text and "ridley_receiver_losses_total" in text
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=60)
    # Exit 0 and nothing said: no syntax error and no lint finding.
    assert (check.returncode, check.stdout, check.stderr) == (0, "", ""), check


class Prometheus:
    def __init__(self, workdir, target_port):
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: ridley\n    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n")
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expr):
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def wait_for(self, expr, predicate, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, "prometheus exited"
            try:
                result = self.query(expr)
                if predicate(result):
                    return result
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"{expr}: {result if 'result' in dir() else None}"
            time.sleep(0.5)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def by(result, *labels):
    return {tuple(s["metric"].get(label, "") for label in labels): float(s["value"][1])
            for s in result}


PROMETHEUS_ONLY = DASHBOARD.with_name("ridley-prometheus.json")


def dashboard_queries(path=DASHBOARD):
    """Every query of a dashboard, with Grafana's variables as an "All" selection and
    its built-in intervals given values (rate(): at least four 1 s scrapes)."""
    dashboard = json.loads(path.read_text())
    substitutions = {"$__rate_interval": "30s", "$__range": "5m", '"$namespace"': '".*"',
                     '"$workload"': '".*"'}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]
    for old, new in substitutions.items():
        exprs = [e.replace(old, new) for e in exprs]
    assert all("$" not in e.replace("$1", "") for e in exprs), exprs
    return exprs


def test_prometheus_scrapes_ridley_and_answers_every_dashboard_query(ridley, peers, tmp_path):
    port = free_port()
    r = with_servicegraph(ridley, port)
    prometheus = Prometheus(tmp_path, port)
    try:
        traffic(peers)
        edges = prometheus.wait_for(
            "sum by (client, server) (traces_service_graph_request_total)",
            lambda result: by(result, "client", "server").get((C4, A4)) == 2
            and by(result, "client", "server").get((B4, A4)) == 3)
        # Exactly the edges the traffic made (and those of the machine's own connections).
        counts = by(edges, "client", "server")
        assert counts[(B4, A4)] == 3 and counts[(C4, A4)] == 2
        failed = by(prometheus.query("sum by (client, server) (traces_service_graph_request_failed_total)"),
                    "client", "server")
        assert (failed[(B4, A4)], failed[(C4, A4)]) == (0, 2)
        sent = by(prometheus.query(
            f'ridley_link_bytes_total{{client_address="{B4}",server_address="{A4}",server_port="8301"}}'),
            "ridley_link_direction")
        assert sent == {("client_to_server",): 300, ("server_to_client",): 120}
        # Every query of the shipped dashboard is valid PromQL over what ridley exposes and
        # answers with data (Grafana's $__rate_interval: at least four scrape intervals).
        queries = dashboard_queries() + dashboard_queries(PROMETHEUS_ONLY)
        assert len(queries) >= 12, queries
        # Cross-zone panels need zones (Kubernetes nodes): their own test below.
        queries = [q for q in queries if "cross_zone" not in q]
        time.sleep(5)  # room for rate() over 1 s scrapes
        for expr in queries:
            result = prometheus.query(expr)
            assert result, f"no data for the dashboard's {expr}"
        # The Prometheus-only map: nodes and edges named by address (no Kubernetes here),
        # the refused client included, each edge once.
        nodes_expr, edges_expr = dashboard_queries(PROMETHEUS_ONLY)[:2]
        nodes = {s["metric"]["id"] for s in prometheus.query(nodes_expr)}
        edges = [(s["metric"]["source"], s["metric"]["target"], s["metric"]["id"])
                 for s in prometheus.query(edges_expr)]
        assert {B4, C4, A4} <= nodes, nodes
        ours = [e for e in edges if e[1] == A4 and e[0] in (B4, C4)]
        assert sorted(ours) == [(B4, A4, f"{B4} -> {A4}"), (C4, A4, f"{C4} -> {A4}")], edges
        assert all(source and target for source, target, _ in edges), edges
    finally:
        prometheus.stop()
        r.stop()


def test_cross_zone_bytes_per_zone_pair(ridley, peers, kube, tmp_path):
    """Nodes in two zones (kmock): the README's recipe gives the exact bytes per zone
    pair, and each dashboard's cross-zone panel shows the cross-zone pair alone."""
    from test_k8s import attrs_of, two_zones, until_named
    two_zones(kube)
    port = free_port()
    r = ridley(exporters=f"  prometheus:\n    endpoint: 127.0.0.1:{port}\n",
               processors=(f"  k8sattributes:\n    kubeconfig: {kube.kubeconfig}\n"
                           "    keep_pod_detail: true\n"),
               pipeline_processors=["k8sattributes"],
               pipelines={"metrics": ["file", "prometheus"]})
    prometheus = Prometheus(tmp_path, port)
    try:
        peers.server("a", A4, 3569, reply=1)
        until_named(r, peers, A4, 3569, key="ridley.link.cross_zone", value=True)
        peers.server("a", A4, 3570, reply=300)
        peers.connect("b", A4, 3570, send=1000)
        peers.connect("c", A4, 3570, send=700)
        r.wait_for(lambda b: attrs_of(b, B4, A4, 3570) is not None
                   and attrs_of(b, C4, A4, 3570) is not None)
        pair = ("client_cloud_availability_zone", "server_cloud_availability_zone",
                "ridley_link_cross_zone")
        recipe = ("sum by (client_cloud_availability_zone, server_cloud_availability_zone, "
                  'ridley_link_cross_zone) (ridley_link_bytes_total{server_port="3570"})')
        want = {("eu-1b", "eu-1a", "true"): 1300, ("eu-1a", "eu-1a", "false"): 1000}
        result = prometheus.wait_for(recipe, lambda res: by(res, *pair) == want)
        assert by(result, *pair) == want
        time.sleep(3)  # increase() needs two scrapes of each series
        panels = [q for q in dashboard_queries() + dashboard_queries(PROMETHEUS_ONLY)
                  if "cross_zone" in q]
        assert len(panels) == 2, panels
        for expr in panels:
            zones = by(prometheus.query(expr), *pair[:2])
            assert set(zones) == {("eu-1b", "eu-1a")}, (expr, zones)
    finally:
        prometheus.stop()
        r.stop()
