"""The gateway's per-install seal key (resp2chat_core/seal.py), kept like the config file.

``seal_key`` set (file, environment or --set): that secret, shared by every replica given it.
Unset: a random 32-byte key made once, on first use, in ``seal.key`` beside the config file
(0600 in a 0700 directory), so sealed items survive a restart of this install.
"""

from __future__ import annotations

import os
from pathlib import Path

from resp2chat_core.seal import derive_key
from resp2chat_io.config import config_path


def key_path() -> Path:
    return config_path().parent / "seal.key"


def seal_key(configured: str) -> bytes:
    if configured:
        return derive_key(configured)
    path = key_path()
    try:
        return derive_key(path.read_bytes())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return derive_key(path.read_bytes())
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key
