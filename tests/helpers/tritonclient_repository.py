"""Run by the python of tritonclient's venv (tests/test_model_repository.py), never imported: the
repository, statistics and configuration extensions through NVIDIA's own client, unchanged.

    python tritonclient_repository.py TARGET MODEL OTHER_MODEL

Prints one JSON document: what each call returned (as_json), and the status of each error.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main() -> None:
    target, model, other = sys.argv[1:4]
    client = grpcclient.InferenceServerClient(target)
    out = {"index": client.get_model_repository_index(as_json=True),
           "config": client.get_model_config(model, as_json=True),
           "metadata": client.get_server_metadata(as_json=True)}
    sent = 0
    for n in (1, 2, 5, 3):  # images per request: the statistics must count every one
        image = grpcclient.InferInput("image", [n, 3, 32, 32], "UINT8")
        image.set_data_from_numpy(np.random.default_rng(n).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))
        client.infer(model, [image])
        sent += n
    out["sent"] = sent
    out["statistics"] = client.get_inference_statistics(model, as_json=True)
    client.unload_model(other)
    out["ready_after_unload"] = client.is_model_ready(other)
    out["index_after_unload"] = client.get_model_repository_index(as_json=True)
    client.load_model(other)
    out["ready_after_load"] = client.is_model_ready(other)
    try:
        client.load_model("no-such-model")
    except InferenceServerException as exc:
        out["unknown"] = exc.status()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
