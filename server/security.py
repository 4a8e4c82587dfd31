"""Who may talk to the server: optional TLS (mutual with a client CA) and optional bearer tokens.

Both are off by default, for a server on 127.0.0.1. Anywhere else, turn TLS on
(``--tls-cert-file``/``--tls-key-file``) and either mutual TLS (``--tls-client-ca-file``) or
tokens (``--auth-token-file``): a token sent without TLS can be read off the wire.

Tokens are checked on every call except the standard health service, which load balancers and
orchestrators probe without credentials. Reflection needs a token like the Classifier does.

Trust: the server runs the code inside every TorchScript file in its models directory, so whoever
can write there can run code as the server. It loads models from that directory only (at start, and
in poll or explicit mode while serving: docs/model-repository.md); a request can name a model, never
a path, and nothing from a request is unpickled or evaluated. With tokens on, loading and unloading
by call needs a token of ``--admin-token-file``; an inference token gets PERMISSION_DENIED.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import stat
from pathlib import Path
from typing import Sequence

import grpc

from cifar10_serving.protos import artifact
from cifar10_serving.server.config import ServerConfig
from cifar10_serving.server.drain import refusing

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"  # open to all: probes carry no credentials
AUTH_HEADER = "authorization"
# The calls that change what is served: with tokens on, only an admin token may make them.
ADMIN_METHODS = ("/inference.GRPCInferenceService/RepositoryModelLoad",
                 "/inference.GRPCInferenceService/RepositoryModelUnload")
BEARER = "Bearer "
NOT_ACCEPTED = "bearer token not accepted"  # check_bearer's answer for a well-formed token it does not know
NOT_ADMIN = "this token may not load or unload models: send one of the server's --admin-token-file"


class SecurityConfigError(ValueError):
    """TLS or token settings that cannot work; the message names the setting."""


# ----------------------------------------------------------------------------- TLS
def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the PEM files in ``config``; None when TLS is off."""
    if not config.tls_cert_file:
        return None
    chain = _read(config.tls_cert_file, "tls_cert_file")
    key = _read(config.tls_key_file, "tls_key_file")
    for what, data, marker in (("tls_cert_file", chain, b"CERTIFICATE"), ("tls_key_file", key, b"PRIVATE KEY")):
        if marker not in data:
            raise SecurityConfigError(f"{what}: {getattr(config, what)} holds no PEM {marker.decode()}")
    client_ca = _read(config.tls_client_ca_file, "tls_client_ca_file") if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def add_port(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Binds the gRPC port, with TLS when configured; returns the bound port (0: failed)."""
    credentials = server_credentials(config)
    if credentials is None:
        if not is_loopback(config.host):
            log.warning("serving plaintext gRPC on %s: anyone on the network can read and send calls; "
                        "set --tls-cert-file and --tls-key-file", config.host)
        return server.add_insecure_port(config.address)
    return server.add_secure_port(config.address, credentials)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (no warning about plaintext there)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------- bearer tokens
def load_tokens(path: str, setting: str = "auth_token_file") -> list[str]:
    """Accepted tokens, one a line; blank lines and lines starting with # are skipped."""
    text = _read(path, setting).decode("utf-8")
    tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise SecurityConfigError(f"{setting}: {path} holds no token")
    if any(" " in token for token in tokens):
        raise SecurityConfigError(f"{setting}: {path}: a token may not contain spaces")
    return tokens


def check_bearer(accepted_tokens: Sequence[bytes], header_value: str | bytes | None) -> str | None:
    """None when ``header_value`` (gRPC's ``authorization`` metadata, HTTP's ``Authorization``
    header; None when absent) carries one of ``accepted_tokens``, else what is wrong with it:
    ``NOT_ACCEPTED`` for a well-formed token that is not one of them, another message when there is
    none or it is malformed. Both front-ends check tokens with it, so they accept the same values.

    ``Bearer <token>``: the scheme in any case (RFC 7235), one or more spaces before the token, and
    whitespace around the whole value ignored (HTTP trims it from any field value); the token itself
    is compared exactly, against every accepted token in constant time, so that timing tells nothing
    about any of them."""
    if header_value is None:
        return f"this server needs a bearer token: send '{AUTH_HEADER}: {BEARER}<token>'"
    value = header_value if isinstance(header_value, str) else header_value.decode("utf-8", "surrogateescape")
    scheme, _, given = value.strip().partition(" ")
    if scheme.lower() != BEARER.strip().lower() or not given.strip():
        return f"the {AUTH_HEADER} value must be '{BEARER}<token>'"
    try:  # tokens are read as UTF-8; surrogateescape gives back the bytes a header could not decode
        given_bytes = given.lstrip(" ").encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return NOT_ACCEPTED
    accepted = False
    for token in accepted_tokens:
        accepted |= hmac.compare_digest(given_bytes, token)
    return None if accepted else NOT_ACCEPTED


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses every call but health with UNAUTHENTICATED unless it carries an accepted token; the
    ``admin_methods`` (``/package.Service/Method``) take only ``admin_tokens``, and a call to them
    with another accepted token is refused PERMISSION_DENIED.

    The metadata is ``authorization: Bearer <token>``, checked by ``check_bearer`` (as the HTTP
    front-end checks its header). A refused call's message is never read."""

    def __init__(self, tokens: Sequence[str], open_prefixes: Sequence[str] = (HEALTH_PREFIX,),
                 admin_tokens: Sequence[str] = (), admin_methods: Sequence[str] = ()) -> None:
        self._admin = [token.encode() for token in admin_tokens]
        self._tokens = [token.encode() for token in tokens] + self._admin
        self._open = tuple(open_prefixes)
        self._admin_methods = frozenset(admin_methods)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(self._open):
            return await continuation(details)
        metadata = details.invocation_metadata or ()
        problem = self._problem(metadata, self._tokens)
        code = grpc.StatusCode.UNAUTHENTICATED
        if problem is None and details.method in self._admin_methods and self._problem(metadata, self._admin):
            code, problem = grpc.StatusCode.PERMISSION_DENIED, NOT_ADMIN
        handler = await continuation(details)
        if problem is None or handler is None:
            return handler
        return refusing(handler, code, problem)

    def _problem(self, metadata, accepted_tokens: list[bytes]) -> str | None:
        values = [value for key, value in metadata if key == AUTH_HEADER]
        return check_bearer(accepted_tokens, values[0] if values else None)


def warn_plaintext_http(config: ServerConfig) -> None:
    """The HTTP port's counterpart of ``add_port``'s and ``interceptors``' warnings: its own host
    (``--http-host``) may be reachable where the gRPC host is not."""
    host = config.http_host or config.host
    if config.tls_cert_file or is_loopback(host):
        return
    log.warning("serving plaintext HTTP on %s: anyone on the network can read and send requests; "
                "set --tls-cert-file and --tls-key-file", host)
    if config.auth_token_file:
        log.warning("bearer tokens without TLS on %s (HTTP): tokens cross the network in the clear", host)


def interceptors(config: ServerConfig) -> list[grpc.aio.ServerInterceptor]:
    """The security interceptors ``config`` asks for, outermost first."""
    if not config.auth_token_file:
        return []
    if not config.tls_cert_file and not is_loopback(config.host):
        log.warning("bearer tokens without TLS on %s: tokens cross the network in the clear", config.host)
    admin = load_tokens(config.admin_token_file, "admin_token_file") if config.admin_token_file else []
    return [TokenAuth(load_tokens(config.auth_token_file), admin_tokens=admin, admin_methods=ADMIN_METHODS)]


# ----------------------------------------------------------------------------- models directory
def check_models_dir(models_dir: str) -> None:
    """Warns when others than the owner may write the models directory or what it serves from: its
    ``NAME.pt`` files, the ``NAME/`` and ``NAME/VERSION/`` folders of Triton's layout and their
    ``model.pt``, and the compiled ``.pt2`` package beside any of them. TorchScript files and packages
    carry code, so write access there is the power to run code in the server; a folder too, as
    writing a version folder into it publishes a version (poll mode loads it unasked)."""
    directory = Path(models_dir)
    folders = [p for p in directory.glob("*/") if p.is_dir() and not p.name.startswith(".")]
    folders += [p for f in folders for p in f.glob("*/") if p.is_dir() and not p.name.startswith(".")]
    files = [p for pattern in ("*", "*/*/model") for suffix in (artifact.ARTIFACT_SUFFIX, artifact.COMPILED_SUFFIX)
             for p in directory.glob(pattern + suffix)]
    for path in (directory, *sorted(folders), *sorted(files)):
        try:
            mode = path.stat().st_mode
        except OSError:
            continue  # loading reports it
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not (path.is_dir() and mode & stat.S_ISVTX):
            log.warning("%s is writable by group or others; whoever can write a model file can run code "
                        "in this server", path)


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
