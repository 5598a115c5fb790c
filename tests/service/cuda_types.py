"""The CUDA runtime's value types as the test double needs them: error codes, enums, opaque handles,
device properties (names and values as in cuda.bindings.runtime; checked by test_trt_double_matches_stubs)."""

from __future__ import annotations

import enum


class cudaError_t(enum.IntEnum):  # the real module's names and values
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalState = 401
    cudaErrorLaunchFailure = 719
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class cudaStreamCaptureStatus(enum.IntEnum):
    cudaStreamCaptureStatusNone = 0
    cudaStreamCaptureStatusActive = 1
    cudaStreamCaptureStatusInvalidated = 2


class Handle:
    def __init__(self, init_value: int = 0) -> None:
        self._value = int(init_value)

    def __int__(self) -> int:
        return self._value

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._value:#x}>"


class cudaStream_t(Handle):
    pass


class cudaGraph_t(Handle):
    pass


class cudaGraphExec_t(Handle):
    pass


class cudaDeviceProp:
    def __init__(self) -> None:
        self.name = b""
        self.major = self.minor = 0
        self.totalGlobalMem = 0
        self.multiProcessorCount = 0
        self.pciDomainID = self.pciBusID = self.pciDeviceID = 0
