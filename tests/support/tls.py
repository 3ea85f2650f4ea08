"""Certificates a test makes itself (trustme): a CA, a server certificate for 127.0.0.1 and localhost that it
signed, and an unrelated CA, written as PEM files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True, slots=True)
class Certificates:
    ca_file: Path  # the CA that signed server_pem
    server_pem: Path  # certificate chain and private key, one file
    other_ca_file: Path  # a CA that signed nothing here


def make_certificates(directory: Path) -> Certificates:
    ca, other = trustme.CA(), trustme.CA()
    paths = Certificates(directory / "ca.pem", directory / "server.pem", directory / "other-ca.pem")
    ca.cert_pem.write_to_path(str(paths.ca_file))
    other.cert_pem.write_to_path(str(paths.other_ca_file))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(paths.server_pem)
    )
    return paths
