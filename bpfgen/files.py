"""Writing bpfgen's own files safely: bpfgen runs as root, and the directories it writes
into (a build directory, /run/bpfgen) may be reachable by others."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_file(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Replace path atomically with data, never writing through a symlink or into a file
    someone else opened: a new file (O_EXCL | O_NOFOLLOW) renamed over the old name."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
