"""Signed audit checkpoints: an Ed25519 key held by the functions, never by the database.

A checkpoint states "at ``signed_at`` the head of audit scope ``scope_id`` was row ``seq`` with
``hash``". Whoever keeps it can later ask ``/api/audit-logs/verify`` whether the log still holds
that row: a superuser who deletes the newest rows cannot forge a checkpoint for the shorter log.

The signature covers the canonical serialization of ``SIGNED_FIELDS``: a JSON object with
exactly those keys, sorted, no whitespace (``separators=(",", ":")``), ASCII only, UTF-8
encoded. ``canonical_payload`` is that function; docs/api.md shows how to check a checkpoint
without this package.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ALGORITHM = "Ed25519"
FORMAT = "upshift.audit-checkpoint.v1"
SIGNED_FIELDS = ("format", "scope_id", "org_id", "seq", "hash", "signed_at", "key_id")
ENV_VAR = "UPSHIFT_AUDIT_SIGNING_KEY"


class SigningKeyError(ValueError):
    """A malformed signing key (the message never contains the key)."""


def canonical_payload(checkpoint: dict[str, Any]) -> bytes:
    """The bytes a checkpoint's signature covers."""
    return json.dumps({name: checkpoint[name] for name in SIGNED_FIELDS}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def rfc3339(moment: datetime) -> str:
    """``2026-11-25T08:13:58Z`` (UTC, whole seconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class AuditSigningKey:
    """The checkpoint signing key (``UPSHIFT_AUDIT_SIGNING_KEY``: base64 of a 32-byte Ed25519 seed)."""

    private_key: Ed25519PrivateKey = field(repr=False)
    public_key_raw: bytes
    key_id: str

    @classmethod
    def from_seed(cls, seed: bytes) -> AuditSigningKey:
        if len(seed) != 32:
            raise SigningKeyError(f"{ENV_VAR} must be the base64 of a 32-byte Ed25519 seed, got {len(seed)} bytes")
        private_key = Ed25519PrivateKey.from_private_bytes(seed)
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(private_key=private_key, public_key_raw=raw, key_id=fingerprint(raw))

    @classmethod
    def from_base64(cls, value: str) -> AuditSigningKey:
        try:
            seed = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise SigningKeyError(f"{ENV_VAR} is not valid base64 (want the base64 of a 32-byte Ed25519 seed)"
                                  ) from None
        return cls.from_seed(seed)

    def __repr__(self) -> str:
        return f"AuditSigningKey(key_id={self.key_id!r})"

    def public_key_json(self) -> dict[str, str]:
        pem = self.private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo)
        return {"key_id": self.key_id, "algorithm": ALGORITHM,
                "public_key": base64.b64encode(self.public_key_raw).decode("ascii"),
                "public_key_pem": pem.decode("ascii")}

    def sign_checkpoint(self, head: dict[str, Any], signed_at: datetime | None = None) -> dict[str, Any]:
        """``head`` is ``public.audit_head``'s answer: scope_id, org_id, seq, hash (hex)."""
        checkpoint: dict[str, Any] = {
            "format": FORMAT,
            "scope_id": str(head["scope_id"]),
            "org_id": None if head.get("org_id") is None else str(head["org_id"]),
            "seq": int(head["seq"]),
            "hash": str(head["hash"]).lower(),
            "signed_at": rfc3339(signed_at or datetime.now(UTC)),
            "key_id": self.key_id,
        }
        signature = self.private_key.sign(canonical_payload(checkpoint))
        return {**checkpoint, "algorithm": ALGORITHM,
                "signature": base64.urlsafe_b64encode(signature).decode("ascii")}


def fingerprint(public_key_raw: bytes) -> str:
    """A short key id: the first 16 hex digits of sha256(raw public key)."""
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


def new_seed_base64() -> str:
    """A fresh key for ``UPSHIFT_AUDIT_SIGNING_KEY``."""
    import secrets

    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")
