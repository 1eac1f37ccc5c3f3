"""A small typed client for peftserve (sync and asyncio); needs grpcio and protobuf only."""

from .aio import AsyncPeftServeClient
from .channel import ChannelSettings, TLSOptions
from .client import PeftServeClient
from .errors import PeftServeClientError
from .requests import build_generate_request
from .types import (
    AdapterEvent,
    AdapterInfo,
    ChatMessage,
    GenerateOptions,
    GenerationOutput,
    ModelInfo,
    SequenceDelta,
    SequenceOutput,
    ServerLimits,
    StreamEvent,
    StreamSummary,
    TokenizeOutput,
    TokenLogprob,
    TopLogprob,
)

__all__ = [
    "AdapterEvent",
    "AdapterInfo",
    "AsyncPeftServeClient",
    "ChannelSettings",
    "ChatMessage",
    "GenerateOptions",
    "GenerationOutput",
    "ModelInfo",
    "PeftServeClient",
    "PeftServeClientError",
    "SequenceDelta",
    "SequenceOutput",
    "ServerLimits",
    "StreamEvent",
    "StreamSummary",
    "TLSOptions",
    "TokenLogprob",
    "TokenizeOutput",
    "TopLogprob",
    "build_generate_request",
]
