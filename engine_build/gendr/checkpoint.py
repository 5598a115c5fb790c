"""GenDR checkpoints: a diffusers-layout folder of safetensors plus embeddings and metadata.

    <dir>/unet/config.json, <dir>/unet/*.safetensors
    <dir>/vae/config.json,  <dir>/vae/*.safetensors
    <dir>/prompt_embeds.safetensors      tensor "prompt_embeds" [1, 77, cross_attention_dim]
    <dir>/gendr.json                     {"format": "gendr-checkpoint", "version": 1, "pipeline": {...}}

Nothing is ever unpickled: pickle-based files are refused with a conversion hint, and every tensor
is checked against the architecture its config describes before it is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine_build.errors import BuildError
from engine_build.gendr.model import GenDR, build_gendr, build_unet, build_vae
from engine_build.gendr.presets import PROMPT_TOKENS
from service.manifest import PipelineParams

META_FILE = "gendr.json"
EMBEDS_FILE = "prompt_embeds.safetensors"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
FORMAT = "gendr-checkpoint"
#: Python pickle containers (can run code when loaded): refused everywhere, never opened.
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar", ".zip"})

CONVERT_HINT = (
    "pickle-based weights are never loaded (they can run arbitrary code). Convert them once, in a "
    'trusted environment, with: python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\" "
    "(or diffusers' save_pretrained(..., safe_serialization=True))"
)


class CheckpointError(BuildError, ValueError):
    """A checkpoint that is missing parts, unsafe, corrupt or inconsistent with its config."""


def refuse_pickles(root: Path) -> None:
    found = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if found:
        names = ", ".join(str(p.relative_to(root)) for p in found[:5])
        raise CheckpointError(f"{root}: refusing pickle-based file(s) {names}: {CONVERT_HINT}")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor, turning truncation or a bad header into a CheckpointError."""
    try:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); is it truncated or corrupt?"
        ) from e


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _load_module_weights(module: torch.nn.Module, folder: Path) -> None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: weights do not match config.json: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{folder}: {k} has shape {tuple(state[k].shape)} but config.json implies {tuple(v.shape)} "
                "(wrong channel count or wrong config?)"
            )
        if not state[k].is_floating_point():
            raise CheckpointError(f"{folder}: {k} is {state[k].dtype}, expected a floating-point tensor")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def read_metadata(root: Path) -> PipelineParams:
    meta = _read_json(Path(root) / META_FILE)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{root / META_FILE}: 'format' must be {FORMAT!r}")
    if meta.get("version") != 1:
        raise CheckpointError(
            f"{root / META_FILE}: unsupported version {meta.get('version')!r} (this tool reads 1)"
        )
    try:
        return PipelineParams.model_validate(meta.get("pipeline", {}))
    except ValidationError as e:
        raise CheckpointError(f"{root / META_FILE}: invalid pipeline metadata: {e}") from e


def load_checkpoint(root: str | Path) -> GenDR:
    """Build GenDR from a checkpoint folder, validating everything before any weight is used."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(f"{root}: refusing a pickle-based file: {CONVERT_HINT}")
        raise CheckpointError(
            f"{root}: a GenDR checkpoint is a folder (unet/, vae/, {EMBEDS_FILE}, {META_FILE})"
        )
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint folder")
    refuse_pickles(root)
    params = read_metadata(root)
    unet_cfg = _read_json(root / "unet" / "config.json")
    vae_cfg = _read_json(root / "vae" / "config.json")
    try:
        unet, vae = build_unet(unet_cfg), build_vae(vae_cfg)
    except Exception as e:  # diffusers raises many types for a bad config
        raise CheckpointError(f"{root}: config.json does not describe a valid model: {e}") from e
    lat = int(vae.config.latent_channels)
    if unet.config.in_channels != lat or unet.config.out_channels != lat:
        raise CheckpointError(
            f"{root}: UNet has {unet.config.in_channels}→{unet.config.out_channels} channels but the VAE "
            f"latent has {lat}; GenDR's UNet works in the VAE's latent space"
        )
    if abs(float(vae.config.scaling_factor) - params.scaling_factor) > 1e-6:
        raise CheckpointError(
            f"{root}: {META_FILE} scaling_factor {params.scaling_factor} differs from vae/config.json "
            f"{vae.config.scaling_factor}"
        )
    _load_module_weights(unet, root / "unet")
    _load_module_weights(vae, root / "vae")
    emb_path = root / EMBEDS_FILE
    if not emb_path.is_file():
        raise CheckpointError(f"{root}: missing {EMBEDS_FILE} (the fixed prompt embeddings)")
    emb = read_safetensors(emb_path).get("prompt_embeds")
    cross = int(unet.config.cross_attention_dim)
    if emb is None or tuple(emb.shape) != (1, PROMPT_TOKENS, cross):
        shape = None if emb is None else tuple(emb.shape)
        raise CheckpointError(
            f"{emb_path}: tensor 'prompt_embeds' must be [1, {PROMPT_TOKENS}, {cross}], got {shape}"
        )
    return GenDR(unet.eval(), vae.eval(), emb.float(), params)


def save_checkpoint(model: GenDR, root: str | Path) -> Path:
    root = Path(root)
    for name, module in (("unet", model.unet), ("vae", model.vae)):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(dict(module.config), indent=2, default=list))
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(d / WEIGHTS_FILE))
    save_file({"prompt_embeds": model.prompt_embeds.detach().contiguous()}, str(root / EMBEDS_FILE))
    meta = {"format": FORMAT, "version": 1, "pipeline": model.params.model_dump()}
    (root / META_FILE).write_text(json.dumps(meta, indent=2))
    return root


def make_tiny(out: str | Path, seed: int = 0) -> Path:
    """Deterministic tiny random checkpoint (same seed → byte-identical weights)."""
    model = build_gendr("tiny", seed=seed)
    return save_checkpoint(model, out)
