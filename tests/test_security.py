"""TLS, mutual TLS and bearer tokens with real certificates made here, on real servers; and the
promise that nothing from a request is unpickled or evaluated."""

from __future__ import annotations

import ast
import datetime
import ipaddress
import logging
import os
import pickle
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cifar10_serving.client import ClassifierClient, ClassifierError, tls_credentials
from cifar10_serving.client import cli
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc
from cifar10_serving.server.config import ServerConfig, parse_config
from cifar10_serving.server.security import (SecurityConfigError, check_models_dir, load_tokens, server_credentials,
                                             warn_plaintext_http)
from tests.helpers.images import random_images
from tests.helpers.servers import RunningServer, make_config

SERVER_DIR = Path(__file__).resolve().parent.parent / "server"
TOKENS = ("s3cret-token-one", "s3cret-token-two")
IMAGE = random_images(1, seed=21)[0]


# ----------------------------------------------------------------------------- certificates
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, tiny_server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if tiny_server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert, key=None) -> tuple[Path, Path | None]:
    cert_path = directory / f"{name}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return cert_path, None
    key_path = directory / f"{name}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server and a client certificate, and a second CA with a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    files = {}
    for ca_name in ("ca", "rogue-ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        files[ca_name] = _write(d, ca_name, _certificate(ca_name, ca_key, ca_name, ca_key, ca=True))[0]
        for role in ("server", "client"):
            key = ec.generate_private_key(ec.SECP256R1())
            name = f"{role}-of-{ca_name}"
            files[name] = _write(d, name, _certificate(name, key, ca_name, ca_key, tiny_server=role == "server"), key)
    tokens = d / "tokens"
    tokens.write_text(f"# accepted bearer tokens\n{TOKENS[0]}\n\n  {TOKENS[1]}  \n")
    files["tokens"] = tokens
    return files


@pytest.fixture(scope="module")
def tls_token_server(tiny_models_dir, pki):
    """TLS, and every call but health needs one of TOKENS."""
    cert, key = pki["server-of-ca"]
    running = RunningServer(make_config(tiny_models_dir, tls_cert_file=str(cert), tls_key_file=str(key),
                                        auth_token_file=str(pki["tokens"])))
    yield running
    running.stop(grace=1.0)


@pytest.fixture(scope="module")
def mtls_server(tiny_models_dir, pki):
    """Mutual TLS: clients must show a certificate signed by "ca"."""
    cert, key = pki["server-of-ca"]
    running = RunningServer(make_config(tiny_models_dir, tls_cert_file=str(cert), tls_key_file=str(key),
                                        tls_client_ca_file=str(pki["ca"])))
    yield running
    running.stop(grace=1.0)


def _classify(target: str, credentials=None, token: str | None = None) -> str:
    with ClassifierClient(target, timeout=10, credentials=credentials, token=token) as c:
        return c.classify([IMAGE])[0].label


def _code(call) -> grpc.StatusCode:
    with pytest.raises(ClassifierError) as info:
        call()
    return info.value.code


# ----------------------------------------------------------------------------- TLS
def test_tls_with_a_token_answers(tls_token_server, pki):
    label = _classify(tls_token_server.target, tls_credentials(pki["ca"]), TOKENS[0])
    assert label in {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}


def test_tls_refuses_plaintext_and_a_client_that_trusts_another_ca(tls_token_server, pki):
    assert _code(lambda: _classify(tls_token_server.target, None, TOKENS[0])) == grpc.StatusCode.UNAVAILABLE
    wrong_ca = tls_credentials(pki["rogue-ca"])
    assert _code(lambda: _classify(tls_token_server.target, wrong_ca, TOKENS[0])) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(mtls_server, pki):
    ours, rogue = pki["client-of-ca"], pki["client-of-rogue-ca"]
    assert _classify(mtls_server.target, tls_credentials(pki["ca"], *ours))
    for credentials in (tls_credentials(pki["ca"]), tls_credentials(pki["ca"], *rogue)):
        assert _code(lambda: _classify(mtls_server.target, credentials)) == grpc.StatusCode.UNAVAILABLE
    assert _classify(mtls_server.target, tls_credentials(pki["ca"], *ours))  # still serving


def test_client_certificate_needs_its_key():
    with pytest.raises(ValueError, match="together"):
        tls_credentials(None, "client.crt", None)


# ----------------------------------------------------------------------------- bearer tokens
def test_every_call_but_health_needs_an_accepted_token(tls_token_server, pki):
    target, creds = tls_token_server.target, tls_credentials(pki["ca"])
    for token in (None, "wrong", TOKENS[0] + "x", TOKENS[0][:-1]):
        with ClassifierClient(target, timeout=10, credentials=creds, token=token) as c:
            for call in (lambda: c.classify([IMAGE]), c.list_models, lambda: c.model_info("tiny-max"),
                         lambda: list(c.classify_stream([[IMAGE]]))):
                with pytest.raises(ClassifierError) as info:
                    call()
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert "token" in info.value.details and TOKENS[0] not in info.value.details
            assert c.health() == "SERVING"  # probes carry no credentials
    for token in TOKENS:  # either token of the file works (rotation)
        assert _classify(target, creds, token)


def test_the_token_must_be_a_bearer_token(tls_token_server, pki):
    channel = grpc.secure_channel(tls_token_server.target, tls_credentials(pki["ca"]))
    with channel:
        stub = pb_grpc.ClassifierStub(channel)
        for value in (f"Basic {TOKENS[0]}", TOKENS[0], f"bearer{TOKENS[0]}"):
            with pytest.raises(grpc.RpcError) as info:
                stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=(("authorization", value),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKENS[1]}"),))
        assert ok.default_model == "tiny-max"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def token_server(tiny_models_dir, pki):
    """Tokens without TLS (on loopback), and a small request limit."""
    running = RunningServer(make_config(tiny_models_dir, auth_token_file=str(pki["tokens"]),
                                        max_receive_message_bytes=SMALL_LIMIT))
    yield running
    running.stop(grace=1.0)


SMALL_LIMIT = 1 << 20


def test_the_bearer_scheme_is_case_insensitive_and_surrounding_whitespace_is_ignored(token_server):
    with grpc.insecure_channel(token_server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)

        def code(value: str) -> grpc.StatusCode:
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=(("authorization", value),))
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        token = TOKENS[0]
        for accepted in (f"bearer {token}", f"BEARER {token}", f"BeArEr {token}", f"  Bearer {token} ",
                         f"Bearer    {token}"):  # RFC 7235: the scheme in any case, then 1*SP
            assert code(accepted) == grpc.StatusCode.OK, accepted
        for refused in (f"Bearer {token}x", f"Bearer {token[:-1]}", f"Bearer {token} extra",
                        f"Bearer{token}", "Bearer", "Bearer   ", f"Basic {token}", f"Bear {token}"):
            assert code(refused) == grpc.StatusCode.UNAUTHENTICATED, refused


def test_a_call_without_a_token_is_refused_before_its_message_is_read(token_server):
    """A request over the size limit: read, it would fail RESOURCE_EXHAUSTED; unread, UNAUTHENTICATED."""
    big = pb.ClassifyRequest(images=[pb.Image(encoded=bytes(2 * SMALL_LIMIT))])
    with grpc.insecure_channel(token_server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            for _ in range(3):  # and again on the same connection: the refusal left it usable
                with pytest.raises(grpc.RpcError) as info:
                    stub.Classify(big, timeout=30, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ClassifyStream(iter([big]), timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = (("authorization", f"Bearer {TOKENS[0]}"),)
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(big, timeout=30, metadata=auth)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # with a token it is read, and too large
        small = pb.ClassifyRequest(images=[pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], layout=pb.LAYOUT_HWC,
                                                                 data=IMAGE.tobytes()))])
        assert len(stub.Classify(small, timeout=30, metadata=auth).results) == 1


def test_reflection_needs_a_token(tls_token_server, pki):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.secure_channel(tls_token_server.target, tls_credentials(pki["ca"])) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([ask]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(stub.ServerReflectionInfo(iter([ask]), timeout=10,
                                                 metadata=(("authorization", f"Bearer {TOKENS[0]}"),)))
        assert "cifar10.v1.Classifier" in {s.name for s in answers[0].list_services_response.service}


def test_cli_flags_and_environment_for_tls_and_tokens(tls_token_server, pki, tmp_path, monkeypatch, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS[1] + "\n")
    base = ["--target", tls_token_server.target, "--timeout", "10"]
    assert cli.main([*base, "--ca-cert", str(pki["ca"]), "--token-file", str(token_file), "models", "--json"]) == 0
    assert '"default_model": "tiny-max"' in capsys.readouterr().out
    assert cli.main([*base, "--ca-cert", str(pki["ca"]), "models"]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cli.main([*base, "--ca-cert", str(pki["ca"]), "health"]) == 0  # health needs no token
    monkeypatch.setenv("CIFAR10_CA_CERT", str(pki["ca"]))
    monkeypatch.setenv("CIFAR10_TOKEN", TOKENS[0])
    assert cli.main([*base, "models"]) == 0
    monkeypatch.setenv("CIFAR10_TOKEN", "wrong")
    assert cli.main([*base, "models"]) == 2


def test_mutual_tls_from_the_cli(mtls_server, pki, capsys):
    cert, key = pki["client-of-ca"]
    base = ["--target", mtls_server.target, "--timeout", "10", "--ca-cert", str(pki["ca"])]
    assert cli.main([*base, "--client-cert", str(cert), "--client-key", str(key), "health"]) == 0
    assert cli.main([*base, "health"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err


# ----------------------------------------------------------------------------- configuration
def test_tls_and_token_settings_come_from_flags_and_environment(pki):
    cert, key = pki["server-of-ca"]
    env = {"CIFAR10_TLS_CERT_FILE": str(cert), "CIFAR10_TLS_KEY_FILE": str(key),
           "CIFAR10_AUTH_TOKEN_FILE": str(pki["tokens"])}
    config = parse_config(["--tls-client-ca-file", str(pki["ca"])], env)
    assert (config.tls_cert_file, config.tls_client_ca_file, config.auth_token_file) == (
        str(cert), str(pki["ca"]), str(pki["tokens"]))
    assert load_tokens(config.auth_token_file) == list(TOKENS)
    assert ServerConfig().tls_cert_file == "" and ServerConfig().auth_token_file == ""  # off by default


def test_inconsistent_or_unreadable_security_settings_fail_at_start(tiny_models_dir, pki, tmp_path):
    with pytest.raises(ValueError, match="go together"):
        ServerConfig(tls_cert_file="a.crt")
    with pytest.raises(ValueError, match="mutual TLS"):
        ServerConfig(tls_client_ca_file="ca.crt")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(SecurityConfigError, match="holds no token"):
        load_tokens(str(empty))
    with pytest.raises(SecurityConfigError, match="cannot read"):
        load_tokens(str(tmp_path / "missing"))
    cert, _ = pki["server-of-ca"]
    with pytest.raises(SecurityConfigError, match="tls_key_file"):  # a certificate where the key belongs
        server_credentials(make_config(tiny_models_dir, tls_cert_file=str(cert), tls_key_file=str(cert)))


def test_a_models_directory_others_may_write_is_warned_about(tiny_models_dir, tmp_path, caplog):
    shared = tmp_path / "models"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with caplog.at_level(logging.WARNING, logger="server.security"):
        check_models_dir(str(shared))
        check_models_dir(str(tiny_models_dir))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and str(shared) in warned[0] and "run code" in warned[0]
    assert not stat.S_IMODE(tiny_models_dir.stat().st_mode) & stat.S_IWOTH

    # Triton's layout: a NAME/ or NAME/VERSION/ folder others may write lets them publish a version
    # (loaded unasked in poll mode), and a compiled package beside a file is code as much as the file.
    repository = tmp_path / "repository"
    version = repository / "tiny-max" / "1"
    version.mkdir(parents=True)
    for path in (version / "model.pt", version / "model.pt2", repository / "flat.pt", repository / "flat.pt2"):
        path.write_bytes(b"")
    owner_only = [repository, version / "model.pt", repository / "flat.pt"]
    open_to_others = [repository / "tiny-max", version, version / "model.pt2", repository / "flat.pt2"]
    for path in owner_only:
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
    for path in open_to_others:
        os.chmod(path, 0o775 if path.is_dir() else 0o664)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server.security"):
        check_models_dir(str(repository))
    warned = sorted(r.getMessage().split(" is writable")[0] for r in caplog.records)
    assert warned == sorted(str(p) for p in open_to_others)


# ----------------------------------------------------------------------------- nothing is evaluated
class _Planted:
    def __reduce__(self):
        return (os.mkdir, (str(_Planted.path),))


def test_a_pickle_in_a_request_is_just_bad_bytes(tls_token_server, pki, tmp_path):
    _Planted.path = tmp_path / "unpickled"
    payload = pickle.dumps(_Planted())
    auth = (("authorization", f"Bearer {TOKENS[0]}"),)
    with grpc.secure_channel(tls_token_server.target, tls_credentials(pki["ca"])) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for image, code in ((pb.Image(encoded=payload), grpc.StatusCode.INVALID_ARGUMENT),
                            (pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], data=payload)), grpc.StatusCode.INVALID_ARGUMENT),
                            (pb.Image(raw=pb.RawTensor(shape=[32, 32, 3], data=bytes(3072))), grpc.StatusCode.NOT_FOUND)):
            model = payload.decode("latin-1") if code == grpc.StatusCode.NOT_FOUND else ""
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(pb.ClassifyRequest(images=[image], model=model), timeout=10, metadata=auth)
            assert info.value.code() == code
    assert not _Planted.path.exists()


FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def test_the_server_never_unpickles_or_evaluates():
    """A static guard: no module of the server imports a deserialiser that runs code, calls eval or
    exec, or loads with torch.load or numpy's pickles; torch.jit.load appears once, in models.py."""
    jit_loads = []
    for path in sorted(SERVER_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & FORBIDDEN_MODULES, path
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in FORBIDDEN_MODULES, path
            elif isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name):
                    assert func.id not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {func.id}"
                dotted = ast.unparse(func)
                assert dotted not in ("torch.load", "np.load", "numpy.load", "pickle.loads"), f"{path.name}:{node.lineno}"
                for keyword in node.keywords:
                    assert keyword.arg != "allow_pickle", f"{path.name}:{node.lineno}"
                if dotted == "torch.jit.load":
                    jit_loads.append(path.name)
    assert set(jit_loads) == {"models.py"}


def test_plaintext_http_off_loopback_is_warned_about(tmp_path, caplog):
    """--http-host may face the network while --host does not: the HTTP port warns for itself."""
    tokens = tmp_path / "tokens"
    tokens.write_text("t\n")
    cases = {("127.0.0.1", ""): 0, ("127.0.0.1", "0.0.0.0"): 1, ("0.0.0.0", "127.0.0.1"): 0, ("0.0.0.0", ""): 1}
    for (host, http_host), warnings in cases.items():
        for token_file, per_case in (("", warnings), (str(tokens), 2 * warnings)):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="cifar10_serving.server.security"):
                warn_plaintext_http(ServerConfig(host=host, http_host=http_host, auth_token_file=token_file))
            said = [r.getMessage() for r in caplog.records]
            assert len(said) == per_case, (host, http_host, token_file, said)
            assert all("HTTP" in line for line in said)
