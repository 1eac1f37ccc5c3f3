"""Throwaway PKI for the security tests, made at test time with the ``openssl`` command.

Two independent CAs: ``ca`` signs the server certificate (SAN localhost and 127.0.0.1) and a
client certificate; ``other_ca`` signs a second client certificate that the server must refuse.
EC P-256 keys and one-day validity keep generation fast and the material useless elsewhere.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files; ``*_key`` are unencrypted private keys."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    return path


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key = _key(directory / f"{name}.key")
    cert = directory / f"{name}.pem"
    _openssl(
        "req", "-x509", "-new", "-key", key, "-out", cert, "-days", "1",
        "-subj", f"/CN=peftserve test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _leaf(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: list[str]
) -> tuple[Path, Path]:
    key = _key(directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    cert = directory / f"{name}.pem"
    ext_file = directory / f"{name}.ext"
    ext_file.write_text("\n".join(["basicConstraints=CA:FALSE", *extensions]) + "\n")
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={name}")
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-out", cert, "-days", "1",
        "-set_serial", str(secrets.randbits(64)), "-extfile", ext_file,
    )  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> Pki:
    """Create every certificate and key under ``directory``."""
    ca = _ca(directory, "ca")
    other_ca = _ca(directory, "other-ca")
    server = _leaf(
        directory,
        "server",
        ca,
        ["subjectAltName=DNS:localhost,IP:127.0.0.1", "extendedKeyUsage=serverAuth"],
    )
    client = _leaf(directory, "client", ca, ["extendedKeyUsage=clientAuth"])
    other_client = _leaf(directory, "other-client", other_ca, ["extendedKeyUsage=clientAuth"])
    return Pki(
        ca_cert=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        other_ca_cert=other_ca[0],
        other_client_cert=other_client[0],
        other_client_key=other_client[1],
    )
