"""The compiled pipeline, run end to end under kfp.local on real parts, and its bad-input errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

TORCHSHIP = [sys.executable, "-m", "torchship.pipelines.cli"]
SMALL = ["--epochs", "3", "--finetune-epochs", "1", "--bench-duration", "1",
         "--concurrency", "1,2"]


@pytest.fixture(scope="module")
def pipeline_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compiled") / "torchship.yaml"
    subprocess.run([*TORCHSHIP, "compile", "--output", str(path)], check=True,
                   capture_output=True)
    return path


def torchship_run(pipeline_yaml: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TORCHSHIP, "run", str(pipeline_yaml), "--pipeline-root", str(root), *args],
        capture_output=True, text=True, timeout=600, check=False,
    )


def test_compiled_pipeline_runs_end_to_end_on_real_triton(pipeline_yaml, tmp_path):
    done = torchship_run(pipeline_yaml, tmp_path / "runs", *SMALL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # Progress from inside the stages reaches the user: epochs and benchmark levels.
    assert "epoch 3/3" in done.stdout
    assert "Task 'benchmark' finished with status SUCCESS" in done.stdout

    results_line = next(line for line in done.stdout.splitlines() if line.startswith("results: "))
    summary = json.loads(Path(results_line.split(": ", 1)[1]).read_text())
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

    # The deployed repository is a Triton repository with a version per model.
    repositories = list((tmp_path / "runs").rglob("model_repository"))
    assert len(repositories) == 1
    for name in rows:
        assert (repositories[0] / name / "config.pbtxt").is_file()
        assert (repositories[0] / name / "1" / "model.onnx").is_file()


def write_table(path: Path, frame: pd.DataFrame) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


def table(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(n, 4)), columns=["a", "b", "c", "d"])
    frame["label"] = np.arange(n) % 3
    return frame


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
    write_table(tmp_path / "t.csv", table())
    text = table()
    text["b"] = "x"
    write_table(tmp_path / "text.csv", text)
    write_table(tmp_path / "empty.parquet", table().iloc[:0])

    root = tmp_path / "runs"
    done = torchship_run(pipeline_yaml, root, *[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2, (case, done.stdout[-2000:], done.stderr[-2000:])
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, done.stderr
    assert expected in error_lines[0], error_lines[0]
    # Nothing was trained: no model artifact was written.
    assert not [p for p in root.rglob("model") if p.is_file()]
