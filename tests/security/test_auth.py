"""Bearer-token auth against real servers: codes, reasons, public probes, token sources."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from peftserve.client import AsyncPeftServeClient, PeftServeClient, PeftServeClientError
from peftserve.client.channel import TLSOptions
from peftserve.server.config import config_from_args
from peftserve.v1 import generation_pb2 as pb
from peftserve.v1 import generation_pb2_grpc as pb_grpc

from ..conftest import ServerThread
from ..server.status_details import details_of
from .certs import Pki

ENV_TOKENS = ("env-token-0123456789abcdef0123456789", "env-token-second-0123456789abcdefgh")
FILE_TOKEN = "file-token-0123456789abcdef0123456789"
RETIRED_TOKEN = "retired-token-0123456789abcdef01234567"
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def env_auth_server() -> Iterator[ServerThread]:
    """Plaintext server whose tokens come from PEFTSERVE_AUTH_TOKENS, through the flag parser."""
    env = {"PEFTSERVE_AUTH_TOKENS": ",".join(ENV_TOKENS)}
    config = config_from_args(["--address", "127.0.0.1:0", "--adapters-dir", ""], env=env)
    server = ServerThread(adapters_dir=None, auth_tokens=config.auth_tokens)
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def file_auth_tls_server(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    """TLS server whose tokens come from a file, so the client sends them as call credentials."""
    tokens_file = tmp_path_factory.mktemp("auth") / "tokens"
    tokens_file.write_text(f"# peftserve tokens\n\n{FILE_TOKEN}\n#{RETIRED_TOKEN}\n")
    server = ServerThread(
        adapters_dir=None,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        auth_tokens_file=tokens_file,
    )
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def stub(env_auth_server: ServerThread) -> Iterator[Any]:
    with grpc.insecure_channel(env_auth_server.address) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def model_info_error(stub: Any, metadata: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=TIMEOUT_S)
    return e.value


def test_missing_token_is_unauthenticated(stub: Any) -> None:
    details = details_of(model_info_error(stub, None))
    assert details.code == grpc.StatusCode.UNAUTHENTICATED
    assert details.reason == "AUTH_TOKEN_MISSING"
    assert "Bearer" in details.message


@pytest.mark.parametrize(
    "value",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        f"Token {ENV_TOKENS[0]}",
        f"Bearer  {ENV_TOKENS[0]}",  # two spaces: the token would start with one
    ],
)
def test_malformed_authorization_is_unauthenticated(stub: Any, value: str) -> None:
    details = details_of(model_info_error(stub, (("authorization", value),)))
    assert details.code == grpc.StatusCode.UNAUTHENTICATED
    assert details.reason == "AUTH_TOKEN_MISSING"


def test_two_authorization_entries_are_unauthenticated(stub: Any) -> None:
    metadata = bearer(ENV_TOKENS[0]) + bearer("another-token")
    assert details_of(model_info_error(stub, metadata)).code == grpc.StatusCode.UNAUTHENTICATED


def test_wrong_token_is_permission_denied_and_not_echoed(stub: Any) -> None:
    wrong = "not-a-configured-token-0123456789abcdef"
    details = details_of(model_info_error(stub, bearer(wrong)))
    assert details.code == grpc.StatusCode.PERMISSION_DENIED
    assert details.reason == "AUTH_TOKEN_REJECTED"
    assert wrong not in details.message
    # A prefix of a real token is just as wrong.
    assert details_of(model_info_error(stub, bearer(ENV_TOKENS[0][:-1]))).code == (
        grpc.StatusCode.PERMISSION_DENIED
    )


def test_streaming_call_without_token_is_unauthenticated(stub: Any) -> None:
    responses = stub.StreamGenerate(pb.GenerateRequest(text="hi"), timeout=TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as e:
        list(responses)
    details = details_of(e.value)
    assert details.code == grpc.StatusCode.UNAUTHENTICATED
    assert details.reason == "AUTH_TOKEN_MISSING"


def test_every_env_token_is_accepted(env_auth_server: ServerThread, stub: Any) -> None:
    env_auth_server.wait_ready()
    for token in ENV_TOKENS:
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=bearer(token), timeout=10)
        assert info.model_id == "base"
    # The scheme is case-insensitive (RFC 7235).
    lower = (("authorization", f"bearer {ENV_TOKENS[0]}"),)
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=lower, timeout=10).model_id


def test_authenticated_errors_still_get_their_rich_status(
    env_auth_server: ServerThread, stub: Any
) -> None:
    # Auth passes the call on to the error-mapping interceptor, which still does its job.
    env_auth_server.wait_ready()
    request = pb.GenerateRequest(text="hi", adapter="no-such-adapter")
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request, metadata=bearer(ENV_TOKENS[0]), timeout=TIMEOUT_S)
    details = details_of(e.value)
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert details.reason == "ADAPTER_NOT_FOUND"


def test_health_and_reflection_need_no_token(env_auth_server: ServerThread) -> None:
    with grpc.insecure_channel(env_auth_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=TIMEOUT_S))
        names = {s.name for s in response.list_services_response.service}
    assert "peftserve.v1.GenerationService" in names


def test_unknown_method_without_token_stays_unimplemented(env_auth_server: ServerThread) -> None:
    with grpc.insecure_channel(env_auth_server.address) as channel:
        call = channel.unary_unary("/peftserve.v1.GenerationService/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as e:
            call(b"", timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_client_sends_its_token_on_a_plaintext_channel(env_auth_server: ServerThread) -> None:
    env_auth_server.wait_ready()
    with PeftServeClient(env_auth_server.address, token=ENV_TOKENS[1]) as client:
        assert client.model_info().model_id == "base"
    with (
        PeftServeClient(env_auth_server.address, token="wrong-token") as client,
        pytest.raises(PeftServeClientError) as e,
    ):
        client.model_info()
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert e.value.reason == "AUTH_TOKEN_REJECTED"


def test_token_from_file_over_tls(file_auth_tls_server: ServerThread, pki: Pki) -> None:
    file_auth_tls_server.wait_ready()
    tls = TLSOptions.from_files(pki.ca_cert)
    address = file_auth_tls_server.address
    with PeftServeClient(address, tls=tls, token=FILE_TOKEN) as client:
        assert client.model_info().model_id == "base"
    # The commented-out line is not a token; neither is an unauthenticated TLS caller.
    for token, code in (
        (RETIRED_TOKEN, grpc.StatusCode.PERMISSION_DENIED),
        (None, grpc.StatusCode.UNAUTHENTICATED),
    ):
        with PeftServeClient(address, tls=tls, token=token) as client:
            with pytest.raises(PeftServeClientError) as e:
                client.model_info()
            assert e.value.code == code


def test_async_client_sends_its_token_over_tls(
    file_auth_tls_server: ServerThread, pki: Pki
) -> None:
    file_auth_tls_server.wait_ready()

    async def model_id() -> str:
        tls = TLSOptions.from_files(pki.ca_cert)
        async with AsyncPeftServeClient(
            file_auth_tls_server.address, tls=tls, token=FILE_TOKEN
        ) as client:
            return (await client.model_info()).model_id

    assert asyncio.run(model_id()) == "base"


def test_tls_health_probe_needs_no_token(file_auth_tls_server: ServerThread, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(Path(pki.ca_cert).read_bytes())
    with grpc.secure_channel(file_auth_tls_server.address, credentials) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
