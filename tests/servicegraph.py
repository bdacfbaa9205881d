"""How backends turn spans into a service graph, applied to what ridley sent, so the
tests assert the edges a user would see (see the design notes):

- Tempo's metrics-generator: a CLIENT span paired with the SERVER span whose parent it
  is, in the same trace; edge = client service -> server service; either span in ERROR
  fails the request; each pair counts 1 / span_multiplier_key's value.
- The collector-contrib servicegraph connector: the same pairing, no multiplier.
- Jaeger: parent service -> child service for every span whose parent is in its trace.
- An unpaired CLIENT span with peer.service becomes an edge to that virtual node.
"""
from collections import defaultdict

MULTIPLIER_KEY = "ridley.sampling.ratio"


def _pairs(spans):
    by_id = {(s["trace"], s["span"]): s for s in spans}
    paired = set()
    for s in spans:
        if s["kind"] != "server":
            continue
        client = by_id.get((s["trace"], s["parent"]))
        if client and client["kind"] == "client":
            paired.add((client["trace"], client["span"]))
            yield client, s
    for s in spans:
        if s["kind"] == "client" and (s["trace"], s["span"]) not in paired and "peer.service" in s["attrs"]:
            yield s, None


def tempo_edges(spans, multiplier_key=MULTIPLIER_KEY):
    edges = defaultdict(lambda: {"requests": 0.0, "failed": 0.0})
    for client, server in _pairs(spans):
        target = server["service"] if server else client["attrs"]["peer.service"]
        ratio = client["attrs"].get(multiplier_key, 1.0) if multiplier_key else 1.0
        weight = 1.0 / ratio
        edge = edges[(client["service"], target)]
        edge["requests"] += weight
        if client["error"] or (server and server["error"]):
            edge["failed"] += weight
    return {k: {"requests": round(v["requests"], 6), "failed": round(v["failed"], 6)} for k, v in edges.items()}


def connector_edges(spans):
    return tempo_edges(spans, multiplier_key=None)


def jaeger_edges(spans):
    by_id = {(s["trace"], s["span"]): s for s in spans}
    edges = defaultdict(int)
    for s in spans:
        parent = by_id.get((s["trace"], s["parent"]))
        if parent:
            edges[(parent["service"], s["service"])] += 1
    return dict(edges)
