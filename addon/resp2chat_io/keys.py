"""The gateway's per-install seal key (resp2chat_core/seal.py), kept like the config file.

``seal_key`` set (file, environment or --set): that secret, shared by every replica given it.
Unset: a random 32-byte key made once, when a gateway that serves starts (addons/turns.py: one
it cannot make stops the start), in ``seal.key`` beside the config file
(0600 in a 0700 directory), so sealed items survive a restart of this install. It is written to
a temporary file and linked into place, so no process ever reads a half-written key; a key file
that is not exactly 32 bytes is refused (an empty one would derive a key anyone can compute).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from resp2chat_core.seal import derive_key
from resp2chat_io.config import config_path

KEY_BYTES = 32


class KeyFileError(RuntimeError):
    pass


def key_path() -> Path:
    return config_path().parent / "seal.key"


def _read(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{path} is not a seal key ({len(key)} bytes, expected {KEY_BYTES}): "
                           "delete it to make a new one, or set seal_key")
    return key


def seal_key(configured: str) -> bytes:
    if configured:
        return derive_key(configured)
    path = key_path()
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".seal-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(KEY_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)  # whole, or not at all; fails if another process linked first
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return _read(path)  # ours, or the one another process made first
