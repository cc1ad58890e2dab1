"""Where the retraining loop finds what serves now: a run that deploys keeps, under a stable
folder (pipeline parameter `reference_uri`, by default `<pipeline root>/torchship-reference/
<pipeline>/<deploy target>/`), the training statistics of the data it was trained on
(`statistics.json`, read by the trigger to judge drift) and the serving record (`serving.json`:
which model name, version and variant, accuracy, p99). Each file is written whole (a local
file by rename; an object store writes whole objects); the statistics go first, so a serving
record never names statistics that are not there."""

from __future__ import annotations

import time
from typing import Any

from torchship.components.contracts import REFERENCE_SERVING, REFERENCE_STATISTICS
from torchship.components.files import read_json, write_json

__all__ = ["PIPELINE", "default_reference_uri", "keep_reference"]

PIPELINE = "torchship"


def default_reference_uri(pipeline_root: str, deploy_target: str) -> str:
    """The reference folder of runs under `pipeline_root` that deploy to `deploy_target`."""
    return f"{str(pipeline_root).rstrip('/')}/torchship-reference/{PIPELINE}/{deploy_target}/"


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def keep_reference(uri: str, statistics_path: str, gate_record_path: str, target: str,
                   deployed: dict[str, Any]) -> dict[str, Any]:
    """Write the reference of the model just deployed; return the serving record: `model` is the
    served name (the same across retrains), `variant` the variant it now serves (`deployed`'s,
    else the gate's choice), `p99_ms` `deployed`'s (the serving search's measurement), else the
    gate's."""
    statistics = read_json(statistics_path)
    gate = read_json(gate_record_path)
    chosen = deployed.get("variant") or gate["variant"]  # the serving search's, where it chose
    row = next(entry for entry in gate["choice"]["table"] if entry["name"] == chosen)
    p99 = deployed.get("p99_ms") or next(
        (check["value"] for check in gate["checks"]
         if check["name"] == "p99 latency" and check.get("variant") == chosen), None)
    model = deployed.get("serving_model_name") or chosen
    versions = deployed.get("versions") or {}
    record = {
        "pipeline": PIPELINE, "target": target, "model": model, "variant": chosen,
        "version": versions.get(model, deployed.get("model_version")),
        "deployed": deployed.get("summary", {}),
        "test_accuracy": row.get("onnx_test_accuracy", row.get("test_accuracy")),
        "p99_ms": p99, "target_concurrency": gate["settings"].get("target_concurrency"),
        "data_source": statistics.get("source"), "training_rows": statistics.get("n_rows"),
        "kept_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(statistics, _join(uri, REFERENCE_STATISTICS))
    write_json(record, _join(uri, REFERENCE_SERVING))
    return record
