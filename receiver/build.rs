//! Builds the kernel programs (`receiver-ebpf`, bin `ridley-ebpf`) for bpfel-unknown-none
//! with Debian's rustc-web, whose prebuilt `core` for that target needs no rust-src
//! download, and bpf-linker. `scripts/setup.sh` installs both. The objects (one per
//! per-socket state variant) are embedded in the `ridley` binary.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const BPF_TARGET: &str = "bpfel-unknown-none";
const BPF_RUSTC: &str = "/usr/bin/rustc";
const BPF_CARGO: &str = "/usr/bin/cargo";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("receiver/ lives in the workspace root");
    let ebpf_dir = workspace.join("receiver-ebpf");
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Cargo.toml").display()
    );

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let target_dir = workspace.join("target").join("bpf");
    for tool in [BPF_RUSTC, BPF_CARGO] {
        if !Path::new(tool).exists() {
            panic!(
                "{tool} not found: the kernel programs are built with Debian's rustc-web. \
                 Run `scripts/setup.sh` (or `make test`), which installs it."
            );
        }
    }

    // The programs twice: per-socket state in socket storage (5.11+), and in a hash
    // table for older kernels (feature `socket-table`).
    for (features, object_name) in [
        (None, "ridley-ebpf.o"),
        (Some("socket-table"), "ridley-ebpf-socket-table.o"),
    ] {
        build_programs(workspace, &target_dir, features, &out_dir.join(object_name));
    }
}

fn build_programs(workspace: &Path, target_dir: &Path, features: Option<&str>, output: &Path) {
    let mut cmd = Command::new(BPF_CARGO);
    cmd.current_dir(workspace)
        .args([
            "build",
            "-p",
            "receiver-ebpf",
            "--bin",
            "ridley-ebpf",
            "--release",
        ])
        .args(["--target", BPF_TARGET])
        .args(features.map(|f| ["--features", f]).into_iter().flatten())
        .arg("--target-dir")
        .arg(target_dir)
        .env("RUSTC", BPF_RUSTC)
        // aya-ebpf needs one unstable feature on the bpf target, and the programs one
        // (compare-and-exchange); scoping the bootstrap to those two crates keeps
        // aya-build-style `-Z build-std` (needs rust-src) out.
        .env("RUSTC_BOOTSTRAP", "aya_ebpf,ridley_ebpf")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        );
    // The outer build's settings would leak into the nested one (or deadlock on its lock).
    for var in [
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "CARGO_ENCODED_RUSTFLAGS_OUTER",
    ] {
        cmd.env_remove(var);
    }
    for (key, _) in env::vars() {
        if key.starts_with("CARGO_FEATURE_") || key.starts_with("CARGO_CFG_") {
            cmd.env_remove(key);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("failed to run {BPF_CARGO}: {e}"));
    if !status.success() {
        panic!("building the kernel programs failed ({status}); see the output above");
    }
    let object = target_dir
        .join(BPF_TARGET)
        .join("release")
        .join("ridley-ebpf");
    std::fs::copy(&object, output).unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
}
