"""The command line, end to end against a real server."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from PIL import Image

from cifar10_serving.client.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_classify_prints_a_table(tiny_server, capsys):
    assert main(["--target", tiny_server.target, "classify", str(EXAMPLES / "cat.jpg"), "--top-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("cat.jpg  (tiny-max version test)") and len(out) == 4
    assert all(line.strip().split()[1].endswith("%") for line in out[1:])


def test_classify_json_for_every_example(tiny_server, capsys):
    images = sorted(str(p) for p in EXAMPLES.glob("*.jpg"))
    assert len(images) == 10
    assert main(["--target", tiny_server.target, "classify", *images, "--json", "--model", "tiny-avg"]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert [a["image"] for a in answers] == images
    for a in answers:
        assert len(a["probabilities"]) == 10 and abs(sum(a["probabilities"]) - 1) < 1e-5
        assert a["label"] == a["top_k"][0]["label"] and len(a["top_k"]) == 5


def test_save_features_writes_one_png_grid_per_layer(tiny_server, tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["--target", tiny_server.target, "classify", str(EXAMPLES / "ship.jpg"), "--save-features", str(out),
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)[0]
    saved = [Path(p) for p in answer["saved"]]
    assert len(saved) == len(answer["feature_maps"]) > 10
    for path in saved:
        assert path.parent == out / "ship" and path.exists()
    pool = Image.open(out / "ship" / "stage1.pool.png")
    c, h, w = answer["feature_maps"]["stage1.pool"]
    assert pool.mode == "L" and pool.width >= math.ceil(math.sqrt(c)) * w


def test_classify_asks_for_the_version_given(tiny_server, capsys):
    cat = str(EXAMPLES / "cat.jpg")
    assert main(["--target", tiny_server.target, "classify", cat, "--version", "test", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)[0]
    assert answer["label"] and (answer["model"], answer["version"]) == ("tiny-max", "test")
    assert main(["--target", tiny_server.target, "classify", cat, "--model", "tiny-avg", "--version", "9"]) == 2
    err = capsys.readouterr().err  # the server was asked for version 9, and names the one it has
    assert "NOT_FOUND" in err and "no ready version '9'" in err and "test" in err


def test_layers_table_shows_pooling_halving_width_and_height(tiny_server, capsys):
    assert main(["--target", tiny_server.target, "layers"]) == 0
    out = capsys.readouterr().out
    assert "pooling: max, window 2, stride 2" in out
    rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.startswith("  stage")}
    assert "4 x 32 x 32" in rows["stage1.conv1"] and "4 x 16 x 16" in rows["stage1.pool"]
    assert main(["--target", tiny_server.target, "layers", "--json", "--model", "tiny-avg"]) == 0
    layers = json.loads(capsys.readouterr().out)
    assert {l["name"]: l["output_shape"] for l in layers}["stage1.pool"] == [4, 15, 15]


def test_models_and_health(tiny_server, capsys):
    assert main(["--target", tiny_server.target, "models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["default_model"] == "tiny-max" and {m["name"] for m in listing["models"]} == {"tiny-max", "tiny-avg"}
    assert main(["--target", tiny_server.target, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_errors_exit_non_zero_with_the_status(tiny_server, capsys, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert main(["--target", tiny_server.target, "classify", str(junk)]) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "image 0" in err
    assert main(["--target", tiny_server.target, "classify", str(EXAMPLES / "cat.jpg"), "--model", "nope"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


def test_python_dash_m_client_runs(tiny_server):
    out = subprocess.run([sys.executable, "-m", "cifar10_serving.client", "--target", tiny_server.target, "health"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "SERVING"
