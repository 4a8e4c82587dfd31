"""The client trusts no string a server sends (issue 28, finding 6): against a real gRPC server on
loopback that answers with hostile layer names, labels and model names, ``--save-features`` writes
only inside its folder, one file per layer, and the CLI never prints a raw control character."""

from __future__ import annotations

import json
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from cifar10_serving.client.cli import main
from cifar10_serving.client.server_text import file_names, printable
from cifar10_serving.protos.cifar10.v1 import classifier_pb2 as pb
from cifar10_serving.protos.cifar10.v1 import classifier_pb2_grpc as pb_grpc

HOSTILE = "\x1b[31m\r"  # colour red, then return to the start of the line and overwrite it
LABEL = f"cat{HOSTILE}"
MODEL = f"evil{HOSTILE}model\x9b2J"  # \x9b: the C1 control sequence introducer, ESC [ in one byte
MAP_SHAPE = (2, 4, 4)


class Hostile(pb_grpc.ClassifierServicer):
    """A server that answers well-formed messages whose strings are chosen to hurt the client."""

    def __init__(self, layers: list[str]) -> None:
        self.layers = layers

    def _info(self) -> pb.ModelInfo:
        return pb.ModelInfo(
            name=MODEL, version=f"1{HOSTILE}", is_default=True, class_names=[LABEL] + [f"c{i}" for i in range(1, 10)],
            input=pb.InputSpec(shape=[3, 32, 32], dtype="uint8", color="RGB"),
            pooling=pb.Pooling(kind=f"max{HOSTILE}", window=2, stride=2),
            layers=[pb.Layer(name=name, kind=f"conv{HOSTILE}", output_shape=MAP_SHAPE, kernel=3, stride=1)
                    for name in self.layers],
            device=f"cpu{HOSTILE}", dataset="CIFAR-10")

    def Classify(self, request, context):
        data = np.arange(np.prod(MAP_SHAPE), dtype="<f4").tobytes()
        maps = [pb.FeatureMap(layer=name, shape=MAP_SHAPE, dtype=pb.DTYPE_FLOAT32, data=data) for name in self.layers]
        scores = [0.0] * 10
        scores[0] = 1.0
        result = pb.Result(probabilities=scores, top_k=[pb.Prediction(label=LABEL, index=0, probability=1.0)],
                           feature_maps=maps)
        return pb.ClassifyResponse(request_id=f"r{HOSTILE}", model=MODEL, model_version=f"1{HOSTILE}",
                                   results=[result] * len(request.images))

    def GetModelInfo(self, request, context):
        return self._info()

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[self._info()], default_model=MODEL)

    def Explain(self, request, context):
        context.abort(grpc.StatusCode.INTERNAL, f"explain broke{HOSTILE}\x07")


@pytest.fixture
def hostile(tmp_path):
    """(target, layer names, the absolute path one of them names): a hostile server on an ephemeral port."""
    absolute = tmp_path / "abs-escape"
    layers = ["stage1.pool", "../../escape", str(absolute), "a/b", "a_b", "..", ".", "a\\b", "", "x" * 300]
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_ClassifierServicer_to_server(Hostile(layers), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", layers, absolute
    server.stop(None)  # nothing in flight to wait for: each test's calls have returned


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "input" / "cat.png"
    path.parent.mkdir()
    Image.new("RGB", (32, 32), (120, 80, 40)).save(path)
    return path


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _assert_stayed_inside(tmp_path: Path, out: Path, image: Path, absolute: Path) -> set[Path]:
    """Every file under tmp_path is the input image or inside ``out``; returns those inside ``out``."""
    assert not absolute.with_name(absolute.name + ".png").exists() and not absolute.exists()
    for parent in (out.parent, out.parent.parent, tmp_path):
        assert not list(parent.glob("escape*")), f"wrote beside {parent}"
    outside = {p for p in _files(tmp_path) if p != image and not p.resolve().is_relative_to(out.resolve())}
    assert not outside, f"wrote outside {out}: {sorted(outside)}"
    return _files(out)


def test_save_features_writes_one_file_per_layer_inside_its_folder(hostile, image, tmp_path, capsys):
    target, layers, absolute = hostile
    out = tmp_path / "deep" / "er" / "maps"
    code = main(["--target", target, "classify", str(image), "--save-features", str(out)])
    written = _assert_stayed_inside(tmp_path, out, image, absolute)
    assert code == 0
    assert all(p.parent == out / "cat" and p.suffix == ".png" for p in written)
    assert len(written) == len(layers)  # distinct layers, distinct files: none overwrote another
    assert (out / "cat" / "stage1.pool.png").exists()  # a name that is already safe is kept
    assert all(len(p.name) <= 255 for p in written)
    stdout = capsys.readouterr().out
    assert "\x1b" not in stdout and "\r" not in stdout and "\x9b" not in stdout
    assert "cat\\x1b[31m\\r" in stdout  # escaped, not dropped: the reader sees what the server sent


def test_save_features_json_names_the_files_and_escapes_what_the_server_sent(hostile, image, tmp_path, capsys):
    target, layers, absolute = hostile
    out = tmp_path / "maps"
    code = main(["--target", target, "classify", str(image), "--save-features", str(out), "--json"])
    written = _assert_stayed_inside(tmp_path, out, image, absolute)
    assert code == 0
    stdout = capsys.readouterr().out
    assert "\x1b" not in stdout and "\r" not in stdout and "\x9b" not in stdout
    answer = json.loads(stdout)[0]
    assert answer["label"] == LABEL and list(answer["feature_maps"]) == layers  # JSON escapes, and keeps the data
    saved = [Path(p) for p in answer["saved"]]
    assert len(set(saved)) == len(layers) and set(saved) == written


def test_tables_and_messages_escape_control_characters(hostile, image, tmp_path, capsys):
    target, _, _ = hostile
    for argv in (["models"], ["layers"], ["classify", str(image), "--features", "*"],
                 ["inspect", str(image), "--out", str(tmp_path / "page")]):
        assert main(["--target", target, *argv]) == 0, argv
        captured = capsys.readouterr()
        for text in (captured.out, captured.err):
            assert "\x1b" not in text and "\r" not in text and "\x9b" not in text and "\x07" not in text, argv
        assert "\\x1b" in captured.out, argv


def test_a_server_error_message_is_escaped(tmp_path, capsys):
    class Refusing(pb_grpc.ClassifierServicer):
        def ListModels(self, request, context):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no{HOSTILE}\x1b]0;pwned\x07")

    server = grpc.server(futures.ThreadPoolExecutor(1))
    pb_grpc.add_ClassifierServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert main(["--target", f"127.0.0.1:{port}", "models"]) == 2
    finally:
        server.stop(None)
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: no\\x1b[31m\\r")
    assert "\x1b" not in err and "\r" not in err and "\x07" not in err


@pytest.mark.parametrize("names", [
    ["a/b", "a_b", "a:b", "a b"],
    ["Conv", "conv", "CONV"],  # one file on a case-insensitive file system unless told apart
    ["..", ".", "", "__", "_"],
    ["x" * 300, "x" * 300 + "y"],
    ["con", "NUL", "com1.pool", "aux"],  # Windows device names: opening CON.png there is the console
])
def test_file_names_are_safe_distinct_and_stable(names):
    safe = file_names(names)
    assert list(safe) == names
    assert len({s.casefold() for s in safe.values()}) == len(names)
    for s in safe.values():
        assert s and s not in (".", "..") and not s.startswith(".") and len(s) <= 120
        assert set(s) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        assert s.split(".")[0].casefold() not in ("con", "nul", "aux", "com1")
    assert file_names(names) == safe


def test_printable_escapes_c0_c1_and_esc_and_leaves_the_rest():
    assert printable("cat\x1b[31m\r\n\t\x00\x7f\x9b") == "cat\\x1b[31m\\r\\n\\t\\x00\\x7f\\x9b"
    assert printable("stage1.pool 4 x 16 x 16 é猫") == "stage1.pool 4 x 16 x 16 é猫"
    assert printable("\u202eevil") == "\\u202eevil"  # a bidi override reorders what follows on screen
    assert printable(printable("\x1b")) == printable("\x1b")
