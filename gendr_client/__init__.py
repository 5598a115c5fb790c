"""Python client for gendr-serve (docs/client.md): sync and async, retries, jobs for large images.

from gendr_client import Client
with Client("http://127.0.0.1:8000") as c:
    c.upscale("photo.jpg", scale=2).save("photo-x2.jpg")
"""

from gendr_client._core import Options, Result
from gendr_client.aio import AsyncClient
from gendr_client.errors import (
    BadRequest,
    ConnectionFailed,
    DeadlineExceeded,
    DeadlinePassed,
    Draining,
    EngineFailure,
    GendrError,
    IdempotencyKeyReused,
    Interrupted,
    JobExpired,
    JobFailed,
    JobLost,
    JobNotFound,
    JobStoreUnavailable,
    ModelNotFound,
    NotFound,
    NotReady,
    Overloaded,
    Retryable,
    TooLarge,
    Unauthorized,
    UndecodableImage,
    UnsupportedMediaType,
)
from gendr_client.folder import FolderReport
from gendr_client.sync import Client

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "ConnectionFailed",
    "DeadlineExceeded",
    "DeadlinePassed",
    "Draining",
    "EngineFailure",
    "FolderReport",
    "GendrError",
    "IdempotencyKeyReused",
    "Interrupted",
    "JobExpired",
    "JobFailed",
    "JobLost",
    "JobNotFound",
    "JobStoreUnavailable",
    "ModelNotFound",
    "NotFound",
    "NotReady",
    "Options",
    "Overloaded",
    "Result",
    "Retryable",
    "TooLarge",
    "Unauthorized",
    "UndecodableImage",
    "UnsupportedMediaType",
]
