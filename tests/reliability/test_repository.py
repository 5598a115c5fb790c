"""Hole 6 and tampered model repositories: what the service refuses to load, and what it still loads."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from service.manifest import (
    Manifest,
    ManifestError,
    TileGeometry,
    make_artifact,
    read_manifest,
    write_manifest,
)

PAYLOAD = b"weights " * 64


def _repo(tmp_path: Path, place: Callable[[Path, Path], None] | None = None) -> Path:
    """models/m/ with one checkpoint artifact `checkpoint/w.bin`; `place(model_dir, outside)` may tamper."""
    model = tmp_path / "models" / "m"
    (model / "checkpoint").mkdir(parents=True)
    w = model / "checkpoint" / "w.bin"
    w.write_bytes(PAYLOAD)
    m = Manifest(
        name="m",
        kind="single",
        native_scale=2,
        tile=TileGeometry(tile=32, overlap=8, graph_scale=2),
        checkpoint=[make_artifact(model, w)],
    )
    write_manifest(model, m)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "w.bin").write_bytes(PAYLOAD)  # same bytes: the hash alone cannot tell
    if place is not None:
        place(model, outside)
    return model


def _link_file(model: Path, outside: Path) -> None:
    (model / "checkpoint" / "w.bin").unlink()
    (model / "checkpoint" / "w.bin").symlink_to(outside / "w.bin")


def _link_folder(model: Path, outside: Path) -> None:
    (model / "checkpoint" / "w.bin").unlink()
    (model / "checkpoint").rmdir()
    (model / "checkpoint").symlink_to(outside)


def _relative_escape(model: Path, outside: Path) -> None:
    (model / "checkpoint" / "w.bin").unlink()
    os.symlink("../../../elsewhere/w.bin", model / "checkpoint" / "w.bin")


def _flip_byte(model: Path, outside: Path) -> None:
    w = model / "checkpoint" / "w.bin"
    w.write_bytes(b"X" + PAYLOAD[1:])


def _truncate(model: Path, outside: Path) -> None:
    (model / "checkpoint" / "w.bin").write_bytes(PAYLOAD[:-1])


def _remove(model: Path, outside: Path) -> None:
    (model / "checkpoint" / "w.bin").unlink()


def _manifest_edit(key: str, value: object) -> Callable[[Path, Path], None]:
    def edit(model: Path, outside: Path) -> None:
        doc = json.loads((model / "manifest.json").read_text())
        doc["checkpoint"][0][key] = value
        (model / "manifest.json").write_text(json.dumps(doc))

    return edit


TAMPERED = {
    "symlink to a file outside": _link_file,
    "symlinked folder outside": _link_folder,
    "relative link escaping": _relative_escape,
    "byte flipped": _flip_byte,
    "truncated": _truncate,
    "artifact removed": _remove,
    "path traversal in manifest": _manifest_edit("path", "../../elsewhere/w.bin"),
    "absolute path in manifest": _manifest_edit("path", "/etc/hostname"),
    "hash edited to another file's": _manifest_edit("sha256", "0" * 64),
    "unknown field in manifest": _manifest_edit("mode", "trust-me"),
}


@pytest.mark.parametrize("tamper", list(TAMPERED.values()), ids=list(TAMPERED))
def test_tampered_repository_is_refused(tmp_path: Path, tamper: Callable[[Path, Path], None]) -> None:
    model = _repo(tmp_path, tamper)
    with pytest.raises(ManifestError):
        read_manifest(model, verify=True)


def test_links_that_stay_inside_the_model_folder_are_served(tmp_path: Path) -> None:
    def inside(model: Path, outside: Path) -> None:
        (model / "store").mkdir()
        (model / "checkpoint" / "w.bin").rename(model / "store" / "w.bin")
        os.symlink("../store/w.bin", model / "checkpoint" / "w.bin")

    model = _repo(tmp_path, inside)
    assert read_manifest(model, verify=True).checkpoint[0].path == "checkpoint/w.bin"


def test_a_model_folder_reached_through_a_link_is_served(tmp_path: Path) -> None:
    """Volume mounts are often links (Kubernetes ..data): the model folder itself may be one."""
    model = _repo(tmp_path)
    alias = tmp_path / "alias"
    alias.symlink_to(model)
    read_manifest(alias, verify=True)
