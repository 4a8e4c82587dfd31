"""Calls a server through NVIDIA's tritonclient, as a Triton user would; run by tests/test_tritonclient.py
with the python of tritonclient's own venv (it pins protobuf<7, this project >=7), never imported.

    python tests/helpers/tritonclient_calls.py TARGET DIR [HTTP_TARGET]

DIR holds images.npy (N x 3 x 32 x 32 uint8) and 0.png, 1.png, ...; what came back is written to
DIR/answers.json for the test to check against the own API. With HTTP_TARGET, the same calls through
tritonclient.http go to DIR/http_answers.json, with statistics, configuration and the repository
(the server runs in explicit mode: OTHER is unloaded and loaded again).
"""

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

MODEL = "tiny-max"
OTHER = "tiny-avg"  # unloaded and loaded again over HTTP
TIMEOUT_SECONDS = 30.0


def main(target: str, directory: Path) -> None:
    images = np.load(directory / "images.npy")
    files = sorted(directory.glob("*.png"), key=lambda p: int(p.stem))
    answers = {}
    with triton.InferenceServerClient(target) as client:
        answers["live"] = client.is_server_live()
        answers["ready"] = client.is_server_ready()
        answers["model_ready"] = client.is_model_ready(MODEL)
        answers["server"] = client.get_server_metadata(as_json=True)
        answers["metadata"] = client.get_model_metadata(MODEL, as_json=True)

        # Raw UINT8, the default output (the scores).
        pixels = triton.InferInput("image", list(images.shape), "UINT8")
        pixels.set_data_from_numpy(images)
        result = client.infer(MODEL, [pixels], request_id="raw-1", client_timeout=TIMEOUT_SECONDS)
        answers["raw"] = result.as_numpy("probabilities").tolist()
        answers["raw_id"] = result.get_response().id

        # Encoded files as BYTES; top-3 through the classification extension; one layer's feature map.
        encoded = np.array([p.read_bytes() for p in files], dtype=np.object_)
        blobs = triton.InferInput("encoded_image", [len(encoded)], "BYTES")
        blobs.set_data_from_numpy(encoded)
        outputs = [triton.InferRequestedOutput("probabilities", class_count=3),
                   triton.InferRequestedOutput("stage2.pool")]
        result = client.infer(MODEL, [blobs], outputs=outputs, client_timeout=TIMEOUT_SECONDS)
        answers["top3"] = [[s.decode() for s in row] for row in result.as_numpy("probabilities")]
        fmap = result.as_numpy("stage2.pool")
        answers["fmap_shape"] = list(fmap.shape)
        answers["fmap"] = fmap.astype(float).ravel().tolist()

        # Explanations: saliency and Grad-CAM as outputs, each image's top class at the default layer.
        outputs = [triton.InferRequestedOutput("saliency"), triton.InferRequestedOutput("grad_cam")]
        result = client.infer(MODEL, [pixels], outputs=outputs, client_timeout=TIMEOUT_SECONDS)
        answers["saliency"] = result.as_numpy("saliency").tolist()
        answers["grad_cam"] = result.as_numpy("grad_cam").tolist()
        layer = result.get_output("grad_cam").parameters["layer"]
        answers["grad_cam_layer"] = layer.string_param

        # Errors come back as InferenceServerException with the gRPC status.
        answers["errors"] = {}
        bad = triton.InferInput("image", [1, 3, 31, 32], "UINT8")
        bad.set_data_from_numpy(images[:1, :, :31])
        for what, model, inputs in (("bad_shape", MODEL, [bad]), ("unknown_model", "resnet-9000", [pixels])):
            try:
                client.infer(model, inputs, client_timeout=TIMEOUT_SECONDS)
                answers["errors"][what] = None
            except InferenceServerException as exc:
                answers["errors"][what] = [exc.status(), exc.message()]
        # ... and the server goes on serving.
        answers["after"] = client.infer(MODEL, [pixels], client_timeout=TIMEOUT_SECONDS).as_numpy("probabilities").tolist()
    (directory / "answers.json").write_text(json.dumps(answers))


def main_http(target: str, directory: Path) -> None:
    """The HTTP/REST form through tritonclient.http: binary and JSON tensors, classification."""
    images = np.load(directory / "images.npy")
    files = sorted(directory.glob("*.png"), key=lambda p: int(p.stem))
    answers = {}
    with triton_http.InferenceServerClient(target, network_timeout=TIMEOUT_SECONDS) as client:
        answers["live"] = client.is_server_live()
        answers["ready"] = client.is_server_ready()
        answers["model_ready"] = client.is_model_ready(MODEL)
        answers["server"] = client.get_server_metadata()
        answers["metadata"] = client.get_model_metadata(MODEL)

        # Binary UINT8 in, every output binary (tritonclient's default when none is named).
        pixels = triton_http.InferInput("image", list(images.shape), "UINT8")
        pixels.set_data_from_numpy(images, binary_data=True)
        result = client.infer(MODEL, [pixels], request_id="http-1")
        answers["binary"] = result.as_numpy("probabilities").tolist()
        answers["binary_id"] = result.get_response()["id"]

        # JSON in and out; then top-3 through the classification extension.
        typed = triton_http.InferInput("image", list(images.shape), "UINT8")
        typed.set_data_from_numpy(images, binary_data=False)
        result = client.infer(MODEL, [typed], outputs=[triton_http.InferRequestedOutput("probabilities",
                                                                                        binary_data=False)])
        answers["json"] = result.as_numpy("probabilities").tolist()
        outputs = [triton_http.InferRequestedOutput("probabilities", binary_data=True, class_count=3)]
        result = client.infer(MODEL, [pixels], outputs=outputs)
        answers["top3"] = [[s.decode() for s in row] for row in result.as_numpy("probabilities")]

        # Encoded files as binary BYTES.
        encoded = np.array([p.read_bytes() for p in files], dtype=np.object_)
        blobs = triton_http.InferInput("encoded_image", [len(encoded)], "BYTES")
        blobs.set_data_from_numpy(encoded, binary_data=True)
        answers["encoded"] = client.infer(MODEL, [blobs]).as_numpy("probabilities").tolist()

        answers["errors"] = {}
        bad = triton_http.InferInput("image", [1, 3, 31, 32], "UINT8")
        bad.set_data_from_numpy(images[:1, :, :31])
        for what, model, inputs in (("bad_shape", MODEL, [bad]), ("unknown_model", "resnet-9000", [pixels])):
            try:
                client.infer(model, inputs)
                answers["errors"][what] = None
            except InferenceServerException as exc:
                answers["errors"][what] = [exc.status(), exc.message()]
        answers["after"] = client.infer(MODEL, [pixels]).as_numpy("probabilities").tolist()

        # Explanations for class 7 at a chosen layer, through infer's own request parameters.
        outputs = [triton_http.InferRequestedOutput("saliency"), triton_http.InferRequestedOutput("grad_cam")]
        result = client.infer(MODEL, [pixels], outputs=outputs, parameters={"class_index": 7, "layer": "stage2.pool"})
        answers["saliency_7"] = result.as_numpy("saliency").tolist()
        answers["grad_cam_7"] = result.as_numpy("grad_cam").tolist()
        answers["grad_cam_7_parameters"] = result.get_output("grad_cam")["parameters"]

        # Statistics, configuration and the repository (explicit mode).
        answers["statistics"] = client.get_inference_statistics(MODEL)
        answers["all_statistics"] = client.get_inference_statistics()
        answers["config"] = client.get_model_config(MODEL)
        answers["index"] = client.get_model_repository_index()
        client.unload_model(OTHER)
        answers["ready_after_unload"] = client.is_model_ready(OTHER)
        answers["index_after_unload"] = client.get_model_repository_index()
        client.load_model(OTHER)
        answers["ready_after_load"] = client.is_model_ready(OTHER)
        try:
            client.load_model("no-such-model")
            answers["errors"]["unknown_load"] = None
        except InferenceServerException as exc:
            answers["errors"]["unknown_load"] = [exc.status(), exc.message()]
    (directory / "http_answers.json").write_text(json.dumps(answers))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    if len(sys.argv) > 3:
        main_http(sys.argv[3], Path(sys.argv[2]))
