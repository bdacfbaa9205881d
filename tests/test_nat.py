"""Translated connections end to end: the real backend behind a Service address read
from the kernel's conntrack table (DNAT written as kube-proxy's nftables mode writes it),
and a server reached through a masquerading router namespace (SNAT)."""
import subprocess
import time

from conftest import HOSTS, ns, sh
from test_k8s import attrs_of, enriched, shop

A4, _ = HOSTS["a"]
B4, _ = HOSTS["b"]
C4, _ = HOSTS["c"]

VIP = "10.96.0.20"
PORT = 3560

# kube-proxy's nftables mode, cut down to one Service with two endpoints: a services
# map from address, protocol and port to the Service's chain, which picks an endpoint
# chain (kube-proxy uses `numgen random`; `numgen inc` alternates, so the spread is
# known), which DNATs. In the client's namespace, as for a host-network client.
KUBE_PROXY_NFT = f"""
table ip rdlt-kube-proxy {{
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    ip daddr . meta l4proto . th dport vmap {{ {VIP} . tcp . 80 : goto service-mixed }}
  }}
  chain service-mixed {{
    numgen inc mod 2 vmap {{ 0 : goto endpoint-a, 1 : goto endpoint-c }}
  }}
  chain endpoint-a {{
    meta l4proto tcp dnat to {A4}:{PORT}
  }}
  chain endpoint-c {{
    meta l4proto tcp dnat to {C4}:{PORT}
  }}
}}
"""


def nft(host, script):
    subprocess.run(["ip", "netns", "exec", ns(host), "nft", "-f", "-"], input=script,
                   text=True, check=True)


def with_service_route(host):
    sh("ip", "-n", ns(host), "route", "add", "10.96.0.0/16", "dev", "eth0")


def cleanup(host, table):
    sh("ip", "netns", "exec", ns(host), "nft", "delete", "table", "ip", table, check=False)
    sh("ip", "-n", ns(host), "route", "del", "10.96.0.0/16", check=False)


def test_each_backend_of_a_service_is_counted_under_its_own_workload(ridley, peers, kube):
    """A Service with two different workloads behind it: connections to its address are
    spread over both, and each backend's bytes are exact under its own workload, with
    the Service kept as `server.k8s.service.name` and the address dialled."""
    shop(kube)
    kube.replicaset("shop", "recommendation-6b2a", "recommendation")
    kube.pod("shop", "recommendation-6b2a-z1", C4, "ReplicaSet", "recommendation-6b2a",
             labels={"app.kubernetes.io/name": "recommendation"})
    kube.service("shop", "mixed", VIP, [A4, C4])
    with_service_route("b")
    try:
        nft("b", KUBE_PROXY_NFT)
        r = enriched(ridley, kube)
        peers.server("a", A4, PORT, reply=3)
        peers.server("c", C4, PORT, reply=3)

        def both_named(batch):
            return all((attrs_of(batch, B4, server, PORT) or {}).get("server.k8s.service.name")
                       for server in (A4, C4))
        deadline = time.monotonic() + 30
        while True:
            assert peers.connect("b", VIP, 80, send=10, count=2) == ["received 3"] * 2
            try:
                before = r.wait_for(both_named, fresh=True, timeout=5)
                break
            except AssertionError:
                assert time.monotonic() < deadline, r.batches()[-1:]
        # The named state is reached; six more connections, three to each backend.
        base = {s: before.link(B4, s, PORT) for s in (A4, C4)}
        assert peers.connect("b", VIP, 80, send=10, count=6) == ["received 3"] * 6
        final = r.stop()
    finally:
        cleanup("b", "rdlt-kube-proxy")
    for server, workload in ((A4, "productcatalog"), (C4, "recommendation")):
        link = final.link(B4, server, PORT)
        delta = {k: link[k] - base[server][k] for k in ("opened", "transmit", "receive")}
        assert delta == {"opened": 3, "transmit": 30, "receive": 9}, (server, delta)
        assert link["failed"] == {}
        attrs = attrs_of(final, B4, server, PORT)
        assert (attrs["server.k8s.deployment.name"], attrs["server.k8s.service.name"],
                attrs["ridley.link.dialed.address"], attrs["ridley.link.dialed.port"],
                attrs["client.k8s.deployment.name"]) == (workload, "mixed", VIP, 80, "checkout")
    # Nothing is left under the Service address, and each connection is counted once
    # (the backends' server sockets are left to the client's report).
    assert sorted(l for l in final.links() if l[0] == B4) == [(B4, A4, PORT), (B4, C4, PORT)]
    assert final.losses().get("nat_unresolved", 0) == 0


def test_a_service_translated_in_the_hosts_namespace_is_looked_up_there(ridley, peers):
    """kube-proxy's usual placement: the pod's packets to the Service address are routed
    to the node and DNAT'd in the host's namespace (replies come back over the bridge
    through the host's conntrack, as with any bridge CNI). The client's own namespace
    has no entry; the host's names the backend."""
    from conftest import HOST_V4
    vip, port = "10.96.0.22", PORT + 2
    host_nat = f"""
table ip rdlt-host-nat {{
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    ip daddr {vip} tcp dport 80 dnat to {A4}:{port}
  }}
}}
"""
    bridged = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    saved = {path: open(path).read().strip() for path in (bridged, "/proc/sys/net/ipv4/ip_forward")}
    try:
        for path in saved:
            with open(path, "w") as f:
                f.write("1")
        subprocess.run(["nft", "-f", "-"], input=host_nat, text=True, check=True)
        sh("ip", "-n", ns("b"), "route", "add", "10.96.0.0/16", "via", HOST_V4)
        r = ridley()
        peers.server("a", A4, port, reply=5)
        assert peers.connect("b", vip, 80, send=8, count=3) == ["received 5"] * 3
        final = r.stop()
    finally:
        sh("nft", "delete", "table", "ip", "rdlt-host-nat", check=False)
        sh("ip", "-n", ns("b"), "route", "del", "10.96.0.0/16", check=False)
        for path, value in saved.items():
            with open(path, "w") as f:
                f.write(value)
    assert [l for l in final.links() if l[0] == B4] == [(B4, A4, port)]
    link = final.link(B4, A4, port)
    assert (link["opened"], link["transmit"], link["receive"]) == (3, 24, 15)
    attrs = attrs_of(final, B4, A4, port)
    assert (attrs["ridley.link.dialed.address"], attrs["ridley.link.dialed.port"]) == (vip, 80)


def test_a_node_port_dialled_at_a_node_address_is_named_by_its_service(ridley, peers, kube):
    """A client dials a node's address at a Service's node port (DNAT'd as kube-proxy
    does for a host-network client): the backend is counted under its workload, and the
    Service is found by its node port, since the address dialled is the node's."""
    from conftest import HOST_V4
    port, node_port = PORT + 4, 30080
    shop(kube)
    kube.node("node-1", HOST_V4)
    kube.service("shop", "front", "10.96.0.30", [A4], node_port=node_port)
    try:
        nft("b", f"""
table ip rdlt-node-port {{
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    ip daddr {HOST_V4} tcp dport {node_port} dnat to {A4}:{port}
  }}
}}
""")
        r = enriched(ridley, kube)
        peers.server("a", A4, port, reply=4)
        deadline = time.monotonic() + 30
        while True:
            assert peers.connect("b", HOST_V4, node_port, send=6) == ["received 4"]
            try:
                before = r.wait_for(lambda b: (attrs_of(b, B4, A4, port) or {}).get(
                    "server.k8s.service.name") is not None, fresh=True, timeout=5)
                break
            except AssertionError:
                assert time.monotonic() < deadline, r.batches()[-1:]
        base = before.link(B4, A4, port)
        assert peers.connect("b", HOST_V4, node_port, send=6, count=3) == ["received 4"] * 3
        final = r.stop()
    finally:
        sh("ip", "netns", "exec", ns("b"), "nft", "delete", "table", "ip", "rdlt-node-port",
           check=False)
    link = final.link(B4, A4, port)
    assert {k: link[k] - base[k] for k in ("opened", "transmit", "receive")} == {
        "opened": 3, "transmit": 18, "receive": 12}
    attrs = attrs_of(final, B4, A4, port)
    assert (attrs["server.k8s.deployment.name"], attrs["server.k8s.service.name"],
            attrs["ridley.link.dialed.address"], attrs["ridley.link.dialed.port"]) == (
        "productcatalog", "front", HOST_V4, node_port)
    assert [l for l in final.links() if l[0] == B4] == [(B4, A4, port)]


def test_an_ipv6_service_address_is_translated_too(ridley, peers):
    """The same lookup over IPv6 (a dual-stack or IPv6 cluster's Services)."""
    a6, b6 = HOSTS["a"][1], HOSTS["b"][1]
    vip, port = "fd00:96::20", PORT + 3
    rules = f"""
table ip6 rdlt-dnat6 {{
  chain out {{
    type nat hook output priority -100; policy accept;
    ip6 daddr {vip} tcp dport 80 dnat to [{a6}]:{port}
  }}
}}
"""
    sh("ip", "-n", ns("b"), "-6", "route", "add", "fd00:96::/64", "dev", "eth0")
    try:
        subprocess.run(["ip", "netns", "exec", ns("b"), "nft", "-f", "-"], input=rules, text=True, check=True)
        r = ridley()
        peers.server("a", a6, port, reply=4)
        assert peers.connect("b", vip, 80, send=6, count=2) == ["received 4"] * 2
        final = r.stop()
    finally:
        sh("ip", "netns", "exec", ns("b"), "nft", "delete", "table", "ip6", "rdlt-dnat6", check=False)
        sh("ip", "-n", ns("b"), "-6", "route", "del", "fd00:96::/64", check=False)
    assert [l for l in final.links() if l[0] == b6] == [(b6, a6, port)]
    link = final.link(b6, a6, port)
    assert (link["network.type"], link["opened"], link["transmit"], link["receive"]) == ("ipv6", 2, 12, 8)
    attrs = attrs_of(final, b6, a6, port)
    assert (attrs["ridley.link.dialed.address"], attrs["ridley.link.dialed.port"]) == (vip, 80)


def test_a_vanished_conntrack_entry_keeps_the_address_dialled_and_is_counted(ridley, peers):
    """An entry gone before the interval's lookup (its TIME_WAIT shortened to 1 s, the
    interval 5 s): the connection is counted under the address dialled, exactly, and
    as `nat_unresolved`."""
    single = f"""
table ip rdlt-dnat {{
  chain out {{
    type nat hook output priority -100; policy accept;
    ip daddr {VIP} tcp dport 80 dnat to {A4}:{PORT + 1}
  }}
}}
"""
    timeouts = ["time_wait", "close", "close_wait", "last_ack", "fin_wait"]
    with_service_route("b")
    try:
        nft("b", single)
        r = ridley(interval="5s")
        peers.server("a", A4, PORT + 1, reply=2)
        # The first connection (entry read at the next interval) makes the address
        # known as translated.
        assert peers.connect("b", VIP, 80, send=4) == ["received 2"]
        r.wait_for(lambda b: b.link(B4, A4, PORT + 1) is not None, timeout=15)
        for t in timeouts:
            sh("ip", "netns", "exec", ns("b"), "sysctl", "-qw", f"net.netfilter.nf_conntrack_tcp_timeout_{t}=1")
        # Just after an interval: the next entry expires 4 s before the next one.
        r.wait_for(lambda b: True, fresh=True, timeout=15)
        assert peers.connect("b", VIP, 80, send=5) == ["received 2"]
        # The losses go out with the batch's telemetry, which may follow its links.
        after = r.wait_for(lambda b: b.link(B4, VIP, 80) is not None
                           and "nat_unresolved" in b.losses(), fresh=True, timeout=15)
        final = r.stop()
    finally:
        cleanup("b", "rdlt-dnat")
    translated = final.link(B4, A4, PORT + 1)
    assert (translated["opened"], translated["transmit"], translated["receive"]) == (1, 4, 2)
    fallback = after.link(B4, VIP, 80)
    assert (fallback["opened"], fallback["transmit"], fallback["receive"]) == (1, 5, 2)
    assert after.losses()["nat_unresolved"] == 1


def test_conntrack_off_keeps_the_address_dialled(ridley, peers):
    """`conntrack.enabled: false`: a translated connection is counted under the address
    the client dialled, as before, and no lookup is counted."""
    with_service_route("b")
    try:
        nft("b", KUBE_PROXY_NFT)
        r = ridley(receiver_extra="    conntrack:\n      enabled: false\n")
        peers.server("a", A4, PORT, reply=1)
        peers.server("c", C4, PORT, reply=1)
        assert peers.connect("b", VIP, 80, send=2, count=4) == ["received 1"] * 4
        final = r.stop()
    finally:
        cleanup("b", "rdlt-kube-proxy")
    link = final.link(B4, VIP, 80)
    assert (link["opened"], link["transmit"], link["receive"]) == (4, 8, 4)
    assert [l for l in final.links() if l[0] == B4] == [(B4, VIP, 80)]


# A client and a server on two subnets, joined by a router namespace that masquerades
# what it forwards to the server's side (as a node masquerades pod traffic).
SNAT_NETS = {"client": "10.232.1.2", "router_in": "10.232.1.1",
             "router_out": "10.232.2.1", "server": "10.232.2.2"}


def snat_topology():
    names = {k: f"rdlt-snat-{k}" for k in ("client", "router", "server")}
    for name in names.values():
        sh("ip", "netns", "del", name, check=False)
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
    for side, peer in (("client", "router_in"), ("server", "router_out")):
        sh("ip", "link", "add", "eth0", "netns", names[side], "type", "veth",
           "peer", "name", f"r-{side}", "netns", names["router"])
        sh("ip", "-n", names[side], "addr", "add", f"{SNAT_NETS[side]}/24", "dev", "eth0")
        sh("ip", "-n", names[side], "link", "set", "eth0", "up")
        sh("ip", "-n", names["router"], "addr", "add", f"{SNAT_NETS[peer]}/24", "dev", f"r-{side}")
        sh("ip", "-n", names["router"], "link", "set", f"r-{side}", "up")
        sh("ip", "-n", names[side], "route", "add", "default", "via", SNAT_NETS[peer])
    sh("ip", "netns", "exec", names["router"], "sysctl", "-qw", "net.ipv4.ip_forward=1")
    subprocess.run(["ip", "netns", "exec", names["router"], "nft", "-f", "-"], text=True, check=True,
                   input="table ip nat {\n chain post {\n  type nat hook postrouting priority 100;\n"
                         "  oifname \"r-server\" masquerade\n }\n}\n")
    return names


def test_a_masqueraded_client_is_mapped_back_and_counted_once(ridley, peers):
    """Client -> router (masquerade) -> server, all on this host: the server's socket
    sees the router's address; conntrack in the router names the real client, whose
    own socket reports the link. One link, exact, under the real client's address,
    for short connections (close records) and one held open through walks."""
    import subprocess as sp
    names = snat_topology()
    client, server = SNAT_NETS["client"], SNAT_NETS["server"]
    try:
        r = ridley()
        peers.server("snat-server", server, 3570, reply=6)
        assert peers.connect("snat-client", server, 3570, send=11, count=3) == ["received 6"] * 3
        held = peers._spawn("snat-client", "connect", "--addr", server, "--port", 3570,
                            "--hold", "--before", 7, "--send", 2, stdin=sp.PIPE)
        assert held.stdout.readline().strip() == "connected"
        r.wait_for(lambda b: (b.link(client, server, 3570) or {}).get("active") == 1, fresh=True)
        held.stdin.write("\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "received 6"
        final = r.stop()
    finally:
        for name in names.values():
            sh("ip", "netns", "del", name, check=False)
    links = [l for l in final.links() if l[2] == 3570]
    assert links == [(client, server, 3570)], links
    link = final.link(client, server, 3570)
    assert (link["opened"], link["transmit"], link["receive"]) == (4, 42, 24)
