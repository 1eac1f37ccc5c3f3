"""TLS and mutual TLS against real servers on 127.0.0.1, with certificates made per session."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from peftserve.client import PeftServeClient
from peftserve.client.channel import ChannelSettings, TLSOptions

from ..conftest import ServerThread
from .certs import Pki

# Handshake failures surface as UNAVAILABLE; a short deadline keeps the negative tests fast.
TIMEOUT_S = 5.0


def health_check(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest()
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT_S).status


def secure_channel(
    address: str, root: bytes, key: bytes | None = None, chain: bytes | None = None
) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root, key, chain)
    return grpc.secure_channel(address, credentials)


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[ServerThread]:
    # No adapters: transport security does not depend on them, and loading stays quick.
    server = ServerThread(
        adapters_dir=None, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key
    )
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[ServerThread]:
    server = ServerThread(
        adapters_dir=None,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca_cert,
        tls_require_client_auth=True,
    )
    yield server
    server.stop(grace_s=1.0)


def test_tls_client_is_served(tls_server: ServerThread, pki: Pki) -> None:
    with secure_channel(tls_server.address, pki.ca_cert.read_bytes()) as channel:
        assert health_check(channel) in (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,  # still loading: the handshake worked
        )


def test_tls_by_hostname_matches_the_san(tls_server: ServerThread, pki: Pki) -> None:
    address = f"localhost:{tls_server.port}"
    with secure_channel(address, pki.ca_cert.read_bytes()) as channel:
        health_check(channel)


def test_plaintext_client_is_refused(tls_server: ServerThread) -> None:
    with grpc.insecure_channel(tls_server.address) as channel, pytest.raises(grpc.RpcError) as e:
        health_check(channel)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_server_not_signed_by_trusted_ca_is_refused(tls_server: ServerThread, pki: Pki) -> None:
    with (
        secure_channel(tls_server.address, pki.other_ca_cert.read_bytes()) as channel,
        pytest.raises(grpc.RpcError) as e,
    ):
        health_check(channel)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_peftserve_client_over_tls_end_to_end(tls_server: ServerThread, pki: Pki) -> None:
    tls_server.wait_ready()
    with PeftServeClient(
        tls_server.address, tls=TLSOptions.from_files(pki.ca_cert), timeout_s=30
    ) as client:
        assert client.model_info().model_id == "base"


def test_mtls_without_client_certificate_is_refused(mtls_server: ServerThread, pki: Pki) -> None:
    with (
        secure_channel(mtls_server.address, pki.ca_cert.read_bytes()) as channel,
        pytest.raises(grpc.RpcError) as e,
    ):
        health_check(channel)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_mtls_with_certificate_from_another_ca_is_refused(
    mtls_server: ServerThread, pki: Pki
) -> None:
    with (
        secure_channel(
            mtls_server.address,
            pki.ca_cert.read_bytes(),
            pki.other_client_key.read_bytes(),
            pki.other_client_cert.read_bytes(),
        ) as channel,
        pytest.raises(grpc.RpcError) as e,
    ):
        health_check(channel)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_mtls_with_good_client_certificate_is_served(mtls_server: ServerThread, pki: Pki) -> None:
    mtls_server.wait_ready()
    tls = TLSOptions.from_files(pki.ca_cert, pki.client_key, pki.client_cert)
    settings = ChannelSettings(tls=tls, retries=False)
    with PeftServeClient(mtls_server.address, settings=settings, timeout_s=30) as client:
        assert client.model_info().model_id == "base"
        assert client.list_adapters() == ()
