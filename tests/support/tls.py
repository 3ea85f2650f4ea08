"""Certificates a test makes itself with the `openssl` command: a CA, a server certificate for 127.0.0.1 and
localhost that it signed, and an unrelated CA, as PEM files (EC P-256, valid two days). No Python package
is needed, so the locked dependencies stay as they are."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_CA_EXT = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
_LEAF_EXT = """subjectAltName = IP:127.0.0.1, DNS:localhost
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True, slots=True)
class Certificates:
    ca_file: Path  # the CA that signed server_pem
    server_pem: Path  # certificate and private key, one file
    other_ca_file: Path  # a CA that signed nothing here


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def _key_and_request(key: Path, out: Path, subject: str, *extra: str) -> list[str | Path]:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    return ["req", *ec, "-keyout", key, "-out", out, "-subj", subject, *extra]


def make_certificates(directory: Path) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = directory
    for name in ("ca", "other-ca"):
        _openssl(
            *_key_and_request(d / f"{name}.key", d / f"{name}.pem", f"/CN=switchboard test {name}"),
            "-x509",
            "-days",
            "2",
            *_CA_EXT,
        )
    _openssl(*_key_and_request(d / "server.key", d / "server.csr", "/CN=127.0.0.1"))
    (d / "leaf.ext").write_text(_LEAF_EXT)
    _openssl(
        "x509",
        "-req",
        "-in",
        d / "server.csr",
        "-CA",
        d / "ca.pem",
        "-CAkey",
        d / "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        d / "leaf.ext",
        "-out",
        d / "server.crt",
    )
    server_pem = d / "server.pem"
    server_pem.write_text((d / "server.crt").read_text() + (d / "server.key").read_text())
    return Certificates(d / "ca.pem", server_pem, d / "other-ca.pem")
