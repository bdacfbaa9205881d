"""Bounded under hostile conditions: a port scan, an internet of clients, a collector
that limits request size. Each test reproduces the fault and asserts the bound."""
import time

import pytest

from conftest import HOSTS, ns, sh

A4, _ = HOSTS["a"]
B4, _ = HOSTS["b"]
C4, _ = HOSTS["c"]


def points_by_port(batch, name):
    """{server.port: value} of a link metric, for links from B4 to A4."""
    return {a["server.port"]: v for a, v in batch.all_points(name)
            if a.get("client.address") == B4 and a.get("server.address") == A4}


def refused(batch, name="ridley.link.connections.failed"):
    return {a.get("server.port", "overflow"): v for a, v in batch.all_points(name)
            if a.get("error.type") == "refused" or a.get("otel.metric.overflow")}


def test_a_port_scan_is_bounded_by_the_link_limit_and_loses_no_count(ridley, peers):
    r = ridley(receiver_extra="    max_links: 50\n")
    assert peers.scan("b", A4, 20000, 20299) == 300
    final = r.stop()
    failed = final.all_points("ridley.link.connections.failed")
    own = {a["server.port"]: v for a, v in failed if a.get("client.address") == B4}
    # Every live connection on the machine is a link too (the walk sees them all), so a
    # connection the machine itself holds may take one of the 50 places before the scan.
    others = sorted({(a.get("client.address"), a.get("server.address"), a.get("server.port"))
                     for a, _ in final.all_points("ridley.link.connections.active")
                     if "server.port" in a and a.get("client.address") != B4})
    assert len(own) + len(others) == 50, others
    assert len(own) >= 45 and set(own.values()) == {1}, others
    overflow = [(a, v) for a, v in failed if a.get("otel.metric.overflow") is True]
    assert len(overflow) == 1, overflow
    attrs, value = overflow[0]
    # The overflow point carries nothing but the convention's attribute and the reason.
    assert attrs == {"otel.metric.overflow": True, "error.type": "refused"}
    assert value == 300 - len(own)
    # Nothing lost: every refused connection of the scan is in its own link or the overflow.
    assert sum(own.values()) + value == 300
    # Each refused connection kept out of the link table is one link_limit loss; another
    # link's records past the limit (a machine's own connection) may add theirs.
    if others:
        assert final.losses()["link_limit"] >= value
    else:
        assert final.losses()["link_limit"] == value


def test_a_scan_larger_than_the_collectors_request_limit_still_arrives(ridley, peers, collector):
    """2,600 links are about 5 MB of metrics, above the 4 MiB a collector's gRPC receiver
    accepts: split into requests of at most `max_request_size`, every link arrives."""
    collector.start()
    exporters = (
        "  otlp:\n"
        f"    endpoint: {collector.grpc_endpoint}\n"
        "    tls: {insecure: true}\n"
        "    retry_on_failure: {initial_interval: 200ms, max_interval: 1s}\n"
    )
    r = ridley(exporters=exporters, pipelines={"metrics": ["otlp"]},
               receiver_extra="    max_links: 5000\n")
    assert peers.scan("b", A4, 30000, 32599) == 2600

    def all_arrived(c):
        return len(refused(c.metrics())) >= 2600

    collector.wait_for(all_arrived, timeout=60)
    r.stop()
    got = refused(collector.metrics())
    assert {p: got[p] for p in range(30000, 32600)} == {p: 1 for p in range(30000, 32600)}
    assert "request dropped" not in r.log_path.read_text()


def test_public_clients_are_one_external_peer_per_server_port(ridley, peers):
    public = ["198.51.100.7", "198.51.100.8"]
    for addr in public:
        sh("ip", "-n", ns("c"), "addr", "add", f"{addr}/32", "dev", "eth0")
        sh("ip", "-n", ns("a"), "route", "add", f"{addr}/32", "via", C4)
    try:
        r = ridley()
        peers.server("a", A4, 8800, reply=7)
        for addr in public:
            assert peers.connect("c", A4, 8800, send=3, count=2, source=addr) == ["received 7"] * 2
        assert peers.connect("b", A4, 8800, send=3) == ["received 7"]
        final = r.stop()
    finally:
        for addr in public:
            sh("ip", "-n", ns("a"), "route", "del", f"{addr}/32", check=False)
            sh("ip", "-n", ns("c"), "addr", "del", f"{addr}/32", "dev", "eth0", check=False)
    opened = [(a.get("client.address"), a.get("ridley.client.group"), v)
              for a, v in final.all_points("ridley.link.connections.opened")
              if a.get("server.port") == 8800]
    assert sorted(opened, key=str) == sorted([(None, "external", 4), (B4, None, 1)], key=str)
    bytes_ = {a["ridley.link.direction"]: v for a, v in final.all_points("ridley.link.bytes")
              if a.get("ridley.client.group") == "external"}
    assert bytes_ == {"client_to_server": 12, "server_to_client": 28}


def test_a_closed_stdout_is_reported_once_and_capture_goes_on(tmp_path):
    """The debug exporter's reader goes away: one warning, no error per interval, and
    the daemon still captures and stops cleanly."""
    import signal
    import subprocess

    from conftest import RIDLEY
    config = tmp_path / "debug.yaml"
    config.write_text(
        "receivers:\n  ebpf:\n    collection_interval: 200ms\n    idle_timeout: 1m\n"
        "exporters:\n  debug:\n"
        "service:\n  pipelines:\n    metrics:\n      receivers: [ebpf]\n      exporters: [debug]\n")
    log_path = tmp_path / "stderr.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(RIDLEY), "run", "--config", str(config)],
                                stdout=subprocess.PIPE, stderr=log)
    try:
        proc.stdout.readline()
        proc.stdout.close()
        time.sleep(2.5)  # about 12 intervals
        assert proc.poll() is None, log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    text = log_path.read_text()
    assert proc.returncode == 0, text
    assert text.count("stdout is closed: the debug exporter stops writing") == 1, text
    assert "export failed" not in text, text


@pytest.mark.parametrize("timeout, bound", [(None, 20), ("2s", 8)], ids=["default 10s", "2s"])
def test_shutdown_with_dead_backends_keeps_one_deadline(ridley, peers, timeout, bound):
    """Four exporters, each with a dead collector and retries pending: they flush in
    parallel under one deadline (`service.shutdown_timeout`, 10 s by default; formerly
    one after another, 4-10 s each), and one line sums up what was dropped."""
    from conftest import free_port
    exporters = "".join(
        f"  {kind}:\n    endpoint: {scheme}127.0.0.1:{free_port()}\n"
        + ("    tls: {insecure: true}\n" if kind.startswith("otlp/") or kind == "otlp" else "")
        + "    retry_on_failure: {initial_interval: 1s, max_interval: 2s, max_elapsed_time: 0s}\n"
        for kind, scheme in [("otlp", ""), ("otlp/b", ""), ("otlphttp", "http://"),
                             ("otlphttp/b", "http://")])
    ids = ["otlp", "otlp/b", "otlphttp", "otlphttp/b"]
    r = ridley(exporters=exporters, pipelines={"metrics": ["file", *ids], "traces": ids},
               interval="200ms",
               service_extra=f"  shutdown_timeout: {timeout}\n" if timeout else "")
    peers.server("a", A4, 8950, reply=1)
    assert peers.connect("b", A4, 8950, send=1, count=20) == ["received 1"] * 20
    time.sleep(1.5)
    started = time.monotonic()
    r.stop()
    took = time.monotonic() - started
    log = r.log_path.read_text()
    assert took < bound, f"shutdown took {took:.1f} s"
    assert log.count("exporters flushed") == 1, log
    assert "request dropped" not in log, log
    summary = next(line for line in log.splitlines() if "exporters flushed" in line)
    assert "exporters=5" in summary, summary


def test_a_full_endpoint_table_is_counted_and_never_inflates(ridley, peers):
    """500 connections held at once, both ends on this host, through an endpoint set of
    one bucket of 8 slots (`max_connections: 1`): the 492 client ends that do not fit are
    counted, and their servers, which cannot know that the client is local, report them
    instead. The state table is never smaller than 1,792 slots, enough for the 500
    clients and the 492 servers: every connection is tracked, each counted once,
    exactly."""
    r = ridley(receiver_extra="    max_connections: 1\n", interval="500ms")
    peers.server("a", A4, 8960, reply=10)
    held = peers.hold_all("b", A4, 8960, count=500, send=50)
    r.wait_for(lambda b: (b.link(B4, A4, 8960) or {}).get("active") == 500, fresh=True)
    time.sleep(1.2)
    link = r.batches()[-1].link(B4, A4, 8960)
    assert (link["active"], link["transmit"]) == (500, 500 * 50), link
    assert peers.release(held) == [f"received {500 * 10}"]
    final = r.stop()
    link = final.link(B4, A4, 8960)
    assert (link["opened"], link["active"]) == (500, 0), link
    assert (link["transmit"], link["receive"]) == (500 * 50, 500 * 10), link
    losses = final.losses()
    assert losses["endpoint_table_full"] == 492, losses
    assert losses["socket_state_unavailable"] == 0, losses


def test_a_full_state_table_is_counted_and_never_inflates(ridley, peers):
    """1,200 connections held at once, both ends on this host, with `max_connections: 1`:
    two state slots per connection (the client's at `connect()`, then the server's, whose
    client found no room in the 8-slot endpoint set) need more than the table's 1,792.
    What finds no room is counted (`socket_state_unavailable`); every connection is
    still seen live (the full walks report sockets without state), each opened one is
    counted exactly and once, nothing is counted that was not sent, and every slot is
    free again after the close."""
    from test_kernel_maps import state_slots_in_use
    r = ridley(receiver_extra="    max_connections: 1\n", interval="500ms")
    assert state_slots_in_use(r.proc.pid) == (0, 0)
    peers.server("a", A4, 8961, reply=10)
    held = peers.hold_all("b", A4, 8961, count=1200, send=50)
    r.wait_for(lambda b: (b.link(B4, A4, 8961) or {}).get("active") == 1200, fresh=True)
    # Every slot taken: 256 buckets of 7; some sockets in their overflow bucket.
    cookies, overflowed = state_slots_in_use(r.proc.pid)
    assert (cookies, overflowed > 0) == (1792, True)
    assert peers.release(held) == [f"received {1200 * 10}"]
    deadline = time.monotonic() + 10
    while state_slots_in_use(r.proc.pid) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state_slots_in_use(r.proc.pid) == (0, 0)
    final = r.stop()
    link = final.link(B4, A4, 8961)
    assert link["active"] == 0, link
    assert 0 < link["opened"] < 1200, link
    assert link["transmit"] == 50 * link["opened"], link
    assert link["receive"] <= 1200 * 10, link
    losses = final.losses()
    assert losses["socket_state_unavailable"] >= 1200 - link["opened"], losses
    assert losses["endpoint_table_full"] > 0, losses


def test_sighup_flushes_and_exits(ridley, peers):
    """No live reload: SIGHUP flushes a final batch and exits 0, like SIGTERM."""
    import signal
    r = ridley(interval="10s")
    peers.server("a", A4, 8970, reply=4)
    assert peers.connect("b", A4, 8970, send=9) == ["received 4"]
    time.sleep(0.3)
    r.proc.send_signal(signal.SIGHUP)
    r.proc.wait(timeout=30)
    assert r.proc.returncode == 0, r.log_path.read_text()
    assert "SIGHUP: flushing and stopping" in r.log_path.read_text()
    link = r.batches()[-1].link(B4, A4, 8970)
    assert (link["opened"], link["transmit"], link["receive"]) == (1, 9, 4)
