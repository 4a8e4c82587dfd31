"""The Open Inference Protocol over HTTP against a real server process, with the standard library's
HTTP client as curl would speak it: health, metadata, JSON and binary inference equal to the gRPC
answer, the classification extension, every refusal with its status (the server serving on), drain,
the body limit refused before the body is read, ``Expect: 100-continue`` answered only once every
refusal has passed, slow, idle and chunked clients, the connection cap, a client that never reads
its answers held by the answer budget, and ``--http-port -1``."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from cifar10_serving.client import ClassifierClient
from cifar10_serving.server.launcher import ServerProcess
from cifar10_serving.server.v2_tensors import SERVER_NAME
from tests.helpers.servers import server_args

pytestmark = pytest.mark.system  # server processes

TOKEN = "http-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_LIMIT = 1 << 20
BUDGET = 128 << 20  # three answers of 16 images with every feature map as JSON (5 MB, 27 MiB reserved each)
HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGES = np.random.default_rng(32).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
CHW = np.ascontiguousarray(IMAGES.transpose(0, 3, 1, 2))
# Short enough for a test to wait out; the body timeout leaves the 5 MB bodies of the budget test
# time to arrive on 2 shared cores.
IDLE_TIMEOUT_MS, BODY_TIMEOUT_MS = 1500, 2000


@pytest.fixture(scope="module")
def running(tiny_models_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    with ServerProcess(server_args(tiny_models_dir, auth_token_file=tokens, http_max_body_bytes=BODY_LIMIT,
                                   http_header_timeout_ms=1000, http_max_connections=24,
                                   http_idle_timeout_ms=IDLE_TIMEOUT_MS, http_body_timeout_ms=BODY_TIMEOUT_MS,
                                   answer_budget_bytes=BUDGET)) as server:
        yield server


def call(server, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None,
         auth: bool = True) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request(method, path, body=body, headers={**(AUTH if auth else {}), **(headers or {})})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def head(method: str, path: str, headers: dict, auth: bool = True) -> bytes:
    """A request's head as a raw socket sends it, for what http.client will not send (Expect, a
    half-sent body, a chunked one)."""
    fields = {**(AUTH if auth else {}), **headers}
    lines = [f"{method} {path} HTTP/1.1", "Host: x", *(f"{k}: {v}" for k, v in fields.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_head(sock: socket.socket) -> bytes:
    """Bytes up to the end of the first answer's head (the status line and headers)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def infer_json(images: np.ndarray, **extra) -> str:
    return json.dumps({"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "UINT8",
                                   "data": images.ravel().tolist()}], **extra})


def binary_request(images: np.ndarray, outputs=None) -> tuple[bytes, dict]:
    header = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "UINT8",
                          "parameters": {"binary_data_size": images.nbytes}}]}
    header.update({"outputs": outputs} if outputs else {"parameters": {"binary_data_output": True}})
    text = json.dumps(header).encode()
    return text + images.tobytes(), {HEADER_LENGTH: str(len(text)), "Content-Type": "application/octet-stream"}


def grpc_scores(server) -> np.ndarray:
    with ClassifierClient(server.target, timeout=30, token=TOKEN) as client:
        return np.stack([r.probabilities for r in client.classify(list(IMAGES), model="tiny-max")])


def assert_serving(server) -> None:
    status, _, body = call(server, "POST", "/v2/models/tiny-max/infer", infer_json(CHW[:1]))
    assert status == 200, body


# ----------------------------------------------------------------------------- the protocol
def test_health_and_metadata(running):
    assert call(running, "GET", "/v2/health/live", auth=False)[:3:2] == (200, b'{"live": true}')
    assert call(running, "GET", "/v2/health/live", auth=False)[1]["server"] == SERVER_NAME  # no aiohttp version
    assert call(running, "GET", "/v2/health/ready", auth=False)[:3:2] == (200, b'{"ready": true}')
    status, _, body = call(running, "GET", "/v2")
    assert status == 200 and json.loads(body)["extensions"] == [
        "classification", "binary_tensor_data", "model_configuration", "statistics", "model_repository"]
    status, _, body = call(running, "GET", "/v2/models/tiny-max")
    meta = json.loads(body)
    assert status == 200 and meta["name"] == "tiny-max" and meta["inputs"][0]["shape"] == [-1, 3, 32, 32]
    assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    version = meta["versions"][0]
    assert call(running, "GET", f"/v2/models/tiny-max/versions/{version}/ready")[0] == 200
    assert call(running, "GET", "/v2/models/tiny-max/versions/v999/ready")[0] == 404


def test_json_and_binary_inference_equal_the_grpc_answer(running):
    expected = grpc_scores(running)
    status, headers, body = call(running, "POST", "/v2/models/tiny-max/infer", infer_json(CHW, id="json-1"),
                                 {"Content-Type": "application/json"})
    assert status == 200 and headers["content-type"].startswith("application/json"), body
    answer = json.loads(body)
    assert answer["id"] == "json-1" and answer["outputs"][0]["shape"] == [3, 10]
    np.testing.assert_array_equal(np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(3, 10), expected)

    body, headers = binary_request(CHW)
    status, headers, body = call(running, "POST", "/v2/models/tiny-max/infer", body, headers)
    assert status == 200, body
    length = int(headers[HEADER_LENGTH.lower()])
    header = json.loads(body[:length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == expected.nbytes
    np.testing.assert_array_equal(np.frombuffer(body[length:], dtype="<f4").reshape(3, 10), expected)


def test_classification_and_a_feature_map(running):
    outputs = [{"name": "probabilities", "parameters": {"classification": 3}},
               {"name": "stage1.pool", "parameters": {"binary_data": True, "datatype": "FP16"}}]
    status, _, body = call(running, "POST", "/v2/models/tiny-max/infer", infer_json(CHW, outputs=outputs))
    assert status == 200, body  # JSON in, binary out
    body, headers = binary_request(CHW, outputs)
    status, headers, body = call(running, "POST", "/v2/models/tiny-max/infer", body, headers)
    assert status == 200, body
    length = int(headers[HEADER_LENGTH.lower()])
    top3, fmap = json.loads(body[:length])["outputs"]
    assert top3["shape"] == [3, 3] and top3["datatype"] == "BYTES"
    expected = grpc_scores(running)
    for row, element in zip(expected, [top3["data"][i:i + 3] for i in range(0, 9, 3)]):
        assert [int(s.split(":")[1]) for s in element] == list(np.argsort(-row, kind="stable")[:3])
    assert fmap["datatype"] == "FP16" and fmap["parameters"]["binary_data_size"] == len(body) - length


# ----------------------------------------------------------------------------- refusals
BAD = {  # name: (path, body, headers, status, words)
    "malformed JSON": ("/v2/models/tiny-max/infer", "{not json", {}, 400, "not valid JSON"),
    "wrong shape": ("/v2/models/tiny-max/infer", infer_json(CHW[:, :, :31]), {}, 400, "input 'image': shape"),
    "wrong datatype": ("/v2/models/tiny-max/infer", infer_json(CHW).replace('"UINT8"', '"INT64"'), {}, 400,
                       "datatype 'INT64'"),
    "unknown model": ("/v2/models/resnet-9000/infer", infer_json(CHW), {}, 404, "'resnet-9000' is not loaded"),
    "unknown version": ("/v2/models/tiny-max/versions/9/infer", infer_json(CHW), {}, 404, "'9'"),
    "unknown parameter": ("/v2/models/tiny-max/infer", infer_json(CHW, parameters={"priority": 1}), {}, 400,
                          "'priority'"),
    "no token": ("/v2/models/tiny-max/infer", infer_json(CHW), None, 401, "needs a bearer token"),
    "bad token": ("/v2/models/tiny-max/infer", infer_json(CHW), {"Authorization": "Bearer nope"}, 403,
                  "not accepted"),
    "no endpoint": ("/v2/models/tiny-max/explode", "{}", {}, 404, "no endpoint"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_each_refusal_has_its_status_and_the_server_keeps_serving(running, name):
    path, body, headers, status, words = BAD[name]
    got, got_headers, answer = call(running, "POST", path, body, headers, auth=headers is not None)
    assert got == status, answer
    assert words in json.loads(answer)["error"]
    if status == 401:
        assert got_headers["www-authenticate"] == "Bearer"
    assert_serving(running)


def test_an_oversized_body_is_refused_before_it_is_sent(running):
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/tiny-max/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nContent-Length: 10000000000\r\n\r\n")
        answer = sock.recv(4096)  # no byte of the body sent: the answer comes anyway
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert_serving(running)


EXPECT = {"Expect": "100-continue"}
REFUSED_UNSENT = {  # name: (headers, auth, status): refused with the body unsent, and no 100 Continue first
    "oversized": ({"Content-Length": "10000000000"}, True, 413),
    "no token": ({"Content-Length": "100"}, False, 401),
    "bad token": ({"Content-Length": "100", "Authorization": "Bearer nope"}, True, 403),
    "no Content-Length": ({"Transfer-Encoding": "chunked"}, True, 411),
}


@pytest.mark.parametrize("name", list(REFUSED_UNSENT))
def test_expect_100_continue_is_not_answered_before_a_refusal(running, name):
    headers, auth, status = REFUSED_UNSENT[name]
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=10) as sock:
        sock.sendall(head("POST", "/v2/models/tiny-max/infer", {**headers, **EXPECT}, auth))
        answer = read_head(sock)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]  # the refusal first, not 100 Continue
    assert b"Connection: close" in answer  # the body was never read: the connection cannot carry another request
    if status == 401:
        assert b"WWW-Authenticate: Bearer" in answer


def test_expect_100_continue_then_the_body_is_answered(running):
    body = infer_json(CHW[:1]).encode()
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=10) as sock:
        sock.sendall(head("POST", "/v2/models/tiny-max/infer", {"Content-Length": len(body), **EXPECT}))
        assert read_head(sock) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert read_head(sock).startswith(b"HTTP/1.1 200 ")
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=10) as sock:
        sock.sendall(head("POST", "/v2/models/tiny-max/infer", {"Content-Length": len(body), "Expect": "gold"}))
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 417 ") and b'"error"' in answer  # JSON, as every refusal


def test_refusals_are_counted_under_the_http_method(running):
    """Every HTTP call under a label of its own, refusals of the tokens included, as gRPC's are."""
    def count(method: str, code: str) -> float:
        return running.metric_sum("cifar10_requests_total", method=method, code=code)

    before = {key: count(*key) for key in (("HTTPModelInfer", "UNAUTHENTICATED"), ("HTTPModelInfer", "PERMISSION_DENIED"),
                                           ("HTTPModelStatistics", "OK"), ("ModelStatistics", "OK"))}
    call(running, "POST", "/v2/models/tiny-max/infer", infer_json(CHW[:, :, :31]))
    assert count("HTTPModelInfer", "INVALID_ARGUMENT") >= 1
    assert count("HTTPModelInfer", "OK") >= 1
    assert call(running, "POST", "/v2/models/tiny-max/infer", infer_json(CHW), auth=False)[0] == 401
    assert call(running, "POST", "/v2/models/tiny-max/infer", infer_json(CHW), {"Authorization": "Bearer nope"},
                auth=False)[0] == 403
    assert call(running, "GET", "/v2/models/tiny-max/stats")[0] == 200
    assert count("HTTPModelInfer", "UNAUTHENTICATED") == before["HTTPModelInfer", "UNAUTHENTICATED"] + 1
    assert count("HTTPModelInfer", "PERMISSION_DENIED") == before["HTTPModelInfer", "PERMISSION_DENIED"] + 1
    assert count("HTTPModelStatistics", "OK") == before["HTTPModelStatistics", "OK"] + 1
    assert count("ModelStatistics", "OK") == before["ModelStatistics", "OK"]  # gRPC's label is gRPC's alone


# ----------------------------------------------------------------------------- slow, idle and many clients
def test_a_client_that_never_finishes_its_headers_is_closed(running):
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        start = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server
    assert time.monotonic() - start < 5


def test_an_idle_keep_alive_connection_is_closed(running):
    connection = http.client.HTTPConnection("127.0.0.1", running.http_port, timeout=10)
    try:
        for _ in range(2):  # kept alive between requests
            connection.request("GET", "/v2/health/live")
            response = connection.getresponse()
            assert response.status == 200 and response.read() == b'{"live": true}'
        start = time.monotonic()
        assert connection.sock.recv(100) == b""  # closed by the server
    finally:
        connection.close()
    idle = time.monotonic() - start
    assert IDLE_TIMEOUT_MS / 1000 - 0.2 < idle < IDLE_TIMEOUT_MS / 1000 + 3, idle


def test_a_half_sent_body_is_answered_408(running):
    body = infer_json(CHW[:1]).encode()
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=10) as sock:
        sock.sendall(head("POST", "/v2/models/tiny-max/infer", {"Content-Length": len(body)}) + body[:100])
        start = time.monotonic()
        answer = read_head(sock)
    waited = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert BODY_TIMEOUT_MS / 1000 - 0.2 < waited < BODY_TIMEOUT_MS / 1000 + 3, waited
    assert_serving(running)


def test_a_chunked_body_is_answered_411(running):
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=10) as sock:
        sock.sendall(head("POST", "/v2/models/tiny-max/infer", {"Transfer-Encoding": "chunked"}) + b"5\r\n{\"a\":\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 411 ") and b"Content-Length" in answer
    assert_serving(running)


def test_connections_over_the_cap_are_answered_503(running):
    socks = [socket.create_connection(("127.0.0.1", running.http_port), timeout=10) for _ in range(24)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", running.http_port), timeout=10) as extra:
            assert extra.recv(100).startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.3)
    assert_serving(running)


def test_a_client_that_never_reads_its_answers_is_held_by_the_budget(running):
    """Feature maps as JSON on connections that never read: the budget fills, then 429 with
    Retry-After; the server's memory stays near the budget; closing the readers frees it."""
    layers = [t["name"] for t in json.loads(call(running, "GET", "/v2/models/tiny-max")[2])["outputs"][1:]
              if t["name"] not in ("saliency", "grad_cam")]  # those come from the explanation path
    # 5 MB of JSON each: more than the kernel's socket buffers take (4 MiB), so the answer stays in the server
    big = infer_json(np.concatenate([CHW] * 5 + [CHW[:1]]), outputs=[{"name": name} for name in layers])
    rss = lambda: int(next(line.split()[1] for line in open(f"/proc/{running.pid}/status")  # noqa: E731
                           if line.startswith("VmRSS:"))) << 10
    before = rss()
    readers, refused = [], None
    try:
        for _ in range(200):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", running.http_port))
            readers.append(sock)
            data = big.encode()
            sock.sendall(b"POST /v2/models/tiny-max/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
            time.sleep(0.02)
            status, headers, body = call(running, "POST", "/v2/models/tiny-max/infer", big)
            if status == 429:
                refused = headers, body
                break
            if len(readers) >= 20:  # the server may only hold so many: leave the cap for the probe
                break
        assert refused is not None, "the budget never filled"
        assert refused[0]["retry-after"] == "1" and b"answers not yet sent" in refused[1]
        assert rss() - before < 3 * BUDGET
    finally:
        for sock in readers:
            sock.close()
    deadline = time.monotonic() + 10
    while call(running, "POST", "/v2/models/tiny-max/infer", big)[0] == 429:  # the closes reach the server
        assert time.monotonic() < deadline


# ----------------------------------------------------------------------------- off, and drain
def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on: its sockets' inodes matched in /proc/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_http_port_minus_one_turns_http_off(tiny_models_dir):
    with ServerProcess(server_args(tiny_models_dir, http_port=-1)) as server:
        assert server.ready["http_port"] is None
        assert listening_ports(server.pid) == {server.port, *server.metrics_ports}  # gRPC and /metrics only


def test_drain_refuses_new_requests_503_and_finishes_those_in_flight(tiny_models_dir):
    with ServerProcess(server_args(tiny_models_dir, grace_period_seconds=10)) as server:
        body = infer_json(CHW[:1]).encode()
        slow = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
        slow.sendall(b"POST /v2/models/tiny-max/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body[:100])  # in flight: its body half sent
        time.sleep(0.3)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert call(server, "GET", "/v2/health/ready")[0] == 503
        status, headers, answer = call(server, "POST", "/v2/models/tiny-max/infer", body)
        assert status == 503 and "shutting down" in json.loads(answer)["error"]
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
            sock.sendall(head("POST", "/v2/models/tiny-max/infer",
                              {"Content-Length": len(body), "Expect": "100-continue"}, auth=False))
            assert read_head(sock).startswith(b"HTTP/1.1 503 ")  # not 100 Continue
        slow.sendall(body[100:])
        answer = slow.recv(1 << 16)
        assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answer
        slow.close()
        assert server.wait(15) == 0
