"""Ray Serve peer: one deployment whose `@serve.batch` method runs the engine on each image of a batch.

The HTTP handler decodes the upload, awaits the batched call and encodes the PNG; Ray's proxy
routes requests to the replica(s). Ray runs locally (`ray.init`) on this machine's cores.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import ray
from engines import decode_png, encode_png, from_env
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "4"))
BATCH_TIMEOUT_S = float(os.environ.get("PEER_BATCH_TIMEOUT_S", "0.01"))


@serve.deployment(
    num_replicas=int(os.environ.get("PEER_WORKERS", "1")),
    max_ongoing_requests=2 * MAX_BATCH,  # Ray warns below max_batch_size: full batches could never form
)
class Upscaler:
    def __init__(self) -> None:
        self.engine = from_env()

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_TIMEOUT_S)
    async def run(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return self.engine.many(images)

    async def __call__(self, request: Request) -> Response:
        form = await request.form()
        rgb = decode_png(await form["image"].read())  # type: ignore[union-attr]
        out = await self.run(rgb)
        return Response(encode_png(out), media_type="image/png")


if __name__ == "__main__":
    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ["PEER_PORT"])})
    serve.run(Upscaler.bind(), route_prefix="/upscale")
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # SIGINT from the harness: take the local cluster down with us
        serve.shutdown()
        ray.shutdown()
