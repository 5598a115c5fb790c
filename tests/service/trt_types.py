"""TensorRT's value types as the test double needs them: logger, data types, I/O modes, allocation
strategies, Dims (names checked against tensorrt-stubs by test_trt_double_matches_stubs)."""

from __future__ import annotations

import enum
from typing import Any


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def log(self, severity: ILogger.Severity, msg: str) -> None:
        pass


class Logger(ILogger):
    INTERNAL_ERROR = ILogger.Severity.INTERNAL_ERROR
    ERROR = ILogger.Severity.ERROR
    WARNING = ILogger.Severity.WARNING
    INFO = ILogger.Severity.INFO
    VERBOSE = ILogger.Severity.VERBOSE

    def __init__(self, min_severity: ILogger.Severity = ILogger.Severity.WARNING) -> None:
        self.min_severity = min_severity
        self._messages: list[tuple[ILogger.Severity, str]] = []

    def log(self, severity: ILogger.Severity, msg: str) -> None:
        self._messages.append((severity, msg))


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class Dims:
    """TensorRT's shape type: indexable (a slice gives a tuple), comparable with tuples and lists."""

    MAX_DIMS = 8

    def __init__(self, shape: list[int] | tuple[int, ...] = ()) -> None:
        self._d = tuple(int(x) for x in shape)

    def __getitem__(self, arg0: Any) -> Any:  # pybind11's parameter names
        return self._d[arg0]

    def __len__(self) -> int:
        return len(self._d)

    def __eq__(self, arg0: object) -> bool:
        return tuple(arg0) == self._d if isinstance(arg0, (tuple, list, Dims)) else NotImplemented

    __hash__ = None  # type: ignore[assignment]  # as in TensorRT

    def __repr__(self) -> str:
        return f"({', '.join(map(str, self._d))})"
