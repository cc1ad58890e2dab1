"""compress_model and export_variants on a model trained once for the whole module."""

import json
import socket

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from torchship.components.compress import compress_model
from torchship.components.data import load_split, prepare_data
from torchship.components.errors import ParityError
from torchship.components.export import export_variants
from torchship.components.train import train_model

VARIANT_KEYS = {"name", "format", "source", "test_accuracy", "size_bytes", "sparsity",
                "n_parameters", "nonzero_parameters"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Digits splits and an mlp trained in this process as a one-worker job (no launcher)."""
    directory = tmp_path_factory.mktemp("trained")
    paths = {name: str(directory / name) for name in ("train", "val", "test")}
    prepare_data("digits", "", paths["train"], paths["val"], paths["test"], seed=0)
    paths["model"] = str(directory / "model.pt")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())}.items():
            patch.setenv(key, value)
        train_model(paths["train"], paths["val"], paths["model"], epochs=4,
                    progress=lambda _: None)
    torch.set_num_threads(threads)
    return paths


@pytest.fixture(scope="module")
def variants(trained, tmp_path_factory):
    variants_dir = tmp_path_factory.mktemp("compress") / "variants"
    rows = compress_model(trained["model"], trained["train"], trained["val"], trained["test"],
                          str(variants_dir), target_sparsity=0.8, finetune_epochs=2,
                          progress=lambda _: None)
    return variants_dir, rows


@pytest.fixture(scope="module")
def exported(trained, variants, tmp_path_factory):
    onnx_dir = tmp_path_factory.mktemp("export") / "onnx"
    return onnx_dir, export_variants(variants[0], trained["test"], str(onnx_dir))


def test_variants_are_written_with_their_records(variants):
    variants_dir, rows = variants
    assert [row["name"] for row in rows] == ["fp32", "pruned", "int8"]
    assert sorted(p.name for p in variants_dir.parent.iterdir()) == ["variants"]  # no staging
    for row in rows:
        assert VARIANT_KEYS <= set(row)
        assert json.loads((variants_dir / row["name"] / "variant.json").read_text()) == row
        model_file = variants_dir / row["name"] / ("model.pt" if row["format"] == "torch"
                                                   else "model.onnx")
        assert model_file.stat().st_size == row["size_bytes"]
        assert row["test_accuracy"] > 0.85, row
    assert [row["source"] for row in rows] == [None, "fp32", "fp32"]
    assert [row["format"] for row in rows] == ["torch", "torch", "onnx"]


def test_pruned_variant_reaches_the_target_sparsity(variants):
    variants_dir, rows = variants
    fp32, pruned = rows[0], rows[1]
    assert fp32["sparsity"] < 0.01
    assert pruned["sparsity"] == pytest.approx(0.8, abs=0.005)
    assert pruned["nonzero_parameters"] < 0.25 * pruned["n_parameters"]
    state = torch.load(variants_dir / "pruned" / "model.pt", weights_only=True)["state_dict"]
    # prune.remove made the masks permanent: plain weights, no weight_orig / weight_mask.
    assert not [key for key in state if key.endswith(("_orig", "_mask"))]
    weights = [t for key, t in state.items() if key.endswith("weight")]
    zeros = sum(int((t == 0).sum()) for t in weights) / sum(t.numel() for t in weights)
    assert zeros == pytest.approx(0.8, abs=0.005)


def test_int8_variant_is_notably_smaller(variants):
    _, rows = variants
    fp32, int8 = rows[0], rows[2]
    assert int8["size_bytes"] < 0.4 * fp32["size_bytes"]
    assert int8["test_accuracy"] >= fp32["test_accuracy"] - 0.03
    model = onnx.load(str(variants[0] / "int8" / "model.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in model.graph.node}


def test_without_quantisation_there_is_no_int8(trained, tmp_path):
    rows = compress_model(trained["model"], trained["train"], trained["val"], trained["test"],
                          str(tmp_path / "variants"), finetune_epochs=0, quantize=False,
                          progress=lambda _: None)
    assert [row["name"] for row in rows] == ["fp32", "pruned"]
    assert sorted(p.name for p in (tmp_path / "variants").iterdir()) == ["fp32", "pruned"]


def test_every_export_passed_checker_and_parity(exported, variants):
    onnx_dir, rows = exported
    assert [row["name"] for row in rows] == ["fp32", "pruned", "int8"]
    assert json.loads((onnx_dir / "variants.json").read_text()) == rows
    for row, variant in zip(rows, variants[1]):
        assert {k: row[k] for k in variant} == variant
        parity = row["parity"]
        assert parity["passed"] and parity["dynamic_batch"]
        assert row["onnx_size_bytes"] == (onnx_dir / row["name"] / "model.onnx").stat().st_size
    float_rows, int8 = rows[:2], rows[2]
    for row in float_rows:
        assert row["parity"]["criterion"] == "max_abs_diff"
        assert row["parity"]["max_abs_diff"] <= row["parity"]["atol"] == 1e-4
    assert int8["parity"]["criterion"] == "top1_agreement"
    assert int8["parity"]["reference"] == "fp32"
    assert int8["parity"]["top1_agreement"] >= 0.97
    assert int8["parity"]["max_abs_diff"] > 0


def test_onnx_models_have_the_contract_io_and_a_dynamic_batch(exported, trained):
    onnx_dir, rows = exported
    x = load_split(trained["test"])["x"]
    for row in rows:
        path = onnx_dir / row["name"] / "model.onnx"
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        (graph_input,), (graph_output,) = model.graph.input, model.graph.output
        assert (graph_input.name, graph_output.name) == ("input", "logits")
        assert graph_input.type.tensor_type.shape.dim[0].dim_param
        assert graph_input.type.tensor_type.shape.dim[1].dim_value == 64
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch in (1, 7, 33):
            (logits,) = session.run(["logits"], {"input": x[:batch]})
            assert logits.shape == (batch, 10) and np.isfinite(logits).all()


def test_parity_failure_names_the_variant_and_publishes_nothing(trained, variants, tmp_path):
    onnx_dir = tmp_path / "onnx"
    with pytest.raises(ParityError) as error:
        export_variants(variants[0], trained["test"], str(onnx_dir), min_top1_agreement=1.01)
    message = str(error.value)
    assert "variant 'int8'" in message and "'fp32'" in message
    assert "top-1 agreement" in message and "at least 1.01" in message
    assert list(tmp_path.iterdir()) == []


def test_export_replaces_an_earlier_export(trained, variants, tmp_path):
    onnx_dir = tmp_path / "onnx"
    (onnx_dir / "stale").mkdir(parents=True)
    export_variants(variants[0], trained["test"], str(onnx_dir))
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["fp32", "int8", "pruned",
                                                          "variants.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
