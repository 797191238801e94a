"""A throwaway CA and a server certificate for 127.0.0.1, made with openssl.

For tests of hostd's TCP listener (TLS-only): `server.pem`/`server.key` for
hostd, `ca.pem` for the client to trust, and `other-ca.pem`, a CA that did
not sign the server's certificate (the client must refuse it).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _self_signed_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, pem = d / f"{name}.key", d / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(pem), "-days", "2", "-subj", f"/CN=moru test {name}",
    )  # fmt: skip
    return pem, key


def make_tls_files(d: Path) -> TlsFiles:
    """Writes the CAs and a server cert (SAN IP:127.0.0.1) into `d`."""
    ca, ca_key = _self_signed_ca(d, "ca")
    other_ca, _ = _self_signed_ca(d, "other-ca")
    key, csr, cert = d / "server.key", d / "server.csr", d / "server.pem"
    ext = d / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return TlsFiles(ca=ca, other_ca=other_ca, cert=cert, key=key)
