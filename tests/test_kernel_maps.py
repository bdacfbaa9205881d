"""The kernel maps return to their baseline after traffic: every way a TCP connection can
end (FIN from either side, RST from either side, refused, timed out, on loopback or
across namespaces) removes what the programs stored for it. Read with bpftool, the real
tool, through the map ids the daemon's own file descriptors hold.

Per-socket state is a preallocated array (`SOCK_STATES`) whose slots are taken under the
socket's cookie in `SOCK_STATE_KEYS` (buckets of seven 8-byte cookies and an overflow
count, a word in use when not 0), and the set of local client ends (`CLIENT_ENDPOINTS`)
an array of buckets of 8-byte slots: both return to their baseline. On kernels before
5.12 the state is a hash table whose entries the programs remove at each socket's close,
and the client ends a hash table too: the same tests run with them
(`socket_state: table`) and count their entries."""
import json
import os
import re
import time

import pytest

from conftest import HOSTS, SILENT_V4, sh

# `BPF_F_MMAPABLE` in `bpf_map_info.map_flags`: the array's values start on a page boundary.
BPF_F_MMAPABLE = 1 << 10

A4, _ = HOSTS["a"]
B4, _ = HOSTS["b"]

# Map names as the kernel keeps them (at most 15 characters).
TRACKED_MAPS = {"CLIENT_ENDPOINT": "CLIENT_ENDPOINTS", "UDP_FLOWS_0": "UDP_FLOWS_0",
                "UDP_FLOWS_1": "UDP_FLOWS_1"}


def daemon_map_ids(pid):
    """Ids of the BPF maps the process holds open, from /proc/<pid>/fdinfo."""
    ids = set()
    fdinfo = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(fdinfo):
        try:
            text = open(os.path.join(fdinfo, fd)).read()
        except OSError:
            continue  # closed meanwhile
        m = re.search(r"^map_id:\s+(\d+)$", text, re.M)
        if m:
            ids.add(int(m.group(1)))
    return ids


def used_slots(dump):
    """Words in use in a dump of an array of buckets of 8-byte words (cookies,
    fingerprints, overflow counts): those that are not 0."""
    used = 0
    for entry in dump:
        value = bytes(int(b, 16) for b in entry["value"])
        used += sum(1 for i in range(0, len(value), 8) if any(value[i:i + 8]))
    return used


def state_slots_in_use(pid):
    """(cookies held, sum of the overflow counts) in the daemon's `SOCK_STATE_KEYS`:
    buckets of seven 8-byte cookies and one 8-byte overflow count."""
    for map_id in daemon_map_ids(pid):
        info = json.loads(sh("bpftool", "-j", "map", "show", "id", str(map_id)).stdout)
        if info.get("name") == "SOCK_STATE_KEYS":
            dump = json.loads(sh("bpftool", "-j", "map", "dump", "id", str(map_id)).stdout)
            cookies = overflowed = 0
            for entry in dump:
                value = bytes(int(b, 16) for b in entry["value"])
                words = [int.from_bytes(value[i:i + 8], "little") for i in range(0, 64, 8)]
                cookies += sum(1 for word in words[:7] if word)
                overflowed += words[7]
            return cookies, overflowed
    raise AssertionError("SOCK_STATE_KEYS not found")


def hash_map_entries(pid, tracked=TRACKED_MAPS):
    """{map name: entries in use} of the daemon's maps keyed by connection or flow."""
    counts = {}
    for map_id in daemon_map_ids(pid):
        info = json.loads(sh("bpftool", "-j", "map", "show", "id", str(map_id)).stdout)
        name = tracked.get(info.get("name"))
        if name:
            dump = json.loads(sh("bpftool", "-j", "map", "dump", "id", str(map_id)).stdout)
            counts[name] = used_slots(dump) if info["type"] == "array" else len(dump)
    assert set(counts) == set(tracked.values()), f"maps not found: {counts}"
    return counts


def held_close_records(pid):
    """{cpu: close records held in that CPU's `CLOSE_BATCHES` batch} (the record count is
    the batch's second 4-byte word)."""
    for map_id in daemon_map_ids(pid):
        info = json.loads(sh("bpftool", "-j", "map", "show", "id", str(map_id)).stdout)
        if info.get("name") == "CLOSE_BATCHES":
            dump = json.loads(sh("bpftool", "-j", "map", "dump", "id", str(map_id)).stdout)
            assert len(dump) == 1, dump
            return {v["cpu"]: int.from_bytes(bytes(int(b, 16) for b in v["value"][4:8]), "little")
                    for v in dump[0]["values"]}
    raise AssertionError("CLOSE_BATCHES not found")


def daemon_maps(pid):
    """{map name: map type} of every BPF map the daemon holds."""
    maps = {}
    for map_id in daemon_map_ids(pid):
        info = json.loads(sh("bpftool", "-j", "map", "show", "id", str(map_id)).stdout)
        maps[info.get("name", "")] = info["type"]
    return maps


@pytest.mark.parametrize("socket_state,kind,endpoints", [("array", "array", "array"),
                                                         ("table", "hash", "hash")])
def test_the_maps_are_what_the_bounds_assume(ridley, socket_state, kind, endpoints):
    """Per-socket state is preallocated (or, in the table, allocated as used) and freed
    at each socket's close; nothing else is keyed by socket. The sizes follow
    `max_connections`."""
    r = ridley(receiver_extra=f"    socket_state: {socket_state}\n    max_connections: 100\n")
    infos = {info["name"]: info for info in
             (json.loads(sh("bpftool", "-j", "map", "show", "id", str(i)).stdout)
              for i in daemon_map_ids(r.proc.pid))}
    maps = {name: info["type"] for name, info in infos.items()}
    r.stop()
    if socket_state == "table":
        # Twice max_connections: clients, and servers of remote clients.
        assert infos["SOCK_STATES"]["max_entries"] == 200, infos["SOCK_STATES"]
        assert infos["CLIENT_ENDPOINT"]["max_entries"] == 100, infos["CLIENT_ENDPOINT"]
    else:
        # Eight 8-byte slots per connection, in a power of two of 64-byte buckets.
        assert (infos["CLIENT_ENDPOINT"]["max_entries"], infos["CLIENT_ENDPOINT"]["bytes_value"]) == (128, 64)
        # A 64-byte bucket of seven state slots per four connections, a power of two of
        # them, at least 256 (100 / 4 = 25: 256), and a 64-byte state per slot. All three
        # arrays page-aligned (mmapable), so that no bucket or state straddles two cache
        # lines.
        assert (infos["SOCK_STATE_KEYS"]["max_entries"], infos["SOCK_STATE_KEYS"]["bytes_value"]) == (256, 64)
        assert (infos["SOCK_STATES"]["max_entries"], infos["SOCK_STATES"]["bytes_value"]) == (256 * 7, 64)
        for name in ("SOCK_STATE_KEYS", "SOCK_STATES", "CLIENT_ENDPOINT"):
            assert infos[name]["flags"] & BPF_F_MMAPABLE, (name, infos[name])
    assert maps.get("SOCK_STATES") == kind, maps
    assert maps.get("CLIENT_ENDPOINT") == endpoints, maps
    assert maps.get("EVENTS") == "ringbuf", maps
    # One batch of 32 120-byte close records and two 4-byte words per CPU.
    assert (infos["CLOSE_BATCHES"]["type"], infos["CLOSE_BATCHES"]["max_entries"],
            infos["CLOSE_BATCHES"]["bytes_value"]) == ("percpu_array", 1, 8 + 32 * 120), infos["CLOSE_BATCHES"]
    assert maps.get("UDP_FLOWS_0") == maps.get("UDP_FLOWS_1") == "percpu_hash", maps
    assert "SOCKS" not in maps, maps


def program_runs(pid):
    """{program name: run count} of the BPF programs the process holds."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            m = re.search(r"^prog_id:\s+(\d+)$", open(f"/proc/{pid}/fdinfo/{fd}").read(), re.M)
        except OSError:
            continue
        if m:
            ids.add(int(m.group(1)))
    runs = {}
    for prog_id in ids:
        info = json.loads(sh("bpftool", "-j", "prog", "show", "id", str(prog_id)).stdout)
        runs[info["name"]] = info.get("run_cnt", 0)
    return runs


def test_the_walks_between_full_walks_visit_only_the_state_table(ridley, peers):
    """Between full walks, the walks run `ridley_walk_states` once per 16 buckets of
    `SOCK_STATE_KEYS` (256 buckets for `max_connections: 100`: 16 runs a walk) and never
    `iter/tcp`, which scans the host's whole connection table once per namespace. A
    connection opened meanwhile is reported live by them, then closed: exact."""
    sh("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=1")
    try:
        r = ridley(receiver_extra="    socket_state: array\n    max_connections: 100\n")
        peers.server("a", A4, 7100, reply=500)
        conn = peers.hold("b", A4, 7100, before=10_000, send=2_500)
        r.wait_for(lambda b: (b.link(B4, A4, 7100) or {}).get("transmit") == 10_000)
        before = program_runs(r.proc.pid)
        time.sleep(3.5)
        after = program_runs(r.proc.pid)
    finally:
        sh("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=0")
    walks = after["ridley_walk_states"] - before["ridley_walk_states"]
    assert walks % 16 == 0 and walks >= 2 * 16, (before, after)
    assert after["ridley_iter_tcp"] == before["ridley_iter_tcp"], (before, after)
    assert peers.release(conn) == ["received 500"]
    final = r.stop()
    link = final.link(B4, A4, 7100)
    assert (link["opened"], link["transmit"], link["receive"]) == (1, 12_500, 500), link
    assert final.links() == [(B4, A4, 7100)]
    assert final.losses() == {k: 0 for k in final.losses()}, final.losses()


def wait_for_baseline(pid, baseline, tracked=TRACKED_MAPS, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        counts = hash_map_entries(pid, tracked)
        if counts == baseline or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


@pytest.mark.parametrize("socket_state", ["array", "table"])
def test_every_way_a_connection_ends_returns_the_maps_to_baseline(ridley, peers, socket_state):
    # A table much smaller than the traffic: a single leaked entry per connection
    # would fill it and show up as a table-full loss.
    r = ridley(receiver_extra=f"    max_connections: 64\n    socket_state: {socket_state}\n")
    pid = r.proc.pid
    states = "SOCK_STATES" if socket_state == "table" else "SOCK_STATE_KEYS"
    tracked = dict(TRACKED_MAPS, **{states: states})
    baseline = hash_map_entries(pid, tracked)

    peers.server("a", A4, 8600, reply=10)
    peers.server("a", A4, 8601, reply=20, close_first=True)
    peers.server("a", A4, 8602, reset=True)
    peers.server("a", A4, 8603, reply=0)
    peers.server("b", "127.0.0.1", 8604, reply=5)

    # FIN from the client first, across namespaces: 3x the table size.
    assert peers.connect("b", A4, 8600, send=7, count=200) == ["received 10"] * 200
    # FIN from the server first.
    assert peers.connect("b", A4, 8601, read_first=True, count=20) == ["received 20"] * 20
    # RST from the server; RST from the client.
    assert peers.connect("b", A4, 8602, send=3, count=20) == ["received reset"] * 20
    assert peers.connect("b", A4, 8603, send=9, count=20, abort=True) == ["aborted"] * 20
    # Refused, timed out.
    assert peers.connect("b", A4, 8699, count=20) == ["connect failed: [Errno 111] Connection refused"] * 20
    out = peers.connect("b", SILENT_V4, 80, count=2, timeout=0.5)
    assert len(out) == 2 and all(line.startswith("connect failed") for line in out), out
    # Both ends on one host, on loopback (the endpoint key carries the namespace).
    assert peers.connect("b", "127.0.0.1", 8604, send=1, count=100) == ["received 5"] * 100

    after = wait_for_baseline(pid, baseline, tracked)
    assert after == baseline, f"kernel maps did not return to baseline: {baseline} -> {after}"
    # The walk after the traffic had every CPU send the close records it held.
    deadline = time.monotonic() + 5
    while set((held := held_close_records(pid)).values()) != {0} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(held) == os.cpu_count() and set(held.values()) == {0}, held

    final = r.stop()
    assert final.losses() == {"ringbuf_full": 0, "socket_state_unavailable": 0,
                              "endpoint_table_full": 0, "udp_flow_table_full": 0, "read_error": 0, "event_missed": 0, "link_limit": 0, "close_lost": 0,
             "namespace_skipped": 0, "nat_unresolved": 0, "nat_lookup_limit": 0}
    link = final.link(B4, A4, 8600)
    assert (link["opened"], link["transmit"], link["receive"]) == (200, 1400, 2000)
    link = final.link(B4, A4, 8601)
    assert (link["opened"], link["transmit"], link["receive"]) == (20, 0, 400)
    link = final.link(B4, A4, 8602)
    assert (link["opened"], link["failed"], link["transmit"]) == (20, {"reset": 20}, 60)
    # An abort discards unacknowledged data, so only the opens are certain.
    assert final.link(B4, A4, 8603)["opened"] == 20
    link = final.link(B4, A4, 8699)
    assert (link["opened"], link["failed"]) == (0, {"refused": 20})
    link = final.link(B4, SILENT_V4, 80)
    assert (link["opened"], link["failed"]) == (0, {"timeout": 2})
    link = final.link("127.0.0.1", "127.0.0.1", 8604)
    assert (link["opened"], link["transmit"], link["receive"]) == (100, 100, 500)


def test_idle_connections_are_not_reported_again_until_they_change(ridley, peers):
    """300 connections held idle (more records than one read of the iterator holds, so
    the kernel re-shows some): each is reported by the walk after it opens, then not
    again while nothing changes; the counts stay exact."""
    r = ridley(interval="500ms", service_extra="  telemetry:\n    logs: {level: debug}\n")
    peers.server("a", A4, 8620, reply=10)
    held = peers.hold_all("b", A4, 8620, count=300, send=50)
    r.wait_for(lambda b: (b.link(B4, A4, 8620) or {}).get("transmit") == 300 * 50, fresh=True)
    log_mark = len(r.log_path.read_text())
    time.sleep(3)
    walks = [line for line in r.log_path.read_text()[log_mark:].splitlines() if "collected" in line]
    changed = [int(re.search(r"sockets=(\d+)", line).group(1))
               for line in walks if "full=false" in line]
    assert len(changed) >= 4, walks
    # The held sockets are idle: only the machine's own busy sockets may show up.
    assert max(changed) < 30, walks
    link = r.batches()[-1].link(B4, A4, 8620)
    assert (link["active"], link["opened"], link["transmit"]) == (300, 300, 300 * 50), link
    assert peers.release(held) == [f"received {300 * 10}"]
    final = r.stop()
    link = final.link(B4, A4, 8620)
    assert (link["active"], link["opened"], link["transmit"], link["receive"]) == (0, 300, 15000, 3000)
