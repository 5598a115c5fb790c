"""Triton peer through PyTriton: `Triton().bind(...)` of a `@batch` function with dynamic batching.

Variable-size images travel as one BYTES element per request (the PNG itself), so Triton's dynamic
batcher can group requests of any size; the function decodes, runs the engine on each image and
returns the ×4 PNGs. Clients speak Triton's own HTTP API (KServe v2 with binary data).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from engines import decode_png, encode_png, from_env
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "4"))
BATCH_TIMEOUT_S = float(os.environ.get("PEER_BATCH_TIMEOUT_S", "0.01"))


def make_infer() -> object:
    engine = from_env()

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        outs = [encode_png(engine(decode_png(bytes(row[0])))) for row in image]
        return {"image": np.array([[o] for o in outs], dtype=np.object_)}

    return infer


if __name__ == "__main__":
    port = int(os.environ["PEER_PORT"])
    config = TritonConfig(http_address="127.0.0.1", http_port=port, grpc_port=port + 1, metrics_port=port + 2)
    workers = int(os.environ.get("PEER_WORKERS", "1"))
    with Triton(config=config) as triton:
        triton.bind(
            model_name="upscale",
            infer_func=[make_infer() for _ in range(workers)],  # a list: one model instance per callable
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(
                max_batch_size=MAX_BATCH,
                batcher=DynamicBatcher(max_queue_delay_microseconds=int(BATCH_TIMEOUT_S * 1e6)),
            ),
            strict=False,
        )
        triton.serve()
