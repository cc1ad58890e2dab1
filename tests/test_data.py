"""prepare_data: splits by a seeded row hash, train-only standardisation, tables, and bad input."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from processes import one_process_job

from torchship.components.data.splits import load_split
from torchship.components.data.stage import prepare_data
from torchship.components.errors import UserInputError
from torchship.components.train.stage import train_model

# What a table split holds besides its input and labels.
EXTRA = {"mean", "std", "feature_names"}


def split_paths(directory: Path) -> tuple[str, str, str]:
    # No suffix, as KFP artifact paths have none: the files must land at exactly these paths.
    return tuple(str(directory / name) for name in ("train", "val", "test"))


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory):
    directory = tmp_path_factory.mktemp("digits")
    meta = prepare_data("digits", "ignored", *split_paths(directory), seed=0)
    return meta, {name: load_split(path) for name, path in zip(
        ("train", "val", "test"), split_paths(directory))}, directory


def test_digits_splits_have_the_contract_keys_at_exact_paths(prepared_digits):
    meta, splits, directory = prepared_digits
    assert sorted(p.name for p in directory.iterdir()) == ["test", "train", "val"]
    for split in splits.values():
        assert set(split.extra) == EXTRA and split.contract.input_names == ["input"]
        assert split.inputs["input"].dtype == np.float32 and split.inputs["input"].shape[1] == 64
        assert split.y.dtype == np.int64
        assert list(split.class_names) == [str(i) for i in range(10)]
    assert meta["n_features"] == 64 and meta["n_classes"] == 10
    assert meta["source"] == "digits"
    assert sum(meta["n_rows"].values()) == 1797
    # A row's split is its seeded hash's: about 15% each for val and test.
    assert all(abs(meta["n_rows"][split] - 270) < 45 for split in ("val", "test"))
    assert len(meta["schema"]) == 65 and len(meta["feature_names"]) == 64


def test_digits_split_keeps_the_class_mix(prepared_digits):
    meta, splits, _ = prepared_digits
    overall = np.bincount(np.concatenate([s.y for s in splits.values()])) / 1797
    for name, split in splits.items():
        share = np.bincount(split.y, minlength=10) / len(split.y)
        assert np.abs(share - overall).max() < 0.08, name  # a hash, not a stratified draw
        counts = meta["class_counts"][name]
        assert [counts[str(i)] for i in range(10)] == list(np.bincount(split.y, minlength=10))


def test_a_row_lands_in_the_same_split_in_new_data(tmp_path):
    """The split is a hash of the row: the trigger's next file (the old rows reordered, with new
    rows among them) puts every old row where it was; duplicates never straddle two splits."""
    from torchship.components.data.splits import split_index

    old = table(60, seed=4)
    new = pd.concat([old, table(60, seed=5), old.iloc[:10]]).sample(frac=1, random_state=2)
    placed = {}
    for name, frame in (("old", old), ("new", new)):
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        prepare_data(str(tmp_path / f"{name}.csv"), "species", *split_paths(tmp_path / name))
        placed[name] = {}
        for split in SPLITS:
            index = split_index(str(tmp_path / name / split))
            for key in index.read(index.pieces(), keys=True)["row_key"]:
                placed[name].setdefault(int(key), set()).add(split)
    assert all(len(splits) == 1 for splits in placed["new"].values())
    assert all(placed["new"][key] == splits for key, splits in placed["old"].items())
    assert len(placed["new"]) > len(placed["old"]) == 180


def test_digits_split_is_seeded(prepared_digits, tmp_path):
    _, splits, _ = prepared_digits
    prepare_data("digits", "", *split_paths(tmp_path / "same"), seed=0)
    prepare_data("digits", "", *split_paths(tmp_path / "other"), seed=1)
    same = load_split(str(tmp_path / "same" / "val"))
    other = load_split(str(tmp_path / "other" / "val"))
    np.testing.assert_array_equal(same.inputs["input"], splits["val"].inputs["input"])
    np.testing.assert_array_equal(same.y, splits["val"].y)
    assert not np.array_equal(other.inputs["input"], splits["val"].inputs["input"])


def test_standardisation_is_fitted_on_train_only(prepared_digits):
    _, splits, _ = prepared_digits
    train, val = splits["train"], splits["val"]
    np.testing.assert_allclose(train.inputs["input"].mean(axis=0), 0, atol=1e-5)
    # Constant pixels keep std 1 (the floor), every other column has unit variance on train.
    std = train.inputs["input"].std(axis=0)
    assert np.all((np.abs(std - 1) < 1e-4) | (std < 1e-6))
    assert np.abs(val.inputs["input"].mean(axis=0)).max() > 1e-3
    for split in splits.values():
        np.testing.assert_array_equal(split.extra["mean"], train.extra["mean"])
        np.testing.assert_array_equal(split.extra["std"], train.extra["std"])
    assert np.all(train.extra["std"] > 0)


def table(n_per_class: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = np.repeat(["setosa", "virginica", "versicolor"], n_per_class)
    return pd.DataFrame({
        "petal": rng.normal(size=len(labels)) + (labels == "setosa"),
        "species": labels,
        "sepal": rng.integers(0, 10, size=len(labels)),
    })


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_with_a_label_column(tmp_path, suffix):
    frame = table()
    source = tmp_path / f"flowers{suffix}"
    frame.to_csv(source, index=False) if suffix == ".csv" else frame.to_parquet(source)
    meta = prepare_data(str(source), "species", *split_paths(tmp_path / "out"), seed=3)
    assert meta["feature_names"] == ["petal", "sepal"]
    assert meta["class_names"] == ["setosa", "versicolor", "virginica"]
    assert meta["schema"]["species"] in ("object", "str", "string")
    assert sum(meta["n_rows"].values()) == 180 and meta["n_rows"]["train"] > 100
    train = load_split(str(tmp_path / "out" / "train"))
    assert list(train.extra["feature_names"]) == ["petal", "sepal"]
    # Class index i is class_names[i]: the rows labelled setosa have the shifted petal values.
    setosa = train.class_names.index("setosa")
    petal = train.inputs["input"][:, 0]
    assert petal[train.y == setosa].mean() > petal[train.y != setosa].mean()
    for split in meta["class_counts"].values():
        assert min(split.values()) > 0 and len(split) == 3


def test_fsspec_url_source(tmp_path):
    source = tmp_path / "flowers.csv"
    table().to_csv(source, index=False)
    meta = prepare_data(f"file://{source}", "species", *split_paths(tmp_path / "out"))
    assert meta["n_classes"] == 3


def test_a_prefix_of_tables_reads_the_newest_and_says_which(tmp_path, capsys):
    """A scheduled run's data_source is the prefix new data lands under: it trains on the table
    written last (the name breaks a tie), says so, and the statistics (which the reference keeps)
    name that file."""
    import os

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    table().to_parquet(incoming / "2026-12-01.parquet")
    table().assign(petal=table()["petal"] + 100).to_csv(incoming / "2026-12-03.csv", index=False)
    table().to_csv(incoming / "2026-12-02.csv", index=False)
    (incoming / "_SUCCESS").write_text("")
    for day, name in enumerate(["2026-12-01.parquet", "2026-12-02.csv", "2026-12-03.csv"]):
        os.utime(incoming / name, (1_796_083_200 + 86_400 * day,) * 2)
    meta = prepare_data(f"file://{incoming}/", "species", *split_paths(tmp_path / "out"))
    newest = f"file://{incoming}/2026-12-03.csv"
    assert meta["source"] == meta["statistics"]["source"] == newest
    assert meta["statistics"]["features"]["petal"]["mean"] > 50  # the shifted table's rows
    assert (f"data: {newest}, the newest of 3 tables under file://{incoming}/ "
            "(written 2026-12-03T00:00:00Z)") in capsys.readouterr().out


def write(frame: pd.DataFrame, path: Path) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def text(content: str, path: Path) -> str:
    path.write_text(content)
    return str(path)


BAD_SOURCES = {
    "missing": (lambda d: str(d / "x.csv"), "label", "does not exist"),
    "suffix": (lambda d: text("a,b\n1,2\n", d / "x.txt"), "b", "unsupported suffix '.txt'"),
    "zero_bytes": (lambda d: text("", d / "e.csv"), "label", "empty"),
    "header_only": (lambda d: write(table().iloc[:0], d / "h.csv"), "species", "empty"),
    "no_label": (lambda d: write(table(), d / "t.csv"), "label",
                 "no column 'label' (columns: petal, species, sepal); pass --label-column"),
    "single_class": (lambda d: write(table().assign(species="a"), d / "t.csv"), "species",
                     "single class 'a'"),
    "non_numeric": (lambda d: write(table().assign(colour="red"), d / "t.csv"), "species",
                    "non-numeric feature columns colour"),
    "nan": (lambda d: write(table().assign(sepal=np.nan), d / "t.csv"), "species",
            "missing or infinite values in feature columns sepal"),
    "too_few_rows": (lambda d: write(table(n_per_class=4), d / "t.csv"), "species",
                     "too few rows"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_is_one_line_and_writes_nothing(tmp_path, case):
    make_source, label, expected = BAD_SOURCES[case]
    source = make_source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserInputError) as error:
        prepare_data(source, label, *split_paths(out))
    message = str(error.value)
    assert "\n" not in message
    assert expected in message
    assert source.split("/")[-1] in message
    assert list(out.iterdir()) == []


def test_bad_fractions(tmp_path):
    with pytest.raises(UserInputError, match="val_fraction 0.6 and test_fraction 0.5"):
        prepare_data("digits", "", *split_paths(tmp_path), val_fraction=0.6, test_fraction=0.5)
    assert list(tmp_path.iterdir()) == []


# -- .npz sources -------------------------------------------------------------------------------

def per_value(split, name: str) -> np.ndarray:
    """A split's per-column (table) or per-channel (images [C, H, W]) statistic, shaped to
    broadcast over its rows."""
    stat = split.extra[name].astype(np.float64)
    return stat[:, None, None] if split.inputs["input"].ndim == 4 else stat


def unstandardised(split) -> np.ndarray:
    """A split's rows as they were in the source: standardisation undone."""
    return split.inputs["input"].astype(np.float64) * per_value(split, "std") \
        + per_value(split, "mean")


def assert_standardised_on_train_only(splits: dict, raw_rows: np.ndarray) -> None:
    """Every split carries train's mean and std, which are exactly those of the raw train rows."""
    train = splits["train"]
    raw_train = unstandardised(train)
    axes = (0, 2, 3) if raw_train.ndim == 4 else (0,)
    np.testing.assert_allclose(train.extra["mean"], raw_train.mean(axis=axes), atol=1e-4)
    np.testing.assert_allclose(train.inputs["input"].mean(axis=axes), 0, atol=1e-5)
    for split in splits.values():
        np.testing.assert_array_equal(split.extra["mean"], train.extra["mean"])
        np.testing.assert_array_equal(split.extra["std"], train.extra["std"])
    # Every row still is a row of the source, and no row is in two splits.
    restored = np.concatenate([unstandardised(s) for s in splits.values()])
    np.testing.assert_allclose(np.sort(restored, axis=0), np.sort(raw_rows, axis=0), atol=1e-3)


def prepared(source: str, directory: Path, label: str = "ignored") -> tuple[dict, dict]:
    meta = prepare_data(source, label, *split_paths(directory), seed=0)
    return meta, {name: load_split(path) for name, path in zip(SPLITS, split_paths(directory))}


SPLITS = ("train", "val", "test")


def test_npz_with_text_labels_and_image_shaped_rows(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(["dog", "cat", "emu"], 60)
    x = rng.integers(0, 9, size=(180, 2, 3)).astype(np.int16)  # N-D: flattened per row
    x[y == "emu", 0, 0] += 50
    np.savez(tmp_path / "animals.npz", x=x, y=y)
    meta, splits = prepared(str(tmp_path / "animals.npz"), tmp_path / "out")
    assert meta["class_names"] == ["cat", "dog", "emu"]
    assert meta["feature_names"] == ["x0_0", "x0_1", "x0_2", "x1_0", "x1_1", "x1_2"]
    assert meta["schema"] == {"x": "int16 2x3", "y": "<U3"}
    assert sum(meta["n_rows"].values()) == 180
    assert sorted(meta["class_counts"]["val"]) == ["cat", "dog", "emu"]
    assert set(meta["statistics"]["features"]) == set(meta["feature_names"])
    for split in splits.values():
        assert set(split.extra) == EXTRA and split.inputs["input"].shape[1] == 6 and split.inputs["input"].dtype == np.float32
    assert_standardised_on_train_only(splits, x.reshape(180, -1).astype(np.float64))
    train = splits["train"]
    emu = np.rint(unstandardised(train))[train.y == 2, 0]
    assert emu.min() >= 50  # class index 2 is emu, whose first feature was shifted


def test_npz_with_class_names_and_feature_names_from_an_fsspec_url(tmp_path):
    import fsspec

    rng = np.random.default_rng(1)
    y = np.arange(120) % 2
    x = rng.normal(size=(120, 3)) + y[:, None]
    url = "memory://torchship-test-data/pairs.npz"
    with fsspec.open(url, "wb") as handle:
        np.savez(handle, x=x, y=y, class_names=np.array(["zebra", "ant"]),
                 feature_names=np.array(["width", "height", "depth"]))
    try:
        meta, splits = prepared(url, tmp_path / "out")
    finally:
        fsspec.filesystem("memory").rm("/torchship-test-data", recursive=True)
    assert meta["source"] == url
    assert meta["class_names"] == ["zebra", "ant"]  # y indexes the given names, in their order
    assert meta["feature_names"] == ["width", "height", "depth"]
    assert meta["schema"] == {"x": "float64 3", "y": "int64 index into class_names"}
    assert sum(meta["class_counts"]["train"].values()) == meta["n_rows"]["train"] > 60
    assert list(splits["train"].extra["feature_names"]) == ["width", "height", "depth"]
    assert list(splits["test"].class_names) == ["zebra", "ant"]
    assert_standardised_on_train_only(splits, x)


# -- image folders ------------------------------------------------------------------------------

def image_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def class_pixels(rng: np.random.Generator, index: int, colour: bool) -> np.ndarray:
    """An 8x8 image whose class shows: class k has a bright band on rows 3k and 3k+1."""
    pixels = rng.integers(0, 60, size=(8, 8, 3) if colour else (8, 8), dtype=np.uint8)
    pixels[3 * index: 3 * index + 2] += 180
    return pixels


def write_image_folder(url: str, per_class: int = 30, colour_every: int = 0) -> None:
    """Classes 'circle', 'line', 'square' of 8x8 PNGs under `url` (any fsspec URL); with
    `colour_every`, every n-th image is RGB and the rest grayscale. Files and folders that are
    not class images are there to be ignored."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    rng = np.random.default_rng(0)
    for index, name in enumerate(("circle", "line", "square")):
        fs.makedirs(f"{root}/{name}", exist_ok=True)
        for i in range(per_class):
            colour = bool(colour_every) and i % colour_every == 0
            fmt, suffix = ("BMP", "bmp") if i == 1 else ("PNG", "png")
            fs.pipe_file(f"{root}/{name}/{i:02d}.{suffix}",
                         image_bytes(class_pixels(rng, index, colour), fmt))
        fs.pipe_file(f"{root}/{name}/notes.txt", b"not an image")
        fs.pipe_file(f"{root}/{name}/.hidden.png", b"not even an image")
    fs.makedirs(f"{root}/.ipynb_checkpoints", exist_ok=True)
    fs.pipe_file(f"{root}/.ipynb_checkpoints/x.png", b"ignored too")
    fs.pipe_file(f"{root}/README.md", b"classes are folders")


def test_grayscale_image_folder(tmp_path):
    write_image_folder(str(tmp_path / "shapes"))
    meta, splits = prepared(str(tmp_path / "shapes"), tmp_path / "out")
    assert meta["schema"] == {"image": "L 8x8", "label": "folder name"}
    assert meta["class_names"] == ["circle", "line", "square"]
    assert meta["n_features"] == 64 and meta["feature_names"] == ["grey"]  # stats per channel
    assert meta["contract"]["inputs"] == [
        {"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    assert sum(meta["n_rows"].values()) == 90 and meta["n_rows"]["train"] > 45
    assert min(meta["class_counts"]["test"].values()) > 0
    assert {sum(meta["class_counts"][s][c] for s in SPLITS) for c in meta["class_names"]} == {30}
    for split in splits.values():
        assert set(split.extra) == EXTRA and split.y.dtype == np.int64
        assert split.inputs["input"].shape[1:] == (1, 8, 8)
    train = splits["train"]
    assert_standardised_on_train_only(
        splits, np.concatenate([unstandardised(s) for s in splits.values()]))
    # Images [C, H, W]: class k's band is rows 3k and 3k+1 of its one channel.
    raw = np.rint(unstandardised(train))[:, 0]
    for index in range(3):
        band = raw[train.y == index][:, 3 * index: 3 * index + 2]
        assert band.min() >= 180, index
    assert raw.max() <= 255 and raw.min() >= 0


def test_one_colour_image_makes_the_folder_rgb(tmp_path):
    write_image_folder(str(tmp_path / "shapes"), colour_every=4)
    meta, splits = prepared(str(tmp_path / "shapes"), tmp_path / "out")
    assert meta["schema"] == {"image": "RGB 8x8", "label": "folder name"}
    assert meta["n_features"] == 192 and splits["val"].inputs["input"].shape[1:] == (3, 8, 8)
    assert meta["feature_names"] == ["red", "green", "blue"]
    assert len(splits["train"].extra["mean"]) == 3  # one mean per channel
    raw = np.rint(unstandardised(splits["train"]))
    grey = ((raw[:, 0] == raw[:, 1]) & (raw[:, 1] == raw[:, 2])).all(axis=(1, 2))
    assert 0 < grey.sum() < len(raw)  # grayscale images became RGB with r = g = b


def test_image_folder_from_an_fsspec_url(tmp_path):
    import fsspec

    url = "memory://torchship-test-images/shapes"
    write_image_folder(url)
    try:
        meta, _ = prepared(url, tmp_path / "out")
    finally:
        fsspec.filesystem("memory").rm("/torchship-test-images", recursive=True)
    assert meta["class_names"] == ["circle", "line", "square"]
    assert meta["schema"]["image"] == "L 8x8" and sum(meta["n_rows"].values()) == 90


def test_an_image_folder_trains(tmp_path):
    write_image_folder(str(tmp_path / "shapes"), per_class=40)
    train, val, _ = split_paths(tmp_path / "out")
    prepare_data(str(tmp_path / "shapes"), "", *split_paths(tmp_path / "out"), seed=0)
    with one_process_job():
        metrics = train_model(train, val, str(tmp_path / "model.pt"), epochs=3, num_workers=1,
                              progress=lambda _: None)
    assert metrics["val_accuracy"] > 0.8, metrics  # chance is 1/3


def test_mixed_sizes_are_resized_with_image_size_and_digits_read_as_images(tmp_path):
    write_image_folder(str(tmp_path / "shapes"))
    (tmp_path / "shapes" / "line" / "wide.png").write_bytes(
        image_bytes(np.full((4, 12), 200, np.uint8)))
    with pytest.raises(UserInputError, match="pass --image-size N to resize them all"):
        prepare_data(str(tmp_path / "shapes"), "", *split_paths(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    meta = prepare_data(str(tmp_path / "shapes"), "", *split_paths(tmp_path / "out"),
                        image_size=16)
    assert meta["contract"]["inputs"][0]["shape"] == ["batch", 1, 16, 16]
    with pytest.raises(UserInputError, match="image_size 16 is for image folders"):
        prepare_data("digits", "", *split_paths(tmp_path / "table"), image_size=16)

    meta = prepare_data("digits-images", "", *split_paths(tmp_path / "digits"))
    assert meta["contract"]["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert meta["n_classes"] == 10 and sum(meta["n_rows"].values()) == 1797
