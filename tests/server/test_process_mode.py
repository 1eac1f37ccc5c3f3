"""The server's own tests again, with the engine in a process of its own (--engine-process).

Imported tests are collected here a second time; every server they start (the shared demo
server, their module fixtures, ``ServerThread()`` in their bodies) runs the engine in a child
process, so the same assertions hold in both modes: generate and stream, logprobs, cancel,
deadlines, a full queue, structured output and chat, adapter loading, unloading and
WatchAdapters, metrics, unread and abandoned streams. Tests that reach into the engine's
internals (fault injection, the worker's between-steps hook) stay in-process only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from ..conftest import ServerThread

# ruff: noqa: F401 (imported to be collected again, in this mode)
from .test_adapter_lifecycle import (
    server_factory,
    test_load_list_generate_unload_then_not_found,
    test_lru_eviction_under_a_budget_spares_pinned,
    test_watch_sees_the_current_set_then_load_and_unload,
)
from .test_errors import (
    test_cancel_mid_stream_frees_the_row,
    test_deadline_passing_while_queued_never_runs,
    test_deadline_too_short_is_deadline_exceeded,
    test_invalid_parameter_names_the_field,
    test_queue_full_is_resource_exhausted_with_retry_info,
    test_unknown_adapter_is_not_found_never_base,
    tight_server,
)
from .test_lifecycle import test_health_goes_serving_then_not_serving_on_drain
from .test_metrics import (
    test_metrics_scrape_after_requests,
    test_running_batch_metrics_move_under_load,
)
from .test_rpcs import (
    test_beam_search_returns_scored_sequences,
    test_concurrent_mixed_adapter_calls_equal_solo_calls,
    test_list_adapters,
    test_logprobs_with_alternatives,
    test_model_info,
    test_seeded_sampling_is_reproducible_and_unseeded_reports_its_seed,
    test_stop_sequence_ends_the_text_before_it,
    test_stream_deltas_concatenate_to_the_unary_text,
    test_stream_with_beams_sends_whole_sequences_then_summary,
    test_tokenize,
    test_upper_adapter_visibly_changes_the_output,
    test_usage_timing_and_effective_parameters,
)
from .test_stream_bounds import (
    records,
    test_abandoned_stream_is_recorded_cancelled,
    test_unread_stream_output_is_bounded,
)
from .test_structured import (
    test_chat_request_uses_the_demo_template,
    test_dead_end_is_a_finish_reason,
    test_json_schema_request_returns_valid_json,
)


@pytest.fixture(scope="module", autouse=True)
def engine_process_mode() -> Iterator[None]:
    previous, ServerThread.engine_process_default = ServerThread.engine_process_default, True
    try:
        yield
    finally:
        ServerThread.engine_process_default = previous


# The session's shared server is in-process: this module has its own, in this mode.
@pytest.fixture(scope="module")
def demo_server(engine_process_mode: None) -> Iterator[ServerThread]:
    server = ServerThread()
    server.wait_ready()
    assert server.server.config.engine_process
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(demo_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(demo_server.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> Any:
    from peftserve.v1 import generation_pb2_grpc

    return generation_pb2_grpc.GenerationServiceStub(channel)
