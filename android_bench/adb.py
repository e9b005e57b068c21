"""A thin, quoting-safe wrapper around the ``adb`` executable.

Every remote command is built from an argument list and each argument goes through ``shlex.quote``
before ``adb shell`` sees it, so a model called ``a b;reboot.tflite`` is a file name, never a command.
Errors are ``DeviceError``: one line naming the device, the step and what to do.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..files import file_sha256

REMOTE_DIR = "/data/local/tmp/bdmtool"

_STATE_FIX = {
    "unauthorized": "unlock the phone and accept the 'Allow USB debugging' prompt, then retry",
    "offline": "reconnect the USB cable or run 'adb kill-server && adb start-server', then retry",
    "no permissions": "add a udev rule for the phone (see 'adb devices' help) or run adb as your user's plugdev group",
    "recovery": "boot the phone normally",
    "bootloader": "boot the phone normally",
}


class DeviceError(RuntimeError):
    """A device-side failure, e.g. ``[adb:R58M] push lce_benchmark_model: no space left``."""


def remote_command(argv: list[str]) -> str:
    """The single string ``adb shell`` sends to the device's ``sh``: every argument quoted."""
    return " ".join(shlex.quote(str(a)) for a in argv)


@dataclass(frozen=True)
class DeviceInfo:
    serial: str
    state: str
    model: str = ""


def adb_executable() -> str:
    exe = os.environ.get("BDMTOOL_ADB") or shutil.which("adb")
    if not exe:
        raise DeviceError("adb not found: install Android platform-tools (Debian: apt install adb) and put adb "
                          "on PATH, or set BDMTOOL_ADB=/path/to/adb")
    return exe


DEVICES_TIMEOUT_S = float(os.environ.get("BDMTOOL_ADB_DEVICES_TIMEOUT", "30"))


def list_devices(adb: str | None = None) -> list[DeviceInfo]:
    """Parse ``adb devices -l``: serial, state and model of every attached device."""
    try:
        r = subprocess.run([adb or adb_executable(), "devices", "-l"], capture_output=True, text=True,
                           timeout=DEVICES_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"'adb devices -l' did not answer within {DEVICES_TIMEOUT_S:.0f} s; restart the adb server "
                          "(adb kill-server) and check the USB connection") from None
    if r.returncode != 0:
        raise DeviceError(f"'adb devices -l' failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
    out = []
    for line in r.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*")):
            continue
        serial, *fields = line.split()  # 'adb devices -l' pads with spaces; older adb uses a tab
        rest = " ".join(fields)
        state = "no permissions" if rest.startswith("no permissions") else (fields[0] if fields else "unknown")
        model = next((f.split(":", 1)[1] for f in rest.split() if f.startswith("model:")), "")
        out.append(DeviceInfo(serial, state, model))
    return out


class AdbDevice:
    """One attached device, checked to be in the ``device`` state."""

    def __init__(self, serial: str, adb: str | None = None, timeout_s: float = 1800.0):
        self.adb = adb or adb_executable()
        self.serial = serial
        self.timeout_s = timeout_s
        devices = {d.serial: d for d in list_devices(self.adb)}
        if serial not in devices:
            seen = ", ".join(f"{d.serial} ({d.state})" for d in devices.values()) or "none"
            raise DeviceError(f"[adb:{serial}] not attached; 'adb devices' lists: {seen}. Check the cable and "
                              "the serial (bdmtool bench --device adb:SERIAL)")
        state = devices[serial].state
        if state != "device":
            fix = _STATE_FIX.get(state, "check 'adb devices -l'")
            raise DeviceError(f"[adb:{serial}] device is {state}: {fix}")

    def _fail(self, step: str, detail: str) -> DeviceError:
        return DeviceError(f"[adb:{self.serial}] {step}: {detail}")

    def _run(self, args: list[str], step: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            r = subprocess.run([self.adb, "-s", self.serial, *args], capture_output=True, text=True,
                               timeout=timeout or self.timeout_s)
        except subprocess.TimeoutExpired:
            raise self._fail(step, f"timed out after {timeout or self.timeout_s:.0f} s") from None
        lost = ("device '" + self.serial + "' not found", "device offline", "no devices/emulators found",
                "device not found")
        if r.returncode != 0 and any(s in r.stderr for s in lost):
            raise self._fail(step, "the device disconnected (" + r.stderr.strip().splitlines()[-1]
                             + "); reconnect it and re-run: finished measurements are kept")
        return r

    def shell(self, argv: list[str], step: str, check: bool = True, timeout: float | None = None) -> str:
        """Run ``argv`` on the device (each element quoted); returns stdout, raises on non-zero exit."""
        r = self._run(["shell", remote_command(argv)], step, timeout)
        if check and r.returncode != 0:
            err = (r.stderr.strip() or r.stdout.strip()).splitlines()
            msg = err[-1] if err else "no output"
            if "Permission denied" in r.stderr + r.stdout:
                msg += " (permission denied: the file must live under /data/local/tmp and be chmod +x)"
            raise self._fail(step, f"exit {r.returncode}: {msg[-400:]}")
        return r.stdout

    def getprop(self, key: str) -> str:
        return self.shell(["getprop", key], f"getprop {key}").strip()

    def properties(self) -> dict:
        return {"model": self.getprop("ro.product.model"), "manufacturer": self.getprop("ro.product.manufacturer"),
                "soc": self.getprop("ro.soc.model") or self.getprop("ro.board.platform"),
                "abi": self.getprop("ro.product.cpu.abi"), "android": self.getprop("ro.build.version.release"),
                "sdk": self.getprop("ro.build.version.sdk")}

    def free_bytes(self, remote_dir: str) -> int:
        """Free space of the filesystem holding ``remote_dir`` (``df -k``; toybox and busybox formats)."""
        out = self.shell(["df", "-k", remote_dir], "df")
        lines = [ln.split() for ln in out.strip().splitlines() if ln.strip()]
        try:
            header, row = lines[0], lines[-1]
            col = next(i for i, h in enumerate(header) if h.lower() in ("available", "avail", "free"))
            width = len(header) - (1 if header[-2:] == ["Mounted", "on"] else 0)
            return int(row[col - width + len(row)]) * 1024  # from the right: a long device name may wrap
        except (StopIteration, ValueError, IndexError):
            raise self._fail("df", f"cannot read free space from {out.strip()[-200:]!r}") from None

    def max_cpu_freqs(self) -> list[int]:
        """Max frequency per CPU index (0 where unreadable), from sysfs."""
        script = ('for d in /sys/devices/system/cpu/cpu[0-9]*; do '
                  'echo "${d##*cpu} $(cat "$d/cpufreq/cpuinfo_max_freq" 2>/dev/null || echo 0)"; done')
        out = self.shell(["sh", "-c", script], "read cpu frequencies", check=False)
        pairs = [ln.split() for ln in out.splitlines() if len(ln.split()) == 2 and ln.split()[0].isdigit()]
        freqs = [0] * (max((int(i) for i, _ in pairs), default=-1) + 1)
        for i, f in pairs:
            freqs[int(i)] = int(f) if f.isdigit() else 0
        return freqs

    def remote_sha256(self, remote: str) -> str | None:
        out = self.shell(["sha256sum", remote], f"hash {remote}", check=False).strip()
        h = out.split()[0] if out else ""
        return h if len(h) == 64 else None

    def push(self, local: str | os.PathLike, remote: str) -> bool:
        """Push unless the remote file has the same sha256; returns True when bytes were sent."""
        if self.remote_sha256(remote) == file_sha256(local):
            return False
        r = self._run(["push", str(local), remote], f"push {Path(local).name}")
        if r.returncode != 0:
            raise self._fail(f"push {Path(local).name}", (r.stderr.strip() or r.stdout.strip())[-300:])
        return True
