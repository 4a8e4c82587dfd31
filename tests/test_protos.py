"""The generated code in protos/ is what the .proto and the pinned grpcio-tools produce."""

from __future__ import annotations


from cifar10_serving.protos.generate import ROOT, generate


def test_generated_code_is_not_stale(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run python -m protos.generate"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: run python -m protos.generate"
    committed_all = {p.relative_to(ROOT) for p in (ROOT / "protos").rglob("*_pb2*.py*")}
    assert committed_all == {p.relative_to(tmp_path) for p in fresh}, "generated files without a .proto"


def test_generated_files_say_do_not_edit():
    for path in (ROOT / "protos").rglob("*_pb2*.py"):
        head = path.read_text().splitlines()[:3]
        assert any("DO NOT EDIT" in line for line in head), path
