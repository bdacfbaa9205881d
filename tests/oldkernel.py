"""Runs ridley on an older kernel than the host's: Debian 11's Linux 5.10 (the kernel of
Debian 11 and of Amazon Linux 2's 5.10 AMIs), booted in QEMU from an initramfs that
holds ridley, the traffic peer, Python and bpftool. The guest runs `vm_scenario.py` and
prints its results on the serial console.

`python3 tests/oldkernel.py fetch` downloads the kernel (pinned by SHA-256) into
target/test-kernel; setup runs it, the tests only read the result."""
import hashlib
import io
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / "target" / "test-kernel"

# Debian 11 (bullseye), its last 5.10 kernel in the main archive: the cloud flavour, as
# cloud nodes run it. Pinned: the archive is frozen, so the hash never changes.
KERNEL_RELEASE = "5.10.0-32-cloud-amd64"
KERNEL_DEB_URL = ("http://deb.debian.org/debian/pool/main/l/linux/"
                  "linux-image-5.10.0-32-cloud-amd64-unsigned_5.10.223-1_amd64.deb")
KERNEL_DEB_SHA256 = "b1fb8d34c26105a2ba1271a3df868a9eea460657df98c77fd08822ef4908c9db"
VMLINUZ = CACHE / f"vmlinuz-{KERNEL_RELEASE}"
# The one module the guest loads: a veth pair between the host namespace and a "pod".
VETH = CACHE / f"veth-{KERNEL_RELEASE}.ko"

BUSYBOX = "/bin/busybox"
QEMU = "qemu-system-x86_64"
BEGIN, END = "===RIDLEY-VM-RESULT-BEGIN===", "===RIDLEY-VM-RESULT-END==="


def fetch():
    """Downloads the kernel package, checks its hash, keeps the kernel image and veth."""
    if VMLINUZ.exists() and VETH.exists():
        return VMLINUZ
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        deb = pathlib.Path(tmp) / "kernel.deb"
        with urllib.request.urlopen(KERNEL_DEB_URL, timeout=300) as response, open(deb, "wb") as out:
            shutil.copyfileobj(response, out)
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        if digest != KERNEL_DEB_SHA256:
            sys.exit(f"{KERNEL_DEB_URL}: SHA-256 {digest}, expected {KERNEL_DEB_SHA256}")
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp + "/x"], check=True)
        shutil.copy(f"{tmp}/x/lib/modules/{KERNEL_RELEASE}/kernel/drivers/net/veth.ko", VETH)
        shutil.copy(f"{tmp}/x/boot/vmlinuz-{KERNEL_RELEASE}", VMLINUZ.with_suffix(".part"))
        VMLINUZ.with_suffix(".part").rename(VMLINUZ)
    return VMLINUZ


def unavailable():
    """Why the guest cannot run here, or None."""
    if not (VMLINUZ.exists() and VETH.exists()):
        return f"{VMLINUZ} or {VETH} missing (python3 tests/oldkernel.py fetch)"
    if shutil.which(QEMU) is None:
        return f"{QEMU} missing (apt-get install qemu-system-x86)"
    if not os.path.exists(BUSYBOX):
        return f"{BUSYBOX} missing (apt-get install busybox-static)"
    return None


class Cpio:
    """An initramfs in the kernel's `newc` cpio format."""

    def __init__(self):
        self.out = io.BytesIO()
        self.ino = 1
        self.seen = set()

    def _entry(self, name, mode, data=b""):
        header = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))
        self.ino += 1
        self.out.write(header.encode() + name.encode() + b"\0")
        self.out.write(b"\0" * (-(110 + len(name) + 1) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def dir(self, path):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            name = "/".join(parts[:i])
            if name and name not in self.seen:
                self.seen.add(name)
                self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, path, data, mode=0o755):
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        if path not in self.seen:
            self.seen.add(path)
            self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path, target):
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self.seen.add(path)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def host_file(self, src, dest=None):
        self.file(dest or src, pathlib.Path(src).read_bytes(), stat.S_IMODE(os.stat(src).st_mode))

    def binary(self, src, dest=None):
        """A dynamically linked executable and the libraries it loads."""
        self.host_file(src, dest)
        for line in subprocess.run(["ldd", src], capture_output=True, text=True, check=True).stdout.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                real = os.path.realpath(m.group(1))
                self.file(m.group(1), pathlib.Path(real).read_bytes())

    def tree(self, src, skip=()):
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = [d for d in dirnames if d not in skip]
            self.dir(dirpath)
            for f in filenames:
                full = os.path.join(dirpath, f)
                if os.path.islink(full):
                    self.symlink(full, os.readlink(full))
                elif os.path.isfile(full):
                    self.host_file(full)

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
insmod /lib/modules/veth.ko
# The memlock limit a container runtime or systemd would give a service.
ulimit -l 64
cd /work && /usr/bin/python3 /work/vm_scenario.py > /dev/ttyS0 2>&1
poweroff -f
"""


def build_initramfs(ridley, dest):
    """The guest's whole filesystem: busybox, a stripped copy of `ridley`, Python's
    standard library, bpftool, iproute2, the veth module, the peer and the scenario."""
    cpio = Cpio()
    for d in ("proc", "sys", "dev", "tmp", "run", "work"):
        cpio.dir(d)
    cpio.host_file(BUSYBOX, "/bin/busybox")
    cpio.symlink("/bin/sh", "busybox")
    cpio.file("/init", INIT.encode())
    with tempfile.TemporaryDirectory() as tmp:
        stripped = os.path.join(tmp, "ridley")
        subprocess.run(["objcopy", "--strip-debug", str(ridley), stripped], check=True)
        cpio.binary(stripped, "/work/ridley")
    cpio.binary("/usr/sbin/bpftool", "/usr/sbin/bpftool")
    cpio.binary("/usr/bin/ip", "/usr/bin/ip")
    cpio.host_file(str(VETH), "/lib/modules/veth.ko")
    # The system's Python (its standard library is where it expects it).
    python = os.path.realpath("/usr/bin/python3")
    cpio.binary(python, "/usr/bin/python3")
    version = os.path.basename(python)
    cpio.tree(f"/usr/lib/{version}", skip={"test", "idlelib", "tkinter", "ensurepip", "lib2to3",
                                            "site-packages", "dist-packages", "turtledemo"})
    for name in ("peer.py", "vm_scenario.py"):
        cpio.host_file(str(ROOT / "tests" / name), f"/work/{name}")
    pathlib.Path(dest).write_bytes(cpio.finish())


def boot(initramfs, timeout=300):
    """Boots the 5.10 kernel with the initramfs; returns the console output."""
    # Emulated (TCG): nested KVM on cloud machines offers too few CPU features to boot.
    cmd = [QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-m", "2048", "-smp", "2",
           "-kernel", str(VMLINUZ), "-initrd", str(initramfs),
           "-append", "console=ttyS0 panic=-1 loglevel=1",
           "-nographic", "-no-reboot", "-nic", "none"]
    done = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return done.stdout.decode(errors="replace").replace("\r\n", "\n")


def result(console):
    """The JSON the scenario printed between the markers."""
    import json
    if BEGIN not in console or END not in console:
        raise AssertionError(f"the guest printed no result:\n{console[-6000:]}")
    text = console.split(BEGIN, 1)[1].split(END, 1)[0]
    return json.loads("".join(text.split("\n")))


if __name__ == "__main__":
    if sys.argv[1:] == ["fetch"]:
        print(fetch())
    else:
        sys.exit("usage: oldkernel.py fetch")
