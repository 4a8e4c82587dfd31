"""The REST forms of statistics, configuration and the repository, with the standard library's HTTP
client as curl would speak them: the same answers as gRPC's, and the same rules (explicit mode only
for load and unload, an admin token for them, names checked), each refusal with its status."""

from __future__ import annotations

import http.client
import json

import grpc
import pytest
from google.protobuf import json_format

from cifar10_serving.protos.inference import open_inference_grpc_pb2 as v2
from cifar10_serving.protos.inference import open_inference_grpc_pb2_grpc as v2_grpc
from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.servers import server_args

TOKEN, ADMIN = "inference-token", "admin-token"


def call(port: int, method: str, path: str, body: str | None = None, token: str | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        connection.close()


def grpc_answer(target: str, rpc: str, request):
    with grpc.insecure_channel(target) as channel:
        return getattr(v2_grpc.GRPCInferenceServiceStub(channel), rpc)(request, timeout=10)


# ----------------------------------------------------------------------------- none mode (the default)
def test_statistics_and_configuration_equal_grpcs(tiny_server):
    port = tiny_server.app.http_port
    status, config = call(port, "GET", "/v2/models/tiny-max/config")
    assert status == 200
    expected = grpc_answer(tiny_server.target, "ModelConfig", v2.ModelConfigRequest(name="tiny-max")).config
    assert json_format.ParseDict(config, v2.ModelConfig()) == expected  # Triton's JSON form of the same message
    version = call(port, "GET", "/v2/models/tiny-max")[1]["versions"][0]
    assert call(port, "GET", f"/v2/models/tiny-max/versions/{version}/config")[1] == config

    status, stats = call(port, "GET", f"/v2/models/tiny-max/versions/{version}/stats")
    assert status == 200 and [s["name"] for s in stats["model_stats"]] == ["tiny-max"]
    assert set(stats["model_stats"][0]) == {"name", "version", "last_inference", "inference_count", "execution_count",
                                            "inference_stats", "batch_stats"}
    assert set(stats["model_stats"][0]["inference_stats"]["success"]) == {"count", "ns"}
    assert sorted(s["name"] for s in call(port, "GET", "/v2/models/stats")[1]["model_stats"]) == ["tiny-avg", "tiny-max"]
    ours = json_format.ParseDict(stats, v2.ModelStatisticsResponse())
    theirs = grpc_answer(tiny_server.target, "ModelStatistics", v2.ModelStatisticsRequest(name="tiny-max"))
    assert ours == theirs  # no call between the two: the same counts


@pytest.mark.parametrize("method, path, body, status, words", [
    ("GET", "/v2/models/resnet-9000/config", None, 404, "'resnet-9000' is not loaded"),
    ("GET", "/v2/models/tiny-max/versions/9/stats", None, 404, "'9'"),
    ("POST", "/v2/repository/models/tiny-max/load", "", 400, "needs explicit"),
    ("POST", "/v2/repository/models/tiny-max/unload", "{}", 400, "needs explicit"),
    ("POST", "/v2/repository/index", '{"repository_name": "other"}', 400, "one repository"),
    ("POST", "/v2/repository/index", '{"ready": 1}', 400, "send true or false"),
    ("POST", "/v2/repository/index", '{"shared": 1}', 400, "unknown field 'shared'"),
    ("POST", "/v2/repository/index", "[1]", 400, "a JSON list"),
])
def test_each_refusal_has_its_status(tiny_server, method, path, body, status, words):
    got, answer = call(tiny_server.app.http_port, method, path, body)
    assert got == status and words in answer["error"], answer
    assert call(tiny_server.app.http_port, "POST", "/v2/repository/index", "")[0] == 200


# ----------------------------------------------------------------------------- explicit mode, with tokens
# These start a server child process, so they are marked system; those above run in process.
@pytest.fixture(scope="module")
def explicit(tiny_models_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    (folder / "tokens").write_text(f"{TOKEN}\n")
    (folder / "admin").write_text(f"{ADMIN}\n")
    with ServerProcess(server_args(tiny_models_dir, model_control_mode="explicit", auth_token_file=folder / "tokens",
                                   admin_token_file=folder / "admin", metrics_port=-1)) as server:
        yield server


@pytest.mark.system
def test_load_and_unload_need_an_admin_token(explicit):
    port = explicit.http_port
    assert call(port, "POST", "/v2/repository/models/tiny-avg/unload")[0] == 401
    status, answer = call(port, "POST", "/v2/repository/models/tiny-avg/unload", token=TOKEN)
    assert status == 403 and "--admin-token-file" in answer["error"]
    assert call(port, "GET", "/v2/models/tiny-avg/ready", token=TOKEN)[0] == 200  # nothing changed

    assert call(port, "POST", "/v2/repository/models/tiny-avg/unload", '{"parameters": {"unload_dependents": false}}',
                token=ADMIN) == (200, {})
    assert call(port, "GET", "/v2/models/tiny-avg/ready", token=ADMIN)[0] == 404
    index = {m["name"]: m.get("state") for m in call(port, "POST", "/v2/repository/index", token=TOKEN)[1]}
    assert index["tiny-avg"] in ("UNLOADING", "UNAVAILABLE") and index["tiny-max"] == "READY"
    ready = call(port, "POST", "/v2/repository/index", '{"ready": true}', token=TOKEN)[1]
    assert [m["name"] for m in ready] == ["tiny-max"]
    assert call(port, "POST", "/v2/repository/models/tiny-avg/load", token=ADMIN) == (200, {})
    assert call(port, "GET", "/v2/models/tiny-avg/ready", token=TOKEN)[0] == 200


@pytest.mark.system
@pytest.mark.parametrize("path, body, status, words", [
    ("/v2/repository/models/no-such-model/load", None, 404, "not in the repository"),
    ("/v2/repository/models/bad%20name/load", None, 400, "use letters, digits"),
    ("/v2/repository/models/tiny-max/load", '{"parameters": {"config": "{}"}}', 400, "'config' not offered"),
    ("/v2/repository/models/tiny-max/unload", '{"parameters": {"unload_dependents": "x"}}', 400, "must be a bool"),
    ("/v2/repository/models/tiny-max/load", '{"parameters": 3}', 400, "must be a JSON object"),
])
def test_bad_repository_calls_change_nothing(explicit, path, body, status, words):
    got, answer = call(explicit.http_port, "POST", path, body, token=ADMIN)
    assert got == status and words in answer["error"], answer
    assert call(explicit.http_port, "GET", "/v2/models/tiny-max/ready", token=TOKEN)[0] == 200
