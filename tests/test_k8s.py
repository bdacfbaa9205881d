"""Kubernetes enrichment end to end: network namespaces stand in for pods, their
addresses registered with owners in the kmock API emulator; real traffic between them,
and the exported metrics and spans name the workloads."""
import time

from conftest import HOST_V4, HOSTS, ns, sh
from servicegraph import tempo_edges

A4, _ = HOSTS["a"]
B4, _ = HOSTS["b"]
C4, _ = HOSTS["c"]


def enriched(ridley, kube, keep_pod_detail=True, **kwargs):
    return ridley(processors=("  k8sattributes:\n"
                              "    cluster_name: test-cluster\n"
                              f"    keep_pod_detail: {str(keep_pod_detail).lower()}\n"
                              f"    kubeconfig: {kube.kubeconfig}\n"),
                  pipeline_processors=["k8sattributes"],
                  pipelines={"metrics": ["file"], "traces": ["file/spans"]}, **kwargs)


def attrs_of(batch, client_ip, server_ip, port):
    for attrs, _ in batch.points("ridley.link.connections.opened"):
        if (attrs["client.address"], attrs["server.address"], attrs["server.port"]) == (client_ip, server_ip, port):
            return attrs
    return None


def until_named(r, peers, server, port, key="client.service.name", value=None, send=1):
    """Connects from host b to server:port until a fresh batch shows `key` on the link
    (equal to `value` when given): the watches have caught up. Returns its attributes."""
    deadline = time.monotonic() + 30
    while True:
        peers.connect("b", server, port, send=send)
        batch = r.wait_for(lambda b: attrs_of(b, B4, server, port) is not None, fresh=True)
        attrs = attrs_of(batch, B4, server, port)
        if attrs.get(key) is not None and value in (None, attrs.get(key)):
            return attrs
        assert time.monotonic() < deadline, (key, value, {k: v for k, v in attrs.items() if "name" in k})


def shop(kube):
    kube.replicaset("shop", "checkout-7d9f", "checkout")
    kube.replicaset("shop", "productcatalog-5c4b", "productcatalog")
    kube.pod("shop", "checkout-7d9f-x1", B4, "ReplicaSet", "checkout-7d9f")
    kube.pod("shop", "productcatalog-5c4b-y1", A4, "ReplicaSet", "productcatalog-5c4b",
             labels={"app.kubernetes.io/name": "productcatalog"})


def test_links_are_named_by_pod_workload_namespace_and_node(ridley, peers, kube):
    shop(kube)
    r = enriched(ridley, kube)
    peers.server("a", A4, 3550, reply=10)
    # Wait for the watches to fill: the link is named once the index knows both pods.
    until_named(r, peers, A4, 3550, send=5)
    r.stop()
    attrs = attrs_of(r.batches()[-1], B4, A4, 3550)
    assert {k: v for k, v in attrs.items() if k.startswith(("client.", "server."))} == {
        "client.address": B4, "server.address": A4, "server.port": 3550,
        "client.service.name": "checkout", "client.service.namespace": "shop",
        "client.k8s.cluster.name": "test-cluster", "client.k8s.namespace.name": "shop",
        "client.k8s.pod.name": "checkout-7d9f-x1", "client.k8s.pod.uid": "uid-checkout-7d9f-x1",
        "client.k8s.node.name": "node-1", "client.k8s.deployment.name": "checkout",
        "client.k8s.pod.ip": B4,
        "server.service.name": "productcatalog", "server.service.namespace": "shop",
        "server.k8s.cluster.name": "test-cluster", "server.k8s.namespace.name": "shop",
        "server.k8s.pod.name": "productcatalog-5c4b-y1", "server.k8s.pod.uid": "uid-productcatalog-5c4b-y1",
        "server.k8s.node.name": "node-1", "server.k8s.deployment.name": "productcatalog",
        "server.k8s.pod.ip": A4,
    }
    named_spans = [s for s in r.spans() if s["service"] in ("checkout", "productcatalog")]
    assert named_spans, "spans carry the workloads as service.name"
    edges = tempo_edges(named_spans)
    assert set(edges) == {("checkout", "productcatalog")}
    assert edges[("checkout", "productcatalog")]["failed"] == 0


def test_pod_recreated_with_a_new_address_keeps_its_workload_name(ridley, peers, kube):
    shop(kube)
    r = enriched(ridley, kube)
    peers.server("a", A4, 3551, reply=1)
    peers.server("c", C4, 3551, reply=1)
    deadline = time.monotonic() + 30
    while not (attrs_of(r.batches()[-1], B4, A4, 3551) or {}).get("server.service.name") if r.batches() else True:
        peers.connect("b", A4, 3551, send=1)
        time.sleep(0.5)
        assert time.monotonic() < deadline
    # The pod is deleted and comes back elsewhere (host c) with a new address.
    kube.delete_pod("shop", "productcatalog-5c4b-y1")
    kube.pod("shop", "productcatalog-5c4b-y2", C4, "ReplicaSet", "productcatalog-5c4b",
             labels={"app.kubernetes.io/name": "productcatalog"})
    until_named(r, peers, C4, 3551, key="server.k8s.pod.name", value="productcatalog-5c4b-y2")
    r.stop()
    final = r.batches()[-1]
    assert attrs_of(final, B4, C4, 3551)["server.service.name"] == "productcatalog"
    # The old address is no longer a pod of the cluster.
    assert "server.service.name" not in (attrs_of(final, B4, A4, 3551) or {})


def test_api_server_down_keeps_the_last_known_names(ridley, peers, kube):
    shop(kube)
    r = enriched(ridley, kube)
    peers.server("a", A4, 3552, reply=1)
    until_named(r, peers, A4, 3552)
    kube.stop()
    r.wait_for(lambda b: any(v > 0 for _, v in b.all_points("ridley.k8s.watch.errors")), fresh=True)
    # New traffic while the API server is away is still named from the last known state.
    peers.connect("b", A4, 3552, send=1)
    after = r.wait_for(lambda b: True, fresh=True)
    assert r.proc.poll() is None, "the data path never blocks on the API server"
    attrs = attrs_of(after, B4, A4, 3552)
    assert (attrs["client.service.name"], attrs["server.service.name"]) == ("checkout", "productcatalog")
    r.stop()


def test_without_a_cluster_links_keep_their_addresses(ridley, peers, tmp_path):
    from conftest import free_port
    kubeconfig = tmp_path / "nowhere"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: none, cluster: {{server: 'http://127.0.0.1:{free_port()}'}}}}]\n"
        "users: [{name: u, user: {}}]\ncontexts: [{name: c, context: {cluster: none, user: u}}]\n"
        "current-context: c\n")
    r = ridley(processors=f"  k8sattributes:\n    kubeconfig: {kubeconfig}\n",
               pipeline_processors=["k8sattributes"])
    peers.server("a", A4, 3553, reply=2)
    assert peers.connect("b", A4, 3553, send=3, count=2) == ["received 2"] * 2
    final = r.stop()
    link = final.link(B4, A4, 3553)
    assert (link["opened"], link["transmit"], link["receive"]) == (2, 6, 4)
    assert "client.service.name" not in attrs_of(final, B4, A4, 3553)


def test_replicas_merge_into_one_workload_link(ridley, peers, kube):
    shop(kube)
    kube.pod("shop", "checkout-7d9f-x2", C4, "ReplicaSet", "checkout-7d9f")
    r = enriched(ridley, kube, keep_pod_detail=False)
    peers.server("a", A4, 3554, reply=7)

    def merged(batch):
        for attrs, p in batch.points("ridley.link.connections.opened"):
            if attrs.get("client.service.name") == "checkout" and attrs["server.port"] == 3554:
                return attrs, int(p["asInt"])
        return None

    # Until the watches have filled, links are per address; wait for the named link.
    deadline = time.monotonic() + 30
    while merged(r.batches()[-1] if r.batches() else None) is None if r.batches() else True:
        peers.connect("b", A4, 3554, send=1)
        time.sleep(0.5)
        assert time.monotonic() < deadline
    before = merged(r.batches()[-1])[1]
    assert peers.connect("b", A4, 3554, send=10, count=3) == ["received 7"] * 3
    assert peers.connect("c", A4, 3554, send=10, count=2) == ["received 7"] * 2
    r.stop()
    final = r.batches()[-1]
    attrs, opened = merged(final)
    assert opened == before + 5, "both replicas' connections on one series"
    assert "client.address" not in attrs and "server.address" not in attrs
    assert "client.k8s.pod.name" not in attrs
    assert (attrs["client.k8s.deployment.name"], attrs["server.service.name"]) == ("checkout", "productcatalog")
    assert len([a for a, _ in final.points("ridley.link.connections.opened")
                if a.get("client.service.name") == "checkout" and a["server.port"] == 3554]) == 1


def test_cluster_ip_destination_is_resolved_to_its_workload(ridley, peers, kube):
    """The client connects to a Service's ClusterIP, translated to the pod by DNAT as
    kube-proxy does; without conntrack lookups (the rule they fall back to) the server
    end is named by the workload behind the Service. With them: test_nat.py."""
    shop(kube)
    kube.service("shop", "catalog-svc", "10.96.0.10", [A4])
    sh("ip", "-n", ns("b"), "route", "add", "10.96.0.0/16", "dev", "eth0")
    nft = ["ip", "netns", "exec", ns("b"), "nft"]
    sh(*nft, "add", "table", "ip", "rdlt")
    try:
        sh(*nft, "add chain ip rdlt out { type nat hook output priority -100; }")
        sh(*nft, f"add rule ip rdlt out ip daddr 10.96.0.10 tcp dport 80 dnat to {A4}:3555")
        r = enriched(ridley, kube, receiver_extra="    conntrack:\n      enabled: false\n")
        peers.server("a", A4, 3555, reply=3)
        until_named(r, peers, "10.96.0.10", 80, key="server.service.name", send=4)
        resolved = r.batches()[-1]
        # The Service goes away: the ClusterIP is no longer resolved (deletes followed too).
        kube.delete("/api/v1/namespaces/shop/services/catalog-svc")
        kube.delete("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/catalog-svc-abcde")
        deadline = time.monotonic() + 30
        while True:
            peers.connect("b", "10.96.0.10", 80, send=4)
            batch = r.wait_for(lambda b: attrs_of(b, B4, "10.96.0.10", 80) is not None, fresh=True)
            if "server.service.name" not in attrs_of(batch, B4, "10.96.0.10", 80):
                break
            assert time.monotonic() < deadline
        r.stop()
    finally:
        sh(*nft, "delete", "table", "ip", "rdlt", check=False)
        sh("ip", "-n", ns("b"), "route", "del", "10.96.0.0/16", check=False)
    attrs = attrs_of(resolved, B4, "10.96.0.10", 80)
    assert (attrs["server.service.name"], attrs["server.k8s.deployment.name"], attrs["server.k8s.service.name"]) == \
        ("productcatalog", "productcatalog", "catalog-svc")
    # One link: the server's socket (which saw the pod address) is left to the client's report.
    assert [l for l in r.batches()[-1].links() if l[0] == B4] == [(B4, "10.96.0.10", 80)]


def test_updates_and_nodes_follow(ridley, peers, kube):
    """A label update renames the pod's service; a node's address names host processes."""
    shop(kube)
    kube.node("worker-7", C4)
    r = enriched(ridley, kube)
    peers.server("a", A4, 3556, reply=1)
    peers.server("c", C4, 3557, reply=1)  # a host process on worker-7

    until_named(r, peers, A4, 3556, "server.service.name", "productcatalog")
    kube.patch_pod("shop", "productcatalog-5c4b-y1",
                   {"metadata": {"labels": {"app.kubernetes.io/name": "catalog-v2"}}})
    until_named(r, peers, A4, 3556, "server.service.name", "catalog-v2")
    host = until_named(r, peers, C4, 3557, "server.service.name", "worker-7")
    assert host["server.k8s.node.name"] == "worker-7"
    r.stop()


def cgroup2_root():
    for line in open("/proc/self/mountinfo"):
        left, _, right = line.partition(" - ")
        if right.startswith("cgroup2 "):
            return left.split()[4]
    raise AssertionError("no cgroup2 mount")


def test_host_network_clients_are_named_by_their_cgroup(ridley, peers, kube):
    """Two clients on the node's own address: one in a host-network pod's cgroup (named
    by the pod), one a plain host process (named by the node)."""
    import os
    import subprocess
    import sys
    from conftest import PEER

    uid = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    kube.node("node-1", HOST_V4)
    kube.create("/api/v1/namespaces/kube-system/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "agent-x1", "namespace": "kube-system", "uid": uid,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent",
                                          "uid": "uid-agent", "controller": True}]},
        "spec": {"nodeName": "node-1", "hostNetwork": True, "containers": [{"name": "agent", "image": "x"}]},
        "status": {"podIP": HOST_V4, "hostIP": HOST_V4}})
    pod_cgroup = os.path.join(cgroup2_root(), "ridley-test", "kubepods", "besteffort", f"pod{uid}")
    os.makedirs(pod_cgroup, exist_ok=True)
    r = enriched(ridley, kube)
    peers.server("a", A4, 3558, reply=2)

    def connect(in_pod):
        def enter():
            with open(os.path.join(pod_cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        out = subprocess.run([sys.executable, str(PEER), "connect", "--addr", A4, "--port", "3558",
                              "--send", "3"], preexec_fn=enter if in_pod else None,
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.split() == ["received", "2"], out

    def names(batch):
        found = {}
        for attrs, _ in batch.points("ridley.link.connections.opened"):
            if (attrs["client.address"], attrs["server.port"]) == (HOST_V4, 3558):
                found[attrs.get("ridley.client.cgroup")] = attrs.get("client.service.name")
        return found

    try:
        deadline = time.monotonic() + 30
        while True:
            connect(in_pod=True)
            connect(in_pod=False)
            batch = r.wait_for(lambda b: len(names(b)) == 2, fresh=True)
            if set(names(batch).values()) == {"agent", "node-1"}:
                break
            assert time.monotonic() < deadline, names(batch)
        r.stop()
    finally:
        for d in [pod_cgroup, os.path.dirname(pod_cgroup), os.path.dirname(os.path.dirname(pod_cgroup)),
                  os.path.join(cgroup2_root(), "ridley-test")]:
            try:
                os.rmdir(d)
            except OSError:
                pass
    final = names(r.batches()[-1])
    assert final[f"/ridley-test/kubepods/besteffort/pod{uid}"] == "agent"
    assert list(final.values()).count("node-1") == 1
    attrs = next(a for a, _ in r.batches()[-1].points("ridley.link.connections.opened")
                 if a.get("client.service.name") == "agent")
    assert attrs["client.k8s.daemonset.name"] == "agent" and attrs["client.k8s.pod.uid"] == uid


ZONE = "topology.kubernetes.io/zone"
REGION = "topology.kubernetes.io/region"


def two_zones(kube):
    """Nodes in zones eu-1a and eu-1b of region eu-1: the server (host a) and one client
    (host c) on node-a in eu-1a, the other client (host b) on node-b in eu-1b."""
    kube.node("node-a", "192.0.2.21", labels={ZONE: "eu-1a", REGION: "eu-1"})
    kube.node("node-b", "192.0.2.22", labels={ZONE: "eu-1b", REGION: "eu-1"})
    kube.pod("shop", "catalog-0", A4, "StatefulSet", "catalog", node="node-a")
    kube.pod("shop", "cart-0", C4, "StatefulSet", "cart", node="node-a")
    kube.pod("shop", "checkout-0", B4, "StatefulSet", "checkout", node="node-b")


def merged_points(batch, client_service, port):
    """The bytes points of a workload link (replicas merged): attributes and value by
    direction."""
    return {attrs["ridley.link.direction"]: (attrs, int(p["asInt"]))
            for attrs, p in batch.points("ridley.link.bytes")
            if attrs.get("client.service.name") == client_service and attrs["server.port"] == port}


def test_zones_are_on_both_ends_and_cross_zone_bytes_are_exact(ridley, peers, kube):
    """With the default merge of replicas into workloads: a workload end carries its
    zone (replicas in two zones would be one end per zone, so merging keeps cross-zone
    bytes apart), and the link says whether it crosses zones."""
    two_zones(kube)
    r = enriched(ridley, kube, keep_pod_detail=False)
    peers.server("a", A4, 3560, reply=1)
    # The watches have caught up once a link carries both ends' zones.
    deadline = time.monotonic() + 30
    while True:
        peers.connect("b", A4, 3560, send=1)
        batch = r.wait_for(lambda b: True, fresh=True)
        if any(a.get("ridley.link.cross_zone") for a, _ in merged_points(batch, "checkout", 3560).values()):
            break
        assert time.monotonic() < deadline, "zones never appeared"
    peers.server("a", A4, 3561, reply=300)
    peers.connect("b", A4, 3561, send=1000)
    peers.connect("c", A4, 3561, send=700)
    batch = r.wait_for(lambda b: len(merged_points(b, "checkout", 3561)) == 2
                       and len(merged_points(b, "cart", 3561)) == 2)
    r.stop()
    for client, zone, cross, sent in (("checkout", "eu-1b", True, 1000), ("cart", "eu-1a", False, 700)):
        points = merged_points(batch, client, 3561)
        assert {d: v for d, (_, v) in points.items()} == {"client_to_server": sent, "server_to_client": 300}
        attrs = points["client_to_server"][0]
        assert {k: v for k, v in attrs.items() if "cloud." in k or "zone" in k} == {
            "client.cloud.availability_zone": zone, "client.cloud.region": "eu-1",
            "server.cloud.availability_zone": "eu-1a", "server.cloud.region": "eu-1",
            "ridley.link.cross_zone": cross,
        }
        assert attrs["server.service.name"] == "catalog"
