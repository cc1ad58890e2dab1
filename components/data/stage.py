"""prepare_data: turn a data source into train/val/test splits, each a folder of Parquet shards
with an index (`shards`), written by an Apache Beam pipeline (`beam_prepare`)."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from torchship.components.contracts import (
    BATCH,
    HF_PREFIX,
    INPUT_NAME,
    SPLITS,
    TensorContract,
    TensorSpec,
)
from torchship.components.data.beam_results import merge_moments
from torchship.components.data.chunks import write_listing
from torchship.components.data.images import CHANNELS
from torchship.components.data.plan import (
    DEFAULT_SOURCE,
    DIGITS_IMAGES,
    SOURCE_KINDS,
    Plan,
    class_order,
    newest_table,
    plan_source,
)
from torchship.components.data.sanity import check_spread
from torchship.components.data.shards import write_index
from torchship.components.data.sources import listed
from torchship.components.data.text import DEFAULT_MAX_LENGTH, check_model_vocabulary
from torchship.components.errors import UserInputError
from torchship.components.files import read_json, write_json
from torchship.components.progress import report

if TYPE_CHECKING:
    from torchship.components.data.runners import BeamRunner

__all__ = ["DEFAULT_LABEL_COLUMN", "DEFAULT_SOURCE", "DIGITS_IMAGES", "KEEP_IMAGE_SIZE",
           "SOURCE_KINDS", "prepare_data", "write_statistics"]

# fsspec, scikit-learn, Beam and the Google SDK are imported inside the functions that use them:
# training workers import the data package only to read splits.

DEFAULT_LABEL_COLUMN = "label"
# image_size 0 keeps the images' own size (they must all have one).
KEEP_IMAGE_SIZE = 0
# The launcher's own files beside the train split's shards while the pipeline runs: the merged
# result, and an image folder's file listing for a remote runner. Removed before publishing.
RESULT, LISTING = ".result.json", ".listing.jsonl"
# A feature whose training std is below this is (near) constant: dividing by it would blow up
# rounding noise, so it is left unscaled (std 1) instead.
STD_FLOOR = 1e-6


def prepare_data(
    source: str,
    label_column: str,
    train_path: str,
    val_path: str,
    test_path: str,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    image_size: int = KEEP_IMAGE_SIZE,
    text_column: str = "",
    tokenizer: str = "",
    max_length: int = DEFAULT_MAX_LENGTH,
    model_name: str = "",
    runner: BeamRunner | None = None,
) -> dict:
    """Split `source` into train/val/test splits, each a folder of Parquet shards with an index,
    and return its metadata, with the tensor contract the splits hold.

    `source` is `digits` (a table of 64 pixels), `digits-images` (1 x 8 x 8 images), a
    CSV/Parquet table with a `label_column`, an `.npz` with arrays `x` and `y`, or a folder of
    images with one sub-folder per class (local or any fsspec URL), resized to `image_size` x
    `image_size` when it is set (0: all must be one size). A table is one float input
    [batch, n_features] standardised per column; images are [batch, C, H, W] standardised per
    channel (with statistics of the training rows, applied as the shards are read). With a
    `text_column` a table is text: tokenised by the `tokenizer` directory (default: an `hf:DIR`
    model's own) to `max_length`, as int64 `input_ids` and `attention_mask` [batch, sequence].

    The work runs as an Apache Beam pipeline on `runner` (DirectRunner by default): each row goes
    to the split a hash of its content (or an image's name) and `seed` choose, so a re-run, or
    new data holding the same rows, splits them the same way. Checks a header or a sample can
    answer run before the pipeline; the rest run on what it merged, and a bad source leaves
    nothing behind.
    """
    from torchship.components.data.beam_prepare import run_pipeline

    _check_fractions(val_fraction, test_fraction)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 0:
        raise UserInputError(f"image_size {image_size!r} is not a whole number >= 0; pass e.g. "
                             "32 to resize images to 32 x 32, or 0 to keep their size")
    if text_column and not tokenizer and model_name.startswith(HF_PREFIX):
        tokenizer = model_name[len(HF_PREFIX):]  # the model's own, saved beside it
    newest = newest_table(source)
    if newest is not None:  # a prefix new data lands under: the newest table, and which it was
        report(f"data: {newest[0]}, the newest of {newest[1]} table{'s' if newest[1] != 1 else ''}"
               f" under {source} (written {newest[2]})")
        source = newest[0]
    plan = plan_source(source, label_column, image_size, text_column, tokenizer, max_length)
    if image_size and not plan.images:
        raise UserInputError(f"image_size {image_size} is for image folders and digits-images; "
                             f"data source '{source}' is a table, so leave it out")
    if runner is None:
        from torchship.components.data.runners import BeamRunner

        runner = BeamRunner()
    runner.check()
    paths = {"train": train_path, "val": val_path, "test": test_path}
    started = time.perf_counter()
    count = len(plan.tasks)
    report(f"data: {count} read task{'s' if count != 1 else ''} on {runner.runner}")
    with _outputs(paths, runner.local) as (outputs, work):
        results_uri, tasks = f"{work}/{RESULT}", plan.tasks
        if plan.spec.kind == "images" and not runner.local:
            tasks = write_listing(tasks, f"{work}/{LISTING}")
        run_pipeline(plan.spec, tasks, outputs, seed, val_fraction, test_fraction, runner,
                     results_uri)
        result = read_json(results_uri)
        meta, indexes = summarise(plan, result, val_fraction, test_fraction, model_name)
        for split, index in indexes.items():
            write_index(outputs[split], index)
    seconds = time.perf_counter() - started
    size = sum(entry["bytes"] for index in indexes.values() for entry in index["shards"])
    shards = sum(len(index["shards"]) for index in indexes.values())
    report(f"data: {result['rows']:,} rows -> {shards} shards, {size / 1e6:.1f} MB in "
           f"{seconds:.1f} s ({result['rows'] / seconds:,.0f} rows/s, "
           f"{size / 1e6 / seconds:.1f} MB/s)")
    return meta


@contextlib.contextmanager
def _outputs(paths: dict[str, str], local: bool):
    """Where the workers write each split, and the folder (the train split's) where the launcher
    keeps its own files (`RESULT`, `LISTING`) until the end. Locally each split
    is built in a staging folder and published whole by one rename; a remote runner's workers
    write to Cloud Storage (a Vertex AI artifact's /gcs/ path, as gs://), where the index, written
    last, is what makes a folder a split. Removed on failure either way."""
    import fsspec

    from torchship.components.files import make_staging_dir, publish_dir

    if local:
        created = _missing_parents(paths.values())
        staging = {split: make_staging_dir(path) for split, path in paths.items()}
        try:
            yield {s: str(p) for s, p in staging.items()}, str(staging["train"])
            for name in (RESULT, LISTING):
                (staging["train"] / name).unlink(missing_ok=True)
            for split, path in paths.items():
                publish_dir(staging[split], path)
        except BaseException:
            for folder in staging.values():
                shutil.rmtree(folder, ignore_errors=True)
            for folder in created:  # deepest first: the folders made for the splits, if empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        return
    remote = {split: _as_uri(path) for split, path in paths.items()}  # refused before a write
    try:
        yield remote, remote["train"].rstrip("/")
        fs, train = fsspec.core.url_to_fs(remote["train"])
        for name in (RESULT, LISTING):
            if fs.exists(f"{train.rstrip('/')}/{name}"):
                fs.rm(f"{train.rstrip('/')}/{name}")
    except BaseException:
        for uri in remote.values():
            fs, path = fsspec.core.url_to_fs(uri)
            if fs.exists(path):
                fs.rm(path, recursive=True)
        raise


def _missing_parents(paths) -> list[Path]:
    """The folders above `paths` that do not exist yet, deepest first."""
    missing: list[Path] = []
    for path in paths:
        for parent in Path(path).absolute().parents:
            if parent.exists():
                break
            if parent not in missing:
                missing.append(parent)
    return sorted(missing, key=lambda folder: len(folder.parts), reverse=True)


# Where the KFP launcher mounts a bucket artifact (Vertex AI: /gcs/; Kubeflow: /s3/ for S3), and
# the URL remote workers write the object at instead.
MOUNTS = {"/gcs/": "gs://", "/s3/": "s3://"}


def _as_uri(path: str) -> str:
    """The bucket URL of a mounted artifact path: remote workers write the object itself. A path
    on this machine's own disk cannot be written by them, and is refused."""
    for mount, scheme in MOUNTS.items():
        if path.startswith(mount):
            return scheme + path[len(mount):]
    if "://" in path:
        return path
    raise UserInputError(
        f"split path '{path}' is on this machine's disk, which a remote Beam runner's workers "
        "cannot write to; set the pipeline root to a bucket (gs://, s3://) or pass "
        "--data-runner DirectRunner")


def summarise(plan: Plan, result: dict, val_fraction: float, test_fraction: float,
              model_name: str = "") -> tuple[dict, dict[str, dict]]:
    """The checks on what the pipeline merged, then the metadata and each split's index."""
    source = plan.spec.source
    if result["problems"]:
        raise UserInputError(min(result["problems"])[1])
    if not result["rows"]:
        raise UserInputError(f"data source '{source}' is empty (no rows); pass a source with rows")
    counts = {split: result["counts"].get(split, {}) for split in SPLITS}
    seen = sorted({label for split in counts.values() for label in split})
    class_names = plan.class_order or class_order(seen)
    if len(class_names) < 2:
        raise UserInputError(
            f"data source '{source}'{' ' + plan.labels_from if plan.labels_from else ''} has a "
            "single class "
            f"'{class_names[0] if class_names else ''}'; pass labels with at least two classes")
    warnings = []
    if plan.table:  # before the class checks: constant rows all hash alike
        spread = merge_moments(sorted(result["spread"], key=lambda part: part["min"]))
        warnings = check_spread(source, spread["max"] - spread["min"], plan.feature_names)
    _check_class_sizes(plan, counts, class_names, val_fraction, test_fraction)
    train = merge_moments(sorted(result["train"], key=lambda part: part["chunk"]))
    assert train is not None  # every class has training rows
    shapes, dtypes = result["shapes"], result["dtypes"]
    if plan.spec.text:
        check_model_vocabulary(model_name, plan.extra, shapes["input_ids"][0],
                               result["extra"].get("largest_token", 0))
        contract = TensorContract.classifier(
            [TensorSpec(name, "int64", (BATCH, "sequence")) for name in shapes], len(class_names))
        statistics = {name: {**{key: float(train[key][i]) for key in ("mean", "min", "max")},
                             "std": float(np.sqrt(train["m2"][i] / train["n"]))}
                      for i, name in enumerate(("tokens", "characters"))}
        standardise = None
        extra = {**plan.extra, "largest_token": result["extra"].get("largest_token", 0)}
        feature_names = ["tokens", "characters"]
    else:
        feature_names = plan.feature_names or CHANNELS["L" if shapes[INPUT_NAME][0] == 1 else "RGB"]
        mean, std = train["mean"], np.sqrt(train["m2"] / train["n"])
        std = np.where(std < STD_FLOOR, 1.0, std)
        contract = TensorContract.classifier(
            [TensorSpec(INPUT_NAME, "float32", (BATCH, *shapes[INPUT_NAME]))], len(class_names))
        statistics = {name: {"mean": float(m), "std": float(sd), "min": float(lo),
                             "max": float(hi)}
                      for name, m, sd, lo, hi in zip(feature_names, mean, std, train["min"],
                                                     train["max"])}
        standardise = {"input": INPUT_NAME, "per": "channel" if plan.images else "feature",
                       "mean": mean.tolist(), "std": std.tolist()}
        extra = {"mean": mean.astype(np.float32).tolist(), "std": std.astype(np.float32).tolist(),
                 "feature_names": feature_names}
    histograms = result.get("histograms") or []
    edges = plan.spec.bin_edges
    for number, name in enumerate(feature_names if histograms else []):
        statistics[name]["histogram"] = {
            "edges": list(edges[number if len(edges) > 1 else 0]), "counts": histograms[number]}
    schema = dict(plan.schema)
    if plan.images:
        height, width = shapes[INPUT_NAME][1:]
        schema = {"image": f"{'L' if shapes[INPUT_NAME][0] == 1 else 'RGB'} {width}x{height}",
                  **schema}
    indexes = {}
    for split in SPLITS:
        shards = sorted(result["shards"].get(split, []), key=lambda entry: entry["file"])
        indexes[split] = {
            "split": split, "n_rows": sum(entry["rows"] for entry in shards),
            "contract": contract.to_dict(), "class_names": class_names,
            "class_counts": [counts[split].get(name, 0) for name in class_names],
            "shapes": shapes, "dtypes": dtypes, "shards": shards, "standardise": standardise,
            "extra": extra}
    meta = {
        "source": source, "contract": contract.to_dict(), "n_features": contract.n_features,
        "n_classes": len(class_names), "class_names": class_names,
        "feature_names": feature_names, "schema": schema,
        "class_counts": {split: {name: counts[split].get(name, 0) for name in class_names}
                         for split in SPLITS},
        "n_rows": {split: indexes[split]["n_rows"] for split in SPLITS},
        "n_shards": {split: len(indexes[split]["shards"]) for split in SPLITS},
        "warnings": warnings,
        # Raw training statistics: the drift trigger (infra/trigger) compares new data with them.
        "statistics": {"source": source, "n_rows": indexes["train"]["n_rows"],
                       "kind": "text" if plan.spec.text else "images" if plan.images else "table",
                       **({"text_column": plan.spec.text_column} if plan.spec.text else {}),
                       "features": statistics,
                       # The training rows' classes: the trigger compares new labels with them.
                       "labels": {"column": plan.spec.label_column,
                                  "counts": dict(counts["train"])}},
    }
    return meta, indexes


def _check_class_sizes(plan: Plan, counts: dict[str, dict[str, int]], class_names: list[str],
                       val_fraction: float, test_fraction: float) -> None:
    """Every class in every split: a class with fewer rows than the smallest split's share
    needs, or one the hash left out of a split, is refused."""
    smallest = min(val_fraction, test_fraction, 1 - val_fraction - test_fraction)
    needed = math.ceil(1 / smallest - 1e-9)
    totals = {name: sum(split.get(name, 0) for split in counts.values()) for name in class_names}
    short = [name for name in class_names if totals[name] < needed]
    unit, where = plan.row_noun, f" {plan.labels_from}" if plan.labels_from else ""
    source = plan.spec.source
    if short:
        named = listed([f"'{name}' ({totals[name]})" for name in short])
        raise UserInputError(
            f"data source '{source}'{where} has too few {unit} for {len(short)} of its "
            f"{len(class_names)} classes ({named}); each class needs at least {needed} {unit} to "
            f"appear in train, val and test: add {unit} or drop rare classes")
    left_out = []
    for name in class_names:
        absent = [split for split, split_counts in counts.items() if not split_counts.get(name)]
        if absent:
            left_out.append(f"'{name}' ({totals[name]} {unit}, none in {' or '.join(absent)})")
    if left_out:
        raise UserInputError(
            f"data source '{source}'{where}: the split by row hash left {len(left_out)} of "
            f"{len(class_names)} classes out of a split ({listed(left_out)}); every class must be "
            f"in train, val and test: add distinct {unit} to those classes, or pass another "
            "--seed")


def write_statistics(statistics: dict, uri: str) -> None:
    """Write the training statistics as JSON to a path or any fsspec URI (gs:// included)."""
    write_json(statistics, uri)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserInputError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must each be between "
            "0 and 1 and sum to less than 1; pass e.g. val_fraction=0.15, test_fraction=0.15"
        )

