"""Input at fault fails in the first seconds: `torchship run`, `submit` and `schedule create` refuse
it before any stage runs (preflight), or in prepare-data (what only the whole data set shows),
with exit status 2 and one `error:` line, and leave nothing on disk."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from artifacts import N_CLASSES, N_FEATURES, labelled_table
from processes import error_lines, torchship

from torchship.pipelines.preflight import preflight_run

STARTED = re.compile(r"Executing task '([\w-]+)'")


def refused(pipeline_yaml: Path | str, root: Path, *args: str, command: str = "run",
            timeout: float = 120) -> tuple[str, list[str]]:
    """Run `torchship <command>`; it must exit 2 with one error line and no traceback. Returns
    the line and the stages that started."""
    where = ["--pipeline-root", str(root)] if command == "run" else []
    done = torchship(*command.split(), str(pipeline_yaml), *where, *args, timeout=timeout)
    assert done.returncode == 2, (args, done.stdout[-2000:], done.stderr[-2000:])
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(lines[0]) < 600, lines[0]
    return lines[0], STARTED.findall(done.stdout)


def write_cases(tmp: Path) -> None:
    """One file per kind of bad input a person really produces."""
    table = labelled_table(90)
    table.to_csv(tmp / "data.csv", index=False)
    (tmp / "dup.csv").write_text(table.to_csv(index=False).replace("a,b,c,d,label",
                                                                   "a,label,c,d,label", 1))
    table.sort_values("label").to_csv(tmp / "index.csv")  # the pandas index written as a column
    numbered = table.copy()
    numbered.insert(0, "row", np.arange(len(numbered)))
    numbered.to_csv(tmp / "numbered.csv", index=False)
    table.to_csv(tmp / "semicolon.csv", sep=";", index=False)
    floats = table.copy()
    floats["label"] = np.random.default_rng(1).normal(size=len(floats)) * 1000
    floats.to_csv(tmp / "float_label.csv", index=False)
    two = table.copy()
    two["label"] = np.arange(len(two)) % 2
    two.to_csv(tmp / "two_classes.csv", index=False)
    (tmp / "file").write_text("not a folder")
    (tmp / "garbage.json").write_text("{not json")
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "summary.json").write_text(json.dumps({"rows": []}))
    (tmp / "hf_empty").mkdir()


@pytest.mark.parametrize(("case", "args", "expected"), [
    ("a CSV where the pipeline YAML goes", ["CSV"],
     "pipeline file '{tmp}/data.csv' is not a compiled pipeline"),
    ("a pipeline root that is a file", ["ROOT={tmp}/file"],
     "--pipeline-root '{tmp}/file' is a file, not a folder"),
    ("a repository path that is a file", ["--local-repository", "{tmp}/file"],
     "--local-repository '{tmp}/file' is a file, not a folder"),
    ("a baseline that does not exist", ["--baseline", "{tmp}/gone.json"],
     "--baseline '{tmp}/gone.json' does not exist; pass the gate.json"),
    ("a baseline that is no gate record", ["--baseline", "{tmp}/list.json"],
     "is not a gate record (with 'variants')"),
    ("garbage previous results", ["--previous-results", "{tmp}/garbage.json"],
     "--previous-results '{tmp}/garbage.json' is not JSON"),
    ("previous results of another kind", ["--previous-results", "{tmp}/summary.json"],
     "is not benchmark results (with 'results')"),
    ("a sparsity above 1", ["--target-sparsity", "1.5"], "target_sparsity=1.5 is not in [0, 1)"),
    ("a parameter that does not exist", ["-p", "epoch=3"],
     "parameter 'epoch' is not a parameter of this pipeline; did you mean 'epochs'?"),
    ("a parameter of the wrong type", ["-p", "epochs=ten"],
     "parameter epochs='ten' is not a whole number; pass e.g. -p epochs=10"),
    ("a list where a number goes", ["-p", "learning_rate=[1]"],
     "parameter learning_rate=[1] is not a number"),
    ("no workers", ["--workers", "0"], "--workers must be a positive integer, got 0"),
    ("a metric the gate cannot optimise", ["-p", "optimise=speed"],
     "parameter optimise='speed' is not a metric of the variant table"),
    ("a model module that does not import", ["--model", "no_such_module_here:make"],
     "module 'no_such_module_here' could not be imported"),
    ("a Hugging Face directory without config.json", ["--model", "hf:{tmp}/hf_empty"],
     "hf_empty' has no config.json; pass a directory written by save_pretrained"),
    ("a semicolon-separated CSV", ["--data-source", "{tmp}/semicolon.csv"],
     "looks semicolon-separated (its header 'a;b;c;d;label' reads as one column)"),
    ("the label header twice", ["--data-source", "{tmp}/dup.csv"],
     "has the column 'label' twice (columns 2 and 5)"),
    ("a pandas index written as a column", ["--data-source", "{tmp}/index.csv"],
     "has the column 'Unnamed: 0', a pandas index written with the rows"),
    ("a column that is the row number", ["--data-source", "{tmp}/numbered.csv"],
     "column 'row' is the row number (0, 1, 2, ...)"),
    ("a continuous label", ["--data-source", "{tmp}/float_label.csv"],
     "label column 'label' looks continuous (90 distinct values"),
])
def test_input_at_fault_is_refused_before_any_stage_runs(pipeline_yaml, tmp_path, case, args,
                                                         expected):
    write_cases(tmp_path)
    root = tmp_path / "runs"
    before = sorted(p.name for p in tmp_path.iterdir())
    pipeline = pipeline_yaml
    if args[0] == "CSV":
        pipeline, args = tmp_path / "data.csv", args[1:]
    elif args[0].startswith("ROOT="):
        root, args = Path(args[0][5:].format(tmp=tmp_path)), args[1:]
    line, started = refused(pipeline, root, *[a.format(tmp=tmp_path) for a in args])
    assert expected.format(tmp=tmp_path) in line, line
    assert started == [], started  # no stage ran
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, nothing new
    assert (tmp_path / "file").read_text() == "not a folder"


def test_data_of_another_shape_than_the_repository_serves_is_refused_first(
        pipeline_yaml, tmp_path, local_repo):
    """The repository serves 3-class models of 8 features: a 2-class table, and a 3-class table
    of 4 features, would fail only at deploy after minutes of training."""
    assert (N_CLASSES, N_FEATURES) == (3, 8)
    write_cases(tmp_path)
    line, started = refused(pipeline_yaml, tmp_path / "runs", "--data-source",
                            str(tmp_path / "two_classes.csv"), "--local-repository",
                            str(local_repo))
    assert f"two_classes.csv' has 2 classes, but model 'fp32' there answers 3 in {local_repo}" \
        in line and "deploy to a new repository (--local-repository DIR)" in line, line
    assert started == []
    line, _ = refused(pipeline_yaml, tmp_path / "runs", "--data-source",
                      str(tmp_path / "data.csv"), "--local-repository", str(local_repo))
    assert "has 4 features, but model 'fp32' there takes 8" in line, line
    assert not (tmp_path / "runs").exists()


def test_constant_features_are_refused_by_prepare_data_and_the_run_folder_removed(
        pipeline_yaml, tmp_path):
    """Only the whole table shows that no feature varies: prepare-data refuses it, training never
    starts, and the run folder it was given is gone."""
    table = labelled_table(90)
    table[["a", "b", "c", "d"]] = 1.0
    table.to_csv(tmp_path / "constant.csv", index=False)
    line, started = refused(pipeline_yaml, tmp_path / "runs", "--data-source",
                            str(tmp_path / "constant.csv"), timeout=240)
    assert "every feature column is constant ('a', 'b', 'c', 'd')" in line, line
    assert started == ["prepare-data"], started
    assert not (tmp_path / "runs").exists()


def test_a_float_label_is_one_short_line_not_a_list_of_every_value(tmp_path):
    from torchship.components.data.stage import prepare_data
    from torchship.components.errors import UserInputError

    table = labelled_table(2000)
    table["label"] = np.linspace(0, 1, len(table))
    table.to_csv(tmp_path / "measured.csv", index=False)
    with pytest.raises(UserInputError) as excinfo:
        prepare_data(str(tmp_path / "measured.csv"), "label", *(str(tmp_path / f"{s}.npz")
                                                               for s in ("tr", "va", "te")))
    message = str(excinfo.value)
    assert len(message) < 300 and "regression is not supported" in message, message
    assert not list(tmp_path.glob("*.npz"))


def test_some_constant_features_are_a_warning_in_the_record(tmp_path):
    from torchship.components.data.stage import prepare_data

    table = labelled_table(90)
    table["d"] = 5.0
    table.to_csv(tmp_path / "t.csv", index=False)
    meta = prepare_data(str(tmp_path / "t.csv"), "label", *(str(tmp_path / f"{s}.npz")
                                                          for s in ("tr", "va", "te")))
    assert meta["warnings"] == [("1 of 4 feature columns never change ('d'); they carry no "
                                 "information and could be dropped")]


def test_target_concurrency_follows_the_measured_levels(pipeline_yaml, tmp_path):
    """`--concurrency 1` alone is a valid request: the gate's level follows the sweep."""
    for levels, target in (([1], 1), ([2, 8], 2), ([8, 16], 8), ([1, 4], None)):
        arguments = {"benchmark_concurrency": levels}
        preflight_run(str(pipeline_yaml), str(tmp_path / "runs"), arguments, {})
        assert arguments.get("target_concurrency") == target, (levels, arguments)
    refused_line, _ = refused(pipeline_yaml, tmp_path / "runs", "--concurrency", "1,2",
                              "--target-concurrency", "8")
    assert "is not a measured level ([1, 2])" in refused_line


@pytest.mark.parametrize(("command", "args", "expected"), [
    ("submit", ["-p", "data_source={tmp}/data.csv"],
     ("parameter data_source='{tmp}/data.csv' is a path on this machine, which Vertex AI cannot "
      "read; upload it")),
    ("submit", ["--kfp-host", "http://127.0.0.1:9", "-p", "baseline_uri=gate.json"],
     "which Kubeflow Pipelines at http://127.0.0.1:9 cannot read"),
    ("schedule create", ["--cron", "0 3 * * *", "-p", "epochs=many"],
     "parameter epochs='many' is not a whole number"),
    ("submit", ["CSV"], "pipeline file '{tmp}/data.csv' is not a compiled pipeline"),
])
def test_cloud_runs_are_checked_before_anything_is_sent(pipeline_yaml, tmp_path, command, args,
                                                        expected):
    write_cases(tmp_path)
    template = pipeline_yaml
    if args == ["CSV"]:
        template, args = tmp_path / "data.csv", []
    line, _ = refused(template, tmp_path, *[a.format(tmp=tmp_path) for a in args],
                      "--project", "p", "--pipeline-root", "gs://b/r", command=command)
    assert expected.format(tmp=tmp_path) in line, line


def test_bench_with_a_csv_as_test_data_is_one_line(local_repo, tmp_path):
    pd.DataFrame({"a": [1, 2]}).to_csv(tmp_path / "rows.csv", index=False)
    line, _ = refused(local_repo, tmp_path, "--test-data", str(tmp_path / "rows.csv"),
                      command="bench")
    assert f"'{tmp_path}/rows.csv' is not a split written by prepare_data" in line, line


def test_a_model_factory_that_cannot_learn_the_table_is_refused_before_any_stage(
        pipeline_yaml, tmp_path):
    """Built and called once on the table's shape, as training would, in the first seconds."""
    (tmp_path / "preflight_models.py").write_text(
        "import torch\n\n"
        "def too_wide(n_features, n_classes):\n"
        "    return torch.nn.Linear(n_features, n_classes + 2)\n\n"
        "def not_a_model(n_features, n_classes):\n"
        "    return 42\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for factory, expected in (("too_wide", "expected logits [3, 10]"),
                              ("not_a_model", "returned a int, not a torch.nn.Module")):
        done = torchship("run", str(pipeline_yaml), "--pipeline-root", str(tmp_path / "runs"),
                         "--model", f"preflight_models:{factory}", env=env, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        [line] = error_lines(done.stderr)
        assert expected in line and "Executing task" not in done.stdout, line
        assert not (tmp_path / "runs").exists()
