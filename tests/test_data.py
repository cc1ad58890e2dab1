"""prepare_data: stratified seeded splits, train-only standardisation, tables, and bad input."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from torchship.components.data import load_split, prepare_data
from torchship.components.errors import UserInputError

KEYS = {"x", "y", "mean", "std", "feature_names", "class_names"}


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
        assert set(split) == KEYS
        assert split["x"].dtype == np.float32 and split["x"].shape[1] == 64
        assert split["y"].dtype == np.int64
        assert list(split["class_names"]) == [str(i) for i in range(10)]
    assert meta["n_features"] == 64 and meta["n_classes"] == 10
    assert meta["source"] == "digits"
    assert sum(meta["n_rows"].values()) == 1797
    assert meta["n_rows"]["val"] == meta["n_rows"]["test"] == 270
    assert len(meta["schema"]) == 65 and len(meta["feature_names"]) == 64


def test_digits_split_is_stratified(prepared_digits):
    meta, splits, _ = prepared_digits
    overall = np.bincount(np.concatenate([s["y"] for s in splits.values()])) / 1797
    for name, split in splits.items():
        share = np.bincount(split["y"], minlength=10) / len(split["y"])
        assert np.abs(share - overall).max() < 0.01, name
        counts = meta["class_counts"][name]
        assert [counts[str(i)] for i in range(10)] == list(np.bincount(split["y"], minlength=10))


def test_digits_split_is_seeded(prepared_digits, tmp_path):
    _, splits, _ = prepared_digits
    prepare_data("digits", "", *split_paths(tmp_path / "same"), seed=0)
    prepare_data("digits", "", *split_paths(tmp_path / "other"), seed=1)
    same = load_split(str(tmp_path / "same" / "val"))
    other = load_split(str(tmp_path / "other" / "val"))
    np.testing.assert_array_equal(same["x"], splits["val"]["x"])
    np.testing.assert_array_equal(same["y"], splits["val"]["y"])
    assert not np.array_equal(other["x"], splits["val"]["x"])


def test_standardisation_is_fitted_on_train_only(prepared_digits):
    _, splits, _ = prepared_digits
    train, val = splits["train"], splits["val"]
    np.testing.assert_allclose(train["x"].mean(axis=0), 0, atol=1e-5)
    # Constant pixels keep std 1 (the floor), every other column has unit variance on train.
    std = train["x"].std(axis=0)
    assert np.all((np.abs(std - 1) < 1e-4) | (std < 1e-6))
    assert np.abs(val["x"].mean(axis=0)).max() > 1e-3
    for split in splits.values():
        np.testing.assert_array_equal(split["mean"], train["mean"])
        np.testing.assert_array_equal(split["std"], train["std"])
    assert np.all(train["std"] > 0)


def table(n_per_class: int = 20, seed: int = 0) -> pd.DataFrame:
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
    assert meta["n_rows"] == {"train": 42, "val": 9, "test": 9}
    train = load_split(str(tmp_path / "out" / "train"))
    assert list(train["feature_names"]) == ["petal", "sepal"]
    # Class index i is class_names[i]: the rows labelled setosa have the shifted petal values.
    setosa = train["class_names"].tolist().index("setosa")
    petal = train["x"][:, 0]
    assert petal[train["y"] == setosa].mean() > petal[train["y"] != setosa].mean()
    for split in meta["class_counts"].values():
        assert set(split.values()) <= {14, 3}


def test_fsspec_url_source(tmp_path):
    source = tmp_path / "flowers.csv"
    table().to_csv(source, index=False)
    meta = prepare_data(f"file://{source}", "species", *split_paths(tmp_path / "out"))
    assert meta["n_classes"] == 3


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
