"""UDP links on the real kernel: connected UDP sockets (a resolver's, a QUIC or statsd
client's) become links with exact datagrams and bytes each way; an unconnected sender
is not attributed; the kernel's flow tables return to empty; a full table is counted."""
import time

from conftest import HOSTS
from test_kernel_maps import hash_map_entries, wait_for_baseline

A4, A6 = HOSTS["a"]
B4, B6 = HOSTS["b"]
C4, _ = HOSTS["c"]
UDP_ON = "    udp_links: true\n"


def udp_link(batch, client, server, port):
    """{(metric, direction): value} of one UDP link, and its attributes."""
    values, attributes = {}, None
    for name in ("ridley.link.bytes", "ridley.link.datagrams"):
        for attrs, p in batch.points(name):
            if (attrs.get("client.address"), attrs.get("server.address"), attrs.get("server.port"),
                    attrs.get("network.transport")) == (client, server, port, "udp"):
                values[(name.rsplit(".", 1)[1], attrs["ridley.link.direction"])] = int(p["asInt"])
                attributes = attrs
    return values, attributes


def test_connected_udp_queries_are_a_link_with_exact_datagrams_and_bytes(ridley, peers):
    r = ridley(receiver_extra=UDP_ON, pipelines={"metrics": ["file"], "traces": ["file/spans"]})
    peers.udp_server("a", A4, 5353, reply=120)
    assert peers.udp_query("b", A4, 5353, send=40, count=5) == 600
    want = {("bytes", "client_to_server"): 200, ("bytes", "server_to_client"): 600,
            ("datagrams", "client_to_server"): 5, ("datagrams", "server_to_client"): 5}
    batch = r.wait_for(lambda b: udp_link(b, B4, A4, 5353)[0] == want)
    values, attrs = udp_link(batch, B4, A4, 5353)
    assert values == want
    assert (attrs["network.type"], attrs["network.transport"]) == ("ipv4", "udp")
    # Connection metrics are TCP's: a UDP link has none of them, and no span pairs.
    for name in ("ridley.link.connections.opened", "ridley.link.connections.active",
                 "ridley.link.rtt", "ridley.link.connect.duration", "ridley.link.retransmits"):
        assert not [a for a, _ in batch.points(name) if a.get("network.transport") == "udp"], name
    # More queries add to the same link (the client's port is not part of it).
    peers.udp_query("b", A4, 5353, send=10, count=2)
    more = {("bytes", "client_to_server"): 220, ("bytes", "server_to_client"): 840,
            ("datagrams", "client_to_server"): 7, ("datagrams", "server_to_client"): 7}
    r.wait_for(lambda b: udp_link(b, B4, A4, 5353)[0] == more)
    # The flow tables are drained every interval: back to empty.
    counts = wait_for_baseline(r.proc.pid, {**hash_map_entries(r.proc.pid), "UDP_FLOWS_0": 0,
                                            "UDP_FLOWS_1": 0})
    assert (counts["UDP_FLOWS_0"], counts["UDP_FLOWS_1"]) == (0, 0), counts
    r.stop()
    # No span pairs for UDP: no handshake to time (see the README); TCP ones go on.
    assert not [s for s in r.spans() if s["attrs"].get("network.transport") == "udp"]


def test_udp_over_ipv6_is_a_link_of_its_own(ridley, peers):
    r = ridley(receiver_extra=UDP_ON)
    peers.udp_server("a", A6, 5357, reply=30)
    assert peers.udp_query("b", A6, 5357, send=20, count=3) == 90
    want = {("bytes", "client_to_server"): 60, ("bytes", "server_to_client"): 90,
            ("datagrams", "client_to_server"): 3, ("datagrams", "server_to_client"): 3}
    batch = r.wait_for(lambda b: udp_link(b, B6, A6, 5357)[0] == want)
    assert udp_link(batch, B6, A6, 5357)[1]["network.type"] == "ipv6"
    r.stop()


def test_an_unconnected_sender_is_not_attributed(ridley, peers):
    """sendto() on an unconnected socket names its peer per datagram, which these hooks
    do not see: no link (its replies come from an unconnected server too)."""
    r = ridley(receiver_extra=UDP_ON)
    peers.udp_server("a", A4, 5354, reply=8)
    assert peers.udp_query("c", A4, 5354, send=8, count=3, unconnected=True) == 24
    # A connected query made after it shows up; by then the unconnected one would have.
    peers.udp_query("b", A4, 5354, send=8, count=1)
    batch = r.wait_for(lambda b: udp_link(b, B4, A4, 5354)[0].get(("datagrams", "client_to_server")) == 1)
    time.sleep(2.5)  # two more intervals
    batch = r.batches()[-1]
    assert udp_link(batch, C4, A4, 5354) == ({}, None)
    assert udp_link(batch, B4, A4, 5354)[0][("datagrams", "client_to_server")] == 1
    r.stop()


def test_a_full_flow_table_is_counted_and_nothing_is_counted_twice(ridley, peers):
    """Two flows fit per interval: every datagram is either in a link or in the
    `udp_flow_table_full` loss, never both, never neither."""
    r = ridley(receiver_extra=UDP_ON + "    max_udp_flows: 2\n")
    for port in range(5360, 5366):
        peers.udp_server("a", A4, port, reply=4)
    for port in range(5360, 5366):
        peers.udp_query("b", A4, port, send=4, count=3)
    total = 6 * 3 * 2  # six flows, three queries, two datagrams each

    def counted(b):
        return sum(v for port in range(5360, 5366)
                   for (kind, _), v in udp_link(b, B4, A4, port)[0].items() if kind == "datagrams")

    def lost(b):
        return sum(int(p["asInt"]) for a, p in b.points("ridley.receiver.losses")
                   if a["reason"] == "udp_flow_table_full")

    batch = r.wait_for(lambda b: counted(b) + lost(b) == total and lost(b) > 0, timeout=20)
    # Full tables are drained like any others: both empty again.
    counts = wait_for_baseline(r.proc.pid, {**hash_map_entries(r.proc.pid), "UDP_FLOWS_0": 0,
                                            "UDP_FLOWS_1": 0})
    assert (counts["UDP_FLOWS_0"], counts["UDP_FLOWS_1"]) == (0, 0), counts
    r.stop()
    assert counted(batch) + lost(batch) == total
    assert counted(batch) > 0


def test_udp_links_are_off_by_default(ridley, peers):
    """Off unless asked for (the hooks cost every socket operation of the host): the
    same queries make no link, and the hooks are not attached."""
    r = ridley()
    peers.udp_server("a", A4, 5355, reply=8)
    peers.udp_query("b", A4, 5355, send=8, count=2)
    peers.server("a", A4, 5356, reply=1)
    peers.connect("b", A4, 5356, send=1)  # a TCP link shows the batch is recent enough
    batch = r.wait_for(lambda b: (b.link(B4, A4, 5356) or {}).get("opened") == 1)
    assert udp_link(batch, B4, A4, 5355) == ({}, None)
    r.stop()
    assert "UDP links: off (receivers.ebpf.udp_links: false)" in r.log_path.read_text()
