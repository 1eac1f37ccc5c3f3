"""The mixing table (server/engine/mixing.py), decided here: each adapter kind's batching on
three families that differ where it matters, served for real.

* Llama: plain LoRA, rsLoRA, LoRA on ``embed_tokens``/``lm_head``, LoHa, LoKr and IA3 mix
  with each other and with base rows (the routed tree); DoRA, modules_to_save and prompt
  tuning run alone; prefix tuning is refused at load (``generate`` ignores it with the pinned
  versions).
* OPT: its MLP sees flattened tokens, so all-linear LoRA, LoHa, LoKr and IA3 (on ``fc2``) fail
  per-row routing:
  the load-time probe serves those adapters alone (LoRA on embeddings/head still mixes).
* Mixtral: all-linear LoRA reaches the experts' parameters (peft ``ParamWrapper``, no mixed
  batches): served alone as well; all-linear LoHa/LoKr (and IA3) reach only ``Linear``
  modules, which see one row per batch row: they mix.

Every served adapter, run alone and all concurrently, equals its solo ``PeftModel.generate``;
nothing is FAILED except what the table refuses. A LoRA on ``lm_head`` and a modules_to_save
``lm_head`` adapter cannot live in one PeftModel; both load, in either order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from peftserve.v1 import generation_pb2 as pb

from .conftest import Served, serving
from .models import FAMILIES
from .test_matrix import PROMPTS, _check, _request, _together

KINDS = {
    "lora": "lora",
    "rslora": "rslora",
    "embhead": "lora_embed_head",
    "dora": "dora",
    "saved": "modules_to_save",
    "loha": "loha",
    "lokr": "lokr",
    "ia3": "ia3",
    "prompt": "prompt_tuning",
    "prefix": "prefix_tuning",
}
# family -> (adapters served mixed, adapters refused at load); every other one runs alone.
TABLE: dict[str, tuple[set[str], set[str]]] = {
    "llama": ({"lora", "rslora", "embhead", "loha", "lokr", "ia3"}, {"prefix"}),
    "opt": ({"embhead"}, set()),
    "mixtral": ({"embhead", "loha", "lokr", "ia3"}, {"prefix"}),
}
UNBUILDABLE = {"mixtral": {"dora"}}  # peft: "lora.ParamWrapper does not work with use_dora"


@pytest.fixture(scope="module", params=sorted(TABLE))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    family = FAMILIES[request.param]
    kinds = {n: k for n, k in KINDS.items() if n not in UNBUILDABLE.get(family.name, set())}
    with serving(family, kinds, tmp_path_factory.mktemp(f"mixing-{family.name}")) as served:
        yield served


def _adapters(served: Served) -> dict[str, Any]:
    return {a.name: a for a in served.stub.ListAdapters(pb.ListAdaptersRequest()).adapters}


def test_the_table_decides_batching_and_refusals(served: Served) -> None:
    mixed, refused = TABLE[served.family.name]
    adapters = _adapters(served)
    for name in served.adapters:
        adapter = adapters[name]
        if name in refused:
            assert adapter.state == pb.ADAPTER_STATE_FAILED, name
            assert "ignores" in adapter.error or "cannot run" in adapter.error, adapter.error
            continue
        assert adapter.state == pb.ADAPTER_STATE_READY, (name, adapter.error)
        assert adapter.mixed_batching == (name in mixed), name


def test_every_served_kind_equals_solo_alone_and_all_together(served: Served) -> None:
    _, refused = TABLE[served.family.name]
    names = ["", *(n for n in served.adapters if n not in refused)]
    cases = [(n, PROMPTS[i % 2]) for i, n in enumerate(names)]
    cases += [(n, PROMPTS[2]) for n in names]
    for adapter, text in cases[: len(names)]:
        _check(served, adapter, text, served.stub.Generate(_request(adapter, text), timeout=60))
    for (adapter, text), response in zip(cases, _together(served, cases), strict=True):
        _check(served, adapter, text, response)


def test_lm_head_lora_and_saved_lm_head_load_in_either_order(served: Served) -> None:
    if served.family.name != "llama":
        pytest.skip("one family is enough for the load order")
    stub = served.stub
    for first, second in (("embhead", "saved"), ("saved", "embhead")):
        for name in (first, second):
            stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), timeout=60)
        for name in (first, second):
            loaded = stub.LoadAdapter(pb.LoadAdapterRequest(name=name), timeout=60)
            assert loaded.adapter.state == pb.ADAPTER_STATE_READY, loaded.adapter.error
        cases = [(first, PROMPTS[0]), (second, PROMPTS[0]), ("lora", PROMPTS[1])]
        for (adapter, text), response in zip(cases, _together(served, cases), strict=True):
            _check(served, adapter, text, response)


def test_a_refused_adapter_is_failed_precondition_naming_why(served: Served) -> None:
    _, refused = TABLE[served.family.name]
    if not refused:
        pytest.skip("nothing refused on this family")
    name = sorted(refused)[0]
    served.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), timeout=60)
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.LoadAdapter(pb.LoadAdapterRequest(name=name), timeout=60)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "generate" in (caught.value.details() or "")
