"""`gendr-build pull`: a model from object storage into a local repository (a node-local cache).

- Skipped when the local manifest is byte-for-byte the remote one and every selected file is there with
  its size (what an earlier pull verified; the server checks sha256 again as it loads).
- Otherwise every file is downloaded into `<repository>/.gendr-pull/<model>-*/` and hashed while it is
  written (one pass, no second read); a connection that drops mid-file resumes with a Range request, the
  hash going on where it stopped. A size or sha256 mismatch refuses the whole model.
- Only a complete, verified folder is renamed to `<repository>/<model>`: a pull killed at any point leaves
  the previous version (or nothing) there, never half a repository, and the next pull sweeps the rest.
- Files the installed version already has (same sha256) are hard-linked instead of downloaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_build.storage.remote import (
    IntegrityError,
    Location,
    StorageError,
    check_model_name,
    describe,
    get_manifest_bytes,
)
from service.manifest import MANIFEST_FILE, Artifact, Manifest

log = logging.getLogger("gendr.storage")
WORK_DIR = ".gendr-pull"  # inside the repository (same filesystem: the final rename is atomic)
CHUNK = 1 << 20
RESUMES = 5  # connection drops survived per file (each resumes where it stopped)


@dataclass
class PullResult:
    model: str
    current: bool = False
    downloaded: int = 0
    linked: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


def select(manifest: Manifest, precisions: Sequence[str] = ()) -> list[Artifact]:
    """What a server of these precisions loads: their ONNX graphs (every shape) and engines, and the prompt
    embeddings; everything when no precision is named (or `auto`)."""
    wanted = [p for p in precisions if p != "auto"]
    if not wanted:
        return manifest.artifacts()
    out: list[Artifact] = [manifest.prompt_embeds] if manifest.prompt_embeds else []
    for p in wanted:
        v = manifest.onnx.get(p)
        engines = [e.plan for e in manifest.engines if e.precision == p]
        if v is None and not engines:
            have = sorted({*manifest.onnx, *(e.precision for e in manifest.engines)})
            raise StorageError(f"{manifest.name}: no {p} graph or engine in the manifest (it has {have})")
        if v is not None:
            out += [v.graph, *([v.external_data] if v.external_data else [])]
            for sg in v.shapes:
                out += [sg.graph, *([sg.external_data] if sg.external_data else [])]
        out += engines
    return out


def is_current(target: Path, raw: bytes, wanted: Sequence[Artifact]) -> bool:
    try:
        if (target / MANIFEST_FILE).read_bytes() != raw:
            return False
        return all((p := target / a.path).is_file() and p.stat().st_size == a.size for a in wanted)
    except OSError:
        return False


@contextlib.contextmanager
def _locked(work: Path) -> Iterator[None]:
    """One pull at a time per repository (pods sharing a cache); then sweep what killed pulls left."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        for stale in work.iterdir():
            if stale.name != "lock":
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _installed(target: Path) -> dict[str, Path]:
    """sha256 → file of the version installed now (trusted: a pull verified it), for hard links."""
    try:
        m = Manifest.model_validate_json((target / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    out = {}
    for a in m.artifacts():
        p = target / a.path
        if not p.is_symlink() and p.is_file() and p.stat().st_size == a.size:
            out[a.sha256] = p
    return out


def _download(client: Any, loc: Location, key: str, dest: Path, art: Artifact) -> int:
    """Stream one object into `dest`, hashing as it is written; resume after a dropped connection."""
    from botocore.exceptions import BotoCoreError, ClientError

    sha, n, drops = hashlib.sha256(), 0, 0
    with open(dest, "wb") as f:
        while True:
            try:
                kwargs = {"Range": f"bytes={n}-"} if n else {}
                body = client.get_object(Bucket=loc.bucket, Key=key, **kwargs)["Body"]
                for chunk in body.iter_chunks(CHUNK):
                    n += len(chunk)
                    if n > art.size:
                        raise IntegrityError(f"{loc}/{key}: more than the {art.size} bytes of {art.path}")
                    f.write(chunk)
                    sha.update(chunk)
                if n == art.size:
                    break
                raise StorageError(f"{loc}/{key}: ended after {n} of {art.size} bytes")
            except ClientError as e:
                raise StorageError(f"{loc}/{key} ({art.path}): {describe(e)}") from e
            except (BotoCoreError, OSError, StorageError) as e:
                if isinstance(e, IntegrityError) or drops >= RESUMES:
                    raise StorageError(f"{loc}/{key} ({art.path}): {describe(e)}") from e
                drops += 1
                log.warning("%s: connection lost at %d of %d bytes (%s); resuming", art.path, n, art.size, e)
                time.sleep(min(8.0, 0.5 * 2**drops))
        f.flush()
        os.fsync(f.fileno())
    digest = sha.hexdigest()
    if digest != art.sha256:
        raise IntegrityError(
            f"{loc}/{key}: {art.path} has sha256 {digest[:12]}…, the manifest says {art.sha256[:12]}…: "
            "the object is damaged or was replaced; refused (push the model again)"
        )
    return n


def _link(old: Path | None, dest: Path) -> bool:
    """Hard-link a file the installed version already has; False when there is none or links fail."""
    if old is None:
        return False
    try:
        os.link(old, dest)
    except OSError:
        return False
    return True


def _place(tmp: Path, art: Artifact) -> Path:
    dest = (tmp / art.path).resolve()
    if not dest.is_relative_to(tmp.resolve()):
        raise IntegrityError(f"artifact path {art.path!r} leaves the model folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pull_model(
    client: Any,
    loc: Location,
    model: str,
    repository: Path,
    precisions: Sequence[str] = (),
    jobs: int = 4,
) -> PullResult:
    """Install `model` from `loc` into `repository/model`, or find it current."""
    t0 = time.monotonic()
    check_model_name(model)
    result = PullResult(model)
    raw = get_manifest_bytes(client, loc, model)
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValueError as e:
        raise StorageError(f"{loc}/{model}/{MANIFEST_FILE}: not a valid manifest: {e}") from e
    wanted = select(manifest, precisions)
    repository = Path(repository)
    target = repository / model
    if is_current(target, raw, wanted):
        result.current, result.seconds = True, time.monotonic() - t0
        return result
    work = repository / WORK_DIR
    with _locked(work):
        if is_current(target, raw, wanted):  # another pull on this cache finished it meanwhile
            result.current, result.seconds = True, time.monotonic() - t0
            return result
        tmp = Path(tempfile.mkdtemp(dir=work, prefix=f"{model}-"))
        try:
            have = _installed(target)
            by_sha: dict[str, list[Artifact]] = {}
            for art in wanted:
                by_sha.setdefault(art.sha256, []).append(art)

            counts = threading.Lock()

            def fetch(arts: list[Artifact]) -> None:
                first = _place(tmp, arts[0])
                linked, received = _link(have.get(arts[0].sha256), first), 0
                if not linked:
                    received = _download(client, loc, loc.blob_key(model, arts[0].sha256), first, arts[0])
                for other in arts[1:]:  # the same bytes under another path
                    os.link(first, _place(tmp, other))
                with counts:
                    result.linked += linked
                    result.downloaded += not linked
                    result.bytes_received += received

            pool = ThreadPoolExecutor(max(1, jobs), thread_name_prefix="gendr-pull")
            try:
                for fut in [pool.submit(fetch, arts) for arts in by_sha.values()]:
                    fut.result()
            finally:  # the first failure stops what has not started yet
                pool.shutdown(wait=True, cancel_futures=True)
            (tmp / MANIFEST_FILE).write_bytes(raw)
            for d in {tmp, *(p.parent for p in tmp.rglob("*"))}:
                _fsync_dir(d)
            os.chmod(tmp, 0o755)
            old_dir = work / f"{model}-old"
            if target.exists():
                os.rename(target, old_dir)
            os.rename(tmp, target)
            _fsync_dir(repository)
            shutil.rmtree(old_dir, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    result.seconds = time.monotonic() - t0
    return result
