"""ridley on Linux 5.10 (Debian 11's kernel, the 5.10 of Amazon Linux 2 nodes too), booted
in QEMU from an initramfs (oldkernel.py): the kernel programs load there, per-socket state
goes to the hash table, RLIMIT_MEMLOCK is lifted from a container's 64 KiB, and the
counts are exact; the table and the endpoint table are empty after the traffic."""
import base64
import json

import pytest

import oldkernel
from conftest import ON_CI, RIDLEY, batches_of


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    why = oldkernel.unavailable()
    if why:
        if ON_CI:
            pytest.fail(f"the 5.10 guest cannot run on CI: {why}")
        pytest.skip(why)
    initramfs = tmp_path_factory.mktemp("guest") / "initramfs.cpio"
    oldkernel.build_initramfs(RIDLEY, initramfs)
    return oldkernel.result(oldkernel.boot(initramfs))


def test_the_guest_runs_linux_5_10(guest):
    assert guest["uname"] == oldkernel.KERNEL_RELEASE


def test_it_loads_with_the_state_table_and_a_lifted_memlock_limit(guest):
    log = guest["log"]
    assert "raised RLIMIT_MEMLOCK from 65536 bytes to unlimited" in log, log
    assert "per-socket state: a hash table of at most 131072 sockets" in log, log
    assert "hooks active: tp_btf/inet_sock_set_state, iter/tcp" in log, log
    assert "capture started open_connections=1" in log, log
    # The guest loads no netfilter module: conntrack lookups say why they cannot run,
    # once, and nothing else warns.
    warnings = [line for line in log.splitlines() if " WARN " in line or " ERROR " in line]
    assert len(warnings) == 1 and "conntrack lookups failed (this kernel has no netfilter netlink" \
        in warnings[0], warnings
    assert "conntrack lookups work again" not in log, log
    assert guest["exit_code"] == 0, log


def batches(guest, key="metrics"):
    return batches_of([json.loads(line)
                       for line in base64.b64decode(guest[key]).decode().splitlines()])


def test_counts_are_exact_on_5_10(guest):
    steps = guest["steps"]
    assert steps["servers"] == ["listening"] * 3
    assert steps["short"] == ["received 5"] * 50
    assert steps["refused"] == ["connect failed: [Errno 111] Connection refused"] * 3
    assert steps["released"] == ["received 300"]
    final = batches(guest)[-1]
    lo = "127.0.0.1"
    # Both ends on this host: the client's socket reports, once.
    assert final.links() == [("10.9.0.2", "10.9.0.1", 9100), (lo, lo, 9000), (lo, lo, 9001),
                             (lo, lo, 9002)]
    link = final.link(lo, lo, 9000)
    assert (link["opened"], link["active"], link["transmit"], link["receive"], link["failed"]) == \
        (50, 0, 50 * 7, 50 * 5, {})
    assert (final.link(lo, lo, 9001)["opened"], final.link(lo, lo, 9001)["failed"]) == (0, {"refused": 3})
    # Opened before the daemon: its role from the listener, the bytes from then on
    # (2,500 sent on release, the 300-byte reply), its close from the state the walk gave it.
    link = final.link(lo, lo, 9002)
    assert (link["opened"], link["active"], link["transmit"], link["receive"]) == (0, 0, 2500, 300)
    assert set(final.losses().values()) == {0}, final.losses()


def test_a_pods_connection_is_walked_in_its_namespace_on_5_10(guest):
    """A client in another network namespace, held open: the walks (which enter the
    namespace) report its bytes while it is open; its close completes them."""
    assert guest["steps"]["pod_held"] == "connected"
    assert guest["steps"]["pod_released"] == ["received 11"]
    held = batches(guest, "metrics_while_held")[-1].link("10.9.0.2", "10.9.0.1", 9100)
    assert (held["opened"], held["active"], held["transmit"], held["receive"]) == (1, 1, 400, 0), held
    final = batches(guest)[-1].link("10.9.0.2", "10.9.0.1", 9100)
    assert (final["opened"], final["active"], final["transmit"], final["receive"]) == (1, 0, 1000, 11), final


def test_the_state_table_is_empty_after_the_traffic(guest):
    assert guest["maps_after_traffic"] == {"SOCK_STATES": 0, "CLIENT_ENDPOINT": 0}


def test_the_array_build_asked_for_on_5_10_fails_with_the_reason(guest):
    """Asked for by its old name, `socket_state: storage`, which still means `array`."""
    log = guest["storage_log"]
    assert guest["storage_exit_code"] != 0, log
    assert "per-socket state: an array of 229376 slots keyed by socket cookie" in log, log
    assert "loading tp_btf/inet_sock_set_state (needs BTF-enabled tracepoints and socket cookies in tracing programs and compare-and-exchange, 5.12+" in log, log
