"""A fake ``adb`` that emulates attached Android devices for the android_bench tests.

The only test double in the suite: no phone exists on the CI machines. State lives in ``$FAKE_ADB_STATE``:
``config.json`` (devices with state, properties, free space, cpu frequencies, faults), ``fs/`` (the device
filesystem: ``/data/local/tmp`` and ``/sys`` are mapped under it) and ``calls.jsonl`` (every invocation).

``adb shell CMD`` behaves like the real one: the argument(s) are joined with spaces and handed to a
real ``sh -c`` (so quoting mistakes are real injection bugs). ``getprop``, ``df`` and ``taskset`` come
from a fake bin directory; ARM executables pushed to the device run through ``fake_lce_benchmark.py``
(like a binfmt/qemu-user registration would), which prints ``lce_benchmark_model``'s real output format.

Faults (config keys): ``disconnect_after_benchmarks`` N (the device vanishes on benchmark run N+1),
``noexec`` (exec of pushed binaries fails with Permission denied), ``bench_fails`` (the benchmark exits 1),
``devices_hang_s`` / ``bench_hang_s`` (``adb devices`` / the benchmark sleep that long: a hung server or phone).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ["FAKE_ADB_STATE"])
HERE = Path(__file__).resolve().parent


def load() -> dict:
    return json.loads((STATE / "config.json").read_text())


def save(cfg: dict) -> None:
    (STATE / "config.json").write_text(json.dumps(cfg, indent=2))


def fs_path(remote: str) -> Path:
    return STATE / "fs" / remote.lstrip("/")


def map_paths(cmd: str) -> str:
    root = str(STATE / "fs")
    return cmd.replace("/data/local/tmp", root + "/data/local/tmp").replace("/sys/", root + "/sys/")


def device_error(cfg: dict, serial: str | None) -> str | None:
    devs = cfg["devices"]
    if serial is None:
        if len(devs) != 1:
            return "error: more than one device/emulator" if devs else "error: no devices/emulators found"
        serial = next(iter(devs))
    if serial not in devs:
        return f"error: device '{serial}' not found"
    state = devs[serial]["state"]
    if state == "offline":
        return "error: device offline"
    if state == "unauthorized":
        return ("error: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\n"
                "Try 'adb kill-server' if that seems wrong.")
    return None


def main(argv: list[str]) -> int:
    with (STATE / "calls.jsonl").open("a") as f:
        f.write(json.dumps(argv) + "\n")
    cfg = load()
    serial = None
    if argv[:1] == ["-s"]:
        serial, argv = argv[1], argv[2:]
    if argv[:1] == ["devices"]:
        if cfg.get("devices_hang_s"):
            time.sleep(cfg["devices_hang_s"])
        print("List of devices attached")
        for s, d in cfg["devices"].items():
            extra = f" usb:1-1 product:{d['props'].get('ro.product.name', 'x')} model:{d['props']['ro.product.model']}" \
                if d["state"] == "device" else ""
            print(f"{s}\t{d['state']}{extra}" if d["state"] != "device" else f"{s}               device{extra}")
        print()
        return 0
    err = device_error(cfg, serial)
    if err:
        print(err, file=sys.stderr)
        return 1
    serial = serial or next(iter(cfg["devices"]))
    if argv[0] == "push":
        src, dst = argv[1], argv[2]
        target = fs_path(dst)
        if not target.parent.is_dir():
            print(f"adb: error: failed to copy '{src}' to '{dst}': remote couldn't create file: No such file or "
                  "directory", file=sys.stderr)
            return 1
        data = Path(src).read_bytes()
        if data[:4] == b"\x7fELF":  # an ARM executable: install the emulator in its place (binfmt-style)
            target.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'fake_lce_benchmark.py'} \"$@\"\n")
            (target.parent / (target.name + ".orig_sha256")).write_text(hashlib.sha256(data).hexdigest())
        else:
            shutil.copyfile(src, target)
        print(f"{src}: 1 file pushed, 0 skipped. 100.0 MB/s ({len(data)} bytes in 0.001s)")
        return 0
    if argv[0] == "shell":
        cmd = " ".join(argv[1:])  # what real adb does with several arguments
        if "lce_benchmark_model --graph" in cmd or "lce_benchmark_model' '--graph" in cmd or "--graph=" in cmd:
            n = cfg.setdefault("benchmarks_run", 0)
            limit = cfg.get("disconnect_after_benchmarks")
            if limit is not None and n >= limit:
                del cfg["devices"][serial]
                save(cfg)
                print(f"error: device '{serial}' not found", file=sys.stderr)
                return 1
            cfg["benchmarks_run"] = n + 1
            save(cfg)
            if cfg.get("bench_hang_s"):
                time.sleep(cfg["bench_hang_s"])
        env = {**os.environ, "PATH": f"{STATE / 'bin'}:{os.environ['PATH']}", "FAKE_ADB_SERIAL": serial,
               "FAKE_ADB_FS": str(STATE / "fs")}
        if cfg.get("noexec"):
            env["FAKE_ADB_NOEXEC"] = "1"
        if cfg.get("bench_fails"):
            env["FAKE_BENCH_FAIL"] = "1"
        r = subprocess.run(["sh", "-c", map_paths(cmd)], env=env, cwd=STATE / "fs", capture_output=True, text=True)
        root = str(STATE / "fs")
        sys.stdout.write(r.stdout.replace(root, ""))
        sys.stderr.write(r.stderr.replace(root, ""))
        return r.returncode
    print(f"fake adb: unsupported command {argv}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
