"""Fixtures of the security tests: one throwaway PKI per session."""

from __future__ import annotations

import pytest

from .certs import Pki, make_pki, openssl_available


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not openssl_available():
        pytest.skip("the openssl command is needed to create test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))
