"""A failed model call must not poison the shared PeftModel (server/engine/peft_guard.py).

peft removes its ``adapter_names`` hooks only on the happy path, so before the guard an error
raised inside a mixed LoRA batch left them installed and every later single-adapter request
failed with INTERNAL while health stayed SERVING. Mixed batches now run on the routed tree
(``routing.py``), whose per-forward state is the row assignment made before each forward. Here a
real server on the demo model runs a real mixed batch (base + two LoRA adapters) and a fault is
raised inside the routed tree's forward (a plain error, and an OOM-shaped one that is retried);
after it, solo and mixed requests must still equal solo ``PeftModel.generate`` runs, and no
model carries a call-scoped hook. The guard alone is also tested on peft's own hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from peft import PeftModel
from peftserve.server.engine.peft_guard import guard_models, leftover_hooks
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc
from transformers import AutoModelForCausalLM

from ..conftest import DEMO_ADAPTERS, DEMO_MODEL, ServerThread

MAX_NEW = 6
# (adapter, prompt ids): base and two LoRA adapters, prompts of different lengths.
CASES = [("", [10, 20, 30, 40, 50]), ("upper", [70, 71, 72]), ("reverse", [33, 90, 91, 92])]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip("models/demo is not present")
    # A long wait so the three concurrent requests form one mixed batch.
    server = ServerThread(max_wait_ms=300.0, engine_process=False)  # faults in the engine
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def references() -> dict[str, list[int]]:
    """Solo greedy ``PeftModel.generate`` for each case, loaded apart from the server."""
    out: dict[str, list[int]] = {}
    for adapter, prompt in CASES:
        model: Any = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
        if adapter:
            model = PeftModel.from_pretrained(model, DEMO_ADAPTERS / adapter).eval()
        with torch.inference_mode():
            ids = model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=MAX_NEW,
                min_new_tokens=MAX_NEW,
                do_sample=False,
            )
        out[adapter] = ids[0, len(prompt) :].tolist()
    return out


def _request(adapter: str, prompt: list[int]) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        adapter=adapter,
        parameters=pb.GenerationParameters(max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW),
        options=pb.ResponseOptions(return_token_ids=True),
    )


def _generate_together(stub: Any) -> list[Any]:
    """Send every case at once; the outcome (response or RpcError) of each."""
    futures = [stub.Generate.future(_request(a, p), timeout=60) for a, p in CASES]
    outcomes: list[Any] = []
    for future in futures:
        try:
            outcomes.append(future.result())
        except grpc.RpcError as error:
            outcomes.append(error)
    return outcomes


def _assert_serves_references(stub: Any, references: dict[str, list[int]]) -> None:
    for adapter, prompt in CASES:  # alone: the plain adapter forward, no adapter_names
        got = stub.Generate(_request(adapter, prompt), timeout=60).sequences[0].token_ids
        assert list(got) == references[adapter], f"solo {adapter or 'base'}"
    for (adapter, _), outcome in zip(CASES, _generate_together(stub), strict=True):
        assert not isinstance(outcome, grpc.RpcError), outcome
        assert list(outcome.sequences[0].token_ids) == references[adapter], f"mixed {adapter}"


class _FaultInForward:
    """Raises ``error`` once, inside the first decoder layer, in a forward of >1 rows."""

    def __init__(self, tree: Any, error: BaseException) -> None:
        self.error = error
        self.armed = True
        self.batch_sizes: list[int] = []
        self.adapters_seen: list[list[str]] = []
        self._routing = tree.routing
        layer = tree.model.model.layers[0]
        self._handle = layer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        batch = hidden.shape[0]
        if self.armed and batch > 1:
            self.armed = False
            self.batch_sizes.append(batch)
            # The adapters this forward routes its rows through (it must be mixed).
            self.adapters_seen.append([name for name, _ in self._routing.groups])
            raise self.error

    def remove(self) -> None:
        self._handle.remove()


def _registry(server: ServerThread) -> Any:
    return server.server.engine().registry


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(RuntimeError("injected fault inside the forward"), id="error"),
        pytest.param(torch.OutOfMemoryError("CUDA out of memory (injected)"), id="oom"),
    ],
)
def test_a_fault_inside_a_mixed_batch_leaves_the_model_clean(
    server: ServerThread, references: dict[str, list[int]], error: BaseException
) -> None:
    registry = _registry(server)
    fault = _FaultInForward(registry.routed, error)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            outcomes = _generate_together(stub)
            assert fault.batch_sizes and fault.batch_sizes[0] >= 2, "no shared forward ran"
            assert fault.adapters_seen and len(fault.adapters_seen[0]) >= 2, (
                "the faulty forward must be a real mixed LoRA batch"
            )
            failed = 0
            for (adapter, _), outcome in zip(CASES, outcomes, strict=True):
                if isinstance(outcome, grpc.RpcError):
                    # A plain fault fails the requests of the forward; an OOM is retried
                    # where nobody has seen tokens (all of these are unary).
                    assert not isinstance(error, torch.OutOfMemoryError), outcome
                    assert outcome.code() == grpc.StatusCode.INTERNAL
                    failed += 1
                else:
                    assert list(outcome.sequences[0].token_ids) == references[adapter]
            assert failed >= (0 if isinstance(error, torch.OutOfMemoryError) else 2)
            # Asked on the worker between steps: results are published from inside a step,
            # before peft's own cleanup of a successful call has run.
            batcher = server.server.engine()._batcher
            models = registry.models()
            between = batcher.run_between_steps(
                lambda: [hook for m in models for hook in leftover_hooks(m)]
            )
            assert between.result(timeout=60) == []
            _assert_serves_references(stub, references)
    finally:
        fault.remove()


def test_guard_restores_active_adapter_and_hooks_without_a_server() -> None:
    """The guard alone: peft's hooks and an adapter switch made inside a failing call go."""
    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, DEMO_ADAPTERS / "upper", adapter_name="upper")
    model.load_adapter(str(DEMO_ADAPTERS / "reverse"), adapter_name="reverse")
    model.set_adapter("upper")
    prompt = torch.tensor([[10, 20, 30], [40, 50, 60]])
    with (
        pytest.raises(ValueError, match="boom"),
        guard_models([model]),
        model._enable_peft_forward_hooks(adapter_names=["upper", "reverse"]),
    ):
        model.set_adapter("reverse")
        raise ValueError("boom")
    assert leftover_hooks(model) == []
    assert model.active_adapter == "upper"
    with torch.inference_mode():
        model(input_ids=prompt[:1])  # one row: no stale two-row routing
