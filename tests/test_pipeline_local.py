"""The compiled pipeline, run end to end under kfp.local on real parts, and its bad-input errors."""

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from artifacts import labelled_table, write_rgb_image_folder, write_text_table, write_tiny_bert
from processes import torchship

from torchship.components.triton.config import read_model_config
from torchship.components.triton.server import TritonServer
from torchship.pipelines.local import prune_runs

SMALL = ["--epochs", "3", "--finetune-epochs", "1", "--bench-duration", "1",
         "--concurrency", "1,2", "--variants", "fp32,pruned,int8", "--target-concurrency", "2"]


def torchship_run(pipeline_yaml: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    return torchship("run", str(pipeline_yaml), "--pipeline-root", str(root), *args, timeout=600)


def printed_paths(stdout: str) -> dict[str, Path]:
    return {name: Path(line.split(": ", 1)[1]) for line in stdout.splitlines()
            for name in ("summary", "results", "gate", "report") if line.startswith(f"{name}: ")}


def test_compiled_pipeline_runs_end_to_end_on_real_triton_and_deploys(pipeline_yaml, tmp_path):
    earlier = tmp_path / "runs" / "torchship-2026-01-01-00-00-00-000000"  # an earlier run's
    (earlier / "train").mkdir(parents=True)
    done = torchship_run(pipeline_yaml, tmp_path / "runs", *SMALL, "--keep-runs", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not earlier.exists() and "removed 1 older run folder under" in done.stdout

    # Progress from inside the stages reaches the user: epochs and benchmark levels.
    assert "epoch 3/3" in done.stdout
    assert "Task 'deploy' finished with status SUCCESS" in done.stdout

    paths = printed_paths(done.stdout)
    summary = json.loads(paths["results"].read_text())
    rows = {row["variant"]: row for row in summary["rows"]}
    assert set(rows) == {"fp32", "pruned", "int8"}
    for name, row in rows.items():
        assert row["test_accuracy"] > 0.85, name
        assert row["errors_c1"] == 0 and row["errors_c2"] == 0, name
        assert row["throughput_rps_c1"] > 0 and row["p50_ms_c1"] <= row["p99_ms_c1"], name
        # The printed table carries the same numbers.
        assert any(line.split()[0] == name and f"{row['test_accuracy']:.4f}" in line
                   for line in done.stdout.splitlines() if line.strip())
    assert rows["int8"]["onnx_size_bytes"] < rows["fp32"]["onnx_size_bytes"] / 2

    # One record decided, and the variant it chose is what was deployed, as version 1 of the
    # serving name (the default, torchship), the version saying which variant it is.
    gate = json.loads(paths["gate"].read_text())
    assert gate["passed"] and gate["variant"] in rows
    # The serving search chose among the variants the gate found eligible; deploy serves its
    # choice.
    [record_path] = list((tmp_path / "runs").rglob("tune-serving/record"))
    serving = json.loads(record_path.read_text())
    chosen = serving["variant"]
    eligible = [row["name"] for row in gate["choice"]["table"] if row["meets_constraints"]]
    assert chosen in eligible and serving["variants"][0] == gate["variant"]
    [deployed] = [line for line in done.stdout.splitlines() if line.startswith("deployed: ")]
    persistent_repo = tmp_path / "runs" / "model_repository"
    assert deployed.startswith(
        f"deployed: {chosen} as version 1 of model 'torchship' in {persistent_repo} (")
    assert deployed.endswith(f"serve it with: torchship serve {persistent_repo}")
    [repository] = list((tmp_path / "runs").rglob("deploy/model_repository"))
    assert [p.name for p in repository.iterdir() if p.is_dir()] == ["torchship"]
    assert (repository / "torchship" / "config.pbtxt").is_file()
    assert (repository / "torchship" / "1" / "model.onnx").is_file()
    assert json.loads((repository / "torchship" / "1" / "torchship-version.json").read_text()) == {
        "variant": chosen}
    # The same version was added to the persistent repository `torchship serve` serves.
    persistent = tmp_path / "runs" / "model_repository" / "torchship"
    assert (persistent / "1" / "model.onnx").read_bytes() == (
        repository / "torchship" / "1" / "model.onnx").read_bytes()

    # The serving search measured each candidate setting of the chosen model, printed a line
    # each and its choice, and the deployed config carries the chosen settings.
    assert "Task 'tune-serving' finished with status SUCCESS" in done.stdout
    assert len(serving["candidates"]) == 4 * len(eligible)
    for candidate in serving["candidates"]:
        assert candidate["levels"]["c2"]["throughput_rps"] > 0, candidate["model"]
        assert any(line.strip().startswith(candidate["model"] + " ")
                   for line in done.stdout.splitlines()), candidate["model"]
    assert (f"serving: {chosen} with instance_count {serving['settings']['instance_count']},"
            in done.stdout)
    for config in (read_model_config(repository / "torchship" / "config.pbtxt"),
                   read_model_config(persistent / "config.pbtxt")):
        assert config.instance_group[0].count == serving["settings"]["instance_count"]
        assert config.dynamic_batching.max_queue_delay_microseconds == (
            serving["settings"]["max_queue_delay_us"])
    assert (f"({serving['settings']['instance_count']} instance" in deployed
            and f"delay {serving['settings']['max_queue_delay_us']} us)" in deployed)

    # The run kept the retraining reference under the pipeline root: the training statistics
    # (histograms included) the trigger judges drift by, and what serves now.
    reference = tmp_path / "runs" / "torchship-reference" / "torchship" / "local"
    kept = json.loads((reference / "serving.json").read_text())
    assert (kept["model"], kept["variant"], kept["version"], kept["target"]) == (
        "torchship", chosen, 1, "local")
    assert 0.85 < kept["test_accuracy"] <= 1 and kept["p99_ms"] > 0
    statistics = json.loads((reference / "statistics.json").read_text())
    assert statistics["labels"]["counts"] and all(
        sum(f["histogram"]["counts"]) == statistics["n_rows"]
        for f in statistics["features"].values())
    assert (f"reference: torchship version 1 ({chosen}) and its training statistics "
            "kept in") in done.stdout
    # `torchship retrain-status` reads it: what serves, and a new file's drift by feature.
    from sklearn.datasets import load_digits

    digits = load_digits(as_frame=True).frame
    digits.assign(pixel_3_3=digits["pixel_3_3"] + 8).to_csv(tmp_path / "new.csv", index=False)
    status = torchship("retrain-status", "--reference", str(reference),
                       "--data", str(tmp_path / "new.csv"))
    assert status.returncode == 0, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith(
        f"serving: torchship version 1 (local, variant {chosen}), test accuracy ")
    assert "decisions: none yet" in lines and f"{tmp_path / 'new.csv'} against the reference: drifted" in status.stdout
    moved = [line.split() for line in lines if line.strip().startswith("pixel_")]
    assert [row[0] for row in moved if row[-1] == "yes"] == ["pixel_3_3"] and len(moved) == 64

    # The HTML report is self-contained, with its plots embedded.
    html = paths["report"].read_text()
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) >= 2
    assert "http://" not in html and "https://" not in html


def test_an_rgb_image_folder_goes_through_as_images_to_a_resnet_on_triton(pipeline_yaml,
                                                                          tmp_path):
    """Images stay [C, H, W] from prepare-data to the served model: a stock tritonclient sees
    one FP32 input [-1, 3, 32, 32] and logits [-1, 4]."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    write_rgb_image_folder(tmp_path / "images")
    done = torchship_run(
        pipeline_yaml, tmp_path / "runs", "--data-source", str(tmp_path / "images"),
        "--model", "resnet", "--epochs", "5",
        # The defaults, given as a dict parameter: its numbers reach the component as doubles.
        "-p", 'model_options={"width": 16, "blocks": [2, 2, 2]}',
        "--batch-size", "16", "--finetune-epochs", "1",
        "--variants", "fp32,structured,int8", "--bench-duration", "1", "--concurrency", "1,2",
        "--target-concurrency", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    paths = printed_paths(done.stdout)
    rows = {row["variant"]: row for row in json.loads(paths["results"].read_text())["rows"]}
    assert set(rows) == {"fp32", "structured", "int8"}
    assert rows["fp32"]["test_accuracy"] > 0.75  # four classes: chance is 0.25
    assert rows["structured"]["onnx_size_bytes"] < rows["fp32"]["onnx_size_bytes"] / 2
    gate = json.loads(paths["gate"].read_text())
    assert gate["passed"]

    repository = tmp_path / "runs" / "model_repository"
    with TritonServer(repository) as server:
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        http = httpclient.InferenceServerClient(server.http_url)
        try:
            for metadata in (grpc.get_model_metadata("torchship", as_json=True),
                             http.get_model_metadata("torchship")):
                assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]])
                        for t in metadata["inputs"]] == [("input", "FP32", [-1, 3, 32, 32])]
                assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]])
                        for t in metadata["outputs"]] == [("logits", "FP32", [-1, 4])]
        finally:
            grpc.close()
            http.close()


def test_a_text_table_goes_through_as_token_ids_to_a_bert_on_triton(pipeline_yaml, tmp_path):
    """Text is tokenised by the model directory's own WordPiece tokenizer; a tiny BERT-style
    model (random weights, built offline here) is trained and served, and a stock tritonclient
    sees input_ids and attention_mask, INT64 [-1, -1]."""
    import tritonclient.grpc as grpcclient

    reviews = write_text_table(tmp_path / "reviews.csv")
    bert = write_tiny_bert(tmp_path / "bert", pd.read_csv(reviews)["review"].tolist())
    done = torchship_run(
        pipeline_yaml, tmp_path / "runs", "--data-source", str(reviews), "--label-column", "label",
        "--text-column", "review", "--max-length", "16", "--model", f"hf:{bert}",
        "--epochs", "6", "--batch-size", "16", "--learning-rate", "0.003",
        "--variants", "fp32,int8,qat", "--bench-duration", "1", "--concurrency", "1,2",
        "--target-concurrency", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    paths = printed_paths(done.stdout)
    summary = json.loads(paths["results"].read_text())
    rows = {row["variant"]: row for row in summary["rows"]}
    assert set(rows) == {"fp32", "int8"} and rows["fp32"]["test_accuracy"] > 0.8
    assert rows["int8"]["kind"] == "dynamic_quantisation"  # ONNX Runtime's path for BERT
    # QAT does not apply to a transformer: the table says so, and why.
    assert summary["skipped"][0]["name"] == "qat"
    assert "not made: qat: fake-quant fine-tuning is for CNNs and tables" in done.stdout
    gate = json.loads(paths["gate"].read_text())
    assert gate["passed"]

    with TritonServer(tmp_path / "runs" / "model_repository") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            metadata = client.get_model_metadata("torchship", as_json=True)
        finally:
            client.close()
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]])
            for t in metadata["inputs"]] == [("input_ids", "INT64", [-1, -1]),
                                             ("attention_mask", "INT64", [-1, -1])]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]])
            for t in metadata["outputs"]] == [("logits", "FP32", [-1, 2])]

    # `torchship bench` sends the held-out token ids, both inputs, to the deployed model.
    test_split = next((tmp_path / "runs").rglob("prepare-data/test"))
    measured = torchship("bench", str(tmp_path / "runs" / "model_repository"), "--test-data",
                         str(test_split), "--concurrency", "2", "--duration", "1",
                         "--protocol", "http", "-o", str(tmp_path / "bench.json"))
    assert measured.returncode == 0, measured.stdout[-2000:] + measured.stderr[-2000:]
    levels = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(row["model"], row["concurrency"], row["errors"]) for row in levels] == [
        ("torchship", 2, 0)]
    assert levels[0]["throughput_rps"] > 0


def test_gate_that_fails_keeps_the_record_and_does_not_deploy(pipeline_yaml, tmp_path):
    done = torchship_run(pipeline_yaml, tmp_path / "runs", *SMALL, "--variants", "fp32",
                         "--latency-budget-ms", "0.001")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "not deployed: the serving version is unchanged" in done.stderr
    gate = json.loads(printed_paths(done.stdout)["gate"].read_text())
    assert not gate["passed"]
    assert any(c["name"] == "p99 latency" and not c["passed"] for c in gate["checks"])
    assert "gate: FAILED" in done.stdout
    assert "Executing task 'deploy'" not in done.stdout
    assert "Executing task 'tune-serving'" not in done.stdout
    assert not list((tmp_path / "runs").rglob("deploy"))
    assert not (tmp_path / "runs" / "torchship-reference").exists()  # nothing serves: no reference


def assert_refused_in_one_line(pipeline_yaml: Path, tmp_path: Path, case: str, args: list[str],
                               expected: str) -> None:
    """`torchship run` with `args` ends with exit status 2 and one `error:` line holding
    `expected`, and no model artifact was written."""
    root = tmp_path / "runs"
    done = torchship_run(pipeline_yaml, root, *[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2, (case, done.stdout[-2000:], done.stderr[-2000:])
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, done.stderr
    assert expected in error_lines[0], error_lines[0]
    # Refused before training: by the preflight (no stage) or by prepare-data.
    started = re.findall(r"Executing task '([\w-]+)'", done.stdout)
    assert started in ([], ["prepare-data"]), (case, started)
    assert not root.exists(), (case, list(root.rglob("*")))  # no run folder left either


def write_table(path: Path, frame: pd.DataFrame) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("case", "args", "expected"),
    [
        ("missing file", ["--data-source", "{tmp}/nowhere.csv"], "does not exist"),
        ("missing label column", ["--data-source", "{tmp}/t.csv", "--label-column", "target"],
         "--label-column"),
        ("non-numeric features", ["--data-source", "{tmp}/text.csv"], "columns b;"),
        ("empty table", ["--data-source", "{tmp}/empty.parquet"], "empty"),
        ("unknown model", ["--model", "resnet9000"], "resnet9000"),
    ],
)
def test_bad_input_fails_with_one_clear_line_before_training(
        pipeline_yaml, tmp_path, case, args, expected):
    write_table(tmp_path / "t.csv", labelled_table())
    text = labelled_table()
    text["b"] = "x"
    write_table(tmp_path / "text.csv", text)
    write_table(tmp_path / "empty.parquet", labelled_table().iloc[:0])

    assert_refused_in_one_line(pipeline_yaml, tmp_path, case, args, expected)


def images_and_models(tmp: Path) -> None:
    """What the cases below get wrong: an image of another size among 32x32 ones; a model
    directory without its weights; a tokenizer of another vocabulary than the model's."""
    from PIL import Image

    write_rgb_image_folder(tmp / "photos", per_class=6)
    Image.new("RGB", (48, 20), (200, 10, 10)).save(tmp / "photos" / "class0" / "wide.png")
    reviews = write_text_table(tmp / "reviews.csv", rows=60)
    texts = pd.read_csv(reviews)["review"].tolist()
    write_tiny_bert(tmp / "bert", texts)
    write_tiny_bert(tmp / "weightless", texts)
    for weights in (tmp / "weightless").glob("model.safetensors*"):
        weights.unlink()
    write_tiny_bert(tmp / "other", ["a tokenizer trained on other words entirely"] * 3)


TEXT = ["--data-source", "{tmp}/reviews.csv", "--text-column", "review", "--max-length", "12"]


@pytest.mark.parametrize(
    ("case", "args", "expected"),
    [
        ("images of mixed sizes", ["--data-source", "{tmp}/photos", "--model", "resnet"],
         "pass --image-size N to resize them all"),
        ("hf directory without weights", [*TEXT, "--model", "hf:{tmp}/weightless"],
         "has no weights (model.safetensors or pytorch_model.bin)"),
        ("tokenizer of another vocabulary", [*TEXT, "--model", "hf:{tmp}/bert",
                                             "--tokenizer", "{tmp}/other"],
         "has a vocabulary of"),
    ],
)
def test_bad_images_and_models_fail_with_one_clear_line(
        pipeline_yaml, tmp_path, case, args, expected):
    images_and_models(tmp_path)
    assert_refused_in_one_line(pipeline_yaml, tmp_path, case, args, expected)


def test_keep_runs_removes_only_the_oldest_run_folders(tmp_path):
    runs = [tmp_path / f"torchship-2026-11-2{day}-10-00-00-00000{day}" for day in (5, 6, 7)]
    others = [tmp_path / "model_repository", tmp_path / "torchship-latest", tmp_path / "notes.txt"]
    for folder in [*runs, *others[:2]]:
        (folder / "inside").mkdir(parents=True)
    others[2].write_text("kept")
    assert prune_runs(tmp_path, keep=2) == [runs[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in [*runs[1:], *others])
    assert prune_runs(tmp_path, keep=2) == []


def test_keep_runs_below_one_is_refused_before_anything_runs(tmp_path):
    done = torchship("run", "--keep-runs", "0", "--pipeline-root", str(tmp_path / "runs"))
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --keep-runs 0 would remove the run being made; pass 1 "
                                   "or more, or leave it out to keep every run")
    assert not (tmp_path / "runs").exists()
