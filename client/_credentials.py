"""Channel credentials for a server that speaks TLS, from PEM files."""

from __future__ import annotations

import os

import grpc


def tls_credentials(ca_file: str | os.PathLike | None = None, cert_file: str | os.PathLike | None = None,
                    key_file: str | os.PathLike | None = None) -> grpc.ChannelCredentials:
    """TLS that trusts ``ca_file`` (None: the system's roots), with a client certificate and key
    for mutual TLS when both are given. Pass the result as ``ClassifierClient(credentials=...)``."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key: give cert_file and key_file together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file), private_key=_read(key_file), certificate_chain=_read(cert_file))


def _read(path: str | os.PathLike | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()
