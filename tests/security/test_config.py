"""Security settings: flags, environment, boolean parsing and the startup checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from peftserve.server.app import PeftServeServer
from peftserve.server.auth import parse_token_list, read_tokens_file
from peftserve.server.config import ServerConfig, config_from_args, validate_security

from .certs import Pki

# The demo model directory exists in a checkout; no adapters keeps these tests independent of
# the demo adapters, so only the settings under test can make config_from_args fail.
BASE_ARGS = ["--address", "127.0.0.1:0", "--adapters-dir", ""]


def problems_of(**fields: object) -> str:
    return "; ".join(validate_security(ServerConfig(**fields)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("YES", True), ("1", True), ("false", False), ("no", False), ("0", False)],
)
def test_bool_flag_values(pki: Pki, raw: str, expected: bool) -> None:
    tls = ["--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key)]
    ca = ["--tls-client-ca-file", str(pki.ca_cert)] if expected else []
    config = config_from_args([*BASE_ARGS, *tls, *ca, "--tls-require-client-auth", raw], env={})
    assert config.tls_require_client_auth is expected


def test_bare_bool_flag_means_true_and_env_sets_it(pki: Pki) -> None:
    env = {
        "PEFTSERVE_TLS_CERT_FILE": str(pki.server_cert),
        "PEFTSERVE_TLS_KEY_FILE": str(pki.server_key),
        "PEFTSERVE_TLS_CLIENT_CA_FILE": str(pki.ca_cert),
    }
    bare = config_from_args([*BASE_ARGS, "--tls-require-client-auth"], env=env)
    assert bare.tls_require_client_auth is True
    env["PEFTSERVE_TLS_REQUIRE_CLIENT_AUTH"] = "yes"
    config = config_from_args(BASE_ARGS, env=env)
    assert config.tls_require_client_auth is True
    assert config.tls_cert_file == pki.server_cert


def test_bad_bool_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        config_from_args([*BASE_ARGS, "--tls-require-client-auth", "maybe"], env={})
    assert "true/false/1/0/yes/no" in capsys.readouterr().err


def test_tokens_from_env_are_comma_separated_and_kept_out_of_repr() -> None:
    config = config_from_args(BASE_ARGS, env={"PEFTSERVE_AUTH_TOKENS": " alpha-1 ,, beta-2 "})
    assert config.auth_tokens == ("alpha-1", "beta-2")
    assert "alpha-1" not in repr(config)
    assert parse_token_list("") == ()


def test_tokens_file_ignores_blank_lines_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# ops team\n\n  first-token  \n#retired-token\nsecond-token\n")
    assert read_tokens_file(path) == ("first-token", "second-token")


def test_valid_tls_settings_have_no_problems(pki: Pki) -> None:
    assert problems_of(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key) == ""
    assert (
        problems_of(
            tls_cert_file=pki.server_cert,
            tls_key_file=pki.server_key,
            tls_client_ca_file=pki.ca_cert,
            tls_require_client_auth=True,
        )
        == ""
    )


def test_cert_without_key_is_refused(pki: Pki) -> None:
    assert "must be set together" in problems_of(tls_cert_file=pki.server_cert)
    assert "must be set together" in problems_of(tls_key_file=pki.server_key)


def test_client_auth_without_ca_is_refused(pki: Pki) -> None:
    tls = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key}
    assert "needs --tls-client-ca-file" in problems_of(**tls, tls_require_client_auth=True)
    # gRPC only asks for client certificates when it requires them: a CA alone is a mistake.
    assert "no effect" in problems_of(**tls, tls_client_ca_file=pki.ca_cert)
    assert "need --tls-cert-file" in problems_of(
        tls_client_ca_file=pki.ca_cert, tls_require_client_auth=True
    )


def test_missing_files_are_refused(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "nope.pem"
    problems = problems_of(tls_cert_file=missing, tls_key_file=pki.server_key)
    assert f"--tls-cert-file {missing} is not a readable file" in problems
    assert "--auth-tokens-file" in problems_of(auth_tokens_file=missing)


def test_empty_tokens_file_and_unusable_tokens_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("# nothing here yet\n\n")
    assert "holds no tokens" in problems_of(auth_tokens_file=empty)
    assert "whitespace" in problems_of(auth_tokens=("two words",))


def test_flags_are_validated(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        config_from_args([*BASE_ARGS, "--tls-cert-file", str(pki.server_cert)], env={})
    assert "--tls-cert-file and --tls-key-file must be set together" in capsys.readouterr().err


def test_server_refuses_to_start_half_configured(pki: Pki) -> None:
    # create_server checks too: tests and embedders build ServerConfig without the flags.
    with pytest.raises(ValueError, match="must be set together"):
        PeftServeServer(ServerConfig(tls_cert_file=pki.server_cert))
