"""`gendr-build push` / `gendr-build pull`: a model repository to and from object storage (S3-compatible).

Torch-free, like engine_build.storage: the cli loads only this module for these two commands, so the
serving image's init container runs `pull` with the `storage` extra and nothing of the build stage.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from engine_build.storage.pull import pull_model
from engine_build.storage.push import push_model
from engine_build.storage.remote import Location, StorageError, list_remote_models, make_client
from service.manifest import PRECISIONS, list_models

COMMANDS = ("push", "pull")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="s3://BUCKET[/PREFIX] (one prefix per GPU pool)")
    p.add_argument(
        "--repository",
        type=Path,
        default=Path(os.environ.get("GENDR_MODEL_REPOSITORY", "models")),
        help="local model repository (default: $GENDR_MODEL_REPOSITORY or ./models)",
    )
    p.add_argument(
        "--model", action="append", default=[], help="model name (repeatable; default: every model)"
    )
    p.add_argument(
        "--endpoint-url",
        default=None,
        help="S3-compatible endpoint (MinIO, Ceph, GCS XML API...); default: $AWS_ENDPOINT_URL_S3 / "
        "$AWS_ENDPOINT_URL, else AWS",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="upload models of a local repository to object storage (sha256-checked, manifest last)",
        description="Uploads every artifact of each model, named by its sha256 (skipped when already "
        "there), checking each file against the manifest while reading it; the manifest goes last.",
    )
    _common(p)
    p.set_defaults(func=cmd_push)
    p = sub.add_parser(
        "pull",
        help="download models from object storage into a local repository (verified, atomic, cached)",
        description="Skips a model whose local manifest matches; else downloads into a temporary folder, "
        "verifies every file's sha256 while writing it, and renames the folder into place.",
    )
    _common(p)
    p.add_argument(
        "--precision",
        action="append",
        default=[],
        choices=["auto", *PRECISIONS],
        help="pull only what serving this precision loads (repeatable; default or auto: everything)",
    )
    p.add_argument("--jobs", type=int, default=4, help="files downloaded at once (default 4)")
    p.set_defaults(func=cmd_pull)


def cmd_push(args: argparse.Namespace) -> int:
    loc = Location.parse(args.url)
    names = args.model or list_models(args.repository)
    if not names:
        raise StorageError(f"{args.repository}: no model folder with a manifest.json to push")
    client = make_client(args.endpoint_url)
    for name in names:
        r = push_model(client, args.repository / name, loc)
        print(
            f"{name}: {r.uploaded} uploaded ({r.bytes_sent / 1e6:.1f} MB), {r.skipped} already there, "
            f"manifest {'written' if r.manifest_written else 'unchanged'} → {loc}/{name} ({r.seconds:.1f} s)"
        )
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    loc = Location.parse(args.url)
    client = make_client(args.endpoint_url)
    names = args.model or list_remote_models(client, loc)
    if not names:
        raise StorageError(f"{loc}: no model there (push one first)")
    args.repository.mkdir(parents=True, exist_ok=True)
    for name in names:
        r = pull_model(client, loc, name, args.repository, args.precision, args.jobs)
        if r.current:
            print(f"{name}: current in {args.repository / name}, nothing to pull")
            continue
        rate = r.bytes_received / 1e6 / max(r.seconds, 1e-3)
        print(
            f"{name}: {r.downloaded} downloaded ({r.bytes_received / 1e6:.1f} MB, {rate:.0f} MB/s), "
            f"{r.linked} reused, verified → {args.repository / name} ({r.seconds:.1f} s)"
        )
    return 0
