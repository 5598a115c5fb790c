"""LitServe peer: a `LitAPI` with `max_batch_size`/`batch_timeout` (LitServe's dynamic batching).

No `from __future__ import annotations` here: LitServe reads the real type hint of `decode_request`
(`fastapi.Request`) to decide that it parses the multipart form.

LitServe's default `batch` stacks numpy arrays, which images of different sizes cannot be, so `batch`
keeps the list and `predict` runs the engine on each image of the batch (one device call each).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import litserve as ls
import numpy as np
from engines import decode_png, encode_png, from_env
from fastapi import Request
from fastapi.responses import Response


class UpscaleAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.engine = from_env()

    def decode_request(self, request: Request) -> np.ndarray:
        return decode_png(request["image"].file.read())  # type: ignore[index]

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return list(inputs)

    def predict(self, x: list[np.ndarray]) -> list[np.ndarray]:
        return self.engine.many(x)

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> Response:
        return Response(content=encode_png(output), media_type="image/png")


if __name__ == "__main__":
    api = UpscaleAPI(
        max_batch_size=int(os.environ.get("PEER_MAX_BATCH", "4")),
        batch_timeout=float(os.environ.get("PEER_BATCH_TIMEOUT_S", "0.01")),
        api_path="/upscale",
    )
    server = ls.LitServer(
        api, accelerator="cpu", devices=1, workers_per_device=int(os.environ["PEER_WORKERS"])
    )
    server.run(
        host="127.0.0.1", port=int(os.environ["PEER_PORT"]), generate_client_file=False, log_level="warning"
    )
