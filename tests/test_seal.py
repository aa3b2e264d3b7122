"""Sealed strings (resp2chat_core/seal.py) and the per-install key (resp2chat_io/keys.py)."""

from __future__ import annotations

import os
import stat

import pytest

from resp2chat_core.seal import SealError, derive_key, seal, unseal
from resp2chat_io import keys

KEY = derive_key("a configured secret")


def test_round_trip_and_opaque():
    token = seal(KEY, "reasoning", "I should run ls — ✓")
    # (the plaintext, or its base64, nowhere in the token: a two-letter word could occur by chance)
    assert token.startswith("r2c1.") and "should run" not in token and "c2hvdWxkIHJ1bi" not in token
    assert unseal(KEY, "reasoning", token) == "I should run ls — ✓"
    assert seal(KEY, "reasoning", "x") != seal(KEY, "reasoning", "x")  # a fresh nonce each time


@pytest.mark.parametrize("bad", [None, 3, "", "r2c1.", "r2c1.!!!", "gAAAAAB-not-ours", "r2c1." + "A" * 40])
def test_foreign_or_malformed_is_refused(bad):
    with pytest.raises(SealError):
        unseal(KEY, "reasoning", bad)


def test_altered_other_key_or_other_purpose_is_refused():
    token = seal(KEY, "compaction", "summary")
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for key, purpose, t in [(KEY, "compaction", flipped), (derive_key("another"), "compaction", token),
                            (KEY, "reasoning", token)]:
        with pytest.raises(SealError):
            unseal(key, purpose, t)


def test_install_key_is_made_once_private_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("RESP2CHAT_CONFIG", raising=False)
    first = keys.seal_key("")
    path = keys.key_path()
    assert path.exists() and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert keys.seal_key("") == first and len(first) == 32
    assert keys.seal_key("configured") == derive_key("configured") != first


def test_a_broken_key_file_is_refused_not_used(tmp_path, monkeypatch):
    """An empty or short seal.key (a crash mid-write elsewhere) would derive a key anyone can
    compute: it is an error, never a key."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("RESP2CHAT_CONFIG", raising=False)
    path = keys.key_path()
    path.parent.mkdir(parents=True)
    for content in (b"", b"short"):
        path.write_bytes(content)
        with pytest.raises(keys.KeyFileError):
            keys.seal_key("")
    path.unlink()
    made = keys.seal_key("")
    assert len(made) == 32 and not [p for p in path.parent.iterdir() if p.name.startswith(".seal-")]
