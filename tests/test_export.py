"""Export to a real collector (rotel) over OTLP gRPC and HTTP, service-graph spans as
Tempo, the servicegraph connector and Jaeger read them, losing nothing while the
collector is away, delta temporality and service-graph metrics."""
import time

import pytest

from conftest import HOSTS, Batch
from servicegraph import connector_edges, jaeger_edges, tempo_edges

A4, _ = HOSTS["a"]
B4, _ = HOSTS["b"]
C4, _ = HOSTS["c"]
OURS = {A4, B4, C4}


def our_edges(edges):
    """Edges between the test hosts (ridley also sees its own export traffic)."""
    return {k: v for k, v in edges.items() if k[0] in OURS and k[1] in OURS}


def otlp_exporters(collector, retry="initial_interval: 200ms\n      max_interval: 1s"):
    return (
        "  otlp:\n"
        f"    endpoint: {collector.grpc_endpoint}\n"
        "    tls: {insecure: true}\n"
        "    retry_on_failure:\n"
        f"      {retry}\n"
        "  otlphttp:\n"
        f"    endpoint: {collector.http_endpoint}\n"
        "    retry_on_failure:\n"
        f"      {retry}\n"
    )


def test_metrics_over_grpc_and_spans_over_http_through_a_collector(ridley, peers, collector):
    collector.start()
    r = ridley(exporters=otlp_exporters(collector),
               pipelines={"metrics": ["otlp"], "traces": ["otlphttp"]})
    peers.server("a", A4, 8090, reply=200)
    assert peers.connect("b", A4, 8090, send=1000, count=5) == ["received 200"] * 5
    assert len(peers.connect("c", A4, 8091, count=2)) == 2  # refused
    r.stop()
    collector.wait_for(lambda c: (c.metrics().link(B4, A4, 8090) or {}).get("opened") == 5
                       and (c.metrics().link(C4, A4, 8091) or {}).get("failed") == {"refused": 2}
                       and len([s for s in c.spans() if s["service"] in OURS]) >= 14)

    metrics = collector.metrics()
    link = metrics.link(B4, A4, 8090)
    assert (link["opened"], link["transmit"], link["receive"], link["failed"], link["active"]) == (5, 5000, 1000, {}, 0)
    assert metrics.resource["service.name"] == "ridley"

    spans = [s for s in collector.spans() if s["service"] in OURS]
    pairs = [(c, s) for c in spans if c["kind"] == "client"
             for s in spans if s["kind"] == "server" and s["parent"] == c["span"]]
    assert len(pairs) == 7
    for client, server in pairs:
        assert client["trace"] == server["trace"]
        assert client["attrs"]["peer.service"] == server["service"]
        assert client["attrs"]["service.peer.name"] == server["service"]
        assert client["end"] > client["start"], "durations are measured handshakes"
    assert our_edges(tempo_edges(spans)) == {(B4, A4): {"requests": 5.0, "failed": 0.0},
                                             (C4, A4): {"requests": 2.0, "failed": 2.0}}
    assert our_edges(connector_edges(spans)) == our_edges(tempo_edges(spans))
    assert our_edges(jaeger_edges(spans)) == {(B4, A4): 5, (C4, A4): 2}


def test_sampled_pairs_keep_request_counts_true(ridley, peers):
    r = ridley(receiver_extra="    span_pairs_per_link: 3\n",
               pipelines={"metrics": ["file"], "traces": ["file/spans"]})
    peers.server("a", A4, 8092, reply=1)
    assert peers.connect("b", A4, 8092, send=1, count=40) == ["received 1"] * 40
    r.stop()
    spans = [s for s in r.spans() if s["service"] in OURS]
    clients = [s for s in spans if s["kind"] == "client"]
    assert len(clients) < 40, "sampled, not one pair per connection"
    assert all(0 < c["attrs"]["ridley.sampling.ratio"] <= 1 for c in clients)
    # Weighted by 1/ratio as Tempo's span_multiplier_key does: exactly 40 requests.
    assert our_edges(tempo_edges(spans)) == {(B4, A4): {"requests": 40.0, "failed": 0.0}}


def test_long_lived_link_gets_a_traffic_pair_each_interval(ridley, peers):
    r = ridley(pipelines={"metrics": ["file"], "traces": ["file/spans"]})
    peers.server("a", A4, 8093, reply=1)
    conn = peers.hold("c", A4, 8093, before=1000, send=10)
    time.sleep(0.5)
    r.wait_for(lambda b: (b.link(C4, A4, 8093) or {}).get("transmit") == 1000)
    r.wait_for(lambda b: True, fresh=True)  # one more interval, with no new connection
    peers.release(conn)
    r.stop()
    spans = [s for s in r.spans() if s["service"] in OURS]
    kinds = [c["attrs"]["ridley.pair"] for c in spans if c["kind"] == "client"]
    assert kinds.count("connection") == 1
    assert kinds.count("traffic") >= 1
    for c in spans:
        if c["kind"] == "client" and c["attrs"]["ridley.pair"] == "traffic":
            assert c["end"] > c["start"], "a traffic pair lasts the measured RTT"


def test_collector_down_then_up_loses_no_counts(ridley, peers, collector):
    r = ridley(exporters=otlp_exporters(collector),
               pipelines={"metrics": ["otlp", "file"], "traces": ["otlp"]})
    peers.server("a", A4, 8094, reply=300)
    assert peers.connect("b", A4, 8094, send=700, count=4) == ["received 300"] * 4
    # Several intervals with the collector away: the daemon keeps running, the metric
    # queue holds only the newest cumulative request of each stream (the links and
    # ridley's own telemetry), failures are counted.
    down = r.wait_for(lambda b: any(v > 0 for a, v in b.all_points("ridley.exporter.requests")
                                    if a["exporter"] == "otlp" and a["signal"] == "metrics"
                                    and a["outcome"] == "failure"))
    time.sleep(2)
    assert r.proc.poll() is None
    queue = r.batches()[-1].all_points("ridley.exporter.queue.size")
    assert [v for a, v in queue if a["exporter"] == "otlp" and a["signal"] == "metrics"] in ([0], [1], [2])
    assert down.link(B4, A4, 8094)["opened"] == 4

    collector.start()
    collector.wait_for(lambda c: (c.metrics().link(B4, A4, 8094) or {}).get("opened") == 4)
    link = collector.metrics().link(B4, A4, 8094)
    assert (link["opened"], link["transmit"], link["receive"]) == (4, 2800, 1200)
    r.stop()


def test_delta_temporality_adds_up_to_the_totals(ridley, peers, collector):
    collector.start()
    exporters = otlp_exporters(collector).replace("  otlphttp:", "    temporality: delta\n  otlphttp:", 1)
    r = ridley(exporters=exporters, pipelines={"metrics": ["otlp", "file"]})
    peers.server("a", A4, 8095, reply=5)
    peers.connect("b", A4, 8095, send=100, count=3)
    r.wait_for(lambda b: (b.link(B4, A4, 8095) or {}).get("opened") == 3)
    peers.connect("b", A4, 8095, send=100, count=2)
    r.stop()
    collector.wait_for(lambda c: sum(_delta_sum(c, "ridley.link.connections.opened")) == 5)
    assert sum(_delta_sum(collector, "ridley.link.bytes", direction="client_to_server")) == 500
    assert sum(_delta_sum(collector, "ridley.link.bytes", direction="server_to_client")) == 25


def _delta_sum(collector, name, direction=None):
    """Every delta point received for the b -> a:8095 series of `name`."""
    values = []
    for doc in collector.docs():
        for rm in doc.get("resourceMetrics", []):
            for sm in rm.get("scopeMetrics", []):
                for m in sm.get("metrics", []):
                    if m["name"] != name:
                        continue
                    assert m["sum"]["aggregationTemporality"] in (1, "AGGREGATION_TEMPORALITY_DELTA")
                    for p in m["sum"]["dataPoints"]:
                        attrs = {a["key"]: list(a["value"].values())[0] for a in p["attributes"]}
                        if (attrs["client.address"], str(attrs["server.port"])) != (B4, "8095"):
                            continue
                        if direction and attrs["ridley.link.direction"] != direction:
                            continue
                        values.append(int(p["asInt"]))
    return values


def test_service_graph_metrics_emitted_directly(ridley, peers):
    r = ridley(processors="  servicegraph:\n", pipeline_processors=["servicegraph"])
    peers.server("a", A4, 8096, reply=1)
    peers.connect("b", A4, 8096, send=1, count=3)
    peers.connect("c", A4, 8097, count=2)  # refused
    final = r.stop()

    def edge(name, client, server):
        (value,) = [v for a, v in final.all_points(name)
                    if (a["client"], a["server"], a["connection_type"]) == (client, server, "")]
        return value

    assert edge("traces_service_graph_request_total", B4, A4) == 3
    assert edge("traces_service_graph_request_failed_total", B4, A4) == 0
    assert edge("traces_service_graph_request_total", C4, A4) == 2
    assert edge("traces_service_graph_request_failed_total", C4, A4) == 2
    hist = edge("traces_service_graph_request_client_seconds", B4, A4)
    assert int(hist["count"]) == 3


def test_prometheus_endpoint_scraped_and_parsed(ridley, peers):
    import urllib.request

    from conftest import free_port
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    r = ridley(exporters=f"  prometheus:\n    endpoint: 127.0.0.1:{port}\n",
               pipelines={"metrics": ["file", "prometheus"]})
    peers.server("a", A4, 8098, reply=64)
    peers.connect("b", A4, 8098, send=128, count=3)
    r.wait_for(lambda b: (b.link(B4, A4, 8098) or {}).get("opened") == 3)
    time.sleep(1.5)  # the next collection reaches the endpoint too
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("client_address") == B4 and s.labels.get("server_port") == "8098":
                key = (s.name, s.labels.get("ridley_link_direction"), s.labels.get("le"))
                samples[key] = s.value
    r.stop()
    assert samples[("ridley_link_bytes_total", "client_to_server", None)] == 384
    assert samples[("ridley_link_bytes_total", "server_to_client", None)] == 192
    assert samples[("ridley_link_connections_opened_total", None, None)] == 3
    assert samples[("ridley_link_connections_active", None, None)] == 0
    assert samples[("ridley_link_connect_duration_seconds_count", None, None)] == 3
    assert samples[("ridley_link_connect_duration_seconds_bucket", None, "+Inf")] == 3


def test_otel_environment_variables_fill_what_the_yaml_leaves_unset(ridley, peers, collector):
    """An SDK's variables: the endpoint of an exporter whose YAML has none, and ridley's
    own resource (OTEL_SERVICE_NAME over the list, detected attributes kept). Headers and
    the YAML-wins rule: `otlp_exporter` unit tests."""
    collector.start()
    exporters = "  otlphttp:\n    retry_on_failure: {initial_interval: 200ms, max_interval: 1s}\n"
    r = ridley(exporters=exporters, pipelines={"metrics": ["otlphttp", "file"]}, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.http_endpoint,
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=ci,service.name=from-the-list",
        "OTEL_SERVICE_NAME": "ridley-ci",
    })
    peers.server("a", A4, 8099, reply=7)
    assert peers.connect("b", A4, 8099, send=11, count=2) == ["received 7"] * 2
    collector.wait_for(lambda c: (c.metrics().link(B4, A4, 8099) or {}).get("opened") == 2)
    r.stop()
    link = collector.metrics().link(B4, A4, 8099)
    assert (link["opened"], link["transmit"], link["receive"]) == (2, 22, 14)
    resources = [{a["key"]: a["value"].get("stringValue") for a in rm["resource"]["attributes"]}
                 for doc in collector.docs() for rm in doc.get("resourceMetrics", [])]
    assert resources and all(res["service.name"] == "ridley-ci" for res in resources), resources
    assert all(res["deployment.environment.name"] == "ci" for res in resources)
    assert all(res.get("host.name") for res in resources), "detected attributes stay"


def otlp_http_receiver(record):
    """An OTLP/HTTP receiver on a free loopback port that hands each request's handler
    and body to `record` and answers 200, as a collector does. Shut it down after use."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            record(self, self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_zstd_compressed_http_requests_decode_whole(ridley, peers):
    """`compression: zstd` over OTLP/HTTP: a receiver that decodes as the collector's
    confighttp does (Content-Encoding: zstd) gets the exact link. rotel, the suite's
    collector, accepts gzip only, and gRPC's zstd is tonic's codec (not exercised here:
    Python's grpcio has no zstd)."""
    import zstandard
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from google.protobuf.json_format import MessageToDict

    received = []

    def record(handler, body):
        encoding = handler.headers.get("content-encoding")
        if encoding == "zstd":
            body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
        request = metrics_service_pb2.ExportMetricsServiceRequest()
        request.ParseFromString(body)
        received.append((encoding, MessageToDict(request)))

    server = otlp_http_receiver(record)
    try:
        exporters = (f"  otlphttp:\n    endpoint: http://127.0.0.1:{server.server_address[1]}\n"
                     "    compression: zstd\n")
        r = ridley(exporters=exporters, pipelines={"metrics": ["otlphttp"]})
        peers.server("a", A4, 8097, reply=9)
        assert peers.connect("b", A4, 8097, send=31, count=3) == ["received 9"] * 3
        r.stop()
    finally:
        server.shutdown()
    assert received and {encoding for encoding, _ in received} == {"zstd"}
    link = Batch([doc for _, doc in received]).link(B4, A4, 8097)
    assert (link["opened"], link["transmit"], link["receive"]) == (3, 93, 27)


def test_per_signal_header_variables_reach_each_signal(ridley, peers):
    """OTEL_EXPORTER_OTLP_HEADERS goes on every request; OTEL_EXPORTER_OTLP_METRICS_HEADERS
    and _TRACES_HEADERS add to it for their signal, overriding a key both name. Read by an
    HTTP receiver that records each request's headers by path."""
    seen = {}

    def record(handler, body):
        seen.setdefault(handler.path, []).append(
            {k.lower(): v for k, v in handler.headers.items() if k.lower().startswith("x-")})

    server = otlp_http_receiver(record)
    try:
        r = ridley(exporters="  otlphttp: {}\n",
                   pipelines={"metrics": ["otlphttp"], "traces": ["otlphttp"]}, env={
                       "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
                       "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=all,x-env=ci",
                       "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "x-tenant=metrics%20team",
                       "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-trace-only=1",
                   })
        peers.server("a", A4, 8096, reply=2)
        assert peers.connect("b", A4, 8096, send=3) == ["received 2"]
        r.stop()
    finally:
        server.shutdown()
    assert set(seen) == {"/v1/metrics", "/v1/traces"}, seen
    assert all(h == {"x-tenant": "metrics team", "x-env": "ci"} for h in seen["/v1/metrics"]), seen
    assert all(h == {"x-tenant": "all", "x-env": "ci", "x-trace-only": "1"}
               for h in seen["/v1/traces"]), seen
