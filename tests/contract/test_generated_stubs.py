"""The contract as built: stubs match the .proto, presence and enum rules hold, all documented."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_tools import protoc
from peftserve.v1 import generation_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_FILE = "peftserve/v1/generation.proto"
COMMITTED = REPO_ROOT / "client" / "generated"


def _load_gen_protos() -> ModuleType:
    # scripts/ is not a package; load the very script `make protos` runs.
    spec = importlib.util.spec_from_file_location(
        "gen_protos", REPO_ROOT / "scripts" / "gen_protos.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_equal_a_fresh_generation(tmp_path: Path) -> None:
    fresh = _load_gen_protos().generate(tmp_path)
    assert fresh, "protoc generated nothing"
    fresh_names = {p.relative_to(tmp_path) for p in fresh}
    suffixes = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
    committed_names = {
        p.relative_to(COMMITTED)
        for p in COMMITTED.rglob("*")
        if p.is_file() and p.name.endswith(suffixes)
    }
    assert fresh_names == committed_names
    drifted = [
        str(name)
        for name in sorted(fresh_names)
        if (tmp_path / name).read_bytes() != (COMMITTED / name).read_bytes()
    ]
    assert not drifted, f"stale generated files (run `make protos`): {drifted}"


# --- field presence -------------------------------------------------------------------------

# Fields where zero is a meaningful value, so the contract must tell "unset" from "0".
MUST_TRACK_PRESENCE = {
    "GenerationParameters": {
        "max_new_tokens",
        "max_length",
        "min_new_tokens",
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "typical_p",
        "num_beams",
        "num_return_sequences",
        "length_penalty",
        "early_stopping",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "seed",
    },
    "Sequence": {"beam_score"},
    "GetModelInfoResponse": {"eos_token_id"},
    "Adapter": {"rank"},
}


def _zero(field: FieldDescriptor) -> Any:
    if field.type == FieldDescriptor.TYPE_BOOL:
        return False
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 0.0
    if field.type == FieldDescriptor.TYPE_STRING:
        return ""
    return 0


@pytest.mark.parametrize(
    ("message_name", "field_name"),
    sorted((m, f) for m, names in MUST_TRACK_PRESENCE.items() for f in names),
)
def test_optional_field_is_unset_until_set_even_to_zero(message_name: str, field_name: str) -> None:
    message = getattr(pb, message_name)()
    field = message.DESCRIPTOR.fields_by_name[field_name]
    assert field.has_presence, f"{message_name}.{field_name} must be `optional`"
    assert not message.HasField(field_name)
    setattr(message, field_name, _zero(field))
    assert message.HasField(field_name)
    # Presence survives the wire: an explicit zero is serialized, not dropped.
    assert type(message).FromString(message.SerializeToString()).HasField(field_name)


def test_no_unexpected_scalar_presence_in_generation_parameters() -> None:
    # Every scalar GenerationParameters field is optional; a new one must be added above.
    scalars = {
        f.name
        for f in pb.GenerationParameters.DESCRIPTOR.fields
        if f.message_type is None and not f.is_repeated
    }
    assert scalars == MUST_TRACK_PRESENCE["GenerationParameters"]


# --- enums ----------------------------------------------------------------------------------


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


@pytest.mark.parametrize("enum_name", sorted(pb.DESCRIPTOR.enum_types_by_name))
def test_enum_zero_is_unspecified_and_values_are_prefixed(enum_name: str) -> None:
    enum = pb.DESCRIPTOR.enum_types_by_name[enum_name]
    prefix = _upper_snake(enum_name) + "_"
    assert enum.values_by_number[0].name == prefix + "UNSPECIFIED"
    assert all(value.name.startswith(prefix) for value in enum.values)


def test_finish_reason_default_is_unspecified() -> None:
    assert pb.Sequence().finish_reason == pb.FINISH_REASON_UNSPECIFIED


# --- oneofs ---------------------------------------------------------------------------------


def test_generate_request_input_is_one_of_text_or_token_ids() -> None:
    request = pb.GenerateRequest()
    assert request.WhichOneof("input") is None
    request.text = "hello"
    assert request.WhichOneof("input") == "text"
    request.token_ids.ids.extend([1, 2])
    assert request.WhichOneof("input") == "token_ids"
    assert not request.HasField("text")
    # An empty TokenIds still counts as chosen: "no tokens" is not "no input".
    request = pb.GenerateRequest()
    request.token_ids.SetInParent()
    assert request.WhichOneof("input") == "token_ids"
    assert pb.GenerateRequest.FromString(request.SerializeToString()).WhichOneof("input") == (
        "token_ids"
    )


def test_stream_event_is_one_of_delta_or_summary() -> None:
    message = pb.StreamGenerateResponse(request_id="r", delta=pb.SequenceDelta(text="a"))
    assert message.WhichOneof("event") == "delta"
    message.summary.SetInParent()
    assert message.WhichOneof("event") == "summary"
    assert not message.HasField("delta")


# --- round trips ----------------------------------------------------------------------------


def _sample(field: FieldDescriptor, salt: int) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        return True
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 0.5 + salt  # exactly representable in float32
    if kind == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{salt}-é"
    if kind == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    if kind == FieldDescriptor.TYPE_UINT64:
        return 2**64 - 1 - salt  # the top of the range: seeds are full uint64
    if kind == FieldDescriptor.TYPE_UINT32:
        return 2**32 - 1 - salt
    return 7 + salt


def _populate(message: Message, oneof_choice: dict[str, str], depth: int = 0) -> None:
    """Set every field (two elements per repeated field), choosing oneof members as told."""
    descriptor: Descriptor = message.DESCRIPTOR
    for field in descriptor.fields:
        oneof = field.containing_oneof
        # proto3 `optional` is a synthetic oneof of one field; real oneofs pick one member.
        is_real_oneof = oneof is not None and len(oneof.fields) > 1
        if is_real_oneof and oneof_choice.get(oneof.name, oneof.fields[0].name) != field.name:
            continue
        if field.message_type is not None:
            if field.is_repeated:
                for _ in range(2):
                    _populate(getattr(message, field.name).add(), oneof_choice, depth + 1)
            else:
                _populate(getattr(message, field.name), oneof_choice, depth + 1)
                getattr(message, field.name).SetInParent()
        elif field.is_repeated:
            getattr(message, field.name).extend([_sample(field, 0), _sample(field, 1)])
        else:
            setattr(message, field.name, _sample(field, depth))


@pytest.mark.parametrize(
    ("message_type", "oneof_choice"),
    [
        (pb.GenerateRequest, {"input": "text"}),
        (pb.GenerateRequest, {"input": "token_ids"}),
        (pb.GenerateResponse, {}),
        (pb.StreamGenerateResponse, {"event": "delta"}),
        (pb.StreamGenerateResponse, {"event": "summary"}),
        (pb.GetModelInfoResponse, {}),
        (pb.ListAdaptersResponse, {}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "-".join(v.values()) or "all",
)
def test_fully_populated_message_round_trips(
    message_type: type[Message], oneof_choice: dict[str, str]
) -> None:
    original = message_type()
    _populate(original, oneof_choice)
    wire = original.SerializeToString()
    decoded = message_type.FromString(wire)
    assert decoded == original
    assert decoded.SerializeToString() == wire
    # Every chosen field really is populated (a populate bug would make this test vacuous).
    for field in original.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and len(oneof.fields) > 1:
            expected = oneof_choice.get(oneof.name, oneof.fields[0].name) == field.name
        else:
            expected = True
        if field.is_repeated:
            assert (len(getattr(decoded, field.name)) == 2) == expected, field.name
        elif field.has_presence:
            assert decoded.HasField(field.name) == expected, field.name
        else:
            assert (getattr(decoded, field.name) != field.default_value) == expected, field.name


# --- documentation --------------------------------------------------------------------------

# FileDescriptorProto / DescriptorProto field numbers used in SourceCodeInfo paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _SERVICE_METHOD = 2, 2


@pytest.fixture(scope="module")
def proto_with_comments(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("descriptor") / "generation.pb"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        # google/protobuf/timestamp.proto ships with grpcio-tools.
        f"-I{_load_gen_protos().WELL_KNOWN_ROOT}",
        f"--descriptor_set_out={out}",
        "--include_source_info",
        PROTO_FILE,
    ]
    assert protoc.main(args) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    (proto,) = [f for f in files if f.name == PROTO_FILE]
    return proto


def _documented_elements(proto: Any) -> list[tuple[str, tuple[int, ...]]]:
    elements: list[tuple[str, tuple[int, ...]]] = []

    def enum(e: Any, path: tuple[int, ...], scope: str) -> None:
        elements.append((f"{scope}{e.name}", path))
        for i, value in enumerate(e.value):
            elements.append((f"{scope}{e.name}.{value.name}", (*path, _ENUM_VALUE, i)))

    def message(m: Any, path: tuple[int, ...], scope: str) -> None:
        name = f"{scope}{m.name}"
        elements.append((name, path))
        for i, field in enumerate(m.field):
            elements.append((f"{name}.{field.name}", (*path, _MESSAGE_FIELD, i)))
        for i, oneof in enumerate(m.oneof_decl):
            if not oneof.name.startswith("_"):  # synthetic oneofs of `optional` fields
                elements.append((f"{name}.{oneof.name}", (*path, _MESSAGE_ONEOF, i)))
        for i, nested in enumerate(m.nested_type):
            message(nested, (*path, _MESSAGE_NESTED, i), f"{name}.")
        for i, nested_enum in enumerate(m.enum_type):
            enum(nested_enum, (*path, _MESSAGE_ENUM, i), f"{name}.")

    for i, m in enumerate(proto.message_type):
        message(m, (_FILE_MESSAGE, i), "")
    for i, e in enumerate(proto.enum_type):
        enum(e, (_FILE_ENUM, i), "")
    for i, service in enumerate(proto.service):
        elements.append((service.name, (_FILE_SERVICE, i)))
        for j, method in enumerate(service.method):
            elements.append(
                (f"{service.name}.{method.name}", (_FILE_SERVICE, i, _SERVICE_METHOD, j))
            )
    return elements


def test_every_element_of_the_proto_has_a_comment(proto_with_comments: Any) -> None:
    comments = {
        tuple(location.path): location.leading_comments.strip()
        for location in proto_with_comments.source_code_info.location
    }
    elements = _documented_elements(proto_with_comments)
    # Guard against a walker that finds nothing and therefore passes.
    assert len(elements) > 100
    undocumented = [name for name, path in elements if not comments.get(path)]
    assert not undocumented, f"elements without a leading comment: {undocumented}"
