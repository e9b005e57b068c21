"""Small file helpers shared by the trainer (bundle provenance) and android_bench (push skipping, results)."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FileFormatError(ValueError):
    """A file bdmtool reads is missing, empty or malformed; the message names the file and the fix."""


def read_json(path: str | os.PathLike, what: str = "JSON file") -> object:
    """Parse a JSON file, or raise FileFormatError naming the file, the position and what the file should be."""
    import json

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileFormatError(f"{path} does not exist (expected the {what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path} is not valid JSON ({e}); it should be the {what}: re-create it") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> str:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it: a full disk or a kill
    leaves the old file or none, never a torn one."""
    import tempfile

    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_savez(path: str | os.PathLike, **arrays) -> str:
    """``np.savez`` through ``atomic_write`` (the archive is built in memory first)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write(path, buf.getvalue())


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> str:
    """``fig.savefig`` through ``atomic_write`` (format taken from the file name)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(os.fspath(path))[1].lstrip(".") or "png", **kwargs)
    return atomic_write(path, buf.getvalue())
