"""Reading the splits prepare_data wrote: what every later stage loads its rows with."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from torchship.components.errors import UserInputError

__all__ = ["load_sample", "load_split"]


def load_split(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a split written by prepare_data into a plain dict of arrays."""
    if not Path(path).exists():
        raise UserInputError(
            f"dataset split '{path}' does not exist; pass a split written by prepare_data"
        )
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def load_sample(path: str | os.PathLike, what: str = "test_path") -> np.ndarray:
    """The ``x`` rows of a split, checked: the requests, warm-up samples and smoke tests of the
    serving stages are built from them. ``what`` names the argument in errors."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what}: {path} does not exist; run prepare_data first")
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data:
            raise UserInputError(f"{what}: {path} has no 'x' array; run prepare_data")
        x = np.asarray(data["x"])
    if x.ndim < 2 or len(x) == 0:
        raise UserInputError(f"{what}: 'x' in {path} has shape {x.shape}; expected [N, F]")
    return x
