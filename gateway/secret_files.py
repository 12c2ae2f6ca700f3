"""Secrets generated once into a file and shared by every process that reads the same path.

Creation is atomic (a temp file, fsynced, then hard-linked into place): processes starting
together agree on one value, and a crash never leaves a half-written secret. Files are 0600.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path


def random_token() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def read_or_create_secret(path: Path, make: Callable[[], str] = random_token) -> str:
    """The secret in ``path``; created with ``make()`` if the file does not exist yet."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
        tmp = Path(tmp_name)
        with os.fdopen(fd, "w") as fh:
            fh.write(make() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"{path} is empty; delete it to generate a new secret")
    return value
