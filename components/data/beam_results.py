"""What the data step's chunks report and how it merges: per-feature moments (mergeable, in a
fixed order, so the same data gives the same statistics), shard lists, class counts, problems, and
the image headers that settle one mode and size for every image. Plain Python: the launcher reads
these without importing Beam."""

from __future__ import annotations

from typing import Any

import numpy as np

from torchship.components.data.chunks import ReadSpec, ReadTask

__all__ = ["image_header", "merge_headers", "merge_moments", "merge_results", "moments"]


def moments(values: np.ndarray, axes: tuple[int, ...]) -> dict[str, Any]:
    """Count, mean, sum of squared deviations, min and max per feature (Chan et al.: mergeable
    without the cancellation of a sum of squares)."""
    count = int(np.prod([values.shape[a] for a in axes]))
    mean = values.mean(axis=axes, dtype=np.float64)
    shape = [1 if a in axes else n for a, n in enumerate(values.shape)]
    m2 = ((values - mean.reshape(shape)) ** 2).sum(axis=axes, dtype=np.float64)
    return {"n": count, "mean": mean.tolist(), "m2": m2.tolist(),
            "min": values.min(axis=axes).astype(np.float64).tolist(),
            "max": values.max(axis=axes).astype(np.float64).tolist()}


def merge_moments(parts: list[dict[str, Any]]) -> dict[str, np.ndarray] | None:
    """The moments of all parts together, merged in the order given."""
    total = None
    for part in parts:
        n, mean, m2 = part["n"], np.asarray(part["mean"]), np.asarray(part["m2"])
        low, high = np.asarray(part["min"]), np.asarray(part["max"])
        if total is None:
            total = {"n": n, "mean": mean, "m2": m2, "min": low, "max": high}
            continue
        both = total["n"] + n
        delta = mean - total["mean"]
        total["m2"] = total["m2"] + m2 + delta ** 2 * total["n"] * n / both
        total["mean"] = total["mean"] + delta * n / both
        total["n"] = both
        total["min"], total["max"] = np.minimum(total["min"], low), np.maximum(total["max"], high)
    return total


def merge_results(parts) -> dict[str, Any]:
    """Every chunk's result in one: lists joined, counts added (order does not matter here: the
    launcher sorts before it merges statistics)."""
    total: dict[str, Any] = {"rows": 0, "shards": {}, "counts": {}, "chunks": [], "spread": [],
                             "train": [], "problems": [], "shapes": {}, "dtypes": {}, "extra": {}}
    for part in parts:
        total["rows"] += part.get("rows", 0)
        for key in ("chunks", "spread", "train", "problems"):
            total[key].extend(part.get(key, []))
        for split, entries in part.get("shards", {}).items():
            total["shards"].setdefault(split, []).extend(entries)
        for split, counts in part.get("counts", {}).items():
            merged = total["counts"].setdefault(split, {})
            for label, count in counts.items():
                merged[label] = merged.get(label, 0) + count
        for key in ("shapes", "dtypes"):
            total[key] = total[key] or part.get(key, {})
        if part.get("histograms"):  # counts per bin of each column, added bin by bin
            mine = total.get("histograms") or [[0] * len(c) for c in part["histograms"]]
            total["histograms"] = [[a + b for a, b in zip(kept, added)]
                                   for kept, added in zip(mine, part["histograms"])]
        largest = part.get("extra", {}).get("largest_token")
        if largest is not None:
            total["extra"]["largest_token"] = max(largest,
                                                  total["extra"].get("largest_token", 0))
    return total


def image_header(spec: ReadSpec, task: ReadTask) -> dict[str, Any]:
    """What each image file's header says (mode, size), without decoding pixels: whether any
    image has colour, and the first file of each size."""
    import fsspec
    from PIL import Image

    from torchship.components.data.images import GRAYSCALE_MODES

    fs = fsspec.core.url_to_fs(spec.source)[0]
    colour, sizes = False, {}
    for _, path, name, _ in task.image_files():
        try:
            with fs.open(path, "rb") as handle, Image.open(handle) as image:
                colour = colour or image.mode not in GRAYSCALE_MODES
                size = f"{image.width}x{image.height}"
        except Exception:  # noqa: BLE001, S112 - the read stage names the file and the reason
            continue
        sizes[size] = min(sizes.get(size, name), name)
    return {"colour": colour, "sizes": sizes}


def merge_headers(spec: ReadSpec, parts) -> dict[str, Any]:
    colour, sizes = False, {}
    for part in parts:
        colour = colour or part["colour"]
        for size, name in part["sizes"].items():
            sizes[size] = min(sizes.get(size, name), name)
    header: dict[str, Any] = {"mode": "RGB" if colour else "L", "colour": colour, "sizes": sizes}
    if len(sizes) > 1 and not spec.image_size:
        (first_size, first), (size, name) = sorted(sizes.items(), key=lambda item: item[1])[:2]
        header["problem"] = (
            f"data source '{spec.source}' image '{name}' is {size} but '{first}' is "
            f"{first_size}; pass --image-size N to resize them all to N x N, or resize them "
            "yourself")
    return header


