"""Image folders as a data source: one sub-folder per class (its name is the class) of same-sized
images, local or at any fsspec URL, read with Pillow."""

from __future__ import annotations

from pathlib import Path
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


def load_image_folder(source: str, fs: AbstractFileSystem, root: str,
                      image_size: int = 0) -> LoadedSource:
    """A folder with one sub-folder per class (its name is the class) of images, as float32
    [rows, C, H, W]: all one size, or each resized to `image_size` x `image_size`."""
    class_folders = sorted(
        _basename(entry["name"]) for entry in fs.ls(root, detail=True)
        if entry["type"] == "directory" and _visible(entry["name"], root)
    )
    if not class_folders:
        raise UserInputError(
            f"data source '{source}' is a folder with no class sub-folders; put each class's "
            "images in a sub-folder named after the class"
        )
    if len(class_folders) < 2:
        raise UserInputError(
            f"data source '{source}' has a single class folder '{class_folders[0]}'; add a "
            "sub-folder of images for each class, at least two"
        )
    base = source.rstrip("/")
    images, labels, names = [], [], []  # names as the user knows them, for errors
    for index, class_name in enumerate(class_folders):
        folder = f"{root.rstrip('/')}/{class_name}"
        files = sorted(
            _basename(entry["name"]) for entry in fs.ls(folder, detail=True)
            if entry["type"] == "file" and _visible(entry["name"], folder)
            and Path(entry["name"]).suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise UserInputError(
                f"data source '{source}' class folder '{class_name}' has no images "
                f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder"
            )
        for file in files:
            name = f"{base}/{class_name}/{file}"
            image = _read_image(source, fs, f"{folder}/{file}", name)
            if image_size:
                image = image.resize((image_size, image_size), resample=BILINEAR)
            elif images and image.size != images[0].size:
                width, height = images[0].size
                raise UserInputError(
                    f"data source '{source}' image '{name}' is {image.width}x{image.height} but "
                    f"'{names[0]}' is {width}x{height}; pass --image-size N to resize them all "
                    "to N x N, or resize them yourself"
                )
            images.append(image)
            labels.append(index)
            names.append(name)

    # Grayscale only when every image is: one colour image makes every row RGB.
    mode = "L" if all(image.mode in GRAYSCALE_MODES for image in images) else "RGB"
    width, height = images[0].size
    pixels = np.stack([np.asarray(image.convert(mode), dtype=np.float32) for image in images])
    # [rows, H, W] or [rows, H, W, C] -> [rows, C, H, W], as convolutions take them.
    features = pixels[:, None] if mode == "L" else pixels.transpose(0, 3, 1, 2)
    return LoadedSource(np.ascontiguousarray(features), np.array(labels, dtype=np.int64),
                        class_folders, CHANNELS[mode],
                        {"image": f"{mode} {width}x{height}", "label": "folder name"},
                        row_noun="images")


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
