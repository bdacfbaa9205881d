#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test ridley:
# Debian's rustc-web (with a prebuilt `core` for bpfel-unknown-none), bpf-linker built
# against the same LLVM, iproute2 for test network namespaces, and the Python test peers.
# Idempotent: each step checks first, so a second run takes a second or two.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

need_apt=()
[ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/bpfel-unknown-none ] || need_apt+=(rustc-web cargo-web libstd-rust-web-dev-bpf)
[ -e /usr/lib/x86_64-linux-gnu/libLLVM.so.22.1 ] || need_apt+=(libllvm22)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v bpftool >/dev/null || need_apt+=(bpftool)
command -v nft >/dev/null || need_apt+=(nftables)
# Containers: the image test runs the DaemonSet's security context under podman + runc
# (Debian's default crun does not handle this host kind's hybrid cgroups).
command -v podman >/dev/null || need_apt+=(podman)
command -v runc >/dev/null || need_apt+=(runc)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
# kubectl renders the examples' kustomization offline.
command -v kubectl >/dev/null || need_apt+=(kubernetes-client)
# Prometheus and promtool: what Prometheus reads is tested with Prometheus itself.
command -v promtool >/dev/null || need_apt+=(prometheus)
# An older kernel (Debian 11's 5.10) runs in QEMU from an initramfs built with busybox.
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# bpf-linker must link with the same LLVM major as Debian's rustc-web (22).
if ! bpf-linker --version 2>/dev/null | grep -q '0.13.0'; then
    log "building bpf-linker 0.13.0 against LLVM 22"
    mkdir -p /opt/llvm22/lib
    ln -sf /usr/lib/x86_64-linux-gnu/libLLVM.so.22.1 /opt/llvm22/lib/libLLVM.so
    LLVM_PREFIX=/opt/llvm22 cargo install --locked bpf-linker@0.13.0 \
        --no-default-features --features llvm-22 --quiet
fi

# Python peers for the end-to-end tests: pytest, a real collector (rotel) and the
# official OTLP protobuf definitions for the sink behind it.
# zstandard decodes zstd request bodies (rotel accepts gzip only); Grafana's typed
# dashboard models (grafana-foundation-sdk, pinned: its API is generated) check the
# dashboard JSON.
if ! python3 -c 'import pytest, rotel, grpc, opentelemetry.proto, prometheus_client, kmock, pytest_asyncio, yaml, kubernetes_validate, zstandard, grafana_foundation_sdk' 2>/dev/null; then
    log "installing the Python test peers"
    python3 -m pip install -q --root-user-action=ignore pytest rotel opentelemetry-proto grpcio prometheus-client kmock pytest-asyncio pyyaml kubernetes-validate zstandard 'grafana-foundation-sdk==1769699998!10.1.0'
fi

# Debian 11's 5.10 kernel image for tests/test_old_kernel.py (pinned by SHA-256).
python3 "$(dirname "$0")/../tests/oldkernel.py" fetch >/dev/null

# Kernel interfaces the daemon and the benchmark use.
[ -d /sys/kernel/tracing/events ] || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
log "ready"
