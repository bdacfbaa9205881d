"""The health_check extension reflects whether capture runs and exporters deliver."""
import json
import time
import urllib.error
import urllib.request

from conftest import free_port


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
    assert body == {"status": "not ready", "receivers": "capturing",
                    "exporters": {"otlp/metrics": "failing"}}
    assert get(port, "/livez")[0] == 200, "alive all the same"
    r.stop()
