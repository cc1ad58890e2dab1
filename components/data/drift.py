"""Drift of new data from the training statistics prepare-data keeps (each numeric feature's
histogram, the training classes), by the measures Vertex AI Model Monitoring uses: Jensen-Shannon
distance and population stability index for a numeric feature, L-infinity distance for the class
distribution. A text table is judged by the histogram of its characters per text (a summary
cheap to compute without the tokenizer) and its classes. Self-contained (numpy, pandas, fsspec): the retraining trigger's Cloud Function
ships this file (infra/trigger/drift.py links here) and `torchship retrain-status` imports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Thresholds", "distances", "drift", "label_distance", "read_table"]


@dataclass(frozen=True)
class Thresholds:
    """What counts as drift: a feature's JS distance or PSI, the classes' L-infinity distance."""

    drift_threshold: float = 0.1
    psi_threshold: float = 0.2
    label_drift_threshold: float = 0.1
    label_column: str = "label"


# A bin no row fell in still gets this share, so that the logarithms stay finite.
EPSILON = 1e-4


def _shares(counts: Any) -> Any:
    import numpy as np

    counts = np.asarray(counts, dtype=np.float64)
    return np.maximum(counts / max(counts.sum(), 1.0), EPSILON)


def distances(histogram: dict[str, Any], values: Any) -> dict[str, float]:
    """Jensen-Shannon distance (base 2, 0-1) and population stability index of `values` against
    a reference histogram (inner bin `edges`, `counts`), as Vertex AI Model Monitoring measures a
    numeric feature."""
    import numpy as np

    edges = np.asarray(histogram["edges"], dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    new = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)
    p, q = _shares(histogram["counts"]), _shares(new)
    m = (p + q) / 2
    divergence = 0.5 * (p * np.log2(p / m)).sum() + 0.5 * (q * np.log2(q / m)).sum()
    return {"js_distance": round(float(np.sqrt(max(divergence, 0.0))), 4),
            "psi": round(float(((q - p) * np.log(q / p)).sum()), 4)}


def label_distance(reference: dict[str, int], labels: Any) -> float:
    """L-infinity distance of the class distributions (the largest change of one class's
    share), as Vertex AI Model Monitoring measures a categorical feature."""
    new = {str(k): int(v) for k, v in labels.astype(str).value_counts().items()}
    total_ref, total_new = max(sum(reference.values()), 1), max(sum(new.values()), 1)
    classes = set(reference) | set(new)
    return round(max(abs(reference.get(c, 0) / total_ref - new.get(c, 0) / total_new)
                     for c in classes), 4)


def drift(statistics: dict[str, Any], table: Any, settings: Thresholds) -> dict[str, Any]:
    """Each numeric feature's distances from its training histogram, the labels' distance from
    the training classes, and whether any passes its threshold."""
    features, moved, missing = {}, [], []
    # Text is judged by its characters per row (and its labels): cheap, and no tokenizer needed.
    text = statistics.get("text_column")
    for feature, reference in statistics.get("features", {}).items():
        if "histogram" not in reference or (text and feature != "characters"):
            continue
        column = text or feature
        if column not in table.columns:
            missing.append(column)
            continue
        values = table[column].astype(str).str.len() if text else table[feature]
        features[feature] = distances(reference["histogram"], values)
        if (features[feature]["js_distance"] > settings.drift_threshold
                or features[feature]["psi"] > settings.psi_threshold):
            moved.append(feature)
    labels = statistics.get("labels") or {}
    label_column = labels.get("column") or settings.label_column
    label = None
    if labels.get("counts") and label_column in table.columns:
        label = label_distance(labels["counts"], table[label_column])
    label_moved = label is not None and label > settings.label_drift_threshold
    return {"drifted": bool(moved or missing or label_moved), "moved": moved,
            "missing": missing, "features": features, "label_linf": label,
            "thresholds": {"js_distance": settings.drift_threshold, "psi": settings.psi_threshold,
                           "label_linf": settings.label_drift_threshold}}


def read_table(uri: str, rows: int) -> Any:
    """The first `rows` rows of a new table: enough to judge drift, whatever its size."""
    import fsspec
    import pandas as pd

    with fsspec.open(uri, "rb") as handle:
        if not uri.endswith(".parquet"):
            return pd.read_csv(handle, nrows=rows)
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(handle).iter_batches(batch_size=rows), None)
        return batch.to_pandas() if batch is not None else pd.DataFrame()
