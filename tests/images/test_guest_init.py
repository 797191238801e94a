"""The guest init of the built `base` image, booted under QEMU microvm (TCG).

guestd is replaced, in a throwaway sparse copy of the rootfs (written with
debugfs, no mounts), by a small shell script: it fails twice so the init
has to restart it, then reports what the init set up (mounts, hostname,
eth0 from moru.net=, the grown root filesystem) on the console and asks
PID 1 to power off (SIGUSR2) or reboot (SIGTERM) the way guestd's Shutdown
RPC does. The real guestd over vsock is tests/images/test_boot.py's job.
eth0 sits on a QEMU hub with no other port: no packet leaves the VM.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostd.vmm import accel
from images.build import Builder
from images.manifest import TemplateManifest
from images.tools import which

pytestmark = pytest.mark.vm

FAKE_GUESTD = r"""#!/bin/busybox sh
# Stands in for guestd: fails twice, then reports and shuts the guest down.
bb=/bin/busybox
n=$($bb cat /run/fake-runs 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" >/run/fake-runs
echo "FAKE run $n args: $*"
[ "$n" -lt 3 ] && exit 7
sig=USR2
grow=0
read -r cmdline </proc/cmdline
for a in $cmdline; do
    case "$a" in fake.signal=*) sig=${a#fake.signal=} ;; fake.grow=*) grow=${a#fake.grow=} ;; esac
done
echo "FAKE pid1 $($bb cat /proc/1/comm) $($bb readlink /proc/1/exe)"
echo "FAKE hostname $($bb hostname)"
echo "FAKE addr $($bb ip -o -4 addr show dev eth0 | $bb awk '{print $4}')"
echo "FAKE route $($bb ip route show default)"
echo "FAKE resolv $($bb grep nameserver /etc/resolv.conf)"
$bb awk '{print "FAKE mount " $2 " " $3}' /proc/mounts
echo "FAKE user $($bb grep '^user:' /etc/passwd)"
echo "FAKE env LANG=$LANG"
echo "FAKE date $($bb date +%s)"
i=0
while [ "$grow" = 1 ] && [ "$i" -lt 600 ]; do
    size=$($bb df -m / | $bb awk 'NR==2 {print $2}')
    [ "$size" -gt 2150 ] && break  # df shows less than the disk: ext4's metadata
    $bb sleep 0.1
    i=$((i + 1))
done
echo "FAKE rootsize $($bb df -m / | $bb awk 'NR==2 {print $2}')"
echo "FAKE done; kill -$sig 1"
$bb kill -"$sig" 1
$bb sleep 120
"""


@dataclass
class Boot:
    console: str
    returncode: int
    seconds: float

    def lines(self, prefix: str) -> list[str]:
        return [ln.strip() for ln in self.console.splitlines() if ln.startswith(prefix)]

    def value(self, key: str) -> str:
        found = self.lines(f"FAKE {key} ")
        assert found, f"no 'FAKE {key}' on the console:\n{self.console[-3000:]}"
        return found[0].removeprefix(f"FAKE {key}").strip()


@pytest.fixture(scope="module")
def base() -> TemplateManifest:
    return Builder().build("base").manifest


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="mgi"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def scratch_rootfs(base: TemplateManifest, workdir: Path, grow_mb: int) -> Path:
    """A sparse copy of base's rootfs, `grow_mb` bigger, with the fake guestd written in."""
    disk = workdir / "disk.ext4"
    subprocess.run(["cp", "--sparse=always", base.rootfs, disk], check=True)
    with open(disk, "r+b") as f:
        f.truncate(base.rootfs_bytes + (grow_mb << 20))
    fake = workdir / "fake-guestd"
    fake.write_text(FAKE_GUESTD)
    for req in (
        "rm /opt/moru/bin/guestd",
        f"write {fake} /opt/moru/bin/guestd",
        "sif /opt/moru/bin/guestd mode 0100755",
    ):
        subprocess.run([which("debugfs"), "-w", "-R", req, str(disk)], check=True,
                       capture_output=True)  # fmt: skip
    return disk


# Bounds: the boot up to the fake guestd's report is slow on a loaded TCG host;
# from its signal to PID 1 to QEMU's exit takes a few seconds (busybox init
# waits 1 s between SIGTERM and SIGKILL, 1 s more before the reboot call).
BOOT_SECONDS = 300
DOWN_SECONDS = 60


def boot(base: TemplateManifest, disk: Path, workdir: Path, append: str,
         done_marker: str = "FAKE done") -> Boot:
    """Boots until QEMU exits; fails fast when the guest does not go down after `done_marker`."""
    console = workdir / "console.log"
    cmd = [
        "qemu-system-x86_64",
        "-machine", "microvm,x-option-roms=off,isa-serial=on",
        *accel.qemu_args("tcg"),
        "-smp", "2", "-m", "512",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
        "-kernel", base.kernel, "-initrd", base.initramfs,
        "-append", " ".join([base.kernel_cmdline, *accel.kernel_args("tcg"), append]),
        "-drive", f"id=root,file={disk},format=raw,if=none",
        "-device", "virtio-blk-device,drive=root",
        "-netdev", "hubport,id=n0,hubid=0",
        "-device", "virtio-net-device,netdev=n0",
    ]  # fmt: skip
    t0 = time.monotonic()
    done_at: float | None = None
    failure = ""
    with (workdir / "qemu.out").open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            now = time.monotonic()
            if done_at is None and console.exists() and done_marker in console.read_text(
                errors="replace"
            ):
                done_at = now
            if done_at is not None and now - done_at > DOWN_SECONDS:
                failure = f"the guest did not go down within {DOWN_SECONDS} s of {done_marker!r}"
                break
            if done_at is None and now - t0 > BOOT_SECONDS:
                failure = f"no {done_marker!r} on the console within {BOOT_SECONDS} s"
                break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = console.read_text(errors="replace") if console.exists() else ""
    qemu_out = (workdir / "qemu.out").read_text(errors="replace")
    assert not failure, f"{failure}\n--- console tail ---\n{text[-3000:]}"
    assert proc.returncode == 0, f"qemu failed ({proc.returncode}): {qemu_out}\n{text[-3000:]}"
    return Boot(text, proc.returncode, time.monotonic() - t0)


def test_init_sets_up_the_guest_restarts_guestd_and_powers_off(
    base: TemplateManifest, workdir: Path
) -> None:
    disk = scratch_rootfs(base, workdir, grow_mb=256)
    now = int(time.time())
    b = boot(
        base, disk, workdir,
        "moru.hostname=sbx-test moru.net=10.11.12.2/24,10.11.12.1,10.11.12.53 "
        f"moru.time={now} fake.grow=1",
    )  # fmt: skip
    # guestd is started with the agreed arguments and restarted when it dies.
    args = "--listen vsock:50051 --data-listen vsock:50052 --guest"
    assert b.lines("FAKE run 1 args:") == [f"FAKE run 1 args: {args}"]
    restarts = b.lines("moru-init: guestd exited")
    assert restarts[:2] == [
        "moru-init: guestd exited with status 7; restart 1 in 0.1s",
        "moru-init: guestd exited with status 7; restart 2 in 0.5s",
    ]
    assert f"FAKE run 3 args: {args}" in b.console
    assert b.value("pid1").startswith("init /usr/bin/busybox")
    assert b.value("hostname") == "sbx-test"
    assert b.value("addr") == "10.11.12.2/24"
    assert b.value("route").startswith("default via 10.11.12.1 dev eth0")
    assert b.value("resolv") == "nameserver 10.11.12.53"
    mounts = set(b.lines("FAKE mount "))
    for mount in (
        "/ ext4", "/proc proc", "/sys sysfs", "/dev devtmpfs", "/dev/pts devpts",
        "/run tmpfs", "/sys/fs/cgroup cgroup2",
    ):  # fmt: skip
        assert f"FAKE mount {mount}" in mounts, mounts
    assert not any(m.startswith("FAKE mount /tmp ") for m in mounts), mounts  # on the disk
    assert b.value("user").startswith("user:x:1000:1000::/home/user:/bin/bash")
    assert b.value("env") == "LANG=C.UTF-8"
    assert abs(int(b.value("date")) - now) < 600  # clock set from moru.time= (or the RTC)
    # The disk is 256 MiB bigger than the image: the init grew / online.
    assert "moru-init: grew / to 2304 MiB" in b.console
    assert int(b.value("rootsize")) > 2150  # a 2048 MiB filesystem shows < 2000
    # SIGUSR2 to PID 1: the shutdown action runs and the VM powers off.
    assert "moru-init: shutting down" in b.console
    assert "reboot: Power down" in b.console
    print(f"boot to poweroff took {b.seconds:.1f}s")


def test_sigterm_to_init_reboots(base: TemplateManifest, workdir: Path) -> None:
    disk = scratch_rootfs(base, workdir, grow_mb=0)
    b = boot(base, disk, workdir, "fake.signal=TERM")
    assert b.value("hostname") == "moru"  # no moru.hostname=: the default
    assert b.value("addr") == ""  # no moru.net=: eth0 stays unconfigured
    assert "moru-init: grew" not in b.console
    assert "moru-init: shutting down" in b.console
    assert "reboot: Restarting system" in b.console  # -no-reboot turns it into an exit
    print(f"boot to reboot took {b.seconds:.1f}s")


def test_initramfs_failure_panics_and_resets(base: TemplateManifest, workdir: Path) -> None:
    """/init exits on a missing root disk: the kernel panics and panic=-1 resets the VM."""
    disk = scratch_rootfs(base, workdir, grow_mb=0)
    b = boot(base, disk, workdir, "root=/dev/vdz", done_marker="did not appear")
    assert "moru-initramfs: root device /dev/vdz did not appear; halting" in b.console
    assert "Kernel panic" in b.console
    assert "FAKE run" not in b.console
