"""ridley as users run it: the image (the Dockerfile's `prebuilt` target around the binary
this suite built), run by podman with exactly the DaemonSet's security context, read from
the manifest itself so that the two cannot drift: the capabilities it adds (all others
dropped), the host PID namespace, a read-only root filesystem and its hostPath mounts.
Inside, it captures links across network namespaces with exact bytes, serves
health_check in its own network namespace and stops cleanly on SIGTERM."""
import json
import os
import pathlib
import shutil
import subprocess
import time
import urllib.request

import pytest
import yaml

from conftest import HOSTS, ON_CI, ROOT, RIDLEY, batches_of, ns, sh

A4, _ = HOSTS["a"]
B4, _ = HOSTS["b"]
IMAGE = "localhost/ridley:test"
BASE = "debian:bookworm-slim"
# This machine's limits: podman's defaults exceed the sandbox's hard limits.
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
MANIFEST = ROOT / "examples" / "otel-collector" / "kubernetes" / "ridley.yaml"


def podman(*args, check=True, timeout=300):
    return subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True,
                          check=check, timeout=timeout)


@pytest.fixture(scope="module")
def image(kernel, tmp_path_factory):
    if shutil.which("podman") is None or shutil.which("runc") is None:
        reason = "podman and runc are not installed (scripts/setup.sh installs them)"
        if ON_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    if podman("image", "exists", BASE, check=False).returncode != 0:
        # No registry here: the same base, made locally (scripts/base-image.sh).
        sh("bash", str(ROOT / "scripts" / "base-image.sh"))
    context = tmp_path_factory.mktemp("image")
    sh("strip", "-o", str(context / "ridley"), str(RIDLEY))
    podman("build", *LIMITS, "--target", "prebuilt", "-f", str(ROOT / "Dockerfile"), "-t", IMAGE,
           str(context))
    return IMAGE


def daemonset_flags():
    """The DaemonSet's pod and container security settings as podman flags."""
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sc = container["securityContext"]
    flags = ["--cap-drop", "all"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    for cap in sc["capabilities"]["add"]:
        flags += ["--cap-add", cap]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    flags.append("--security-opt=no-new-privileges")
    # AppArmor, where the node has it: the manifest's profile, as the kubelet would set it
    # (this kernel has no AppArmor, so the flag is accepted and changes nothing here).
    apparmor = sc.get("appArmorProfile", {}).get("type")
    assert apparmor in (None, "Unconfined", "RuntimeDefault"), apparmor
    if apparmor == "Unconfined":
        flags.append("--security-opt=apparmor=unconfined")
    if sc.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    if pod.get("hostPID"):
        flags += ["--pid", "host"]
    # A pod network namespace of its own, as a pod without hostNetwork has.
    flags += ["--network", "none"] if not pod.get("hostNetwork") else ["--network", "host"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        source = volumes[mount["name"]]
        if "hostPath" not in source:
            continue  # the ConfigMap: the test mounts its own config at the same path
        path = source["hostPath"]["path"]
        os.makedirs(path, exist_ok=True)  # DirectoryOrCreate
        mode = "ro" if mount.get("readOnly") else "rw"
        flags += ["-v", f"{path}:{mount['mountPath']}:{mode}"]
    env = {e["name"]: e.get("value", "") for e in container.get("env", []) if "value" in e}
    return flags, container["args"], env


def test_the_daemonset_security_context_captures_exactly_in_a_container(image, peers, tmp_path):
    flags, args, _ = daemonset_flags()
    assert args == ["run", "--config", "/etc/ridley/ridley.yaml"]
    config_dir, out = tmp_path / "config", tmp_path / "out"
    config_dir.mkdir()
    out.mkdir()
    (config_dir / "ridley.yaml").write_text(
        "extensions:\n  health_check:\n    endpoint: 127.0.0.1:13133\n"
        "receivers:\n  ebpf:\n    collection_interval: 1s\n"
        "exporters:\n  file:\n    path: /out/metrics.jsonl\n"
        "service:\n  extensions: [health_check]\n"
        "  pipelines:\n    metrics:\n      receivers: [ebpf]\n      exporters: [file]\n")
    name = f"ridley-test-{os.getpid()}"
    podman("rm", "-f", name, check=False)
    podman("run", "-d", "--name", name, *LIMITS, *flags,
           "-v", f"{config_dir}:/etc/ridley:ro", "-v", f"{out}:/out:rw", image, *args)
    try:
        deadline = time.monotonic() + 60
        while "capture started" not in podman("logs", name).stderr:
            state = podman("inspect", "-f", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", podman("logs", name).stderr
            assert time.monotonic() < deadline, podman("logs", name).stderr
            time.sleep(0.2)
        logs = podman("logs", name).stderr
        assert "capture will be partial" not in logs, logs
        # The host's cgroup tree through the manifest's mount, not the container's own.
        assert "cgroup paths from /host/sys/fs/cgroup" in logs, logs
        assert "\x1b[" not in logs, "no colour codes when stderr is not a terminal"

        # health_check, in the container's own network namespace (as the kubelet probes it).
        pid = podman("inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
        probe = subprocess.run(
            ["nsenter", "-t", pid, "-n", "python3", "-c",
             "import urllib.request,sys; r=urllib.request.urlopen('http://127.0.0.1:13133/', timeout=5);"
             "sys.stdout.write(str(r.status)+' '+r.read().decode())"],
            capture_output=True, text=True, timeout=30)
        code, body = probe.stdout.split(" ", 1)
        assert (code, json.loads(body)["status"]) == ("200", "ready"), probe.stderr

        peers.server("a", A4, 9100, reply=300)
        assert peers.connect("b", A4, 9100, send=1234, count=3) == ["received 300"] * 3
        # A Service address DNAT'd in the client's namespace: with the manifest's
        # capabilities conntrack is readable, and the link names the backend.
        sh("ip", "-n", ns("b"), "route", "add", "10.96.0.0/16", "dev", "eth0")
        nft = ["ip", "netns", "exec", ns("b"), "nft"]
        sh(*nft, "add table ip rdlt-ct; add chain ip rdlt-ct out { type nat hook output priority -100; };"
                 f" add rule ip rdlt-ct out ip daddr 10.96.0.30 tcp dport 80 dnat to {A4}:9101")
        peers.server("a", A4, 9101, reply=50)
        try:
            assert peers.connect("b", "10.96.0.30", 80, send=10, count=2) == ["received 50"] * 2
        finally:
            sh(*nft, "delete table ip rdlt-ct", check=False)
            sh("ip", "-n", ns("b"), "route", "del", "10.96.0.0/16", check=False)
        time.sleep(0.3)
        stopped = podman("stop", "-t", "30", name, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert podman("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0", \
            podman("logs", name).stderr
        assert "SIGTERM: flushing and stopping" in podman("logs", name).stderr
        lines = (out / "metrics.jsonl").read_text().split("\n")[:-1]
        final = batches_of([json.loads(line) for line in lines])[-1]
        link = final.link(B4, A4, 9100)
        assert (link["opened"], link["transmit"], link["receive"], link["failed"]) == (3, 3702, 900, {})
        assert "conntrack lookups" not in podman("logs", name).stderr
        assert [l for l in final.links() if l[0] == B4] == [(B4, A4, 9100), (B4, A4, 9101)]
        backend = final.link(B4, A4, 9101)
        assert (backend["opened"], backend["transmit"], backend["receive"]) == (2, 20, 100)
    finally:
        podman("rm", "-f", name, check=False)
