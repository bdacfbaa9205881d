"""`ridley validate` and `ridley config --print`: realistic mistakes are caught before
anything starts, with the file, line, column, key path, what was expected and what was
found. These run the real binary; they need no root."""
import os
import subprocess
import time

import pytest

from conftest import RIDLEY

BASE = """receivers:
  ebpf:
    collection_interval: 5s
exporters:
  debug:
service:
  pipelines:
    metrics:
      receivers: [ebpf]
      exporters: [debug]
"""


@pytest.fixture(autouse=True)
def kernel():
    """Overrides the end-to-end suite's kernel check: validation touches no kernel."""
    assert RIDLEY.exists(), f"{RIDLEY} is not built"


def validate(tmp_path, *texts, env=None, timeout=10):
    paths = []
    for i, text in enumerate(texts):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        paths += ["--config", str(path)]
    proc = subprocess.run([str(RIDLEY), "validate", *paths], capture_output=True, text=True,
                          env={**os.environ, **(env or {}), "NO_COLOR": "1"}, cwd=tmp_path, timeout=timeout)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def error_of(tmp_path, text, **kw):
    code, out = validate(tmp_path, text, **kw)
    assert code == 1, out
    (line,) = [l for l in out.splitlines() if l.startswith("error: ")]
    return line.removeprefix("error: ").replace(str(tmp_path) + "/", "")


def test_the_embedded_default_and_a_good_config_are_valid(tmp_path):
    out = subprocess.run([str(RIDLEY), "validate"], capture_output=True, text=True)
    assert out.returncode == 0 and "embedded default config: valid (1 pipelines, 1 receivers)" in out.stdout
    code, out = validate(tmp_path, BASE)
    assert code == 0, out


MISTAKES = [
    ("typo in a key", BASE.replace("collection_interval", "colection_interval"),
     "c0.yaml:3:5: receivers.ebpf.colection_interval: unknown field `colection_interval`, expected one of "
     "`collection_interval`, `idle_timeout`, `max_connections`, `ring_buffer_size`, `span_pairs_per_link`, "
     "`max_links`, `group_public_clients`, `keep_client_ranges`, "
     "`udp_links`, `max_udp_flows`, `allow_partial_capture`, `conntrack`, `socket_state` (did you mean `collection_interval`?)"),
    ("typo in a top-level key", BASE.replace("exporters:\n  debug", "exporter:\n  debug"),
     "c0.yaml:4:1: exporter: unknown field `exporter`, expected one of `extensions`, `receivers`, `processors`, `exporters`, "
     "`service` (did you mean `exporters`?)"),
    ("bad duration", BASE.replace("5s", "5 parsecs"),
     "c0.yaml:3:5: receivers.ebpf.collection_interval: invalid value: string \"5 parsecs\", expected a duration"),
    ("wrong type", BASE.replace("collection_interval: 5s", "max_connections: lots"),
     "c0.yaml:3:5: receivers.ebpf.max_connections: invalid type: string \"lots\", expected u32"),
    ("the receiver's old service-graph switch", BASE.replace("5s", "5s\n    service_graph_metrics: true"),
     "c0.yaml:4:5: receivers.ebpf.service_graph_metrics: the service graph is a processor of its own now: "
     "remove this key and list the `servicegraph` processor (after k8sattributes) in a metrics pipeline"),
    ("the service graph in a traces pipeline",
     BASE.replace("exporters:\n  debug:", "processors:\n  servicegraph:\nexporters:\n  debug:")
         .replace("    metrics:", "    traces:").replace("      exporters: [debug]", "      processors: [servicegraph]\n      exporters: [debug]"),
     "c0.yaml:5:3: processors.servicegraph: cannot be used in a traces pipeline (it supports metrics)"),
    ("undefined exporter in a pipeline", BASE.replace("exporters: [debug]", "exporters: [debug, otlp]"),
     "c0.yaml:10:7: service.pipelines.metrics.exporters: \"otlp\" is not defined under `exporters`"),
    ("missing env var", BASE.replace("5s", "${env:RIDLEY_TEST_NOT_SET}"),
     "c0.yaml:3:5: receivers.ebpf.collection_interval: ${env:RIDLEY_TEST_NOT_SET}: environment variable "
     "RIDLEY_TEST_NOT_SET is not set (give a default with ${env:RIDLEY_TEST_NOT_SET:-value})"),
    ("unreadable file reference", BASE.replace("5s", "${file:/nonexistent/interval}"),
     "c0.yaml:3:5: receivers.ebpf.collection_interval: ${file:/nonexistent/interval}: cannot read "
     "/nonexistent/interval: No such file or directory (os error 2)"),
    ("duplicate pipeline", BASE + "    metrics:\n      receivers: [ebpf]\n      exporters: [debug]\n",
     "c0.yaml:8:5: not valid YAML: service.pipelines: duplicate entry with key \"metrics\""),
    ("unknown component type", BASE.replace("  debug:", "  kafka:").replace("[debug]", "[kafka]"),
     "c0.yaml:5:3: in pipeline metrics: exporters.kafka: unknown exporters type \"kafka\" (available: debug, "
     "file, otlp, otlphttp, otlp_grpc, otlp_http, prometheus)"),
    ("exporter in a pipeline of the wrong signal", BASE.replace("  debug:", "  prometheus:").replace(
        "    metrics:\n      receivers: [ebpf]\n      exporters: [debug]", "    traces:\n      receivers: [ebpf]\n"
        "      exporters: [prometheus]"),
     "c0.yaml:5:3: in pipeline traces: exporters.prometheus: cannot be used in a traces pipeline (it supports metrics)"),
    ("otlphttp endpoint without a scheme", BASE.replace("  debug:", "  otlphttp:\n    endpoint: collector:4318")
     .replace("[debug]", "[otlphttp]"),
     "c0.yaml:5:3: in pipeline metrics: exporters.otlphttp: \"collector:4318/v1/metrics\": an otlphttp endpoint "
     "is a URL (http:// or https://)"),
    ("a nested setting out of range", BASE.replace("  debug:", "  otlp:\n    endpoint: collector:4317\n"
                                                   "    retry_on_failure:\n      multiplier: 0.5")
     .replace("[debug]", "[otlp]"),
     "c0.yaml:8:7: in pipeline metrics: exporters.otlp.retry_on_failure.multiplier: must be from 1 to 10, got 0.5"),
    ("ring buffer not a power of two", BASE.replace("collection_interval: 5s", "ring_buffer_size: 100000"),
     "c0.yaml:3:5: receivers.ebpf.ring_buffer_size: must be a power of two from 4096 bytes to 1GiB, got 100000"),
    ("invalid YAML", BASE.replace("receivers: [ebpf]", "receivers: [ebpf"),
     None),
    ("bad CIDR in external names", BASE.replace("exporters:\n  debug:", "processors:\n  k8sattributes:\n"
     "    external_names: [{cidr: 10.0.0.0/33, name: x}]\nexporters:\n  debug:").replace(
        "      exporters: [debug]", "      processors: [k8sattributes]\n      exporters: [debug]"),
     "c0.yaml:6:5: processors.k8sattributes.external_names: \"10.0.0.0/33\" is not a CIDR: invalid IP address syntax"),
]


@pytest.mark.parametrize("name,text,expected", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistakes_are_reported_with_where_and_why(tmp_path, name, text, expected):
    message = error_of(tmp_path, text)
    if expected is None:
        assert message.startswith("c0.yaml:") and "not valid YAML" in message, message
    else:
        assert message == expected


def test_missing_config_file(tmp_path):
    proc = subprocess.run([str(RIDLEY), "validate", "--config", "nope.yaml"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: reading nope.yaml: No such file or directory (os error 2)"


def test_files_merge_in_order_and_references_expand(tmp_path):
    override = "exporters:\n  debug:\n    verbosity: basic\nreceivers:\n  ebpf:\n    collection_interval: ${env:RIDLEY_TEST_INTERVAL:-7s}\n"
    (tmp_path / "a.yaml").write_text(BASE)
    (tmp_path / "b.yaml").write_text(override)
    out = subprocess.run([str(RIDLEY), "config", "--print", "--config", "a.yaml", "--config", "b.yaml"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "RIDLEY_TEST_INTERVAL": "3s"})
    assert out.returncode == 0, out.stderr
    assert "collection_interval: 3s" in out.stdout
    assert "verbosity: basic" in out.stdout
    code, msg = validate(tmp_path, BASE, override)
    assert code == 0, msg


def test_components_lists_types_signals_and_keys():
    out = subprocess.run([str(RIDLEY), "components"], capture_output=True, text=True)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert "exporter   prometheus     [metrics]" in lines
    assert any(l.strip() == "keys: path" for l in lines)
    assert any(l.strip().startswith("keys: collection_interval, idle_timeout") for l in lines)


def test_help_describes_every_command():
    out = subprocess.run([str(RIDLEY), "--help"], capture_output=True, text=True).stdout
    for command in ("run", "validate", "config", "components"):
        assert f"  {command}" in out
        sub = subprocess.run([str(RIDLEY), command, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "Usage: ridley " + command in sub.stdout


def test_sizes_and_telemetry_levels(tmp_path):
    text = BASE.replace("collection_interval: 5s", "ring_buffer_size: 512KiB") + (
        "  telemetry:\n    logs: {level: warn}\n    metrics: {level: none}\n")
    code, out = validate(tmp_path, text)
    assert code == 0, out
    message = error_of(tmp_path, BASE.replace("collection_interval: 5s", "ring_buffer_size: 5 parsecs"))
    assert message == ('c0.yaml:3:5: receivers.ebpf.ring_buffer_size: "5 parsecs": unknown size unit '
                       '"parsecs" (B, KiB, MiB, GiB, KB, MB, GB)')


def validate_file(tmp_path, name):
    """`ridley validate --config NAME` in tmp_path; a few seconds at most, whatever NAME is."""
    proc = subprocess.run([str(RIDLEY), "validate", "--config", name], capture_output=True, text=True,
                          cwd=tmp_path, timeout=5)
    return proc.returncode, proc.stderr.strip()


def test_only_regular_files_are_read(tmp_path):
    # A FIFO with no writer: opening it for reading used to wait forever.
    os.mkfifo(tmp_path / "fifo")
    assert validate_file(tmp_path, "fifo") == (1, "error: reading fifo: not a regular file (it is a FIFO)")
    assert validate_file(tmp_path, "/dev/zero") == (
        1, "error: reading /dev/zero: not a regular file (it is a character device)")
    (tmp_path / "dir").mkdir()
    assert validate_file(tmp_path, "dir") == (1, "error: reading dir: not a regular file (it is a directory)")
    # The same for ${file:...}: /dev/zero used to be read until memory ran out.
    for name, kind in [("fifo", "a FIFO"), ("/dev/zero", "a character device"), ("dir", "a directory")]:
        message = error_of(tmp_path, BASE.replace("5s", "${file:%s}" % name), timeout=5)
        assert message == (f"c0.yaml:3:5: receivers.ebpf.collection_interval: ${{file:{name}}}: cannot read "
                           f"{name}: not a regular file (it is {kind})")


def test_oversized_files_are_refused(tmp_path):
    limit = 4 << 20
    padding = "#" * (limit - len(BASE))
    code, out = validate(tmp_path, BASE + padding)
    assert code == 0, out
    message = error_of(tmp_path, BASE + padding + "\n")
    assert message == "reading c0.yaml: larger than the 4 MiB limit for a config file"
    (tmp_path / "interval").write_text("5s" + " " * ((1 << 20) - 2))
    code, out = validate(tmp_path, BASE.replace("5s", "${file:interval}"))
    assert code == 0, out
    (tmp_path / "interval").write_text("5s" + " " * ((1 << 20) - 1))
    message = error_of(tmp_path, BASE.replace("5s", "${file:interval}"))
    assert message == ("c0.yaml:3:5: receivers.ebpf.collection_interval: ${file:interval}: cannot read interval: "
                       "larger than the 1 MiB limit for a referenced file")


def test_deep_nesting_is_refused_quickly(tmp_path):
    block = "".join("  " * i + "a:\n" for i in range(200))
    # 600 KB of nested flow mappings took the YAML parser minutes.
    flow = "receivers: " + "{a: " * 150_000
    for text, where in [(block, "c0.yaml:65:129"), (flow, "c0.yaml:1:264")]:
        started = time.monotonic()
        message = error_of(tmp_path, text)
        assert time.monotonic() - started < 2
        assert message == f"{where}: YAML nested more than 64 levels deep (the limit for a config file)"
    # 64 levels are fine as far as nesting goes: the next complaint is about the content.
    at_limit = "".join("  " * i + "a:\n" for i in range(64))
    assert error_of(tmp_path, at_limit).startswith("c0.yaml:1:1: a: unknown field `a`")


SECRETS = """receivers:
  ebpf:
    collection_interval: 5s
processors:
  k8sattributes:
    keep_pod_detail: true
exporters:
  otlphttp:
    endpoint: https://collector.example:4318
    headers:
      Authorization: Bearer ${env:RIDLEY_TEST_TOKEN}
      X-Scope-OrgID: tenant-1
    tls:
      cert_file: /etc/ridley/client.crt
      key_file: /etc/ridley/client.key
service:
  pipelines:
    metrics:
      receivers: [ebpf]
      processors: [k8sattributes]
      exporters: [otlphttp]
"""


def print_config(tmp_path, *flags):
    (tmp_path / "c.yaml").write_text(SECRETS)
    proc = subprocess.run([str(RIDLEY), "config", "--print", *flags, "--config", "c.yaml"], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "RIDLEY_TEST_TOKEN": "s3cr3t"}, timeout=10)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_print_redacts_secrets_unless_asked(tmp_path):
    redacted = SECRETS.replace("Bearer ${env:RIDLEY_TEST_TOKEN}", "'[REDACTED]'").replace(
        "tenant-1", "'[REDACTED]'").replace(" [ebpf]", "\n      - ebpf").replace(
        " [k8sattributes]", "\n      - k8sattributes").replace(" [otlphttp]", "\n      - otlphttp")
    assert print_config(tmp_path) == redacted
    full = print_config(tmp_path, "--no-redact")
    assert "      Authorization: Bearer s3cr3t\n      X-Scope-OrgID: tenant-1\n" in full
    assert full.replace("Bearer s3cr3t", "'[REDACTED]'").replace("tenant-1", "'[REDACTED]'") == redacted


def test_validate_opens_nothing_and_run_stops_before_capture_on_a_port_in_use(tmp_path):
    """Building components has no side effects: `validate` accepts a config whose port is
    taken (it binds nothing); `run` fails at start, naming the key, before any capture."""
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    text = BASE.replace("exporters:\n  debug:",
                        f"extensions:\n  health_check:\n    endpoint: 127.0.0.1:{port}\n"
                        "exporters:\n  debug:") + "  extensions: [health_check]\n"
    code, out = validate(tmp_path, text)
    assert code == 0, out
    proc = subprocess.run([str(RIDLEY), "run", "--config", str(tmp_path / "c0.yaml")],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "NO_COLOR": "1"})
    taken.close()
    assert proc.returncode == 1, proc.stderr
    assert (f"error: starting extensions.health_check: extensions.health_check.endpoint: "
            f"listening on 127.0.0.1:{port}: Address already in use") in proc.stderr, proc.stderr
    assert "capture started" not in proc.stderr


def test_the_collectors_current_exporter_names_are_accepted(tmp_path):
    text = BASE.replace("  debug:", "  otlp_grpc:\n    endpoint: collector:4317\n"
                        "  otlp_http/backup:\n    endpoint: http://collector:4318").replace(
        "[debug]", "[otlp_grpc, otlp_http/backup]")
    code, out = validate(tmp_path, text)
    assert code == 0, out


@pytest.mark.parametrize("encoding", ["console", "json"])
def test_logs_are_plain_text_off_a_terminal_or_json(tmp_path, encoding):
    """Logs to a pipe carry no colour codes (even without NO_COLOR); `json` writes one
    object per line with the level and message."""
    import json
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = tmp_path / "logs.yaml"
    config.write_text(BASE.replace("exporters:\n  debug:",
                                   f"extensions:\n  health_check:\n    endpoint: 127.0.0.1:{port}\n"
                                   "exporters:\n  debug:")
                      + f"  extensions: [health_check]\n  telemetry:\n    logs: {{encoding: {encoding}}}\n")
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    proc = subprocess.run([str(RIDLEY), "run", "--config", str(config)], capture_output=True,
                          text=True, timeout=30, env=env)
    taken.close()
    assert proc.returncode == 1, proc.stderr
    assert "\x1b[" not in proc.stderr
    log_lines = [line for line in proc.stderr.splitlines() if not line.startswith("error: ")]
    starting = [line for line in log_lines if "starting (one instance per component id)" in line]
    assert len(starting) == 1, proc.stderr
    if encoding == "json":
        record = json.loads(starting[0])
        assert record["level"] == "INFO"
        assert record["fields"]["message"] == "starting (one instance per component id)"
        assert all(json.loads(line) for line in log_lines)
    else:
        assert " INFO " in starting[0]


def test_shutdown_timeout_is_bounded(tmp_path):
    assert error_of(tmp_path, BASE + "  shutdown_timeout: 1h\n") == (
        "c0.yaml:11:3: service.shutdown_timeout: must be from 100ms to 5m, got 1h")
    code, out = validate(tmp_path, BASE + "  shutdown_timeout: 20s\n")
    assert code == 0, out


def test_tls_files_are_regular_files_only(tmp_path):
    """A FIFO given as `tls.ca_file` is refused at once, not waited on."""
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    text = BASE.replace("  debug:", f"  otlp:\n    endpoint: https://collector:4317\n"
                        f"    tls: {{ca_file: {fifo}}}").replace("[debug]", "[otlp]")
    message = error_of(tmp_path, text, timeout=5)
    assert "tls.ca_file: reading" in message and "not a regular file (it is a FIFO)" in message, message
