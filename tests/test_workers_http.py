"""``--workers`` and HTTP: every worker serves the Open Inference Protocol's REST form on one port,
shared as the gRPC port is (SO_REUSEPORT), driven over real connections."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from cifar10_serving.server.launcher import ServerProcess
from tests.helpers.images import random_images
from tests.helpers.servers import server_args

pytestmark = pytest.mark.system  # server processes

WORKERS = 2
CONNECTIONS = 16  # the kernel spreads connections at random: all 16 on one worker has odds of 2 in 65,536


def _http_calls(server: ServerProcess, worker: int) -> float:
    return sum(v for (name, labels), v in server.metrics(worker).items()
               if name == "cifar10_requests_total" and ("method", "HTTPModelInfer") in labels and ("code", "OK") in labels)


def test_workers_share_one_http_port_and_each_answers(tiny_models_dir):
    with ServerProcess(server_args(tiny_models_dir, workers=WORKERS, torch_threads=None), start_timeout=120) as server:
        workers = server.ready["workers"]
        assert server.http_port and {w["http_port"] for w in workers} == {server.http_port}
        chw = np.ascontiguousarray(random_images(1, seed=7).transpose(0, 3, 1, 2))
        body = json.dumps({"inputs": [{"name": "image", "shape": list(chw.shape), "datatype": "UINT8",
                                       "data": chw.ravel().tolist()}]})
        for _ in range(CONNECTIONS):  # a new connection each: the kernel picks a worker per connection
            connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
            try:
                connection.request("POST", "/v2/models/tiny-max/infer", body=body)
                response = connection.getresponse()
                assert response.status == 200, response.read()
                response.read()
            finally:
                connection.close()
        per_worker = [_http_calls(server, i) for i in range(WORKERS)]
        assert sum(per_worker) == CONNECTIONS and all(n > 0 for n in per_worker), per_worker
