"""The Open Inference Protocol over HTTP against a real server process, with the standard library's
HTTP client as curl would speak it: health, metadata, JSON and binary inference equal to the gRPC
answer, the classification extension, every refusal with its status (the server serving on), drain,
the body limit refused before the body is read, slow and idle clients, the connection cap, and a
client that never reads its answers held by the answer budget."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time

import numpy as np
import pytest

from cifar10_serving.client import ClassifierClient
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.servers import server_args

pytestmark = pytest.mark.system  # server processes

TOKEN = "http-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_LIMIT = 1 << 20
BUDGET = 128 << 20  # three answers of 16 images with every feature map as JSON (5 MB, 27 MiB reserved each)
HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGES = np.random.default_rng(32).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
CHW = np.ascontiguousarray(IMAGES.transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def running(tiny_models_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    with ServerProcess(server_args(tiny_models_dir, auth_token_file=tokens, http_max_body_bytes=BODY_LIMIT,
                                   http_header_timeout_ms=1000, http_max_connections=24,
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
    got, _, answer = call(running, "POST", path, body, headers, auth=headers is not None)
    assert got == status, answer
    assert words in json.loads(answer)["error"]
    assert_serving(running)


def test_an_oversized_body_is_refused_before_it_is_sent(running):
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/tiny-max/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nContent-Length: 10000000000\r\n\r\n")
        answer = sock.recv(4096)  # no byte of the body sent: the answer comes anyway
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_refusals_are_counted_under_the_http_method(running):
    call(running, "POST", "/v2/models/tiny-max/infer", infer_json(CHW[:, :, :31]))
    assert running.metric_sum("cifar10_requests_total", method="HTTPModelInfer", code="INVALID_ARGUMENT") >= 1
    assert running.metric_sum("cifar10_requests_total", method="HTTPModelInfer", code="OK") >= 1


# ----------------------------------------------------------------------------- slow, idle and many clients
def test_a_client_that_never_finishes_its_headers_is_closed(running):
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        start = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server
    assert time.monotonic() - start < 5


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


# ----------------------------------------------------------------------------- drain
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
        slow.sendall(body[100:])
        answer = slow.recv(1 << 16)
        assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answer
        slow.close()
        assert server.wait(15) == 0
