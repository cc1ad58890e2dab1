"""Never deploy a wrong model: a model no better than always guessing the most frequent class, or
worse than the one the repository serves now, is not deployed, with no `--baseline` given, and the
versions served stay byte for byte what they were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from artifacts import digest
from processes import torchship

QUICK = ["--epochs", "3", "--finetune-epochs", "1", "--bench-duration", "1", "--variants", "fp32",
         "--concurrency", "1", "-p", "serving_instance_counts=[]",
         "-p", "serving_queue_delays_us=[]"]


def table(path: Path, informative: bool, rows: int = 300) -> Path:
    """Four features and a 3-class label (60/20/20 %): the features say the class, or nothing."""
    rng = np.random.default_rng(3)
    label = np.repeat([0, 1, 2], [rows * 3 // 5, rows // 5, rows // 5])
    features = rng.normal(size=(rows, 4))
    if informative:
        features[np.arange(rows), label] += 4.0
    frame = pd.DataFrame(features, columns=["a", "b", "c", "d"])
    frame["label"] = label
    frame.sample(frac=1.0, random_state=0).to_csv(path, index=False)
    return path



def gate_of(done) -> dict:
    """The gate record of a run the gate stopped: exit 1, nothing deployed."""
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "not deployed: the serving version is unchanged" in done.stderr
    assert "Executing task 'deploy'" not in done.stdout
    [path] = [line.split(": ", 1)[1] for line in done.stdout.splitlines()
              if line.startswith("gate: /")]
    gate = json.loads(Path(path).read_text())
    assert gate["passed"] is False
    return gate


def test_a_model_no_better_than_chance_or_than_what_serves_is_not_deployed(pipeline_yaml,
                                                                          tmp_path):
    root, repository = tmp_path / "runs", tmp_path / "served"
    good, noise = table(tmp_path / "good.csv", True), table(tmp_path / "noise.csv", False)

    def run(data: Path, served: Path, *args: str):
        return torchship("run", str(pipeline_yaml), "--pipeline-root", str(root),
                         "--local-repository", str(served), "--data-source", str(data),
                         *QUICK, *args, timeout=600)

    # `--concurrency 1` alone: the gate's concurrency follows the measured level.
    first = run(good, repository)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "target concurrency 1: the largest measured level up to the default 4" in first.stdout
    assert "deployed: fp32 as version 1 of" in first.stdout
    before = digest(repository)

    # Features that say nothing about the label, on a first run (an empty repository, no
    # baseline, accuracy floor 0): the model can only guess the majority class.
    # With no baseline the first-run accuracy bar is the larger of the floor and the test
    # split's majority-class rate, and the model does not clear it.
    chance = {c["name"]: c for c in gate_of(run(noise, tmp_path / "empty"))["checks"]}
    accuracy = chance["accuracy"]
    assert accuracy["passed"] is False and accuracy["status"] == "failed", accuracy
    assert accuracy["bar"]["applied"] == "majority-class rate", accuracy
    # Class '0' is 60% of the rows; the test split holds about 45 of them, split by row hash.
    assert 0.45 < accuracy["threshold"] < 0.8
    assert "first run" in accuracy["detail"] and "always predicting '0'" in accuracy["detail"]
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())

    # A worse model of the same data, no --baseline given: the serving model is the baseline,
    # measured on this run's test split.
    worse = gate_of(run(good, repository, "--learning-rate", "1e-6", "--epochs", "1"))
    accuracy = next(c for c in worse["checks"] if c["name"] == "accuracy")
    assert not accuracy["passed"] and "vs serving baseline 1.0000" in accuracy["detail"], accuracy
    # What the repository serves is what the first run's serving record names.
    source = worse["baseline"]["source"]
    assert source.startswith(
        f"serving record {root}/torchship-reference/torchship/local/serving.json ('"), source
    assert source.endswith("' version 1), measured on this run's test split"), source
    assert digest(repository) == before
