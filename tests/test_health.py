"""The health_check extension reflects whether capture runs and exporters deliver."""
import json
import socket
import time
import urllib.error
import urllib.request

from conftest import HOSTS, free_port

A4, _ = HOSTS["a"]
B4, _ = HOSTS["b"]


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def health(port):
    code, body = get(port, "/")
    return code, json.loads(body)


def test_ready_when_capturing_and_exporters_deliver(ridley):
    port = free_port()
    r = ridley(extensions=f"  health_check:\n    endpoint: 127.0.0.1:{port}\n")
    code, body = health(port)
    assert (code, body["status"], body["receivers"]) == (200, "ready", "capturing")
    assert get(port, "/livez") == (200, "alive")
    r.stop()


def test_not_ready_while_an_exporter_fails(ridley):
    port, dead = free_port(), free_port()
    r = ridley(extensions=f"  health_check:\n    endpoint: 127.0.0.1:{port}\n",
               exporters=f"  otlp:\n    endpoint: 127.0.0.1:{dead}\n    tls: {{insecure: true}}\n",
               pipelines={"metrics": ["file", "otlp"]})
    deadline = time.monotonic() + 30
    while True:
        code, body = health(port)
        if code == 503:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
    assert body == {"status": "not ready", "receivers": "capturing", "capture_problems": [],
                    "exporters": {"otlp/metrics": "failing"}}
    assert get(port, "/livez")[0] == 200, "alive all the same"
    r.stop()


def test_idle_and_slow_clients_cannot_exhaust_the_health_endpoint(ridley, peers):
    """300 connections that never send a request: at most 64 are held, each for at most
    the 5 s header timeout; capture goes on, and the endpoint answers afterwards."""
    port = free_port()
    r = ridley(extensions=f"  health_check:\n    endpoint: 127.0.0.1:{port}\n")
    idle = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        idle.append(s)

    def closed_by_server(s):
        # One non-blocking peek per socket: the whole check takes microseconds, so it
        # cannot run into the header timeout it is measuring.
        s.setblocking(False)
        try:
            return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True

    time.sleep(1.0)
    held = [s for s in idle if not closed_by_server(s)]
    assert len(held) == 64, f"{len(held)} idle connections held, the limit is 64"
    # Past the header read timeout every idle connection is closed.
    time.sleep(5.5)
    assert [s for s in held if not closed_by_server(s)] == []
    for s in idle:
        s.close()
    assert get(port, "/livez") == (200, "alive")
    peers.server("a", A4, 8701, reply=3)
    assert peers.connect("b", A4, 8701, send=5, count=2) == ["received 3"] * 2
    final = r.stop()
    link = final.link(B4, A4, 8701)
    assert (link["opened"], link["transmit"], link["receive"]) == (2, 10, 6)
    # Every connection past the limit is counted where it was refused.
    refused = {a["listener"]: v for a, v in final.all_points("ridley.listener.refused")}
    assert refused == {"health_check": 300 - 64}


def test_partial_capture_is_said_counted_and_fails_readiness(ridley, peers):
    """Without CAP_SYS_ADMIN the pods' network namespaces cannot be entered: a WARN
    names what is missing, the walk counts what it skipped, readiness fails, and closed
    connections (seen by the tracepoint in every namespace) are still exact."""
    port = free_port()
    no_sys_admin = ("setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--")
    r = ridley(extensions=f"  health_check:\n    endpoint: 127.0.0.1:{port}\n",
               command_prefix=no_sys_admin)
    code, body = health(port)
    assert (code, body["status"], body["receivers"]) == (503, "not ready", "partial")
    assert any(p.startswith("CAP_SYS_ADMIN is missing") for p in body["capture_problems"]), body
    log = r.log_path.read_text()
    assert "capture will be partial: CAP_SYS_ADMIN is missing" in log
    assert "capture is partial: network namespaces could not be walked" in log
    peers.server("a", A4, 8702, reply=4)
    assert peers.connect("b", A4, 8702, send=6, count=3) == ["received 4"] * 3
    final = r.stop()
    link = final.link(B4, A4, 8702)
    assert (link["opened"], link["transmit"], link["receive"]) == (3, 18, 12)
    assert final.losses()["namespace_skipped"] > 0
    assert final.losses()["close_lost"] == 0


def test_partial_capture_can_be_accepted(ridley):
    port = free_port()
    no_sys_admin = ("setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--")
    r = ridley(extensions=f"  health_check:\n    endpoint: 127.0.0.1:{port}\n",
               receiver_extra="    allow_partial_capture: true\n", command_prefix=no_sys_admin)
    code, body = health(port)
    assert (code, body["status"], body["receivers"]) == (200, "ready", "partial")
    assert body["capture_problems"], body
    r.stop()
