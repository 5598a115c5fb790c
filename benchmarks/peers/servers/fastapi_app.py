"""Hand-written FastAPI peer: one sync route, the engine call under the device lock (`uvicorn --workers N`).

Sync routes run on Starlette's thread pool, so decode and encode of several requests overlap while
the engine (serialised by its lock across workers) runs one call at a time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import decode_png, encode_png, from_env
from fastapi import FastAPI, File, UploadFile
from fastapi.responses import Response

app = FastAPI()
engine = from_env()


@app.post("/upscale")
def upscale(image: Annotated[UploadFile, File()]) -> Response:
    out = engine(decode_png(image.file.read()))
    return Response(encode_png(out), media_type="image/png")


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}
