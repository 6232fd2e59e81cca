"""Cheap checks of files and folders a run will need, made before anything runs: each returns the
reason a path cannot be used, or None. (No project imports: the adapters, the methods and the
command line all use them.)"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (its header read, its tensors' extent checked
    against the file size), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return "its header runs past the end of the file (truncated?)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"unreadable ({e.strerror})"
    except (ValueError, UnicodeDecodeError):
        return "its header is not valid safetensors JSON"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"truncated: {size} bytes, its header describes {8 + n + end}"
    return None


def writable_dir_problem(path: Path) -> str | None:
    """Why the folder `path` (created if missing) cannot take new files, or None. Creates only
    what is missing and removes its probe file."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                return f"{str(existing)!r} is a file, not a folder"
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None
