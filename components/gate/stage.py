"""The promotion gate: one record that says whether the candidate may be deployed, and why.

The record joins three decisions: the variant chosen by the user's constraints (accuracy drop,
size, the metric to optimise), the gate checks on that variant (accuracy against the serving
baseline or a floor, parity with PyTorch, p99 on Triton at the target concurrency), and the
regression check against the previous run's numbers.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from torchship.components.contracts import (
    MODEL_ONNX,
    REFERENCE_SERVING,
    TARGET_CONCURRENCY,
    VARIANTS_JSON,
    ServingSettings,
)
from torchship.components.data.splits import EVALUATION_ROWS, Split, load_split
from torchship.components.errors import UserInputError, one_line
from torchship.components.files import read_json
from torchship.components.gate.checks import (
    ACCURACY_FLOOR,
    GATE_SCHEMA,
    MAX_ACCURACY_DROP_PT,
    evaluate_gate,
    read_gate_record,
    write_gate_record,
)
from torchship.components.gate.choice import (
    OPTIMISE,
    choose_variant,
    format_choice_table,
    publish_chosen_variant,
)
from torchship.components.gate.regression import MAX_P99_REGRESSION_PCT, compare_with_previous
from torchship.components.report.html_report import write_html_report
from torchship.components.triton.versions import serving_model


def decide(
    onnx_dir: str,
    summary: dict[str, Any],
    chosen_dir: str,
    *,
    max_accuracy_drop_pt: float = MAX_ACCURACY_DROP_PT,
    max_size_bytes: int | None = None,
    optimise: str = OPTIMISE,
    accuracy_floor: float = ACCURACY_FLOOR,
    baseline_uri: str = "",
    reference_uri: str = "",
    latency_budget_p99_ms: float | None = None,
    target_concurrency: int = TARGET_CONCURRENCY,
    previous_results_uri: str = "",
    max_p99_regression_pct: float = MAX_P99_REGRESSION_PCT,
    test_path: str | None = None,
    serving_repository: str = "",
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Choose the variant, gate it and return the record; the chosen model goes to `chosen_dir`.
    With `test_path`, the record also holds the chosen variant's confusion matrix on it, and the
    candidate must beat always predicting the test split's most frequent class.

    None means "no limit" for `max_size_bytes` and `latency_budget_p99_ms`; the serving baseline
    is `serving_baseline`'s. An empty `previous_results_uri` means no regression check.
    """
    split = load_split(test_path, rows=EVALUATION_ROWS) if test_path else None  # read once, used three times
    baseline, baseline_source = serving_baseline(baseline_uri, reference_uri, serving_repository,
                                                 split, progress)
    rows = json.loads((Path(onnx_dir) / VARIANTS_JSON).read_text())
    choice = choose_variant(rows, max_acc_drop_pt=max_accuracy_drop_pt,
                            max_size_bytes=max_size_bytes, optimise=optimise)
    regression = compare_with_previous(summary, previous_results_uri or None,
                                       max_p99_regression_pct)
    variant = choice["chosen"]
    if variant is None:
        record = {"schema": GATE_SCHEMA, "passed": False, "checks": [], "regression": regression,
                  "reason": f"no variant meets the constraints: {choice['reason']}",
                  "settings": {"latency_budget_p99_ms": latency_budget_p99_ms,
                               "target_concurrency": target_concurrency,
                               "accuracy_floor": accuracy_floor,
                               "max_accuracy_drop_pt": max_accuracy_drop_pt},
                  "environment": known_environment()}
        progress(record["reason"])
        progress(format_choice_table(choice))
        return {**record, "choice": choice, "variant": None}
    # The gate record itself (a later run reads a passing one as its serving baseline), with
    # the choice that named its variant.
    record = evaluate_gate(
        summary, accuracy_floor=accuracy_floor, baseline_accuracy=baseline,
        baseline_source=baseline_source,
        majority=majority_class(split) if split is not None else None,
        max_accuracy_drop_pt=max_accuracy_drop_pt,
        latency_budget_p99_ms=latency_budget_p99_ms,
        target_concurrency=target_concurrency, variant=variant, regression=regression,
    )
    record = {**record, "choice": choice, "variant": variant, "environment": known_environment()}
    if split is not None:
        record["confusion_matrix"] = confusion_matrix(onnx_dir, variant, split)
    if record["passed"]:
        publish_chosen_variant(onnx_dir, choice, chosen_dir)
    progress(f"chose '{variant}': {choice['reason']}")
    progress(f"gate {'passed' if record['passed'] else 'FAILED'}: {record['reason']}")
    return record


def serving_baseline(baseline_uri: str, reference_uri: str, serving_repository: str,
                     split: Split | None, progress: Callable[[str], None] = print,
                     ) -> tuple[float | str | None, str | None]:
    """What the candidate must match, and where it came from: the gate record (or serving
    record) at `baseline_uri`, which must exist; else, deploying to a local repository
    (`serving_repository`), the model it serves now, measured on this run's test split (the
    repository is what serves: a reference kept for another repository does not apply); else
    the serving record a deploying run kept at `reference_uri` (its test accuracy when it was
    deployed). None of them: a first run, and the accuracy floor applies."""
    if baseline_uri:
        if read_gate_record(baseline_uri) is None:
            raise UserInputError(
                f"baseline_uri: {baseline_uri} does not exist; pass the gate record (gate.json) "
                "of the run whose model serves now, or leave it out to compare with what the "
                "reference (reference_uri) says serves")
        return baseline_uri, None
    kept_at = reference_uri.rstrip("/") + "/" + REFERENCE_SERVING if reference_uri else ""
    kept = read_json(kept_at) if kept_at else None
    named = (f"serving record {kept_at} ('{kept['model']}' version {kept['version']})"
             if kept else "")
    if serving_repository:
        serving = serving_model(serving_repository) if split is not None else None
        if serving is None:
            return None, None
        accuracy = onnx_accuracy(serving.onnx_path, split, f"serving model {serving}")
        same = kept and (kept["model"], kept["version"]) == (serving.name, serving.version)
        source = (f"{named if same else f'serving model {serving}'}, measured on this run's "
                  "test split")
        progress(f"serving baseline: {source}: test accuracy {accuracy:.4f}")
        return accuracy, source
    if kept and kept.get("test_accuracy") is not None:
        progress(f"serving baseline: {named}: test accuracy {kept['test_accuracy']:.4f} "
                 "(on its own test split, when it was deployed)")
        return float(kept["test_accuracy"]), named
    return None, None


def known_environment() -> dict[str, Any]:
    """How the benchmark served, where its result does not record it, from what the gate knows:
    the serving settings the pipeline's benchmark repository is built with (torchship's
    defaults), its backend, and the packages installed where the gate runs (the same image
    family as the benchmark's). The report marks each as the gate's, not the benchmark's."""
    from importlib import metadata

    def version(*names: str) -> str | None:
        for name in names:
            try:
                return f"{name} {metadata.version(name)}"
            except metadata.PackageNotFoundError:
                continue
        return None

    defaults = ServingSettings.__dataclass_fields__
    return {
        "backend": "python", "cloud_backend": "onnxruntime",
        "serving": {name: defaults[name].default for name in
                    ("instance_count", "max_batch_size", "max_queue_delay_us")},
        "triton_package": version("nvidia-pytriton"),
        "onnxruntime": version("onnxruntime", "onnxruntime-gpu"),
        "source": "torchship's serving defaults, which the pipeline's benchmark repository "
                  "(python backend, locally) is built with, and the packages where the gate "
                  "ran; for a benchmark result without its server block (one written before "
                  "the benchmark recorded what served)",
    }


def write_reports(record: dict[str, Any], summary: dict[str, Any], record_path: str,
                  html_path: str) -> None:
    """The record as JSON, and the HTML report with the variant table, plots and the gate."""
    write_gate_record(record, record_path)
    write_html_report(summary, html_path, gate=record, regression=record.get("regression"))


def majority_class(split: Split) -> tuple[str, float]:
    """The test split's most frequent class and its share: the accuracy of always guessing it."""
    counts = np.bincount(split.y, minlength=len(split.class_names))
    return str(split.class_names[int(counts.argmax())]), float(counts.max() / counts.sum())


def onnx_accuracy(onnx_path: str | Path, split: Split, what: str) -> float:
    """Test accuracy of an ONNX classifier on a split; a model that cannot take the split's
    inputs is a ``UserInputError`` naming `what`."""
    try:
        logits = _logits(onnx_path, split)
    except Exception as error:  # an input it does not have, a shape it does not take
        raise UserInputError(
            f"{what} cannot take this run's data ({one_line(error, 160, with_type=True)}); "
            "deploy to a new repository (--local-repository) or pass data of the same shape"
        ) from error
    if logits.ndim != 2 or logits.shape[1] != len(split.class_names):
        raise UserInputError(
            f"{what} answers {logits.shape[1:]} logits for this run's "
            f"{len(split.class_names)} classes; deploy to a new repository "
            "(--local-repository) or pass data with the same classes")
    return float(np.mean(logits.argmax(axis=1) == split.y))


def _logits(onnx_path: str | Path, split: Split) -> np.ndarray:
    """An ONNX classifier's logits for every row of a split, on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, split.inputs)[0]


def confusion_matrix(onnx_dir: str, variant: str, test: str | Split) -> dict[str, Any]:
    """The chosen variant's ONNX model on the test split (or its path), as KFP's
    ClassificationMetrics takes it: class names, and counts with rows the true class and columns
    the predicted one."""
    split = load_split(test, rows=EVALUATION_ROWS) if isinstance(test, str) else test
    logits = _logits(Path(onnx_dir) / variant / MODEL_ONNX, split)
    n = logits.shape[1]
    categories = list(split.class_names)
    counts = np.bincount(split.y * n + logits.argmax(axis=1), minlength=n * n)
    matrix = counts.reshape(n, n)
    return {"categories": categories, "matrix": matrix.tolist(),
            "accuracy": float(np.trace(matrix) / matrix.sum())}
