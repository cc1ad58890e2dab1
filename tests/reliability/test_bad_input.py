"""Bad input: one clear line naming the input and the fix, a non-zero exit from the command line,
and no partial artifact. Stage functions are called directly; the `torchship run` command is run
for three representative cases where its `error:` line and exit status 2 matter."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from artifacts import N_CLASSES, N_FEATURES, labelled_table, write_onnx_dir
from processes import error_lines, torchship, wait_gone

from torchship.components.benchmark.stage import benchmark_endpoint
from torchship.components.data.stage import prepare_data
from torchship.components.deploy.targets.local import deploy_local
from torchship.components.errors import ServingError, UserInputError
from torchship.components.export.stage import export_variants
from torchship.components.gate.checks import evaluate_gate
from torchship.components.models import build_model, check_model_output, save_checkpoint
from torchship.components.triton.repository import build_model_repository
from torchship.components.triton.server import TritonServer, free_port


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# -- data sources -------------------------------------------------------------------------------

def _write_sources(root: Path) -> None:
    (root / "folder.csv").mkdir()  # a directory where a file is expected (root reads any file)
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    labelled_table().iloc[:0].to_parquet(root / "empty.parquet")
    labelled_table().to_csv(root / "table.csv", index=False)
    one = labelled_table()
    one["label"] = 7
    one.to_csv(root / "one_class.csv", index=False)
    nan = labelled_table()
    nan.loc[4, "c"] = np.nan
    nan.to_csv(root / "nan.csv", index=False)
    text = labelled_table()
    text["b"] = "x"
    text.to_csv(root / "text.csv", index=False)


@pytest.mark.parametrize(
    ("source", "label", "expected"),
    [
        ("missing.csv", "label", ["does not exist", "pass a path"]),
        ("folder.csv", "label", ["could not be read as csv", "Is a directory", "pass a valid"]),
        ("corrupt.parquet", "label", ["could not be read as parquet", "pass a valid parquet"]),
        ("empty.parquet", "label", ["is empty", "pass a table with a header and rows"]),
        ("table.csv", "target", ["has no column 'target'", "pass --label-column"]),
        ("one_class.csv", "label", ["single class '7'", "at least two classes"]),
        ("nan.csv", "label", ["missing or infinite values in feature columns c", "fill or drop"]),
        ("text.csv", "label", ["columns b", "b"]),
    ],
)
def test_bad_data_source_is_one_line_and_writes_nothing(tmp_path, source, label, expected):
    _write_sources(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(UserInputError) as excinfo:
        prepare_data(str(tmp_path / source), label, str(out / "train.npz"),
                     str(out / "val.npz"), str(out / "test.npz"))
    message = _one_line(excinfo)
    assert source in message, message
    for text in expected:
        assert text in message, message
    assert not out.exists() or not any(out.iterdir())


def _refused_source(source: Path) -> str:
    """prepare_data's error for `source`: one line naming it, with nothing written."""
    out = source.parent / "out"
    with pytest.raises(UserInputError) as excinfo:
        prepare_data(str(source), "label", str(out / "train.npz"), str(out / "val.npz"),
                     str(out / "test.npz"))
    message = _one_line(excinfo)
    assert message.startswith(f"data source '{source}' "), message
    assert not out.exists()
    return message


class _MakesADirectory:
    """Unpickling this runs os.mkdir: a stand-in for code hidden in a pickled array."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _write_npz_sources(root: Path) -> None:
    x, y = np.random.default_rng(0).normal(size=(30, 3)), np.arange(30) % 3
    np.savez(root / "no_y.npz", x=x)
    np.savez(root / "rows.npz", x=x, y=y[:29])
    np.savez(root / "text_x.npz", x=np.full((30, 3), "a"), y=y)
    holes = x.copy()
    holes[4, 1], holes[7, 2] = np.nan, np.inf
    np.savez(root / "holes.npz", x=holes, y=y)
    outside = y.copy()
    outside[[3, 5]] = [3, -1]
    np.savez(root / "outside.npz", x=x, y=outside, class_names=np.array(["a", "b", "c"]))
    np.savez(root / "pickled.npz", y=y,
             x=np.array([_MakesADirectory(str(root / "unpickled"))], dtype=object))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("no_y.npz", ["has no array 'y' (arrays: x)", "np.savez(path, x=features, y=labels)"]),
        ("rows.npz", ["30 rows in x but y has shape (29,)", "one label per row"]),
        ("text_x.npz", ["array 'x' holds <U1 values, not numbers", "encode the features"]),
        ("holes.npz", ["missing or infinite values in feature columns x1, x2", "fill or drop"]),
        ("outside.npz", ["values -1, 3 outside class_names' indices 0..2",
                         "store y as indices into class_names"]),
        ("pickled.npz", ["could not be read as npz", "allow_pickle=False", "plain numeric"]),
    ],
)
def test_bad_npz_source_is_one_line_and_writes_nothing(tmp_path, source, expected):
    _write_npz_sources(tmp_path)
    message = _refused_source(tmp_path / source)
    for text in expected:
        assert text in message, message
    assert not (tmp_path / "unpickled").exists()  # nothing in the file was unpickled


def _png(path: Path, size: tuple[int, int] = (8, 8)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, color=len(path.parent.name) * 40).save(path)


def _write_image_folders(root: Path) -> None:
    for i in range(3):
        _png(root / "no_classes" / f"{i}.png")
        _png(root / "one_class" / "a" / f"{i}.png")
        _png(root / "few" / "a" / f"{i}.png")
        _png(root / "few" / "bb" / f"{i}.png")
    for folder in ("empty_class", "unreadable", "odd_size"):
        for label in ("a", "bb"):
            for i in range(8):
                _png(root / folder / label / f"{i:02d}.png")
    for path in (root / "empty_class" / "bb").iterdir():
        path.rename(path.with_suffix(".txt"))
    (root / "unreadable" / "bb" / "03.png").write_bytes(b"\x89PNG but then nothing")
    _png(root / "odd_size" / "bb" / "02.png", size=(6, 4))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("no_classes", ["a folder with no class sub-folders", "a sub-folder named after the"]),
        ("one_class", ["single class folder 'a'", "at least two"]),
        ("empty_class", ["class folder 'bb' has no images (.png, .jpg, .jpeg, .bmp, .gif)",
                         "add images or remove the folder"]),
        ("unreadable", ["image '{root}/unreadable/bb/03.png' could not be read",
                        "replace or remove it"]),
        ("odd_size", ["image '{root}/odd_size/bb/02.png' is 6x4",
                      "but '{root}/odd_size/a/00.png' is 8x8", "pass --image-size N"]),
        ("few", ["has too few images for 2 of its 2 classes ('a' (3), 'bb' (3))",
                 "each class needs at least 7 images"]),
    ],
)
def test_bad_image_folder_is_one_line_and_writes_nothing(tmp_path, source, expected):
    _write_image_folders(tmp_path / "images")
    message = _refused_source(tmp_path / "images" / source)
    for text in expected:
        assert text.format(root=tmp_path / "images") in message, message


GCS_PROBE = textwrap.dedent("""
    import sys
    from torchship.components.data.stage import prepare_data
    from torchship.components.errors import UserInputError
    try:
        prepare_data("gs://torchship-reliability-no-such-bucket/data.csv", "label",
                     sys.argv[1] + "/tr.npz", sys.argv[1] + "/va.npz", sys.argv[1] + "/te.npz")
    except UserInputError as exc:
        print("USER", exc)
        sys.exit(2)
""")


def test_gs_uri_without_credentials_fails_fast_and_clearly(tmp_path):
    env = {**os.environ, "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "nonexistent.json"),
           "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9",
           "GCE_METADATA_IP": "127.0.0.1:9"}
    try:
        done = subprocess.run([sys.executable, "-c", GCS_PROBE, str(tmp_path / "out")],
                              check=False, capture_output=True, text=True, timeout=15,
                              env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("prepare_data on a gs:// URI without credentials ran for more than 15 s")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout.startswith("USER data source 'gs://"), done.stdout
    assert not (tmp_path / "out").exists()


# -- models -------------------------------------------------------------------------------------

@pytest.fixture
def user_models(tmp_path, monkeypatch) -> str:
    (tmp_path / "rel_user_models.py").write_text(textwrap.dedent("""
        import torch

        def not_a_module(n_features, n_classes):
            return 42

        def wrong_width(n_features, n_classes):
            return torch.nn.Linear(n_features, n_classes + 2)

        def no_arguments():
            return torch.nn.Linear(1, 1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rel_user_models"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("resnet9000", ["'resnet9000' is unknown", "pass one of mlp"]),
        ("rel_no_such_module:make", ["module 'rel_no_such_module' could not be imported",
                                     "make it importable"]),
        ("rel_user_models:missing", ["has no attribute 'missing'"]),
        ("rel_user_models:not_a_module", ["returned a int, not a torch.nn.Module",
                                          "return the model from the factory"]),
        ("rel_user_models:no_arguments", ["cannot be called as", "change its signature"]),
        ("no_colon_here", ["is unknown"]),
        (":factory", ["is not of the form 'module:factory'"]),
    ],
)
def test_bad_model_spec_is_one_line(user_models, spec, expected):
    with pytest.raises(UserInputError) as excinfo:
        build_model(spec, N_FEATURES, N_CLASSES)
    message = _one_line(excinfo)
    for text in expected:
        assert text in message, message


def test_model_output_not_matching_the_classes_is_one_line(user_models):
    model = build_model("rel_user_models:wrong_width", N_FEATURES, N_CLASSES)
    with pytest.raises(UserInputError) as excinfo:
        check_model_output(model, N_FEATURES, N_CLASSES, name="rel_user_models:wrong_width")
    message = _one_line(excinfo)
    assert f"expected logits [3, {N_CLASSES}]" in message and "[3, 5]" in message, message


# -- corrupt ONNX, invalid config ---------------------------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_onnx_is_refused_by_build_and_deploy(tmp_path, test_path):
    onnx_dir = write_onnx_dir(tmp_path / "onnx")
    _truncate(onnx_dir / "fp32" / "model.onnx")
    with pytest.raises(UserInputError) as built:
        build_model_repository(onnx_dir, tmp_path / "repo", backend="python")
    assert "fp32/model.onnx is not a readable ONNX model" in _one_line(built)
    assert "re-run the export stage" in str(built.value)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())

    with pytest.raises(UserInputError) as deployed:
        deploy_local(onnx_dir, tmp_path / "served", test_path, progress=None)
    message = _one_line(deployed)
    assert "failed and was not promoted" in message and "not a readable ONNX model" in message
    # Only the deploy lock is left; no model directory, no version.
    assert [p.name for p in (tmp_path / "served").iterdir()] == [".torchship-deploy.lock"]


def _corrupt_int8_variants(tmp_path: Path) -> Path:
    variants = tmp_path / "variants"
    model = build_model("mlp", N_FEATURES, N_CLASSES)
    save_checkpoint(variants / "fp32" / "model.pt", model, "mlp", N_FEATURES, N_CLASSES)
    (variants / "fp32" / "variant.json").write_text(json.dumps(
        {"name": "fp32", "format": "torch", "n_features": N_FEATURES, "n_classes": N_CLASSES}))
    (variants / "int8").mkdir()
    (variants / "int8" / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf")
    (variants / "int8" / "variant.json").write_text(json.dumps(
        {"name": "int8", "format": "onnx", "source": "fp32", "n_features": N_FEATURES,
         "n_classes": N_CLASSES}))
    return variants


def test_corrupt_onnx_variant_fails_export_and_publishes_nothing(tmp_path, test_path):
    variants = _corrupt_int8_variants(tmp_path)
    onnx_dir = tmp_path / "onnx"
    with pytest.raises(Exception) as excinfo:
        export_variants(variants, str(test_path), onnx_dir, measure=False, progress=lambda _: None)
    assert "int8" in str(excinfo.value) or "model.onnx" in str(excinfo.value), excinfo.value
    assert not onnx_dir.exists()
    assert not list(tmp_path.glob(".onnx.tmp-*")), "the staging directory was left behind"


def test_corrupt_onnx_variant_is_one_line_naming_the_variant_file(tmp_path, test_path):
    variants = _corrupt_int8_variants(tmp_path)
    with pytest.raises(UserInputError) as excinfo:
        export_variants(variants, str(test_path), tmp_path / "onnx", measure=False,
                        progress=lambda _: None)
    assert str(variants / "int8" / "model.onnx") in _one_line(excinfo)


def test_invalid_config_value_is_one_line_and_nothing_runs(tmp_path, local_repo):
    repo = tmp_path / "repo"
    shutil.copytree(local_repo, repo)
    config = repo / "fp32" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 64", "max_batch_size: lots"))
    with pytest.raises(UserInputError) as excinfo, TritonServer(repo):
        pytest.fail("a malformed config.pbtxt was served")
    assert "fp32/config.pbtxt is not a valid Triton ModelConfig" in _one_line(excinfo)
    assert wait_gone(str(repo), 1) == []


# -- endpoints and ports ------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_benchmark_endpoint_that_does_not_answer(test_path, protocol):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ServingError) as excinfo:
        benchmark_endpoint(f"127.0.0.1:{port}", protocol, ["fp32"], test_path, concurrency=1,
                           duration_s=1, progress=None)
    message = _one_line(excinfo)
    assert f"cannot reach Triton at {protocol}://127.0.0.1:{port}" in message, message
    assert "is the server running" in message
    assert time.monotonic() - started < 15


def test_port_in_use_is_one_line_before_any_server_starts(local_repo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(UserInputError) as excinfo, TritonServer(local_repo, grpc_port=port):
            pytest.fail("a server started on a taken port")
    message = _one_line(excinfo)
    assert f"grpc_port: port {port} on 127.0.0.1 is already in use" in message, message
    assert "pass a different --grpc-port" in message
    assert time.monotonic() - started < 5
    assert wait_gone(str(local_repo.resolve()), 1) == []


def test_serve_command_with_a_taken_port_exits_2(local_repo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = torchship("serve", str(local_repo), "--http-port", str(port), timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = error_lines(done.stderr)
    assert f"http_port: port {port} on 127.0.0.1 is already in use" in line


# -- the gate -----------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0, -5.0])
def test_impossible_latency_budget_is_refused(budget):
    with pytest.raises(UserInputError) as excinfo:
        evaluate_gate({"rows": []}, latency_budget_p99_ms=budget)
    assert f"latency_budget_p99_ms: {budget} must be > 0" == _one_line(excinfo)


# -- the command line, end to end ---------------------------------------------------------------

def test_cli_bad_inputs_print_one_error_line_and_exit_2(pipeline_yaml, tmp_path):
    _write_sources(tmp_path)
    cases = [
        (["--data-source", str(tmp_path / "folder.csv")], "could not be read as csv"),
        (["--model", "rel_no_such_module:make"], "could not be imported"),
        (["--data-source", str(tmp_path / "one_class.csv"), "--label-column", "label"],
         "single class"),
    ]
    for args, expected in cases:
        root = tmp_path / "runs"
        done = torchship("run", str(pipeline_yaml), "--pipeline-root", str(root), "--epochs", "1",
                         *args, timeout=240)
        assert done.returncode == 2, (args, done.stdout[-2000:], done.stderr[-2000:])
        lines = error_lines(done.stderr)
        assert len(lines) == 1 and expected in lines[0], (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr
        started = re.findall(r"Executing task '([\w-]+)'", done.stdout)
        assert started in ([], ["prepare-data"]), (args, started)  # before training
        # Nothing was written: no run folder, no model, no repository.
        assert not root.exists(), list(root.rglob("*"))


@pytest.mark.parametrize(("args", "expected"), [
    (["--latency-budget-ms", "-5"], "latency_budget_p99_ms=-5.0 is negative"),
    (["--target-sparsity", "1.5"], "target_sparsity=1.5 is not in [0, 1); pass e.g. 0.8"),
    (["--concurrency", "1,2", "--target-concurrency", "8"], "is not a measured level ([1, 2])"),
    (["--variants", "fp32,int4"], "unknown ones (int4)"),
    (["-p", "calibration_method=magic"], "calibration_method='magic' is unknown"),
])
def test_parameters_that_would_fail_late_are_refused_before_anything_runs(
        pipeline_yaml, tmp_path, args, expected):
    done = torchship("run", str(pipeline_yaml), "--pipeline-root", str(tmp_path / "runs"), *args,
                     timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = error_lines(done.stderr)
    assert expected in line
    assert not (tmp_path / "runs").exists()  # no stage started
