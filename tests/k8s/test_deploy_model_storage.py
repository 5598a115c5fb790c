"""The two model storage modes (docs/deploy.md, "Model storage"): models-s3 (the engine-build Job pushes to
object storage, an init container in each server pod pulls into a volume of that pod) and models-pvc
(a ReadWriteMany volume every pod mounts). The init container's command is run for real against a local
S3-compatible server."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import OVERLAYS, REPO, STORAGE_MODES, VARIANTS, components_of, one, pool_of

POOL_SETS = [*OVERLAYS, *(v for v in VARIANTS if pool_of(v))]
ALL_SETS = [*POOL_SETS, *(v for v in VARIANTS if not pool_of(v))]


def _server(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    dep = one(objs, "Deployment", "gendr")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    (ref,) = [e["configMapRef"]["name"] for e in c["envFrom"]]
    return dep, c, one(objs, "ConfigMap", ref)["data"]


def _source(objs: list[dict[str, Any]]) -> dict[str, str]:
    (cm,) = [
        o
        for o in objs
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("gendr-models-source")
    ]
    return cm["data"]


def _init_argv(objs: list[dict[str, Any]]) -> list[str]:
    """The init container's command line with $(VAR) expanded as the kubelet does."""
    dep, _, cfg = _server(objs)
    (init,) = dep["spec"]["template"]["spec"]["initContainers"]
    env = dict(_source(objs))
    for e in init["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            env[e["name"]] = cfg[e["valueFrom"]["configMapKeyRef"]["key"]]
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in [*init["command"], *init["args"]]]


@pytest.mark.parametrize("name", ALL_SETS)
def test_one_storage_mode(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    modes = [c for c in components_of(name) if c in STORAGE_MODES]
    assert len(modes) == 1, f"{name}: exactly one of {STORAGE_MODES}"
    dep, c, cfg = _server(rendered[name])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == cfg["GENDR_MODEL_REPOSITORY"]]
    assert mount["readOnly"] is True
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    pvc = one(rendered[name], "PersistentVolumeClaim", "gendr-models")
    init = dep["spec"]["template"]["spec"].get("initContainers", [])
    if modes == ["models-pvc"]:
        assert vol["persistentVolumeClaim"] == {"claimName": "gendr-models", "readOnly": True}
        assert mount["subPath"] == "repository"
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and not init
    else:
        # A volume of the pod: made with it, in its zone, gone with it; never a hostPath (refused by Pod
        # Security Admission `restricted`).
        template = vol["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert template["accessModes"] == ["ReadWriteOnce"]
        assert int(template["resources"]["requests"]["storage"].removesuffix("Gi")) >= 20
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"], "the Job's workspace only: any storage class"
        (pull,) = init
        (w,) = [m for m in pull["volumeMounts"] if m["name"] == mount["name"]]
        assert w["mountPath"] == mount["mountPath"] and not w.get("readOnly")


@pytest.mark.parametrize("name", [n for n in ALL_SETS if "models-s3" in components_of(n)])
def test_the_init_container_pulls_what_the_server_loads(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objs = rendered[name]
    dep, c, cfg = _server(objs)
    (init,) = dep["spec"]["template"]["spec"]["initContainers"]
    # The serving image (no torch): `pull` needs only the storage extra, never the build image.
    assert init["image"] == c["image"] and "build" not in init["image"]
    argv = _init_argv(objs)
    assert argv[:2] == ["gendr-build", "pull"]
    from engine_build.cli import _light_modules, build_parser

    args = build_parser(_light_modules(argv[1:])).parse_args(argv[1:])
    assert str(args.repository) == cfg["GENDR_MODEL_REPOSITORY"]
    assert args.model == [cfg["GENDR_DEFAULT_MODEL"]] and args.precision == [cfg["GENDR_PRECISION"]]
    assert args.url == _source(objs)["MODELS_URL"]
    # Only the server reads GENDR_ settings (the init container gets the two it needs by key).
    assert not [e for e in init.get("envFrom", []) if e["configMapRef"]["name"].startswith("gendr-config")]
    # The engine-build Job pushes what it built to the same place, after the engine step.
    job = one(objs, "Job", "gendr-engine-build")
    (build,) = job["spec"]["template"]["spec"]["containers"]
    refs = [e["configMapRef"]["name"] for e in build.get("envFrom", [])]
    assert [r for r in refs if r.startswith("gendr-models-source")]
    script = build["args"][0]
    assert script.index('gendr-build push "$models_url"') > script.index("gendr-build engine")


def test_each_pool_pushes_to_its_own_prefix(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Each pool's Job writes its own manifest (its own engines): two pools on one prefix would overwrite
    each other's."""
    urls = {o: _source(rendered[o])["MODELS_URL"] for o in OVERLAYS}
    assert len(set(urls.values())) == len(OVERLAYS)
    for pool, url in urls.items():
        assert url.startswith("s3://") and url.rstrip("/").endswith("/" + pool)


def test_the_rendered_init_container_pulls_from_a_real_s3_endpoint(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the A10 overlay's init container command (bucket and mount point moved to this test's) against
    moto's S3 server, with a repository pushed as the engine-build Job pushes it."""
    pytest.importorskip("moto.server")
    sys.path.insert(0, str(REPO / "tests" / "engine_build" / "storage"))
    sys.path.insert(0, str(REPO / "tests" / "service"))
    import shutil

    from s3_helpers import CREDENTIALS, moto_server
    from tiny_onnx import write_repo

    from engine_build.cli import main
    from engine_build.storage.remote import make_client
    from service.manifest import Manifest, OnnxVariant, make_artifact, read_manifest, write_manifest

    objs = rendered["a10"]
    _, _, cfg = _server(objs)
    model, precision = cfg["GENDR_DEFAULT_MODEL"], cfg["GENDR_PRECISION"]
    built = tmp_path / "built"
    model_dir = write_repo(built, model)
    m = read_manifest(model_dir)
    extra = model_dir / "onnx" / precision / "model.onnx"
    extra.parent.mkdir(parents=True)
    extra.write_bytes((model_dir / m.onnx["fp32"].graph.path).read_bytes() + b"\0")  # other bytes
    variant = OnnxVariant(precision=precision, graph=make_artifact(model_dir, extra), opset=18, key="k")
    write_manifest(
        model_dir, Manifest.model_validate({**m.model_dump(), "onnx": {**m.onnx, precision: variant}})
    )

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    with moto_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        make_client().create_bucket(Bucket="gendr-models")
        prefix = _source(objs)["MODELS_URL"].rsplit("/", 1)[1]
        assert main(["push", f"s3://gendr-models/{prefix}", "--repository", str(built)]) == 0
        argv = _init_argv(objs)[1:]
        argv[1] = f"s3://gendr-models/{prefix}"
        argv[argv.index("--repository") + 1] = str(tmp_path / "models")
        assert main(argv) == 0
    got = tmp_path / "models" / model
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == [
        "manifest.json",
        f"onnx/{precision}/model.onnx",
    ]
    assert (got / "manifest.json").read_bytes() == (model_dir / "manifest.json").read_bytes()
    shutil.rmtree(built)
