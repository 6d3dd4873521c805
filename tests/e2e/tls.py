"""Self-signed TLS certificates for the e2e servers, made with the ``openssl`` command."""

from __future__ import annotations

import os
import ssl
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class TlsFiles:
    """A certificate for 127.0.0.1 (and localhost) and its key, PEM files in one directory."""

    cert: str
    key: str

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts exactly this certificate (and checks the host)."""
        return ssl.create_default_context(cafile=self.cert)


def self_signed(directory: str, name: str = "server") -> TlsFiles:
    """A fresh self-signed certificate (RSA 2048, one day) for 127.0.0.1 in ``directory``."""
    cert = os.path.join(directory, f"{name}.crt")
    key = os.path.join(directory, f"{name}.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    os.chmod(key, 0o600)
    return TlsFiles(cert=cert, key=key)
