"""The generation engine: batching, adapters and decoding around ``PeftModel.generate``.

Nothing in this package knows about gRPC or protobuf; the servicer translates.
"""

from .engine import Engine
from .handle import RequestHandle
from .stats import EngineStats, StepStats

__all__ = ["Engine", "EngineStats", "RequestHandle", "StepStats"]
