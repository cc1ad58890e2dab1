"""The data step as a Beam pipeline (DirectRunner): a table, an image folder and a text table
become sharded splits; the same source gives the same shards byte for byte; the index's checksums
and row counts are the files'; a bad row deep in the source leaves nothing; progress is shown."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from artifacts import write_text_table, write_tiny_bert
from test_data import table, write_image_folder

from torchship.components.data import chunks, plan
from torchship.components.data.runners import BeamRunner
from torchship.components.data.shards import INDEX
from torchship.components.data.splits import load_split, split_index
from torchship.components.data.stage import prepare_data
from torchship.components.errors import UserInputError

SPLITS = ("train", "val", "test")


def paths(directory: Path) -> list[str]:
    return [str(directory / split) for split in SPLITS]


def files(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by its relative path."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few hundred rows and tasks of a few images, so that a small source is read as
    several tasks and chunks, as a large one is."""
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 40 * 8 * 8)  # 40 rows of 8 float64 features
    monkeypatch.setattr(chunks, "MIN_CHUNK_ROWS", 40)
    monkeypatch.setattr(plan, "IMAGES_PER_TASK", 16)


def sources(tmp_path: Path) -> dict[str, dict]:
    frame = table(60)
    for i in range(5):  # more features: a row of the table is 8 float64 values
        frame[f"extra{i}"] = np.random.default_rng(i).normal(size=len(frame))
    frame.to_parquet(tmp_path / "flowers.parquet", row_group_size=50)
    write_image_folder(str(tmp_path / "shapes"), per_class=30)
    reviews = write_text_table(tmp_path / "reviews.csv")
    bert = write_tiny_bert(tmp_path / "bert", pd.read_csv(reviews)["review"].tolist())
    return {
        "table": {"source": str(tmp_path / "flowers.parquet"), "label_column": "species"},
        "images": {"source": str(tmp_path / "shapes"), "label_column": ""},
        "text": {"source": str(reviews), "label_column": "label", "text_column": "review",
                 "max_length": 16, "model_name": f"hf:{bert}"},
    }


@pytest.mark.usefixtures("small_chunks")
def test_a_table_an_image_folder_and_a_text_table_give_the_same_shards_twice(tmp_path, capsys):
    for kind, arguments in sources(tmp_path).items():
        runs = []
        for run in ("first", "second"):
            out = tmp_path / kind / run
            meta = prepare_data(**arguments, train_path=str(out / "train"),
                                val_path=str(out / "val"), test_path=str(out / "test"), seed=7,
                                runner=BeamRunner(runner="DirectRunner"))
            runs.append(files(out))
        assert runs[0] == runs[1], kind  # every shard and every index, byte for byte
        assert sum(meta["n_shards"].values()) > 3, kind  # read as several chunks
        total = 0
        for split in SPLITS:
            folder = tmp_path / kind / "first" / split
            index = json.loads((folder / INDEX).read_text())
            for entry in index["shards"]:
                data = (folder / entry["file"]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry
                assert len(data) == entry["bytes"] and sum(entry["row_groups"]) == entry["rows"]
            loaded = load_split(str(folder))
            assert len(loaded) == index["n_rows"] == meta["n_rows"][split]
            assert np.bincount(loaded.y, minlength=len(loaded.class_names)).tolist() \
                == index["class_counts"]
            total += len(loaded)
        assert total == {"table": 180, "images": 90}.get(kind, total), kind
    out = capsys.readouterr().out
    assert "data: chunk" in out and "rows/s" in out and "MB/s" in out


@pytest.mark.usefixtures("small_chunks")
def test_the_seed_moves_rows_between_splits_and_rows_keep_their_keys(tmp_path):
    source = tmp_path / "flowers.csv"
    table(60).to_csv(source, index=False)
    keys = {}
    for seed in (0, 1):
        out = tmp_path / str(seed)
        prepare_data(str(source), "species", *paths(out), seed=seed)
        keys[seed] = {split: set(split_index(str(out / split)).read(
            split_index(str(out / split)).pieces(), keys=True)["row_key"].tolist())
            for split in SPLITS}
    every = set().union(*keys[0].values())
    assert every == set().union(*keys[1].values()) and len(every) == 180
    assert keys[0]["test"] != keys[1]["test"]


@pytest.mark.usefixtures("small_chunks")
def test_a_bad_row_deep_in_the_source_leaves_nothing(tmp_path):
    frame = table(60)
    frame.loc[170, "petal"] = np.inf  # in the last chunk, read after the first were written
    source = tmp_path / "flowers.csv"
    frame.to_csv(source, index=False)
    with pytest.raises(UserInputError) as error:
        prepare_data(str(source), "species", *paths(tmp_path / "out"))
    assert "missing or infinite values in feature columns petal" in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_dataflow_runner_without_its_settings_is_refused_before_reading(tmp_path):
    with pytest.raises(UserInputError, match="dataflow"):
        prepare_data("digits", "", *paths(tmp_path / "out"),
                     runner=BeamRunner(runner="DataflowRunner"))
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("small_chunks")
def test_image_tasks_read_from_a_listing_write_the_same_shards(tmp_path):
    """For a remote runner the file names go to a listing (the job graph stays small); workers
    read their byte range of it and write the very shards the in-graph file lists give."""
    from torchship.components.data.beam_prepare import run_pipeline
    from torchship.components.data.chunks import write_listing

    write_image_folder(str(tmp_path / "shapes"), per_class=30)
    planned = plan.plan_source(str(tmp_path / "shapes"), "")
    assert len(planned.tasks) > 2
    listed = write_listing(planned.tasks, str(tmp_path / "listing.jsonl"))
    assert all(not task.files and task.listing for task in listed)
    assert [t.image_files() for t in listed] == [list(t.files) for t in planned.tasks]
    runs = {}
    for name, tasks in (("inline", planned.tasks), ("listing", listed)):
        outputs = {split: str(tmp_path / name / split) for split in SPLITS}
        for folder in outputs.values():
            Path(folder).mkdir(parents=True)
        run_pipeline(planned.spec, tasks, outputs, 0, 0.15, 0.15, BeamRunner(),
                     str(tmp_path / name / "result.json"))
        result = json.loads((tmp_path / name / "result.json").read_text())
        assert not result["problems"] and result["rows"] == 90
        runs[name] = {k: v for k, v in files(tmp_path / name).items() if k != "result.json"}
    assert runs["inline"] == runs["listing"] and len(runs["inline"]) > 3


def test_a_remote_runner_is_refused_splits_on_this_machines_disk(tmp_path):
    """Flink or Dataflow workers cannot write to the launcher's disk: the splits must be in a
    bucket (a /gcs/ or /s3/ artifact path, or a URL)."""
    runner = BeamRunner(runner="PortableRunner", job_endpoint="localhost:8099")
    with pytest.raises(UserInputError, match="cannot write to; set the pipeline root to a bucket"):
        prepare_data("digits", "", *paths(tmp_path / "out"), runner=runner)
    assert not (tmp_path / "out").exists()


def test_a_text_table_keeps_its_characters_per_text_and_the_trigger_judges_by_them(tmp_path):
    """Text drift without a tokenizer: prepare-data keeps the histogram of characters per text
    (and of tokens); the trigger's measure compares a new table's texts by their characters."""
    from torchship.components.data.drift import Thresholds, drift

    text = sources(tmp_path)["text"]
    meta = prepare_data(text["source"], text["label_column"],
                        *(str(tmp_path / "out" / split) for split in ("train", "val", "test")),
                        text_column="review", max_length=16, model_name=text["model_name"])
    statistics = meta["statistics"]
    assert statistics["kind"] == "text" and statistics["text_column"] == "review"
    characters = statistics["features"]["characters"]
    assert sum(characters["histogram"]["counts"]) == statistics["n_rows"]
    assert 0 < characters["min"] <= characters["mean"] <= characters["max"]
    assert statistics["features"]["tokens"]["max"] <= 16

    same = pd.read_csv(text["source"])
    longer = same.assign(review=same["review"] + " and then some more words were written here")
    judged = {name: drift(statistics, frame, Thresholds())
              for name, frame in (("same", same), ("longer", longer))}
    assert list(judged["same"]["features"]) == ["characters"] and not judged["same"]["drifted"]
    assert judged["longer"]["moved"] == ["characters"] and judged["longer"]["drifted"]
    assert judged["longer"]["features"]["characters"]["js_distance"] > 0.5
    assert drift(statistics, same.drop(columns="review"), Thresholds())["missing"] == ["review"]
