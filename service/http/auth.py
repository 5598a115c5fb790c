"""Optional bearer-token API keys for /upscale (health, readiness and metrics stay open).

Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every configured key
without stopping early, so neither the key's content nor its length leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr

from service.errors import Unauthorized
from service.http.quotas import Caller, KeyEntry


class ApiKeys:
    """Plain keys (`GENDR_API_KEYS`, no quota) and named keys with quotas (`GENDR_API_KEYS_FILE`)."""

    def __init__(self, keys: list[SecretStr], entries: list[KeyEntry] | None = None) -> None:
        self._digests = [hashlib.sha256(k.get_secret_value().encode()).digest() for k in keys]
        self._callers = [Caller(f"key{i + 1}") for i in range(len(keys))]
        for e in entries or []:
            self._digests.append(bytes.fromhex(e.sha256))
            self._callers.append(Caller(e.name, e.quota_mp_s, e.burst_mp))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> Caller | None:
        """Raise 401 unless `Authorization: Bearer <key>` names a configured key (no keys: open)."""
        if not self._digests:
            return None
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("this endpoint needs an API key: send `Authorization: Bearer <key>`")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Caller | None = None
        for d, caller in zip(self._digests, self._callers, strict=True):
            if hmac.compare_digest(digest, d):
                found = caller  # no early exit: every key is compared
        if found is None:
            raise Unauthorized("invalid API key")
        return found
