"""End-to-end link capture on the real kernel: traffic between network namespaces with
known byte counts, and the exact numbers ridley's file exporter reports."""
import re
import subprocess
import threading
import time

import pytest

from conftest import HOSTS, SILENT_V4, ns, sh

A4, A6 = HOSTS["a"]
B4, B6 = HOSTS["b"]
C4, C6 = HOSTS["c"]

NO_LOSSES = {"ringbuf_full": 0, "socket_state_unavailable": 0, "endpoint_table_full": 0,
             "udp_flow_table_full": 0,
             "read_error": 0, "event_missed": 0, "link_limit": 0, "close_lost": 0,
             "namespace_skipped": 0, "nat_unresolved": 0, "nat_lookup_limit": 0}


@pytest.fixture(params=["array", "table"])
def ridley(request, ridley):
    """Every test here runs with per-socket state in the table keyed by socket cookie
    (5.12+) and in the hash table older kernels use, on this kernel: the counts must not
    differ."""
    def start(receiver_extra="", **kwargs):
        return ridley(receiver_extra=f"    socket_state: {request.param}\n{receiver_extra}", **kwargs)
    return start


def test_clients_and_servers_across_namespaces_exact_bytes(ridley, peers):
    r = ridley()
    peers.server("a", A4, 8080, reply=3000)
    peers.server("c", C4, 9090, reply=17)
    assert peers.connect("b", A4, 8080, send=1234, count=5) == ["received 3000"] * 5
    assert peers.connect("c", A4, 8080, send=777, count=3) == ["received 3000"] * 3
    assert peers.connect("a", C4, 9090, send=65536 * 4, count=2) == ["received 17"] * 2
    final = r.stop()

    assert final.links() == [(A4, C4, 9090), (B4, A4, 8080), (C4, A4, 8080)]
    b_a = final.link(B4, A4, 8080)
    assert b_a == {
        "network.type": "ipv4", "network.transport": "tcp",
        "opened": 5, "active": 0, "failed": {},
        "transmit": 5 * 1234, "receive": 5 * 3000,
        "retransmits": 0, "connect_count": 5, "rtt_count": 5,
    }
    c_a = final.link(C4, A4, 8080)
    assert (c_a["opened"], c_a["transmit"], c_a["receive"], c_a["failed"]) == (3, 3 * 777, 3 * 3000, {})
    a_c = final.link(A4, C4, 9090)
    assert (a_c["opened"], a_c["transmit"], a_c["receive"], a_c["failed"]) == (2, 2 * 262144, 2 * 17, {})
    assert final.losses() == NO_LOSSES
    assert final.resource["service.name"] == "ridley"
    assert final.resource["host.name"]


def test_connection_opened_before_the_daemon_counts_from_then_on(ridley, peers):
    peers.server("a", A4, 8081, reply=500)
    conn = peers.hold("b", A4, 8081, before=10_000, send=2_500)
    r = ridley()
    assert peers.release(conn) == ["received 500"]
    final = r.stop()
    link = final.link(B4, A4, 8081)
    # The role is right (b is the client) although the handshake was never seen; only
    # the bytes after the daemon started count, and it was not opened while watched.
    assert (link["opened"], link["transmit"], link["receive"], link["active"]) == (0, 2_500, 500, 0)
    assert final.links() == [(B4, A4, 8081)]
    assert final.losses() == NO_LOSSES


def test_clients_sharing_a_local_port_are_each_counted_once(ridley, peers):
    """connect() reuses an address's ephemeral port towards other destinations. Two held
    clients on one local port, to two servers on this host: the first's close removes
    the endpoint both share from the kernel's table (state-table build), so a full walk
    (every 60th) finds the second's server without a known local client and gives it
    state; the walk sees both ends of that connection, and it is still counted once. The second
    client's keepalive probes keep its server active but change neither end's counters:
    the walks between full walks, which list only changed sockets, must not show that
    server without its client (they leave sockets without state to the full walks)."""
    r = ridley(interval="100ms", service_extra="  telemetry:\n    logs: {level: debug}\n")
    peers.server("a", A4, 8710, reply=10)
    peers.server("a", A4, 8711, reply=20)
    first = peers.hold("b", A4, 8710, before=100, send=5, source=B4, source_port=47000)
    second = peers.hold("b", A4, 8711, before=200, send=7, source=B4, source_port=47000,
                        keepalive=1)
    # Both clients counted by the walks before the endpoint is forgotten.
    r.wait_for(lambda b: (b.link(B4, A4, 8711) or {}).get("transmit") == 200)
    log_mark = len(r.log_path.read_text())
    assert peers.release(first) == ["received 10"]
    # A full walk after the close, and a few of the walks between full walks after it.
    deadline = time.monotonic() + 30
    while not re.search(r"full=true(.*\n){5}", r.log_path.read_text()[log_mark:]):
        assert time.monotonic() < deadline, "no full walk within 30 s"
        time.sleep(0.2)
    assert peers.release(second) == ["received 20"]
    final = r.stop()
    first_link, second_link = final.link(B4, A4, 8710), final.link(B4, A4, 8711)
    assert (first_link["opened"], first_link["transmit"], first_link["receive"]) == (1, 105, 10)
    assert (second_link["opened"], second_link["active"], second_link["transmit"],
            second_link["receive"]) == (1, 0, 207, 20), second_link
    assert final.losses() == NO_LOSSES


def test_long_lived_connection_is_reported_while_open(ridley, peers):
    r = ridley(interval="1s")
    peers.server("a", A4, 8082, reply=42)
    conn = peers.hold("c", A4, 8082, before=4_096, send=100)
    live = r.wait_for(lambda b: (b.link(C4, A4, 8082) or {}).get("transmit") == 4_096)
    assert live.link(C4, A4, 8082)["active"] == 1
    assert live.link(C4, A4, 8082)["opened"] == 1
    assert peers.release(conn) == ["received 42"]
    final = r.stop()
    link = final.link(C4, A4, 8082)
    assert (link["opened"], link["active"], link["transmit"], link["receive"]) == (1, 0, 4_196, 42)


def test_refused_connect(ridley, peers):
    r = ridley()
    assert peers.connect("b", A4, 8181, count=3) == ["connect failed: [Errno 111] Connection refused"] * 3
    final = r.stop()
    link = final.link(B4, A4, 8181)
    assert (link["opened"], link["failed"], link["transmit"], link["receive"]) == (0, {"refused": 3}, 0, 0)
    assert link["connect_count"] == 0


def test_reset_connection(ridley, peers):
    r = ridley()
    peers.server("a", A4, 8083, reset=True)
    assert peers.connect("b", A4, 8083, send=300, count=2) == ["received reset"] * 2
    final = r.stop()
    link = final.link(B4, A4, 8083)
    assert (link["opened"], link["failed"], link["transmit"], link["receive"]) == (2, {"reset": 2}, 600, 0)


def test_connect_duration_spans_the_handshake_including_a_lost_syn(ridley, peers):
    """The server's host drops SYNs until the first is lost: the client's kernel resends
    it after its initial timeout (1 s), so the handshake takes at least that long. The
    start is the client's clock at `connect()` and the end the time its kernel processed
    the SYN-ACK; a wrong clock or unit would read 1,000 times off, a missing end 0."""
    r = ridley()
    peers.server("a", A4, 8095, reply=5)
    table = "rdlt_drop_syn"
    rules = (f"table inet {table} {{\n chain input {{\n  type filter hook input priority 0;\n"
             f"  tcp dport 8095 tcp flags & (syn | ack) == syn drop\n }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", ns("a"), "nft", "-f", "-"], input=rules,
                   check=True, capture_output=True, text=True)
    outcome = []
    client = threading.Thread(target=lambda: outcome.extend(
        peers.connect("b", A4, 8095, send=10, count=1, timeout=10.0)))
    try:
        client.start()
        time.sleep(0.3)
    finally:
        sh("ip", "netns", "exec", ns("a"), "nft", "delete", "table", "inet", table)
    client.join(timeout=15)
    assert outcome == ["received 5"]
    final = r.stop()
    link = final.link(B4, A4, 8095)
    assert (link["opened"], link["connect_count"], link["retransmits"]) == (1, 1, 0)
    [duration] = [p for attrs, p in final.points("ridley.link.connect.duration")
                  if (attrs.get("client.address"), attrs.get("server.address")) == (B4, A4)]
    # The resent SYN leaves 1 s after the first (the kernel's TCP_TIMEOUT_INIT); a second
    # resend would be 2 s after that.
    assert 1.0 <= float(duration["sum"]) < 3.0, duration


def test_connect_timeout(ridley, peers):
    r = ridley()
    out = peers.connect("b", SILENT_V4, 80, count=1, timeout=1.0)
    assert len(out) == 1 and out[0].startswith("connect failed"), out
    final = r.stop()
    link = final.link(B4, SILENT_V4, 80)
    assert (link["opened"], link["failed"]) == (0, {"timeout": 1})


def test_ipv6(ridley, peers):
    r = ridley()
    peers.server("c", C6, 8443, reply=999)
    assert peers.connect("b", C6, 8443, send=4321, count=2) == ["received 999"] * 2
    final = r.stop()
    assert final.links() == [(B6, C6, 8443)]
    link = final.link(B6, C6, 8443)
    assert link["network.type"] == "ipv6"
    assert (link["opened"], link["transmit"], link["receive"]) == (2, 8642, 1998)


def test_ipv4_mapped_ipv6_is_shown_as_ipv4(ridley, peers):
    r = ridley()
    peers.server("a", "::", 8084, reply=5)  # dual-stack listener
    assert peers.connect("b", A4, 8084, send=6) == ["received 5"]
    final = r.stop()
    link = final.link(B4, A4, 8084)
    assert link["network.type"] == "ipv4"
    assert (link["opened"], link["transmit"], link["receive"]) == (1, 6, 5)


def test_burst_of_short_connections_is_counted_exactly(ridley, peers):
    r = ridley()
    peers.server("a", A4, 8085, reply=50)
    out = peers.connect("c", A4, 8085, send=100, count=1200)
    assert out == ["received 50"] * 1200
    final = r.stop()
    link = final.link(C4, A4, 8085)
    assert (link["opened"], link["transmit"], link["receive"], link["failed"]) == (1200, 120_000, 60_000, {})
    assert link["connect_count"] == 1200
    assert final.losses() == NO_LOSSES


def test_a_burst_larger_than_the_ring_buffer_is_drained_as_it_comes(ridley, peers):
    """4,000 short connections through a 64 KiB ring buffer (about 540 records, in
    batches of 32): more than the ring holds between two of the reader's timer drains
    (every 200 ms), so nothing is lost only if the programs wake the reader as the
    backlog crosses each quarter of the ring."""
    r = ridley(receiver_extra="    ring_buffer_size: 65536\n")
    peers.server("a", A4, 8087, reply=5)
    out = peers.connect("c", A4, 8087, send=10, count=4000)
    assert out == ["received 5"] * 4000
    final = r.stop()
    link = final.link(C4, A4, 8087)
    assert (link["opened"], link["transmit"], link["receive"]) == (4000, 40_000, 20_000)
    assert final.losses() == NO_LOSSES


def test_same_host_loopback_is_one_link(ridley, peers):
    r = ridley()
    peers.server("b", "127.0.0.1", 7070, reply=11)
    assert peers.connect("b", "127.0.0.1", 7070, send=22, count=4) == ["received 11"] * 4
    final = r.stop()
    link = final.link("127.0.0.1", "127.0.0.1", 7070)
    assert (link["opened"], link["transmit"], link["receive"]) == (4, 88, 44)
    # Not also reported from the server end (which would be 127.0.0.1 -> 127.0.0.1:<ephemeral>).
    assert [l for l in final.links() if l[0] == "127.0.0.1"] == [("127.0.0.1", "127.0.0.1", 7070)]


def test_idle_link_expires(ridley, peers):
    r = ridley(interval="1s", idle_timeout="2s")
    peers.server("a", A4, 8086, reply=1)
    peers.connect("b", A4, 8086, send=1)
    r.wait_for(lambda b: b.link(B4, A4, 8086) is not None)
    gone = r.wait_for(lambda b: b.link(B4, A4, 8086) is None, timeout=10)
    assert (B4, A4, 8086) not in gone.links()
    r.stop()


def tcp_info(host, peer_addr, peer_port):
    """The kernel's own view of one connection, from `ss -ti` in its namespace."""
    out = sh("ip", "netns", "exec", ns(host), "ss", "-tinH", "dst", f"{peer_addr}:{peer_port}").stdout
    acked = re.search(r"bytes_acked:(\d+)", out)
    retrans = re.search(r"retrans:\d+/(\d+)", out)
    return (int(acked.group(1)) if acked else 0, int(retrans.group(1)) if retrans else 0)


def test_retransmits_match_the_kernel(ridley, peers):
    """A shaper with a tiny queue on the client's link drops segments; ridley's count of
    retransmitted segments equals the kernel's own count for the connection."""
    r = ridley()
    peers.server("a", A4, 8087, reply=10)
    sh("ip", "netns", "exec", ns("b"), "tc", "qdisc", "add", "dev", "eth0", "root",
       "tbf", "rate", "20mbit", "burst", "3000", "limit", "6000")
    try:
        conn = peers.send_then_pause("b", A4, 8087, send=4_000_000)
        deadline = time.monotonic() + 60
        while (info := tcp_info("b", A4, 8087))[0] != 4_000_001:  # payload + SYN
            assert time.monotonic() < deadline, f"data not acknowledged: {info}"
            time.sleep(0.1)
    finally:
        sh("ip", "netns", "exec", ns("b"), "tc", "qdisc", "del", "dev", "eth0", "root")
    kernel_retrans = info[1]
    assert kernel_retrans > 0, "the shaper dropped nothing: the test proves nothing"
    assert peers.release(conn) == ["received 10"]
    final = r.stop()
    link = final.link(B4, A4, 8087)
    assert (link["retransmits"], link["transmit"], link["receive"]) == (kernel_retrans, 4_000_000, 10)


def test_the_default_config_starts_and_prints_live_links(peers, tmp_path):
    """`ridley run` with no config: the embedded default captures and prints the table."""
    import signal
    import subprocess

    from conftest import RIDLEY
    peers.server("a", A4, 8099, reply=5)
    log = open(tmp_path / "stderr.log", "w")
    proc = subprocess.Popen([str(RIDLEY), "run"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 30
        while "capture started" not in (tmp_path / "stderr.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.log").read_text()
            time.sleep(0.05)
        assert peers.connect("b", A4, 8099, send=6) == ["received 5"]
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    lines = out.splitlines()
    assert any(l.startswith("CLIENT") and "BYTES C>S" in l for l in lines), out
    row = next(l.split() for l in lines if l.startswith(B4) and " 8099 " in l)
    # CLIENT SERVER PORT OPENED ACTIVE REFUSED RESET TIMEOUT BYTES C>S BYTES S>C ...
    assert row[:10] == [B4, A4, "8099", "1", "0", "0", "0", "0", "6", "5"]


def test_the_resource_names_the_node(ridley, peers, monkeypatch):
    """In a cluster the downward API's node name is host.name, k8s.node.name and
    service.instance.id; outside one, the host's name."""
    import socket
    r = ridley()
    assert r.stop().resource["host.name"] == socket.gethostname()
    monkeypatch.setenv("K8S_NODE_NAME", "node-7")
    r = ridley()
    resource = r.stop().resource
    assert (resource["host.name"], resource["k8s.node.name"], resource["service.instance.id"]) == (
        "node-7", "node-7", "node-7")
