"""Test doubles for what cannot exist on a CI machine: an Android phone behind adb."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

PIXEL = {"state": "device", "free_kb": 8_000_000, "cpu_max_freq": [1800000] * 4 + [2400000] * 3 + [2850000],
         "props": {"ro.product.model": "Pixel_7", "ro.product.manufacturer": "Google", "ro.product.name": "panther",
                   "ro.soc.model": "GS201", "ro.product.cpu.abi": "arm64-v8a", "ro.build.version.release": "14",
                   "ro.build.version.sdk": "34"}}


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def install_fake_adb(root: Path, devices: dict[str, dict], **faults) -> dict:
    """Create the fake device state under ``root``; returns env vars that put the fake ``adb`` first on PATH."""
    state = root / "adb_state"
    (state / "bin").mkdir(parents=True)
    (state / "fs" / "data" / "local" / "tmp").mkdir(parents=True)
    for d in devices.values():
        for i, f in enumerate(d.get("cpu_max_freq", [])):
            p = state / "fs" / "sys" / "devices" / "system" / "cpu" / f"cpu{i}" / "cpufreq"
            p.mkdir(parents=True, exist_ok=True)
            (p / "cpuinfo_max_freq").write_text(f"{f}\n")
    (state / "config.json").write_text(json.dumps({"devices": devices, **faults}, indent=2))
    py = sys.executable
    bindir = root / "adb_bin"
    bindir.mkdir()
    _script(bindir / "adb", f'#!/bin/sh\nexec {py} {HERE / "adb.py"} "$@"\n')
    # Device-side commands that the host lacks or that must answer for the device.
    cfg = state / "config.json"
    _script(state / "bin" / "getprop", f"#!/bin/sh\nexec {py} -c 'import json,os,sys; "
            f"d=json.load(open(\"{cfg}\"))[\"devices\"][os.environ[\"FAKE_ADB_SERIAL\"]]; "
            "print(d[\"props\"].get(sys.argv[1], \"\"))' \"$1\"\n")
    _script(state / "bin" / "df", f"#!/bin/sh\nexec {py} -c 'import json,os; "
            f"d=json.load(open(\"{cfg}\"))[\"devices\"][os.environ[\"FAKE_ADB_SERIAL\"]]; "
            "print(\"Filesystem     1K-blocks    Used Available Use% Mounted on\"); "
            "print(\"/dev/block/dm-5 {0} 1000 {1} 1% /data\".format(d[\"free_kb\"] + 1000, d[\"free_kb\"]))'\n")
    _script(state / "bin" / "taskset", '#!/bin/sh\ncase "$1" in *[!0-9a-fA-F]*|"") echo "taskset: bad mask" >&2; '
            'exit 1;; esac\nshift\nexec "$@"\n')
    _script(state / "bin" / "sha256sum", '#!/bin/sh\nif [ -f "$1.orig_sha256" ]; then echo "$(cat "$1.orig_sha256")  $1"; '
            'else exec /usr/bin/env -i PATH=/usr/bin:/bin sha256sum "$@"; fi\n')
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_ADB_STATE": str(state)}


def fake_arm64_binary(path: Path) -> Path:
    """An ELF header for e_machine 183 (aarch64): what the harness checks against the device ABI."""
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1  # 64-bit, little-endian, version 1
    header[16:18] = (2).to_bytes(2, "little")  # ET_EXEC
    header[18:20] = (183).to_bytes(2, "little")
    path.write_bytes(bytes(header) + b"\0" * 1024)
    return path


def fake_arm32_binary(path: Path) -> Path:
    fake_arm64_binary(path)
    data = bytearray(path.read_bytes())
    data[18:20] = (40).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path
