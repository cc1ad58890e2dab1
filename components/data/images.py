"""Image folders as a data source: one sub-folder per class (its name is the class) of images,
local or at any fsspec URL, read with Pillow (listed by `plan`, decoded by `chunks`); and the
built-in digits as images."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from torchship.components.data.sources import LoadedSource
from torchship.components.errors import UserInputError, one_line

if TYPE_CHECKING:
    import PIL.Image
    from fsspec import AbstractFileSystem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
# Single-channel Pillow modes (LA: grey with alpha, which is dropped). A palette image ("P") may
# hold colours, so it counts as colour.
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# The channels an image's statistics are kept per, by Pillow mode.
CHANNELS = {"L": ["grey"], "RGB": ["red", "green", "blue"]}
# Pillow's bilinear filter (Image.Resampling.BILINEAR); the module imports Pillow lazily.
BILINEAR = 2


def digits_images() -> LoadedSource:
    """scikit-learn's digits (it ships inside the package) as 1 x 8 x 8 images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = digits.images.astype(np.float32)[:, None]
    return LoadedSource(features, digits.target.astype(np.int64),
                        [str(c) for c in digits.target_names], CHANNELS["L"],
                        {"image": "L 8x8", "label": "digit"}, row_noun="images")


def _read_image(source: str, fs: AbstractFileSystem, path: str, name: str) -> PIL.Image.Image:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(fs.cat_file(path)))
        image.load()
    except Exception as error:  # Pillow raises many kinds for a bad file
        # Pillow's own text for an unknown format names only the in-memory buffer.
        reason = ("not an image format Pillow knows"
                  if isinstance(error, UnidentifiedImageError) else one_line(error, 200, with_type=True))
        raise UserInputError(
            f"data source '{source}' image '{name}' could not be read ({reason}); "
            "replace or remove it"
        ) from error
    return image



def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _visible(path: str, parent: str) -> bool:
    """Not hidden (.DS_Store, .ipynb_checkpoints) and not the listed folder itself (object
    stores may list a folder's placeholder object among its contents)."""
    return path.rstrip("/") != parent.rstrip("/") and not _basename(path).startswith(".")
