"""compress_model and export_variants on a model trained once for the whole module."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from processes import one_process_job

from torchship.components.compress.stage import compress_model
from torchship.components.compress.variants import default_names, names
from torchship.components.compress.variants.pruned import sparsity_schedule
from torchship.components.compress.variants.structured import structured_pruning
from torchship.components.data.splits import load_split
from torchship.components.errors import ParityError, UserInputError
from torchship.components.export.measure import measure_variants
from torchship.components.export.stage import export_variants
from torchship.components.models import build_model, export_onnx, load_checkpoint, save_checkpoint
from torchship.components.train.stage import train_model

VARIANT_KEYS = {"name", "order", "format", "source", "kind", "precision", "parity_criterion",
                "test_accuracy", "size_bytes", "sparsity", "n_parameters", "nonzero_parameters",
                "settings"}
# Every registered variant, in table order.
ALL_VARIANTS = names()
MEASURED_KEYS = {"onnx_test_accuracy", "acc_drop_pt", "n_parameters", "nonzero_parameters",
                 "onnx_size_bytes", "compressed_size_bytes", "latency_b1_ms", "latency_b64_ms",
                 "speedup_b1", "speedup_b64", "size_ratio", "param_ratio",
                 "fp32_top1_agreement", "fp32_max_abs_diff", "latency_settings"}
# Small settings: every variant in seconds; the goals are bench-compress's business.
FAST = {"target_sparsity": 0.8, "prune_steps": 2, "finetune_epochs": 1, "distill_epochs": 8,
        "qat_epochs": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """Digits splits and an mlp trained in this process as a one-worker job (no launcher)."""
    paths = {**digits, "model": str(tmp_path_factory.mktemp("trained") / "model.pt")}
    with one_process_job():
        train_model(paths["train"], paths["val"], paths["model"], epochs=4,
                    progress=lambda _: None)
    return paths


@pytest.fixture(scope="module")
def variants(trained, tmp_path_factory):
    variants_dir = tmp_path_factory.mktemp("compress") / "variants"
    rows = compress_model(trained["model"], trained["train"], trained["val"], trained["test"],
                          str(variants_dir), variants=ALL_VARIANTS, progress=lambda _: None,
                          **FAST)
    return variants_dir, {row["name"]: row for row in rows}, rows


@pytest.fixture(scope="module")
def exported(trained, variants, tmp_path_factory):
    onnx_dir = tmp_path_factory.mktemp("export") / "onnx"
    rows = export_variants(variants[0], trained["test"], str(onnx_dir), progress=lambda _: None)
    return onnx_dir, {row["name"]: row for row in rows}, rows


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_every_variant_is_written_with_its_record(variants):
    variants_dir, _, rows = variants
    assert [row["name"] for row in rows] == list(ALL_VARIANTS)
    assert ALL_VARIANTS == ("fp32", "pruned", "structured", "distilled", "int8", "qat",
                            "int8_dynamic", "fp16")
    # Made when none are named: fp16 and dynamic int8 are for GPU serving and for comparison,
    # QAT costs a fine-tuning.
    assert default_names() == ["fp32", "pruned", "structured", "distilled", "int8"]
    assert sorted(p.name for p in variants_dir.parent.iterdir()) == ["variants"]  # no staging
    for row in rows:
        assert VARIANT_KEYS <= set(row)
        assert json.loads((variants_dir / row["name"] / "variant.json").read_text()) == row
        model_file = variants_dir / row["name"] / ("model.pt" if row["format"] == "torch"
                                                   else "model.onnx")
        assert model_file.stat().st_size == row["size_bytes"]
        assert row["test_accuracy"] > 0.85, row
    # QAT's model is its own fine-tuned one (kept beside it as model.pt).
    assert [row["source"] for row in rows] == [None] + ["fp32"] * 4 + ["qat"] + ["fp32"] * 2
    assert [row["format"] for row in rows] == ["torch"] * 4 + ["onnx"] * 4
    assert [row["parity_criterion"] for row in rows] == (
        ["max_abs_diff"] * 4 + ["top1_agreement"] * 4)


def test_pruning_follows_an_iterative_schedule_to_the_target_sparsity(variants):
    schedule = sparsity_schedule(0.8, 3)
    assert schedule == sorted(schedule) and schedule[-1] == pytest.approx(0.8)
    assert schedule[0] > 0.8 / 3  # cubic: the big step first
    variants_dir, by_name, _ = variants
    fp32, pruned = by_name["fp32"], by_name["pruned"]
    assert fp32["sparsity"] < 0.01
    assert pruned["sparsity"] == pytest.approx(0.8, abs=0.005)
    assert pruned["settings"]["prune_steps"] == 2
    assert pruned["nonzero_parameters"] < 0.25 * pruned["n_parameters"]
    state = torch.load(variants_dir / "pruned" / "model.pt", weights_only=True)["state_dict"]
    # prune.remove made the masks permanent: plain weights, no weight_orig / weight_mask.
    assert not [key for key in state if key.endswith(("_orig", "_mask"))]
    weights = [t for key, t in state.items() if key.endswith("weight")]
    zeros = sum(int((t == 0).sum()) for t in weights) / sum(t.numel() for t in weights)
    assert zeros == pytest.approx(0.8, abs=0.005)


def test_structured_variant_has_really_fewer_neurons(variants, exported):
    variants_dir, by_name, _ = variants
    fp32, structured = by_name["fp32"], by_name["structured"]
    # Half of each hidden layer's 1024 neurons go; the 10 class outputs all stay.
    assert structured["settings"]["widths"] == {
        "layers.0": [512, 64], "layers.3": [512, 512], "layers.6": [10, 512]}
    assert structured["n_parameters"] < 0.3 * fp32["n_parameters"]
    model, checkpoint = load_checkpoint(variants_dir / "structured" / "model.pt")
    assert checkpoint["resized"] and model.layers[3].in_features == 512
    shapes = {tuple(array.shape) for name, array in
              initializers(exported[0] / "structured" / "model.onnx").items()
              if name.endswith("weight")}
    assert shapes == {(512, 64), (512, 512), (10, 512)}


def test_structured_pruning_follows_the_cnn_through_flatten():
    cnn = build_model("cnn", 64, 10)
    pruned = structured_pruning(cnn, {}, 64, ratio=0.5, steps=1, finetune_epochs=0,
                                training={"batch_size": 8, "learning_rate": 1e-3, "seed": 0})
    assert pruned.features[0].out_channels == 8 and pruned.features[2].out_channels == 16
    assert pruned.classifier[1].in_features == 16 * 4 * 4  # follows the channels it flattens
    assert pruned.classifier[3].out_features == 10
    assert pruned(torch.randn(3, 64)).shape == (3, 10)


def test_resized_checkpoint_round_trips_through_export(tmp_path):
    cnn = structured_pruning(build_model("cnn", 64, 10), {}, 64, ratio=0.5, steps=1,
                             finetune_epochs=0,
                             training={"batch_size": 8, "learning_rate": 1e-3, "seed": 0})
    save_checkpoint(tmp_path / "model.pt", cnn, "cnn", 64, 10, resized=True)
    loaded, _ = load_checkpoint(tmp_path / "model.pt")
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), cnn.eval()(x))
    export_onnx(loaded, 64, tmp_path / "model.onnx")
    (logits,) = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(logits, cnn(x).detach().numpy(), atol=1e-5)


def test_distilled_student_is_smaller_and_learned_from_the_teacher(variants):
    variants_dir, by_name, _ = variants
    fp32, student = by_name["fp32"], by_name["distilled"]
    assert student["n_parameters"] * 4 <= fp32["n_parameters"]
    assert student["settings"]["student_options"] == {"hidden": 256}
    assert student["settings"]["temperature"] == 4.0
    assert student["test_accuracy"] >= fp32["test_accuracy"] - 0.05
    model, checkpoint = load_checkpoint(variants_dir / "distilled" / "model.pt")
    assert checkpoint["model_options"] == {"hidden": 256}
    assert model.layers[0].out_features == 256


def test_int8_static_is_qdq_per_channel_and_notably_smaller(variants):
    variants_dir, by_name, _ = variants
    fp32, int8 = by_name["fp32"], by_name["int8"]
    assert int8["size_bytes"] < 0.3 * fp32["size_bytes"]
    assert int8["test_accuracy"] >= fp32["test_accuracy"] - 0.03
    assert int8["settings"]["calibration_method"] == "minmax"
    assert int8["settings"]["calibration_rows"] == 512
    model = onnx.load(str(variants_dir / "int8" / "model.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in model.graph.node}
    weights = initializers(variants_dir / "int8" / "model.onnx")
    scales = [array for name, array in weights.items() if name.endswith("weight_scale")]
    assert scales and all(scale.shape[0] > 1 for scale in scales)  # one scale per channel
    assert weights["input_zero_point"].dtype == np.uint8


def test_calibration_methods_give_different_ranges(trained, tmp_path):
    scales = {}
    for method in ("minmax", "entropy", "percentile"):
        rows = compress_model(trained["model"], trained["train"], trained["val"], trained["test"],
                              str(tmp_path / method), variants=["int8"],
                              calibration_method=method, calibration_rows=256,
                              progress=lambda _: None)
        assert [row["name"] for row in rows] == ["fp32", "int8"]
        int8 = rows[1]
        assert int8["settings"]["calibration_method"] == method
        assert int8["test_accuracy"] >= rows[0]["test_accuracy"] - 0.03
        weights = initializers(tmp_path / method / "int8" / "model.onnx")
        scales[method] = {name: float(array) for name, array in weights.items()
                          if name.endswith("_output_0_scale")}
    assert scales["minmax"] and scales["entropy"] != scales["minmax"]
    assert scales["percentile"] != scales["minmax"]
    # Entropy and percentile clip outliers: ranges no wider than min-max's.
    for method in ("entropy", "percentile"):
        assert all(scales[method][k] <= scales["minmax"][k] * 1.001 for k in scales["minmax"])


def test_int8_dynamic_quantises_weights_only(variants):
    variants_dir, by_name, _ = variants
    assert by_name["int8_dynamic"]["size_bytes"] < 0.3 * by_name["fp32"]["size_bytes"]
    ops = {node.op_type for node in onnx.load(
        str(variants_dir / "int8_dynamic" / "model.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops


def test_fp16_keeps_float32_io(variants):
    variants_dir, by_name, _ = variants
    model = onnx.load(str(variants_dir / "fp16" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weight_types = {t.data_type for t in model.graph.initializer if t.name.endswith("weight")}
    assert weight_types == {onnx.TensorProto.FLOAT16}
    assert by_name["fp16"]["size_bytes"] < 0.55 * by_name["fp32"]["size_bytes"]
    assert by_name["fp16"]["settings"]["intended_for"] == "GPU serving"


def test_without_quantisation_there_is_no_int8_or_fp16(trained, tmp_path):
    rows = compress_model(trained["model"], trained["train"], trained["val"], trained["test"],
                          str(tmp_path / "variants"), finetune_epochs=0, quantize=False,
                          variants=["pruned", "int8", "fp16"], progress=lambda _: None)
    assert [row["name"] for row in rows] == ["fp32", "pruned"]
    assert sorted(p.name for p in (tmp_path / "variants").iterdir()) == [
        "fp32", "pruned", "skipped.json"]


@pytest.mark.parametrize(("options", "expected"), [
    ({"variants": ["int4"]}, "unknown variants 'int4'"),
    ({"calibration_method": "mse"}, "--calibration-method 'mse' is unknown; pass one of minmax"),
    ({"structured_ratio": 1.0}, r"--structured-ratio 1.0 is not in \(0, 1\)"),
    ({"prune_steps": 0}, "--prune-steps 0 is not a whole number >= 1; pass e.g. 3"),
    ({"distill_temperature": 0}, "--distill-temperature 0 is not positive"),
    ({"target_sparsity": 1.5}, r"--target-sparsity 1.5 is not in \[0, 1\)"),
    ({"sparsity": 0.5}, "compression options sparsity are unknown"),
])
def test_bad_options_fail_before_any_work(trained, tmp_path, options, expected):
    with pytest.raises(UserInputError, match=expected):
        compress_model(trained["model"], trained["train"], trained["val"], trained["test"],
                       str(tmp_path / "variants"), progress=lambda _: None, **options)
    assert list(tmp_path.iterdir()) == []


def test_every_export_passed_checker_and_parity(exported, variants):
    onnx_dir, _, rows = exported
    assert [row["name"] for row in rows] == list(ALL_VARIANTS)
    assert json.loads((onnx_dir / "variants.json").read_text()) == rows
    for row, variant in zip(rows, variants[2]):
        assert {k: row[k] for k in variant} == variant
        parity = row["parity"]
        assert parity["passed"] and parity["dynamic_batch"]
        assert row["onnx_size_bytes"] == (onnx_dir / row["name"] / "model.onnx").stat().st_size
    for row in rows[:4]:  # exported from PyTorch: checked against their own PyTorch model
        assert row["parity"]["criterion"] == "max_abs_diff"
        assert row["parity"]["reference"] == row["name"]
        assert row["parity"]["max_abs_diff"] <= row["parity"]["atol"] == 1e-4
    for row in rows[4:]:  # made on the ONNX graph: checked against their source, on the decision
        assert row["parity"]["criterion"] == "top1_agreement"
        assert row["parity"]["reference"] == row["source"]
        assert row["parity"]["top1_agreement"] >= 0.97
        assert row["parity"]["max_abs_diff"] > 0


def test_every_variant_is_measured_against_fp32(exported):
    _, by_name, rows = exported
    for row in rows:
        assert MEASURED_KEYS <= set(row), MEASURED_KEYS - set(row)
        assert row["latency_b1_ms"] > 0 and row["latency_b64_ms"] > row["latency_b1_ms"] / 2
        assert 0 < row["compressed_size_bytes"] < row["onnx_size_bytes"]
        assert row["latency_settings"]["intra_op_num_threads"] == 1
        assert row["fp32_top1_agreement"] > 0.9
    fp32 = by_name["fp32"]
    assert (fp32["acc_drop_pt"], fp32["speedup_b64"], fp32["fp32_max_abs_diff"]) == (0, 1, 0)
    assert fp32["onnx_test_accuracy"] == pytest.approx(fp32["test_accuracy"], abs=0.004)
    # Dense storage does not shrink a pruned file; compression sees the zeros.
    pruned = by_name["pruned"]
    assert pruned["onnx_size_bytes"] == pytest.approx(fp32["onnx_size_bytes"], rel=0.01)
    assert pruned["compressed_size_bytes"] < 0.5 * fp32["compressed_size_bytes"]
    assert by_name["int8"]["size_ratio"] > 3.5
    assert by_name["distilled"]["param_ratio"] > 4
    assert by_name["fp16"]["fp32_max_abs_diff"] < 0.05


def test_measure_variants_reads_and_rewrites_an_export(exported, trained, tmp_path):
    onnx_dir = tmp_path / "onnx"
    (onnx_dir / "fp32").mkdir(parents=True)
    (onnx_dir / "fp32" / "model.onnx").write_bytes(
        (exported[0] / "fp32" / "model.onnx").read_bytes())
    plain = {k: v for k, v in exported[1]["fp32"].items() if k not in MEASURED_KEYS}
    (onnx_dir / "variants.json").write_text(json.dumps([plain]))
    rows = measure_variants(onnx_dir, trained["test"], rounds=2, batch_sizes=(1, 8))
    assert {"latency_b1_ms", "latency_b8_ms", "speedup_b8"} <= set(rows[0])
    assert json.loads((onnx_dir / "variants.json").read_text()) == rows
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["fp32", "variants.json"]


def test_onnx_models_have_the_contract_io_and_a_dynamic_batch(exported, trained):
    onnx_dir, _, rows = exported
    x = load_split(trained["test"]).inputs["input"]
    for row in rows:
        path = onnx_dir / row["name"] / "model.onnx"
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        (graph_input,), (graph_output,) = model.graph.input, model.graph.output
        assert (graph_input.name, graph_output.name) == ("input", "logits")
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert graph_input.type.tensor_type.shape.dim[0].dim_param
        assert graph_input.type.tensor_type.shape.dim[1].dim_value == 64
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch in (1, 7, 33):
            (logits,) = session.run(["logits"], {"input": x[:batch]})
            assert logits.shape == (batch, 10) and logits.dtype == np.float32
            assert np.isfinite(logits).all()


def test_parity_failure_names_the_variant_and_publishes_nothing(trained, variants, tmp_path):
    onnx_dir = tmp_path / "onnx"
    with pytest.raises(ParityError) as error:
        export_variants(variants[0], trained["test"], str(onnx_dir), min_top1_agreement=1.01,
                        progress=lambda _: None)
    message = str(error.value)
    assert "variant 'int8'" in message and "'fp32'" in message
    assert "top-1 agreement" in message and "at least 1.01" in message
    assert list(tmp_path.iterdir()) == []


def test_export_replaces_an_earlier_export(trained, variants, tmp_path):
    onnx_dir = tmp_path / "onnx"
    (onnx_dir / "stale").mkdir(parents=True)
    export_variants(variants[0], trained["test"], str(onnx_dir), measure=False,
                    progress=lambda _: None)
    assert sorted(p.name for p in onnx_dir.iterdir()) == sorted(
        [*ALL_VARIANTS, "skipped.json", "variants.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_qat_fine_tunes_under_fake_quantisation_and_exports_the_static_int8_form(trained,
                                                                                  tmp_path):
    rows = compress_model(trained["model"], trained["train"], trained["val"], trained["test"],
                          str(tmp_path / "variants"), variants=["int8", "qat"], qat_epochs=1,
                          progress=lambda _: None)
    by_name = {row["name"]: row for row in rows}
    assert list(by_name) == ["fp32", "int8", "qat"]  # PTQ and QAT side by side
    qat = by_name["qat"]
    assert qat["kind"] == "quantisation_aware_training" and qat["precision"] == "int8"
    assert qat["source"] == "qat" and qat["settings"]["qat_epochs"] == 1
    # The same QDQ form as static int8, from weights fine-tuned under fake quantisation.
    graph = onnx.load(str(tmp_path / "variants" / "qat" / "model.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    tuned, _ = load_checkpoint(tmp_path / "variants" / "qat" / "model.pt")
    fp32, _ = load_checkpoint(trained["model"])
    assert not torch.equal(tuned.layers[0].weight, fp32.layers[0].weight)
    assert qat["test_accuracy"] >= by_name["fp32"]["test_accuracy"] - 0.03
    # Export checks it against its own fine-tuned weights, on the decision.
    exported = export_variants(tmp_path / "variants", trained["test"], str(tmp_path / "onnx"),
                               measure=False, progress=lambda _: None)
    parity = {row["name"]: row["parity"] for row in exported}["qat"]
    assert parity["passed"] and parity["reference"] == "qat"
    assert parity["criterion"] == "top1_agreement"
    assert json.loads((tmp_path / "onnx" / "skipped.json").read_text()) == []
