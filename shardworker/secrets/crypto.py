"""AES-256-GCM envelopes with a key id, and the keyring that holds the keys.

Envelope: ``sw1.<kid>.<b64url nonce>.<b64url ciphertext+tag>`` (unpadded base64url).  The
additional data binds an envelope to where it is stored (``tenant|name``), so a row copied
to another tenant or name does not decrypt.  Errors name key ids, never key material or
plaintext, and never carry a ``cryptography`` stack.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shardworker.errors import ConfigError, SecretError, SecretKeyError

SETTING = "SHARDWORKER_SECRET_KEYS"
PREFIX = "sw1"
KEY_BYTES = 32
NONCE_BYTES = 12
_KID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _parse_key(kid: str, encoded: str) -> bytes:
    try:
        key = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{SETTING}: key {kid!r} is not base64 of {KEY_BYTES} bytes")
    return key


@dataclass(frozen=True)
class Keyring:
    """Keys newest first: the first encrypts, every key decrypts its own envelopes."""

    _keys: tuple[tuple[str, bytes], ...]

    def __repr__(self) -> str:
        return f"Keyring(kids={list(self.kids)})"

    @classmethod
    def from_setting(cls, value: str) -> Keyring:
        """Parse ``kid:base64(32 bytes)[,kid:...]``; an empty setting is an empty keyring."""
        keys: list[tuple[str, bytes]] = []
        for position, entry in enumerate((e.strip() for e in value.split(",")), start=1):
            if not entry:
                continue
            kid, sep, encoded = entry.partition(":")
            kid = kid.strip()
            if not sep or not _KID.fullmatch(kid):
                # Name the position only: a malformed entry may be a pasted raw key.
                raise ConfigError(
                    f"{SETTING}: entry {position} must be `kid:base64key` with a kid of "
                    "letters, digits, `_` or `-` (at most 64)"
                )
            if any(kid == k for k, _ in keys):
                raise ConfigError(f"{SETTING}: key {kid!r} appears twice")
            keys.append((kid, _parse_key(kid, encoded)))
        return cls(tuple(keys))

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(kid for kid, _ in self._keys)

    @property
    def newest_kid(self) -> str:
        if not self._keys:
            raise SecretKeyError(f"no encryption key: set {SETTING}")
        return self._keys[0][0]

    def _key(self, kid: str) -> bytes:
        for candidate, key in self._keys:
            if candidate == kid:
                return key
        raise SecretKeyError(f"key {kid!r} is not in {SETTING} (known: {list(self.kids)})")

    def encrypt(self, plaintext: str, aad: bytes) -> str:
        kid = self.newest_kid
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self._key(kid)).encrypt(nonce, plaintext.encode(), aad)
        return f"{PREFIX}.{kid}.{_b64url(nonce)}.{_b64url(sealed)}"

    def decrypt(self, envelope: str, aad: bytes) -> str:
        kid, nonce, sealed = parse_envelope(envelope)
        key = self._key(kid)
        try:
            return AESGCM(key).decrypt(nonce, sealed, aad).decode()
        except (InvalidTag, UnicodeDecodeError):
            raise SecretKeyError(f"cannot decrypt with key {kid}") from None


def parse_envelope(envelope: str) -> tuple[str, bytes, bytes]:
    """(kid, nonce, ciphertext+tag) of an envelope; SecretError when malformed."""
    parts = envelope.split(".")
    if len(parts) != 4 or parts[0] != PREFIX or not _KID.fullmatch(parts[1]):
        raise SecretError(f"not a {PREFIX} envelope")
    try:
        nonce, sealed = _unb64url(parts[2]), _unb64url(parts[3])
    except (binascii.Error, ValueError):
        raise SecretError(f"{PREFIX} envelope with key {parts[1]} is not valid base64") from None
    if len(nonce) != NONCE_BYTES or len(sealed) < 16:
        raise SecretError(f"{PREFIX} envelope with key {parts[1]} is truncated")
    return parts[1], nonce, sealed


def envelope_kid(envelope: str) -> str:
    return parse_envelope(envelope)[0]


def generate_key_setting(kid: str) -> str:
    """A fresh ``kid:base64key`` entry to put first in SHARDWORKER_SECRET_KEYS."""
    if not _KID.fullmatch(kid):
        raise ConfigError(f"key id must be letters, digits, `_` or `-` (at most 64): {kid!r}")
    return f"{kid}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}"
