"""Sealed strings: state the gateway hands a client to hand back later.

Stateless clients keep what the gateway would otherwise have to store: the reasoning of earlier
turns (``include: ["reasoning.encrypted_content"]``) and Codex's remote compaction summaries.
Both travel as an item's ``encrypted_content``. A sealed string is AES-256-GCM (authenticated
encryption, from ``cryptography``, which mitmproxy already depends on) under the gateway's
``seal_key``, so only this gateway (or replicas that share the key) can read it, and a client
can neither read it nor forge or alter one: ``unseal`` raises ``SealError``.

``purpose`` is bound into the authentication (as associated data): a sealed reasoning text
cannot be replayed as a compaction summary, nor the other way round.

    seal(key, "reasoning", "…")  ->  "r2c1.<base64url(nonce ‖ ciphertext ‖ tag)>"
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEALED_PREFIX = "r2c1."
_NONCE = 12


class SealError(ValueError):
    """Not a sealed string of this gateway: malformed, altered, another key or another purpose."""


def derive_key(secret: str | bytes) -> bytes:
    """A 32-byte key from a configured secret of any length (``seal_key``)."""
    raw = secret.encode() if isinstance(secret, str) else secret
    return raw if len(raw) == 32 else hashlib.sha256(b"resp2chat seal key\n" + raw).digest()


def seal(key: bytes, purpose: str, plaintext: str) -> str:
    nonce = os.urandom(_NONCE)
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8", "surrogatepass"), purpose.encode())
    return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")


def unseal(key: bytes, purpose: str, token: object) -> str:
    if not isinstance(token, str) or not token.startswith(SEALED_PREFIX):
        raise SealError("not sealed by this gateway")
    body = token[len(SEALED_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise SealError("not sealed by this gateway: malformed") from None
    if len(raw) < _NONCE + 16:
        raise SealError("not sealed by this gateway: too short")
    try:
        plain = AESGCM(key).decrypt(raw[:_NONCE], raw[_NONCE:], purpose.encode())
    except InvalidTag:
        raise SealError("sealed by another key, for another purpose, or altered") from None
    return plain.decode("utf-8", "surrogatepass")


class Sealer:
    """``seal``/``unseal`` bound to the gateway's key, fetched only when first needed (the key may
    live in a file made on first use): what the core's turn and translator are handed."""

    __slots__ = ("_key",)

    def __init__(self, key: Callable[[], bytes]) -> None:
        self._key = key

    def seal(self, purpose: str, plaintext: str) -> str:
        return seal(self._key(), purpose, plaintext)

    def unseal(self, purpose: str, token: object) -> str:
        return unseal(self._key(), purpose, token)
