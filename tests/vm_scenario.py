"""Runs inside the 5.10 guest (see oldkernel.py): ridley with its default socket state
choice, known traffic on loopback, then the kernel maps and everything ridley wrote,
printed as one JSON document between markers on the console."""
import base64
import json
import os
import signal
import subprocess
import sys
import time

PY = sys.executable
PEER = "/work/peer.py"
CONFIG = """receivers:
  ebpf:
    collection_interval: 1s
exporters:
  file:
    path: /tmp/metrics.jsonl
service:
  pipelines:
    metrics:
      receivers: [ebpf]
      exporters: [file]
"""


def peer(*args, stdin=None, netns=None):
    enter = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    return subprocess.Popen([*enter, PY, PEER, *map(str, args)], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def add_pod():
    """A network namespace with its own address behind a veth pair, as a pod has."""
    for cmd in (["netns", "add", "pod"],
                ["link", "add", "rdv0", "type", "veth", "peer", "name", "rdv1", "netns", "pod"],
                ["addr", "add", "10.9.0.1/24", "dev", "rdv0"],
                ["link", "set", "rdv0", "up"],
                ["-n", "pod", "addr", "add", "10.9.0.2/24", "dev", "rdv1"],
                ["-n", "pod", "link", "set", "rdv1", "up"],
                ["-n", "pod", "link", "set", "lo", "up"]):
        subprocess.run(["/usr/bin/ip", *cmd], check=True, capture_output=True)


def metrics_file():
    try:
        return base64.b64encode(open("/tmp/metrics.jsonl", "rb").read()).decode()
    except OSError:
        return ""


def run_peer(*args):
    proc = peer(*args)
    out, err = proc.communicate(timeout=120)
    return out.splitlines() + ([f"stderr: {err}"] if proc.returncode else [])


def map_entries():
    """{map name: entries} of ridley's hash maps, read with bpftool."""
    shown = json.loads(subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    counts = {}
    for info in shown:
        if info.get("name") in ("SOCK_STATES", "CLIENT_ENDPOINT") and info.get("type") == "hash":
            dump = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(info["id"])],
                                  capture_output=True, text=True, check=True).stdout
            counts[info["name"]] = len(json.loads(dump))
    return counts


def main():
    out = {"uname": os.uname().release, "steps": {}}
    steps = out["steps"]
    with open("/tmp/ridley.yaml", "w") as f:
        f.write(CONFIG)
    add_pod()
    servers = [peer("serve", "--addr", "127.0.0.1", "--port", port, "--reply", reply)
               for port, reply in ((9000, 5), (9002, 300))]
    steps["servers"] = [s.stdout.readline().strip() for s in servers]
    # Opened before the daemon: counted from then on, its close reported.
    held = peer("connect", "--addr", "127.0.0.1", "--port", 9002, "--hold", "--before", 1000,
                "--send", 2500, stdin=subprocess.PIPE)
    steps["held"] = held.stdout.readline().strip()

    log = open("/tmp/ridley.log", "w")
    daemon = subprocess.Popen(["/work/ridley", "run", "--config", "/tmp/ridley.yaml"],
                              stdout=log, stderr=subprocess.STDOUT, env={"NO_COLOR": "1"})
    deadline = time.monotonic() + 60
    while "capture started" not in open("/tmp/ridley.log").read():
        if daemon.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if daemon.poll() is None:
        time.sleep(1.5)  # the first walk gives the held connection its state
        steps["short"] = run_peer("connect", "--addr", "127.0.0.1", "--port", 9000, "--send", 7,
                                  "--count", 50)
        steps["refused"] = run_peer("connect", "--addr", "127.0.0.1", "--port", 9001, "--count", 3)
        # A client in the pod's namespace, held open across walks (which enter it).
        servers.append(peer("serve", "--addr", "10.9.0.1", "--port", 9100, "--reply", 11))
        steps["servers"].append(servers[-1].stdout.readline().strip())
        pod = peer("connect", "--addr", "10.9.0.1", "--port", 9100, "--hold", "--before", 400,
                   "--send", 600, stdin=subprocess.PIPE, netns="pod")
        steps["pod_held"] = pod.stdout.readline().strip()
        time.sleep(2.5)
        out["metrics_while_held"] = metrics_file()
        pod.stdin.write("go\n")
        pod.stdin.flush()
        steps["pod_released"] = pod.communicate(timeout=30)[0].splitlines()
        held.stdin.write("go\n")
        held.stdin.flush()
        steps["released"] = held.communicate(timeout=30)[0].splitlines()
        time.sleep(2.5)  # two walks after the last close
        out["maps_after_traffic"] = map_entries()
        daemon.send_signal(signal.SIGTERM)
        try:
            out["exit_code"] = daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            out["exit_code"] = "killed"
    else:
        out["exit_code"] = daemon.returncode
    for s in servers:
        s.kill()
    out["log"] = open("/tmp/ridley.log").read()
    # The 5.12 build asked for explicitly, by its old name (`storage`, still accepted for
    # `array`): this kernel cannot run it, and says so.
    with open("/tmp/storage.yaml", "w") as f:
        f.write(CONFIG.replace("    collection_interval: 1s\n",
                               "    collection_interval: 1s\n    socket_state: storage\n"))
    storage = subprocess.run(["/work/ridley", "run", "--config", "/tmp/storage.yaml"],
                             capture_output=True, text=True, env={"NO_COLOR": "1"}, timeout=120)
    out["storage_exit_code"] = storage.returncode
    out["storage_log"] = storage.stdout + storage.stderr
    out["metrics"] = metrics_file()
    print("===RIDLEY-VM-RESULT-BEGIN===")
    text = json.dumps(out)
    for i in range(0, len(text), 512):
        print(text[i:i + 512])
    print("===RIDLEY-VM-RESULT-END===", flush=True)


if __name__ == "__main__":
    main()
