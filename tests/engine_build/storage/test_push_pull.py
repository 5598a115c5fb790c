"""`gendr-build push` / `pull` against a real S3-compatible HTTP server (moto's server mode on loopback):
a round trip of a real repository, skip-when-current, a damaged object refused, a dropped connection
resumed, a killed pull that leaves no half repository, and `pull` without torch."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "service"))

from s3_helpers import CREDENTIALS, CuttingProxy, moto_server

pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from engine_build.cli import main as gendr_build  # noqa: E402
from engine_build.storage import pull as pull_mod  # noqa: E402
from engine_build.storage.pull import WORK_DIR, pull_model  # noqa: E402
from engine_build.storage.push import push_model  # noqa: E402
from engine_build.storage.remote import IntegrityError, Location, StorageError, make_client  # noqa: E402
from service.manifest import (  # noqa: E402
    Manifest,
    OnnxVariant,
    make_artifact,
    read_manifest,
    verify_artifact,
    write_manifest,
)

ROOT = Path(__file__).resolve().parents[3]
BUCKET = "gendr-models"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    saved = {k: os.environ.get(k) for k in (*CREDENTIALS, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    os.environ.update(CREDENTIALS)
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(k, None)
    try:
        with moto_server() as url:
            make_client(url).create_bucket(Bucket=BUCKET)
            yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def loc(request: pytest.FixtureRequest) -> Location:
    """A fresh prefix per test (one pool's repository)."""
    return Location(BUCKET, f"t/{request.node.name.replace('[', '-').rstrip(']')}")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A real repository without torch: the runtime tests' tiny ONNX model with shape buckets and a dynamic
    graph, plus an int8 variant whose file has the same bytes as fp32 (one blob, two paths)."""
    from tiny_onnx import write_bucket_repo

    root = tmp_path / "models"
    model_dir = write_bucket_repo(root, "tiny")
    m = read_manifest(model_dir)
    fp32 = model_dir / m.onnx["fp32"].graph.path
    int8 = model_dir / "onnx" / "int8" / "model.onnx"
    int8.parent.mkdir(parents=True)
    shutil.copyfile(fp32, int8)
    variant = OnnxVariant(precision="int8", graph=make_artifact(model_dir, int8), opset=18, key="tests-int8")
    write_manifest(
        model_dir, Manifest.model_validate({**m.model_dump(), "onnx": {**m.onnx, "int8": variant}})
    )
    return root


def _tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _leftovers(repository: Path) -> list[str]:
    work = repository / WORK_DIR
    return sorted(p.name for p in work.iterdir() if p.name != "lock") if work.is_dir() else []


def test_push_then_pull_round_trip(endpoint: str, loc: Location, repo: Path, tmp_path: Path) -> None:
    client = make_client(endpoint)
    first = push_model(client, repo / "tiny", loc)
    n_blobs = len({a.sha256 for a in read_manifest(repo / "tiny").artifacts()})
    assert (first.uploaded, first.skipped, first.manifest_written) == (n_blobs, 0, True)
    again = push_model(client, repo / "tiny", loc)  # nothing changed: every blob and the manifest stay
    assert (again.uploaded, again.skipped, again.manifest_written) == (0, n_blobs, False)

    cache = tmp_path / "cache"
    got = pull_model(client, loc, "tiny", cache)
    assert not got.current and got.downloaded == n_blobs
    assert _tree(cache / "tiny") == _tree(repo / "tiny")  # every file, the manifest byte for byte
    read_manifest(cache / "tiny", verify=True)  # what the server checks as it loads
    assert _leftovers(cache) == []

    # Through the CLI, as the init container runs it: current, so nothing is downloaded.
    rc = gendr_build(
        ["pull", f"s3://{BUCKET}/{loc.prefix}", "--repository", str(cache), "--endpoint-url", endpoint]
    )
    assert rc == 0
    assert pull_model(client, loc, "tiny", cache).current


def test_pull_only_what_a_precision_needs_and_reuse(
    endpoint: str, loc: Location, repo: Path, tmp_path: Path
) -> None:
    client = make_client(endpoint)
    push_model(client, repo / "tiny", loc)
    cache = tmp_path / "cache"
    got = pull_model(client, loc, "tiny", cache, precisions=["int8"])
    assert sorted(_tree(cache / "tiny")) == ["manifest.json", "onnx/int8/model.onnx"]
    assert pull_model(client, loc, "tiny", cache, precisions=["int8"]).current
    # Asking for more: only the missing files come over the network; the int8 file has fp32's bytes.
    got = pull_model(client, loc, "tiny", cache)
    assert got.linked == 1 and _tree(cache / "tiny") == _tree(repo / "tiny")
    # A file damaged or deleted locally: not current any more, pulled again.
    (cache / "tiny" / "onnx" / "fp32" / "model.onnx").unlink()
    assert not pull_model(client, loc, "tiny", cache).current
    assert _tree(cache / "tiny") == _tree(repo / "tiny")
    with pytest.raises(StorageError, match="no fp8"):
        pull_model(client, loc, "tiny", tmp_path / "other", precisions=["fp8"])


def test_a_corrupted_object_is_refused(
    endpoint: str, loc: Location, repo: Path, tmp_path: Path, capsys: Any
) -> None:
    client = make_client(endpoint)
    push_model(client, repo / "tiny", loc)
    cache = tmp_path / "cache"
    pull_model(client, loc, "tiny", cache, precisions=["int8"])
    before = _tree(cache / "tiny")
    # Same size, other bytes (bit rot, a botched manual copy): the sha256 check must refuse it.
    art = read_manifest(repo / "tiny").onnx["fp32"].shapes[0].graph
    key = loc.blob_key("tiny", art.sha256)
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        pull_model(client, loc, "tiny", cache)  # wants more than is installed: downloads, and refuses
    assert _tree(cache / "tiny") == before and _leftovers(cache) == []  # the old version stays whole
    fresh = tmp_path / "fresh"
    url = f"s3://{BUCKET}/{loc.prefix}"
    assert gendr_build(["pull", url, "--repository", str(fresh), "--endpoint-url", endpoint]) == 2
    assert "sha256" in capsys.readouterr().err
    assert not (fresh / "tiny").exists() and _leftovers(fresh) == []


def test_push_refuses_a_file_that_does_not_match_its_manifest(
    endpoint: str, loc: Location, repo: Path
) -> None:
    client = make_client(endpoint)
    path = repo / "tiny" / "onnx" / "int8" / "model.onnx"
    art = read_manifest(repo / "tiny").onnx["int8"].graph
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))  # the fp32 file (same sha256 in the manifest) stays intact
    fp32 = repo / "tiny" / "onnx" / "fp32" / "model.onnx"
    fp32.unlink()
    fp32.symlink_to(path)
    with pytest.raises(IntegrityError):
        push_model(client, repo / "tiny", loc)
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=loc.key()).get("Contents", [])
    assert not [o for o in listed if art.sha256 in o["Key"] or o["Key"].endswith("manifest.json")]


def test_a_dropped_connection_resumes_where_it_stopped(
    endpoint: str, loc: Location, repo: Path, tmp_path: Path
) -> None:
    push_model(make_client(endpoint), repo / "tiny", loc)
    proxy = CuttingProxy(endpoint, keep=1000, cuts=2).start()
    try:
        got = pull_model(make_client(proxy.url), loc, "tiny", tmp_path / "cache", precisions=["fp32"])
    finally:
        proxy.stop()
    assert proxy.cuts == 0 and "bytes=1000-" in proxy.seen_ranges
    wanted = pull_mod.select(read_manifest(repo / "tiny"), ["fp32"])
    assert got.bytes_received == sum(a.size for a in wanted)
    for art in wanted:  # as the server checks what it loads
        verify_artifact(tmp_path / "cache" / "tiny", art)


def test_an_interrupted_pull_leaves_no_repository_and_a_retry_succeeds(
    endpoint: str, loc: Location, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    push_model(make_client(endpoint), repo / "tiny", loc)
    cache = tmp_path / "cache"
    # 1. The connection keeps dropping: the pull gives up, and nothing that looks like a model is there.
    monkeypatch.setattr(pull_mod, "RESUMES", 1)
    monkeypatch.setattr(pull_mod.time, "sleep", lambda _s: None)
    proxy = CuttingProxy(endpoint, keep=1000, cuts=100).start()
    try:
        with pytest.raises(StorageError, match="tiny"):
            pull_model(make_client(proxy.url), loc, "tiny", cache)
    finally:
        proxy.stop()
    assert not (cache / "tiny").exists() and _leftovers(cache) == []

    # 2. The puller is killed mid-download (SIGKILL: no clean-up runs): still no model folder.
    proxy = CuttingProxy(endpoint, keep=1000, cuts=1, stall=True).start()
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "engine_build.cli", "pull", f"s3://{BUCKET}/{loc.prefix}"]
    proc = subprocess.Popen([*cmd, "--repository", str(cache), "--endpoint-url", proxy.url], env=env)
    try:
        assert proxy.cut_done.wait(60), "the download never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
        proxy.stop()
    assert not (cache / "tiny").exists()
    assert _leftovers(cache), "the killed pull's temporary folder is what a retry must sweep"

    # 3. A clean retry sweeps the leftovers and installs the verified model.
    out = subprocess.run([*cmd, "--repository", str(cache), "--endpoint-url", endpoint], env=env, timeout=120)
    assert out.returncode == 0
    assert _tree(cache / "tiny") == _tree(repo / "tiny") and _leftovers(cache) == []


def test_pull_runs_without_torch(endpoint: str, loc: Location, repo: Path, tmp_path: Path) -> None:
    """The init container runs `pull` from the serving image: no torch, no build stage (nor the server)."""
    push_model(make_client(endpoint), repo / "tiny", loc)
    # Nothing of the build stage, nor of the `serve` extra: the `storage` extra (boto3) is all it needs.
    build = ("torch", "torchvision", "diffusers", "onnx", "onnxruntime", "PIL", "spandrel", "tensorrt")
    serve = ("fastapi", "starlette", "uvicorn", "pydantic_settings", "prometheus_client", "redis", "httpx")
    blocked = (*build, *serve)
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "from engine_build.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        f"assert not [m for m in {blocked!r} if sys.modules.get(m) is not None]\n"
        "sys.exit(rc)\n"
    )
    url = f"s3://{BUCKET}/{loc.prefix}"
    args = [url, "--repository", str(tmp_path / "cache"), "--model", "tiny", "--precision", "fp32"]
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL": endpoint}
    out = subprocess.run([sys.executable, "-c", code, "pull", *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "verified" in out.stdout
    assert (tmp_path / "cache" / "tiny" / "manifest.json").is_file()


@pytest.mark.parametrize(
    "url", ["http://x/y", "s3://", "s3://b", "s3://Bucket/x", "s3://bucket/a//b", "s3://bucket/../x"]
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(StorageError):
        Location.parse(url)


def test_locations() -> None:
    loc = Location.parse("s3://gendr-models/pools/a10/")
    assert (loc.bucket, loc.prefix) == ("gendr-models", "pools/a10")
    assert loc.manifest_key("gendr") == "pools/a10/gendr/manifest.json"
    assert loc.blob_key("gendr", "ab" * 32) == f"pools/a10/gendr/blobs/sha256/{'ab' * 32}"
    assert Location.parse("s3://bucket").key("m", "manifest.json") == "m/manifest.json"
    with pytest.raises(StorageError):
        loc.manifest_key("../etc")
