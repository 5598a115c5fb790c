"""Where a repository lives in object storage, the S3 client, and the layout of a model there.

Layout under `s3://BUCKET/PREFIX/` (one prefix per GPU pool: each pool's build pushes its own manifest):

    <model>/manifest.json             the manifest, byte for byte as the build wrote it; written last
    <model>/blobs/sha256/<hex>        every artifact, named by its content: immutable once written

Content addressing makes a push atomic for readers (a pull reads the manifest, then blobs nothing
rewrites), lets a push skip what is already there, and needs no listing to pull.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from engine_build.errors import BuildError
from service.manifest import MANIFEST_FILE, MODEL_NAME_PATTERN

# A manifest is a few KB to a few hundred KB; anything far larger is not one.
MAX_MANIFEST_BYTES = 16 << 20


class StorageError(BuildError):
    """Object storage cannot be reached, refuses us, or lacks what was asked for."""


class IntegrityError(StorageError):
    """Bytes that do not match the manifest's sha256 or size: refused, nothing installed."""


@dataclass(frozen=True)
class Location:
    """`s3://bucket[/prefix]`: a repository in a bucket."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> Location:
        m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?", url.strip())
        if not m:
            raise StorageError(f"not an s3://bucket[/prefix] URL: {url!r}")
        prefix = (m.group(2) or "").strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise StorageError(f"empty, '.' or '..' path segment in {url!r}")
        return cls(m.group(1), prefix)

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def manifest_key(self, model: str) -> str:
        return self.key(check_model_name(model), MANIFEST_FILE)

    def blob_key(self, model: str, sha256: str) -> str:
        return self.key(check_model_name(model), "blobs", "sha256", sha256)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def check_model_name(name: str) -> str:
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise StorageError(f"not a model name: {name!r} (pattern {MODEL_NAME_PATTERN})")
    return name


def make_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client. Credentials and region come from boto3's usual chain (environment, shared
    credentials file, IRSA / EKS Pod Identity web identity). With an endpoint (argument,
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) it speaks path-style, which MinIO, Ceph and moto need, and
    only sends the checksums a request requires: S3-compatible servers differ in which of botocore's
    default CRC trailers they accept, and every file is checked against its sha256 here anyway."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise StorageError("boto3 is not installed: pip install 'gendr-serve[storage]'") from e
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"} if endpoint else {},
        max_pool_connections=16,
    )
    return boto3.client("s3", endpoint_url=endpoint or None, config=config)


def client_error_code(e: BaseException) -> str:
    """The S3 error code of a botocore ClientError ("NoSuchKey", "404", "AccessDenied"), else ""."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def describe(e: BaseException) -> str:
    """One line for the user out of a botocore error."""
    code = client_error_code(e)
    return f"{code}: {e}" if code and code not in str(e) else str(e)


def get_manifest_bytes(client: Any, loc: Location, model: str) -> bytes:
    """The manifest's bytes as pushed; StorageError when the model is not there."""
    from botocore.exceptions import BotoCoreError, ClientError

    key = loc.manifest_key(model)
    try:
        obj = client.get_object(Bucket=loc.bucket, Key=key)
        if int(obj.get("ContentLength") or 0) > MAX_MANIFEST_BYTES:
            raise StorageError(f"{loc}/{key}: {obj['ContentLength']} bytes is too large for a manifest")
        return bytes(obj["Body"].read())
    except ClientError as e:
        if client_error_code(e) in ("NoSuchKey", "404", "NotFound"):
            raise StorageError(f"{model}: no {MANIFEST_FILE} at {loc}/{key} (push it first)") from e
        raise StorageError(f"{loc}/{key}: {describe(e)}") from e
    except BotoCoreError as e:
        raise StorageError(f"{loc}/{key}: {describe(e)}") from e


def list_remote_models(client: Any, loc: Location) -> list[str]:
    """Model names under the prefix (folders holding a manifest.json)."""
    from botocore.exceptions import BotoCoreError, ClientError

    base = loc.key() + "/" if loc.prefix else ""
    names: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=loc.bucket, Prefix=base, Delimiter="/"
        ):
            for cp in page.get("CommonPrefixes", []):
                name = cp["Prefix"][len(base) :].rstrip("/")
                if re.fullmatch(MODEL_NAME_PATTERN, name):
                    names.append(name)
        found = []
        for name in names:
            try:
                client.head_object(Bucket=loc.bucket, Key=loc.manifest_key(name))
                found.append(name)
            except ClientError as e:
                if client_error_code(e) not in ("NoSuchKey", "404", "NotFound"):
                    raise
    except (BotoCoreError, ClientError) as e:
        raise StorageError(f"{loc}: cannot list models: {describe(e)}") from e
    return sorted(found)
