"""Drift of new data from the training statistics prepare-data keeps (each numeric feature's
histogram, the training classes), by the measures Vertex AI Model Monitoring uses: Jensen-Shannon
distance and population stability index for a numeric feature, L-infinity distance for the class
distribution. A text table is judged by the histogram of its characters per text (a summary
cheap to compute without the tokenizer) and its classes. An image folder (one sub-folder per
class) is judged on a sample of its images by each channel's pixel-intensity histogram and the
classes of its sub-folders. Self-contained (numpy, pandas, fsspec; Pillow for images, imported
only then): the retraining trigger's Cloud Function ships this file (infra/trigger/drift.py links
here) and `torchship retrain-status` imports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_IMAGES",
    "Thresholds",
    "distances",
    "drift",
    "folder_tables",
    "image_drift",
    "image_files",
    "label_distance",
    "newest_table",
    "read_table",
]


@dataclass(frozen=True)
class Thresholds:
    """What counts as drift: a feature's JS distance or PSI, the classes' L-infinity distance;
    `features` sets either per feature ({"income": {"js_distance": 0.2, "psi": 0.5}}), the global
    one applying to the rest."""

    drift_threshold: float = 0.1
    psi_threshold: float = 0.2
    label_drift_threshold: float = 0.1
    label_column: str = "label"
    features: dict[str, dict[str, float]] = field(default_factory=dict)

    def of(self, feature: str) -> tuple[float, float]:
        """The JS distance and PSI thresholds of `feature`."""
        own = self.features.get(feature, {})
        return (float(own.get("js_distance", self.drift_threshold)),
                float(own.get("psi", self.psi_threshold)))


# A bin no row fell in still gets this share, so that the logarithms stay finite.
EPSILON = 1e-4
# As the data step reads an image folder (components/data/images.py): the image files of a class
# sub-folder, and the channels its statistics are kept per, by Pillow mode.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
CHANNELS = {"L": ["grey"], "RGB": ["red", "green", "blue"]}
# Images of a new folder decoded to judge it, at most: a sample, spread over the whole listing.
MAX_IMAGES = 500
# Image files fetched at once.
FETCH_BATCH = 32


def _shares(counts: Any) -> Any:
    import numpy as np

    counts = np.asarray(counts, dtype=np.float64)
    return np.maximum(counts / max(counts.sum(), 1.0), EPSILON)


def distances(histogram: dict[str, Any], values: Any) -> dict[str, float]:
    """Jensen-Shannon distance (base 2, 0-1) and population stability index of `values` against
    a reference histogram (inner bin `edges`, `counts`), as Vertex AI Model Monitoring measures a
    numeric feature."""
    return _compare(histogram["counts"], _binned(histogram["edges"], values))


def _binned(edges: Any, values: Any) -> Any:
    """How many of `values` fall in each bin of the inner `edges` (as the histograms are kept)."""
    import numpy as np

    edges = np.asarray(edges, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    return np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)


def _compare(reference: Any, new: Any) -> dict[str, float]:
    """Jensen-Shannon distance and PSI of the counts `new` against the counts `reference`."""
    import numpy as np

    p, q = _shares(reference), _shares(new)
    m = (p + q) / 2
    divergence = 0.5 * (p * np.log2(p / m)).sum() + 0.5 * (q * np.log2(q / m)).sum()
    return {"js_distance": round(float(np.sqrt(max(divergence, 0.0))), 4),
            "psi": round(float(((q - p) * np.log(q / p)).sum()), 4)}


def label_distance(reference: dict[str, int], labels: Any) -> float:
    """L-infinity distance of the class distributions (the largest change of one class's
    share), as Vertex AI Model Monitoring measures a categorical feature."""
    import pandas as pd

    new = {str(k): int(v) for k, v in pd.Series(labels).astype(str).value_counts().items()}
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
        if _moved(features[feature], settings, feature):
            moved.append(feature)
    labels = statistics.get("labels") or {}
    label_column = labels.get("column") or settings.label_column
    label = None
    if labels.get("counts") and label_column in table.columns:
        label = label_distance(labels["counts"], table[label_column])
    return _report(features, moved, missing, label, settings)


def _moved(measured: dict[str, float], settings: Thresholds, feature: str) -> bool:
    js_distance, psi = settings.of(feature)
    return measured["js_distance"] > js_distance or measured["psi"] > psi


def _report(features: dict[str, dict[str, float]], moved: list[str], missing: list[str],
            label: float | None, settings: Thresholds) -> dict[str, Any]:
    label_moved = label is not None and label > settings.label_drift_threshold
    return {"drifted": bool(moved or missing or label_moved), "moved": moved,
            "missing": missing, "features": features, "label_linf": label,
            "thresholds": {"js_distance": settings.drift_threshold, "psi": settings.psi_threshold,
                           "label_linf": settings.label_drift_threshold,
                           **({"features": settings.features} if settings.features else {})}}


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


def _folder(uri: str) -> tuple[Any, str]:
    """The filesystem and path of a folder URI, its listing fresh (a Cloud Function instance
    lives on between events, and gcsfs would otherwise answer from an old listing)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    return fs, root


def _visible(name: str) -> bool:
    return bool(name) and not name.startswith(".")


def image_files(uri: str) -> list[tuple[str, str]]:
    """(class, path) of each image file in the class sub-folders of the folder `uri`, sorted by
    class, then name; empty when it is not an image folder. As the data step reads one: a class
    is a sub-folder's name; hidden files and folders, and files of other suffixes, are left
    out."""
    fs, root = _folder(uri)
    files = []
    for path in fs.find(root, maxdepth=2):
        parts = path[len(root):].strip("/").split("/")
        if (len(parts) == 2 and all(_visible(part) for part in parts)
                and parts[1].lower().endswith(IMAGE_SUFFIXES)):
            files.append((parts[0], path))
    return sorted(files)


def folder_tables(uri: str) -> list[tuple[str, Any]]:
    """(URL, modification time) of each .csv/.parquet table directly in the folder `uri`,
    hidden ones left out, oldest first (by modification time, then name): the last is the one
    the data step trains on from a folder of tables."""
    fs, root = _folder(uri)
    tables = [(path, fs.modified(path)) for path in fs.ls(root, detail=False)
              if _visible(path.rstrip("/").rsplit("/", 1)[-1])
              and path.lower().endswith(TABLE_SUFFIXES)]
    return [(fs.unstrip_protocol(path) if "://" in uri else path, modified)
            for path, modified in sorted(tables, key=lambda table: (table[1], table[0]))]


def newest_table(uri: str) -> str | None:
    """The table of the folder `uri` the data step trains on (see folder_tables); None when
    there is none."""
    tables = folder_tables(uri)
    return tables[-1][0] if tables else None


def image_drift(statistics: dict[str, Any], uri: str, settings: Thresholds,
                max_images: int = MAX_IMAGES,
                files: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """drift() for an image folder (one sub-folder per class), judged on a sample: at most
    `max_images` image files spread evenly over the sorted listing of every class sub-folder
    (so each class is sampled in proportion to its size). Each image is decoded with Pillow and
    converted to the reference's channels ("L" for grey, else "RGB"); each channel's pixel
    values (0-255) are compared with that channel's pixel-intensity histogram of the training
    images (8 bins, edges 32, 64, ..., 224) by Jensen-Shannon distance and PSI, and the sample's
    classes (its sub-folder names) with the training classes by L-infinity distance. The report
    is drift()'s, with `sample`: how many images were decoded, of how many, and how many could
    not be."""
    import io

    import numpy as np
    from PIL import Image

    files = image_files(uri) if files is None else files
    total = len(files)
    if total > max_images > 0:  # every n-th file of the sorted listing, n fractional
        files = [files[i * total // max_images] for i in range(max_images)]
    references = {name: reference["histogram"]
                  for name, reference in statistics.get("features", {}).items()
                  if "histogram" in reference}
    mode = "L" if set(references) <= set(CHANNELS["L"]) else "RGB"
    channels = [name for name in CHANNELS[mode] if name in references]
    # Each channel's count of every pixel value 0-255, binned by the reference's edges at the end.
    values = {name: np.zeros(256, dtype=np.int64) for name in channels}
    classes, unreadable = [], 0
    fs = _folder(uri)[0]
    for start in range(0, len(files), FETCH_BATCH):
        batch = files[start:start + FETCH_BATCH]
        # Fetched together: gcsfs reads a list of objects concurrently.
        fetched = fs.cat([path for _, path in batch], on_error="return")
        for class_name, path in batch:
            try:
                with Image.open(io.BytesIO(fetched[path])) as image:
                    pixels = np.asarray(image.convert(mode), dtype=np.uint8)
            except Exception:  # noqa: BLE001 - a failed read, or one of Pillow's many kinds
                unreadable += 1
                continue
            pixels = pixels.reshape(-1, len(CHANNELS[mode]))
            for name in channels:
                values[name] += np.bincount(pixels[:, CHANNELS[mode].index(name)],
                                            minlength=256)
            classes.append(class_name)
    features, moved = {}, []
    for name in channels if classes else []:
        edges = np.asarray(references[name]["edges"], dtype=np.float64)
        binned = np.bincount(np.searchsorted(edges, np.arange(256.0), side="left"),
                             weights=values[name], minlength=len(edges) + 1)
        features[name] = _compare(references[name]["counts"], binned)
        if _moved(features[name], settings, name):
            moved.append(name)
    # Channels the reference has and the sample does not (a table's features, say, or no image
    # could be decoded) count as missing: drift.
    missing = [name for name in references if name not in features]
    labels = (statistics.get("labels") or {}).get("counts")
    label = label_distance(labels, classes) if labels and classes else None
    report = _report(features, moved, missing, label, settings)
    report["sample"] = {"images": len(classes), "of": total, "unreadable": unreadable}
    return report
