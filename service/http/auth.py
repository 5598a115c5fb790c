"""Optional bearer-token API keys for /upscale (health, readiness and metrics stay open).

Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every configured key
without stopping early, so neither the key's content nor its length leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr

from service.errors import Unauthorized


class ApiKeys:
    def __init__(self, keys: list[SecretStr]) -> None:
        self._digests = [hashlib.sha256(k.get_secret_value().encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise 401 unless `Authorization: Bearer <key>` names a configured key (no keys: open)."""
        if not self._digests:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("this endpoint needs an API key: send `Authorization: Bearer <key>`")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(digest, d)
        if not ok:
            raise Unauthorized("invalid API key")
