"""Every configuration `validate` accepts must run: generated configs, with values at
and beyond every bound, either start (and stop cleanly) or fail with a message; none
panics. A fixed seed keeps the run repeatable; each case is printed on failure."""
import random
import signal
import subprocess
import time

from conftest import RIDLEY, free_port

DURATIONS = ["1ns", "50ms", "100ms", "1s", "59m", "1h", "2h", "7d", "8d", "0s",
             "10000000000000000000s", "18446744073709551615s"]
SIZES = ["0", "4095", "4096", "65536", "64KiB", "3MiB", "64MiB", "1GiB", "2GiB", "-1",
         "18446744073709551615"]
NUMBERS = ["0", "1", "2", "1000", "1001", "4194304", "4194305", "4294967295", "-1",
           "18446744073709551616"]
FLOATS = ["0", "0.5", "1", "1.5", "10", "11", "-1", "1e30", ".nan"]


def generated(rng, workdir):
    pick = rng.choice
    ebpf = {
        "collection_interval": pick(DURATIONS),
        "idle_timeout": pick(DURATIONS),
        "max_connections": pick(NUMBERS),
        "ring_buffer_size": pick(SIZES),
        "span_pairs_per_link": pick(NUMBERS),
        "max_links": pick(NUMBERS),
    }
    otlp = {
        "timeout": pick(DURATIONS),
        "max_request_size": pick(SIZES),
        "retry_on_failure": {
            "initial_interval": pick(DURATIONS), "max_interval": pick(DURATIONS),
            "max_elapsed_time": pick(DURATIONS), "multiplier": pick(FLOATS),
            "randomization_factor": pick(FLOATS),
        },
        "sending_queue": {"queue_size": pick(NUMBERS), "max_bytes": pick(SIZES)},
    }
    # Keep each case to a few keys, so that valid ones come up often.
    ebpf = dict(rng.sample(sorted(ebpf.items()), rng.randint(0, 3)))
    otlp_keys = rng.sample(sorted(otlp), rng.randint(0, 2))
    lines = ["receivers:", "  ebpf:" + ("" if ebpf else " {}")]
    lines += [f"    {k}: {v}" for k, v in ebpf.items()]
    lines += ["exporters:", f"  file:\n    path: {workdir / 'out.jsonl'}",
              f"  otlp:\n    endpoint: 127.0.0.1:{free_port()}\n    tls: {{insecure: true}}"]
    for key in otlp_keys:
        value = otlp[key]
        if isinstance(value, dict):
            lines.append(f"    {key}:")
            lines += [f"      {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"    {key}: {value}")
    lines += ["service:", "  pipelines:", "    metrics:", "      receivers: [ebpf]",
              "      exporters: [file, otlp]"]
    return "\n".join(lines) + "\n"


def test_generated_configs_run_or_fail_with_a_message(tmp_path, network):
    rng = random.Random(20261122)
    outcomes = {"invalid": 0, "ran": 0, "failed at start": 0}
    for case in range(60):
        text = generated(rng, tmp_path)
        path = tmp_path / f"case{case}.yaml"
        path.write_text(text)
        check = subprocess.run([str(RIDLEY), "validate", "--config", str(path)],
                               capture_output=True, text=True, timeout=30)
        assert "panicked" not in check.stderr, f"{text}\n{check.stderr}"
        if check.returncode != 0:
            assert check.stderr.startswith("error: "), f"{text}\n{check.stderr}"
            outcomes["invalid"] += 1
            continue
        log = tmp_path / f"case{case}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([str(RIDLEY), "run", "--config", str(path)],
                                    stdout=subprocess.DEVNULL, stderr=out)
        deadline = time.monotonic() + 20
        while proc.poll() is None and "capture started" not in log.read_text():
            assert time.monotonic() < deadline, f"{text}\n{log.read_text()}"
            time.sleep(0.05)
        if proc.poll() is None:
            time.sleep(0.5)
            assert proc.poll() is None, f"{text}\n{log.read_text()}"
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            outcomes["ran"] += 1
        else:
            outcomes["failed at start"] += 1
        stderr = log.read_text()
        assert "panicked" not in stderr, f"{text}\n{stderr}"
        assert proc.returncode == 0 or "error: " in stderr, f"{text}\n{stderr}"
    print(outcomes)
    # Both sides of the boundary were exercised.
    assert outcomes["invalid"] >= 5 and outcomes["ran"] >= 5, outcomes
