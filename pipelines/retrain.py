"""`torchship retrain-status`: what serves now, the trigger's last decisions, and how far a data
file or image folder is from the training data of what serves, read from the reference a
deploying run keeps (components/deploy/reference.py) with the trigger's own measures
(components/data/drift.py)."""

from __future__ import annotations

import json
from typing import Any

from torchship.components.contracts import REFERENCE_SERVING as SERVING
from torchship.components.contracts import REFERENCE_STATISTICS as STATISTICS
from torchship.components.data.drift import (
    MAX_IMAGES,
    Thresholds,
    drift,
    image_drift,
    image_files,
    newest_table,
    read_table,
)
from torchship.components.errors import UserInputError
from torchship.components.files import read_json

__all__ = ["status_lines"]


def _decisions(reference_uri: str, newest: int) -> list[dict[str, Any]]:
    import fsspec

    fs, folder = fsspec.core.url_to_fs(reference_uri.rstrip("/") + "/decisions")
    if not fs.exists(folder):
        return []
    names = sorted(path for path in fs.ls(folder, detail=False)
                   if path.endswith(".json") and not path.endswith("latest.json"))
    return [json.loads(fs.cat_file(path)) for path in names[-newest:]] if newest else []


def _is_folder(data: str) -> bool:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(data)
        return bool(fs.isdir(path))
    except (OSError, ValueError, ImportError):
        return False  # read_table says what is wrong with it


def _measure(statistics: dict[str, Any], data: str, thresholds: Thresholds, rows: int,
             max_images: int) -> tuple[dict[str, Any], list[str]]:
    """The drift report of DATA (a table, a folder of tables: its newest, or an image folder: a
    sample of its images), and what was measured, in words."""
    if _is_folder(data):
        files = image_files(data)
        if files:
            report = image_drift(statistics, data, thresholds, max_images, files)
            sample = report["sample"]
            return report, [f"  a sample of {sample['images']:,} of {sample['of']:,} images "
                            "(pixel-intensity histogram per channel, classes by sub-folder)"
                            + (f"; {sample['unreadable']} could not be read"
                               if sample["unreadable"] else "")]
        table = newest_table(data)
        if table is None:
            raise UserInputError(f"data '{data}' is a folder with no class sub-folders of images "
                                 "and no .csv or .parquet table; pass a table or an image folder")
        return _measure(statistics, table, thresholds, rows, max_images)[0], [
            f"  its newest table: {table}"]
    try:
        table = read_table(data, rows)
    except (OSError, ValueError) as error:
        raise UserInputError(f"data '{data}' could not be read as a table ({error}); pass a "
                             ".csv or .parquet file, or an image folder") from error
    return drift(statistics, table, thresholds), []


def status_lines(reference_uri: str, data: str | None = None, newest: int = 5,
                 thresholds: Thresholds | None = None, rows: int = 100_000,
                 max_images: int = MAX_IMAGES) -> list[str]:
    """The lines `retrain-status` prints. DATA: a .csv/.parquet table (its first ROWS rows), a
    folder of them (its newest), or an image folder (a sample of MAX_IMAGES images, measured
    per channel)."""
    base = reference_uri.rstrip("/")
    serving, statistics = read_json(f"{base}/{SERVING}"), read_json(f"{base}/{STATISTICS}")
    if serving is None or statistics is None:
        raise UserInputError(
            f"reference '{reference_uri}' holds no {SERVING} and {STATISTICS}: no run has deployed "
            "there yet; pass the folder a deploying run printed ('reference: ... kept in ...')")
    p99 = (f", p99 {serving['p99_ms']:.2f} ms at concurrency {serving['target_concurrency']}"
           if serving.get("p99_ms") is not None else "")
    variant = f", variant {serving['variant']}" if serving.get("variant") else ""
    lines = [(f"serving: {serving['model']} version {serving['version']} ({serving['target']}"
              f"{variant}), "
             f"test accuracy {serving['test_accuracy']:.4f}{p99}; trained on "
             f"{serving['training_rows']:,} rows of {serving['data_source']} "
             f"(kept {serving['kept_at']})")]
    made = _decisions(reference_uri, newest)
    lines.append(f"decisions: {len(made)} shown (newest last)" if made else "decisions: none yet")
    lines += [f"  {d['time']} {d['status']} {d['uri']}: {d.get('reason', '')}" for d in made]
    if data:
        thresholds = thresholds or Thresholds(
            label_column=(statistics.get("labels") or {}).get("column") or "label")
        report, measured_on = _measure(statistics, data, thresholds, rows, max_images)
        lines.append(f"{data} against the reference: "
                     f"{'drifted' if report['drifted'] else 'no drift'} (thresholds: JS distance "
                     f"{thresholds.drift_threshold}, PSI {thresholds.psi_threshold}, labels "
                     f"L-inf {thresholds.label_drift_threshold})")
        lines += measured_on
        column = "channel" if "sample" in report else "feature"
        lines.append(f"  {column:<20} {'JS distance':>11} {'PSI':>8}  moved")
        for name, measured in report["features"].items():
            lines.append(f"  {name:<20} {measured['js_distance']:>11.4f} {measured['psi']:>8.4f}  "
                         f"{'yes' if name in report['moved'] else ''}")
        if report["missing"]:
            lines.append(f"  missing in the data: {', '.join(report['missing'])}")
        if report["label_linf"] is not None:
            lines.append(f"  labels L-inf {report['label_linf']:.4f}")
    return lines
