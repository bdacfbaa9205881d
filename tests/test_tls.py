"""TLS to a collector whose certificate is signed by a private, self-signed CA given as
`tls.ca_file`: over gRPC (the official-proto sink with TLS) and over HTTP (a small HTTPS
server), the data arrives."""
import http.server
import json
import ssl
import subprocess
import sys
import threading
import time

import pytest

from conftest import HOSTS, ROOT, free_port, sh

A4, _ = HOSTS["a"]
B4, _ = HOSTS["b"]


def make_ca_and_server_cert(workdir):
    """A self-signed CA and a server certificate it signed, for 127.0.0.1."""
    ca_key, ca_cert = workdir / "ca.key", workdir / "ca.pem"
    key, csr, cert = workdir / "server.key", workdir / "server.csr", workdir / "server.pem"
    ext = workdir / "server.ext"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
       "-subj", "/CN=ridley test CA", "-keyout", str(ca_key), "-out", str(ca_cert),
       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
       "-keyout", str(key), "-out", str(csr))
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
                   "basicConstraints=CA:FALSE\n")
    sh("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
       "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return ca_cert, cert, key


class HttpsSink:
    def __init__(self, cert, key):
        self.port = free_port()
        self.posts = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                sink.posts.append((self.path, len(body)))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def make_self_signed(workdir):
    """A self-signed server certificate as `openssl req -x509` makes it (marked CA)."""
    key, cert = workdir / "self.key", workdir / "self.pem"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
       "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
       "-keyout", str(key), "-out", str(cert))
    return cert, cert, key


@pytest.mark.parametrize("kind", ["private CA", "self-signed server certificate"])
def test_a_certificate_given_as_ca_file_is_trusted(ridley, peers, tmp_path, kind):
    if kind == "private CA":
        ca, cert, key = make_ca_and_server_cert(tmp_path)
    else:
        ca, cert, key = make_self_signed(tmp_path)
    grpc_port, out = free_port(), tmp_path / "tls-sink.jsonl"
    sink = subprocess.Popen([sys.executable, str(ROOT / "tests" / "otlp_sink.py"), "--port", str(grpc_port),
                             "--out", str(out), "--tls-cert", str(cert), "--tls-key", str(key)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    https = HttpsSink(cert, key)
    try:
        assert sink.stdout.readline().strip() == "listening", sink.stderr.read()
        exporters = (
            "  otlp:\n"
            f"    endpoint: https://127.0.0.1:{grpc_port}\n"
            f"    tls: {{ca_file: {ca}}}\n"
            "  otlphttp:\n"
            f"    endpoint: https://127.0.0.1:{https.port}\n"
            f"    tls: {{ca_file: {ca}}}\n"
        )
        r = ridley(exporters=exporters, pipelines={"metrics": ["file", "otlp", "otlphttp"]})
        peers.server("a", A4, 8900, reply=2)
        assert peers.connect("b", A4, 8900, send=3) == ["received 2"]
        r.wait_for(lambda b: (b.link(B4, A4, 8900) or {}).get("opened") == 1)
        r.stop()
        log = r.log_path.read_text()
        assert "export failed" not in log, log
        received = [json.loads(line) for line in out.read_text().splitlines()]
        assert any("resourceMetrics" in doc for doc in received)
        assert https.posts and all(path == "/v1/metrics" for path, _ in https.posts), https.posts
    finally:
        https.stop()
        sink.kill()
        sink.wait()


@pytest.mark.parametrize("tls, delivered", [
    ("{{ca_file: {cert}}}", False),
    ("{{ca_file: {cert}, server_name_override: elsewhere.example}}", True),
    ("{{insecure_skip_verify: true}}", True),
], ids=["refused", "server_name_override", "insecure_skip_verify"])
def test_a_server_certificate_for_another_name(ridley, tmp_path, tls, delivered):
    """Trusting the certificate in ca_file does not trust it for any name; the name can
    be overridden, or verification skipped (said at WARN)."""
    key, cert = tmp_path / "other.key", tmp_path / "other.pem"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
       "-subj", "/CN=elsewhere", "-addext", "subjectAltName=DNS:elsewhere.example",
       "-keyout", str(key), "-out", str(cert))
    https = HttpsSink(cert, key)
    try:
        exporters = (
            "  otlphttp:\n"
            f"    endpoint: https://127.0.0.1:{https.port}\n"
            f"    tls: {tls.format(cert=cert)}\n"
            "    retry_on_failure: {initial_interval: 100ms, max_interval: 200ms}\n"
        )
        r = ridley(exporters=exporters, pipelines={"metrics": ["file", "otlphttp"]})
        deadline = time.monotonic() + 20
        while "export failed" not in r.log_path.read_text() and not https.posts:
            assert time.monotonic() < deadline, r.log_path.read_text()
            time.sleep(0.1)
        r.stop()
        log = r.log_path.read_text()
        if delivered:
            assert https.posts and "export failed" not in log, log
        else:
            assert https.posts == []
            assert "NotValidForName" in log
        assert ("tls.insecure_skip_verify: the collector's certificate is not checked" in log) == (
            "insecure" in tls)
    finally:
        https.stop()
