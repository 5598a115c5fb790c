"""`gendr-build push`: a local model folder into object storage, checked against its manifest on the way.

Each artifact is read once: the bytes go to the upload and into a sha256 at the same time, and an upload
whose bytes do not match the manifest is deleted again and the push fails. Blobs already in the bucket
(same sha256 and size) are skipped; the manifest goes last, so a pull never sees a manifest whose files
are not all there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_build.storage.remote import (
    IntegrityError,
    Location,
    StorageError,
    check_model_name,
    client_error_code,
    describe,
)
from service.manifest import MANIFEST_FILE, Artifact, Manifest, ManifestError, artifact_path

log = logging.getLogger("gendr.storage")
PART_BYTES = 64 << 20  # multipart part size (S3 allows 10,000 parts: files up to 640 GB)


@dataclass
class PushResult:
    model: str
    uploaded: int = 0
    skipped: int = 0
    bytes_sent: int = 0
    manifest_written: bool = False
    seconds: float = 0.0


class _HashingReader:
    """A file as a non-seekable stream: s3transfer then reads it once, in order, so the digest taken here
    is the digest of exactly the bytes that were sent."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return bytes(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


def _exists(client: Any, loc: Location, key: str, size: int) -> bool:
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=loc.bucket, Key=key)
    except ClientError as e:
        if client_error_code(e) in ("NoSuchKey", "404", "NotFound"):
            return False
        raise
    return int(head.get("ContentLength", -1)) == size


def _upload(client: Any, loc: Location, key: str, path: Path, art: Artifact) -> None:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=4)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb") as f:
        reader = _HashingReader(f)
        client.upload_fileobj(reader, loc.bucket, key, Config=config)
    digest = reader.sha.hexdigest()
    if digest != art.sha256 or reader.size != art.size:
        client.delete_object(Bucket=loc.bucket, Key=key)
        raise IntegrityError(
            f"{path}: {reader.size} bytes with sha256 {digest[:12]}… but the manifest says {art.size} bytes, "
            f"{art.sha256[:12]}…; the local repository is damaged: re-run the step that wrote it"
        )


def push_model(client: Any, model_dir: Path, loc: Location) -> PushResult:
    """Upload one model folder (its name is the model's name in the bucket)."""
    from botocore.exceptions import BotoCoreError, ClientError

    model_dir = Path(model_dir)
    model = check_model_name(model_dir.name)
    t0 = time.monotonic()
    result = PushResult(model)
    try:
        raw = (model_dir / MANIFEST_FILE).read_bytes()
        manifest = Manifest.model_validate_json(raw)
    except (OSError, ValueError) as e:
        raise StorageError(f"{model_dir}: no readable {MANIFEST_FILE}: {e}") from e
    seen: set[str] = set()
    try:
        for art in manifest.artifacts():
            if art.sha256 in seen:
                continue
            seen.add(art.sha256)
            try:
                path = artifact_path(model_dir, art)
            except ManifestError as e:
                raise IntegrityError(str(e)) from e
            if not path.is_file():
                raise IntegrityError(f"{model_dir.name}: artifact {art.path} is missing")
            key = loc.blob_key(model, art.sha256)
            if _exists(client, loc, key, art.size):
                result.skipped += 1
                continue
            log.info("%s: uploading %s (%.1f MB)", model, art.path, art.size / 1e6)
            _upload(client, loc, key, path, art)
            result.uploaded += 1
            result.bytes_sent += art.size
        key = loc.manifest_key(model)
        try:
            current = client.get_object(Bucket=loc.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if client_error_code(e) not in ("NoSuchKey", "404", "NotFound"):
                raise
            current = None
        if current != raw:
            client.put_object(Bucket=loc.bucket, Key=key, Body=raw, ContentType="application/json")
            result.manifest_written = True
    except (BotoCoreError, ClientError) as e:
        raise StorageError(f"push of {model} to {loc}: {describe(e)}") from e
    result.seconds = time.monotonic() - t0
    return result
