"""Typed service settings: every knob, read once, from `GENDR_*` env vars and an optional config file.

There is deliberately no port setting: Kubernetes injects `<SERVICE>_PORT` variables, so a Service
called `gendr` would collide with `GENDR_PORT`. Host and port are `gendr-serve` flags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidatorFunctionWrapHandler, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

BackendName = Literal[
    "auto",
    "onnxruntime-cpu",
    "onnxruntime-cuda",
    "onnxruntime-trt",
    "openvino-cpu",
    "tensorrt",
    "torch",
    "fake",
]
PrecisionName = Literal["auto", "fp32", "fp16", "bf16", "int8", "fp8"]

CONFIG_FILE_ENV = "GENDR_CONFIG_FILE"


class AutoPixels(int):
    """`GENDR_WHOLE_IMAGE_MAX_PIXELS=auto`: an int, so code that needs a number before the cap is measured
    (a backend deciding to load its whole-image graph and the sizes to warm it up at) gets a positive one;
    the runtime replaces it by the cap measured at warm-up (service/scheduling/whole_image.py)."""

    def __repr__(self) -> str:
        return "'auto'"

    __str__ = __repr__


#: What backends load and warm up with under `auto` (the warm-up sizes come out as t² and (2t)²).
WHOLE_IMAGE_AUTO = AutoPixels(1 << 20)


class Settings(BaseSettings):
    """Service settings. Env: `GENDR_<FIELD>`; lists as JSON (`GENDR_MODELS='["a","b"]'`)."""

    model_config = SettingsConfigDict(env_prefix="GENDR_", extra="forbid", validate_default=True)

    # --- models and backends -------------------------------------------------------------
    model_repository: Path = Field(Path("models"), description="Folder holding one sub-folder per model.")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models to load (JSON list or comma-separated); empty = every model found.",
    )
    default_model: str | None = Field(
        None, description="Model used when a request names none; default: first."
    )
    backend: BackendName = Field("auto", description="Inference backend; `auto` picks the fastest available.")
    precision: PrecisionName = Field("auto", description="Precision of the ONNX variant / engine to serve.")
    device_id: int = Field(0, ge=0, description="CUDA device index for GPU backends.")
    instances_per_device: Annotated[int, Field(ge=1, le=16)] | Literal["auto"] = Field(
        1,
        description="Engine instances per device: one worker each (TensorRT contexts, OpenVINO streams, "
        "ONNX Runtime sessions where each needs its own pool, else one shared session). `auto`: TensorRT "
        "fits as many as the GPU's free memory holds (measured at load, at most 8); other backends 1.",
    )
    intra_op_threads: int = Field(
        0, ge=0, le=256, description="ONNX Runtime CPU threads per instance; 0 = cores/instances."
    )
    cuda_graphs: bool = Field(False, description="Capture CUDA graphs per batch size (TensorRT backend).")
    ort_trt_cache_dir: Path | None = Field(
        None,
        description="Writable folder for ONNX Runtime TensorRT EP engines; default: a temp folder.",
    )
    fake_delay_s: float = Field(
        0.0, ge=0, le=600, description="Test backend only (GENDR_BACKEND=fake): seconds per engine call."
    )
    fake_per_tile_s: float = Field(
        0.0,
        ge=0,
        le=60,
        description="Test backend only (GENDR_BACKEND=fake): extra seconds per primary tile's pixels.",
    )
    fake_tiles: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="Test backend only (GENDR_BACKEND=fake): extra static tile edges (shape buckets).",
    )
    fake_dynamic: bool = Field(
        False, description="Test backend only (GENDR_BACKEND=fake): also run whole images (any shape)."
    )
    torch_compile: bool = Field(
        False, description="torch.compile the reference backend (torch backend only)."
    )

    # --- batching and admission ----------------------------------------------------------
    max_batch: int = Field(4, ge=1, le=64, description="Largest number of tiles per engine call.")
    max_queue_delay_ms: float = Field(
        2.0, ge=0, le=1000, description="How long a partial batch waits for more tiles."
    )
    queue_capacity_tiles: int = Field(
        512,
        ge=1,
        description="Backlog (primary-tile units) above which a new request gets a 503, whatever its size.",
    )
    whole_image_max_pixels: int = Field(
        WHOLE_IMAGE_AUTO,
        description="Input pixels of one call on a dynamic-shape graph (bounds its memory); 0 = off; `auto`: "
        "what fits the memory left after loading, measured at warm-up (GET /v1/models says why).",
    )
    whole_image_memory_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="`auto` whole-image cap: share of the memory free after loading (GPU: the device's, CPU: "
        "the container's) that the instances' whole-image calls may use at once.",
    )
    scheduling_work_weight: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="Queue order: arrival + this × remaining engine seconds (0: first come, first served).",
    )
    unhealthy_after_failures: int = Field(
        3, ge=1, description="Consecutive failed batches before an instance is unhealthy."
    )

    # --- request limits --------------------------------------------------------------------
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest request body, enforced while reading."
    )
    max_input_pixels: int = Field(
        16_777_216, ge=1, description="Largest input image (width × height), from the header."
    )
    max_output_pixels: int = Field(16_777_216, ge=1, description="Largest output image (width × height).")
    max_scale: float = Field(8.0, ge=1, le=16, description="Largest `scale` a client may ask for.")
    default_deadline_s: float = Field(120.0, gt=0, description="Deadline of a request that sets none.")
    max_deadline_s: float = Field(600.0, gt=0, description="Cap on a client-supplied deadline.")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="SIGTERM: admitted work may finish, then exit, all within this many seconds."
    )
    image_workers: int = Field(
        2, ge=1, le=64, description="Threads that decode and encode images off the event loop."
    )
    image_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP"],
        description="Input formats accepted (Pillow format ids, e.g. add `AVIF`); anything else is 415.",
    )
    output_quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality when a request sets none.")
    encode_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="Threads that compress the bands of one PNG output in parallel (the GIL released); "
        "0 = the container's CPUs (cgroup quota).",
    )
    png_compress_level: int = Field(
        3,
        ge=0,
        le=9,
        description="PNG deflate level: 1–3 ISA-L's fast deflate (one speed; ≈ +3 % size vs zlib 3 at "
        "~13× its speed), 4–9 zlib (6: ≈ 8 % smaller, ≈ 27× slower), 0 stored.",
    )
    max_pixels_per_byte: float = Field(
        1024.0,
        ge=0,
        description="Above 1 MP, at most this many input pixels per byte sent (413); 0 = no cap.",
    )
    retry_after_s: float = Field(
        5.0, gt=0, le=3600, description="Retry-After of 503s that carry no estimate (all but a full queue)."
    )

    # --- HTTP server (uvicorn; docs/http.md "Before the app") ----------------------------------
    max_connections: int = Field(
        256, ge=1, description="Open connections (and requests) before new requests get 503 `overloaded`."
    )
    max_header_bytes: int = Field(
        16_384, ge=1024, description="Largest request line + header block; larger is 431."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A request head must arrive within this many seconds (else 408)."
    )
    # Above the idle timeout of the proxies that pool connections to us (ingress-nginx upstream keepalive
    # and AWS ALB: 60 s), so they close idle connections first: else a request they send on a connection
    # we are closing gets a 502 (docs/deploy.md, "Ingress and load balancers").
    keep_alive_timeout_s: float = Field(
        75.0, gt=0, description="Idle keep-alive connections are closed after this many seconds."
    )
    root_path: str = Field(
        "",
        pattern=r"^(/[A-Za-z0-9._~-]+)*$",
        description="Path prefix a proxy strips before forwarding (e.g. `/gendr`): used in Location, "
        "result_url and the web page's links.",
    )

    # --- security ----------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens for /upscale (comma-separated or JSON list); empty = open.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="JSON list of named keys with quotas: name, sha256 (of the token), quota_mp_s, burst_mp.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Allowed CORS origins (JSON list or comma-separated); empty = CORS off.",
    )

    # --- jobs: POST /v1/jobs (docs/jobs.md) ---------------------------------------------------
    jobs_dir: Path | None = Field(
        None, description="Folder for job results and records; default: `gendr-jobs` in the temp folder."
    )
    jobs_ttl_s: float = Field(3600.0, gt=0, description="A finished job and its result are kept this long.")
    jobs_max_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Cap on stored results; beyond it the oldest results expire."
    )
    jobs_max: int = Field(
        256, ge=1, description="Jobs held at once (unfinished + finished); all unfinished: 503."
    )
    # --- shared job layer on Redis Streams (docs/jobs.md#several-replicas) ----------------------
    redis_url: str | None = Field(
        None,
        description="redis://, rediss:// or unix:// URL of the shared job store; unset: the embedded store.",
    )
    redis_password_file: Path | None = Field(
        None, description="File holding the Redis password (a mounted Secret); overrides the URL's."
    )
    redis_prefix: str = Field(
        "gendr", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Key prefix of every Redis key we write."
    )
    jobs_lease_s: float = Field(
        30.0,
        gt=0,
        description="A claimed job whose replica stops heartbeating for this long is reclaimed by another.",
    )
    jobs_max_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="Starts of one job (a start per replica lost) before it fails (`job_lost`).",
    )
    jobs_idempotency_ttl_s: float = Field(
        86400.0, gt=0, description="How long an `Idempotency-Key` of POST /v1/jobs is remembered."
    )
    jobs_max_backlog_tiles: int = Field(
        100_000,
        ge=1,
        description="Shared store: queued tiles of a model beyond which POST /v1/jobs is a 503.",
    )
    # --- webhooks and URLs of a job (docs/jobs.md#webhooks) ------------------------------------
    webhook_secret: str | None = Field(
        None, description="Standard Webhooks signing secret (`whsec_` + base64); unset: webhooks refused."
    )
    webhook_max_s: float = Field(
        3600.0, gt=0, description="A webhook delivery is retried with back-off for at most this long."
    )
    url_allowlist: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDRs that input_url/output_url/webhook_url may reach although private.",
    )
    url_allow_http: bool = Field(False, description="Allow plain http:// for input_url/output_url/webhooks.")
    url_timeout_s: float = Field(30.0, gt=0, description="Time limit of one fetch or upload of a job URL.")

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level (`gendr-serve --log-level` overrides it)."
    )

    @field_validator(
        "api_keys", "models", "cors_origins", "image_formats", "fake_tiles", "url_allowlist", mode="before"
    )
    @classmethod
    def _split_list(cls, v: object) -> object:
        # Allow a plain comma-separated list in env files and Kubernetes Secrets, or a JSON list.
        if isinstance(v, str):
            if v.strip().startswith("["):
                return json.loads(v)
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("whole_image_max_pixels", mode="wrap")
    @classmethod
    def _auto_pixels(cls, v: object, handler: ValidatorFunctionWrapHandler) -> object:
        if isinstance(v, AutoPixels) or (isinstance(v, str) and v.strip().lower() == "auto"):
            return WHOLE_IMAGE_AUTO
        n = handler(v)
        if n < 0:
            raise ValueError("whole_image_max_pixels must be >= 0 or `auto`")
        return n

    @field_validator("image_formats", mode="after")
    @classmethod
    def _check_formats(cls, v: list[str]) -> list[str]:
        from PIL import Image  # only here: settings stay importable without the serve extras

        Image.init()
        out = [f.upper() for f in v]
        unknown = [f for f in out if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"Pillow cannot read {unknown}; known formats: {sorted(Image.OPEN)}")
        if not out:
            raise ValueError("image_formats must name at least one format")
        return out

    def instances(self, auto: int = 1) -> int:
        """`instances_per_device` as a number (`auto` → what the caller measured or chose)."""
        return auto if self.instances_per_device == "auto" else int(self.instances_per_device)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_deadline_s > self.max_deadline_s:
            raise ValueError("default_deadline_s must not exceed max_deadline_s")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get(CONFIG_FILE_ENV)
        if path:
            p = Path(path)
            if not p.is_file():
                raise ValueError(f"{CONFIG_FILE_ENV}={path}: no such file")
            if p.suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=p))
            elif p.suffix == ".json":
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=p))
            else:
                raise ValueError(f"{CONFIG_FILE_ENV}: use a .toml or .json file, got {p.name}")
        return tuple(sources)


def settings_table() -> str:
    """Markdown table of every setting (README keeps a copy; a test checks they agree)."""
    rows = [
        "| env var | default | description |",
        "| --- | --- | --- |",
        f"| `{CONFIG_FILE_ENV}` | unset | Optional `.toml`/`.json` file of these settings (env wins). |",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        if isinstance(default, Path):
            default = str(default)
        rows.append(f"| `GENDR_{name.upper()}` | `{default!r}` | {field.description} |")
    return "\n".join(rows)
