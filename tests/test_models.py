"""build_model: built-ins, a user's module:factory, the output check, and checkpoints."""

import textwrap

import pytest
import torch
from torch import nn

from torchship.components.errors import UserInputError
from torchship.components.models import (
    build_model,
    check_model_output,
    load_checkpoint,
    save_checkpoint,
)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_builtin_models_map_features_to_logits(name):
    model = build_model(name, 64, 10)
    check_model_output(model, 64, 10, name=name)
    assert model(torch.randn(5, 64)).shape == (5, 10)


def test_cnn_needs_a_square_number_of_features():
    assert build_model("cnn", 16, 3)(torch.randn(2, 16)).shape == (2, 3)
    with pytest.raises(UserInputError, match="square number of features.*got 63"):
        build_model("cnn", 63, 10)


def test_unknown_model_lists_the_choices():
    with pytest.raises(UserInputError) as error:
        build_model("resnet", 64, 10)
    message = str(error.value)
    assert "'resnet'" in message and "mlp, cnn" in message and "module:factory" in message


def user_module(tmp_path, monkeypatch, name: str, body: str) -> str:
    """Write a user's model module into tmp_path and make it importable."""
    (tmp_path / f"{name}.py").write_text("from torch import nn\n\n" + textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_module_factory(tmp_path, monkeypatch):
    module = user_module(tmp_path, monkeypatch, "tiny_models_ok", """
        def make(n_features, n_classes):
            return nn.Sequential(nn.Linear(n_features, 8), nn.ReLU(), nn.Linear(8, n_classes))
    """)
    model = build_model(f"{module}:make", 64, 10)
    check_model_output(model, 64, 10)
    assert model(torch.randn(3, 64)).shape == (3, 10)


BAD_FACTORIES = {
    "attribute_missing": ("def other(n_features, n_classes):\n    return None\n",
                          "has no attribute 'make'"),
    "not_a_module": ("def make(n_features, n_classes):\n    return 'a string'\n",
                     "returned a str, not a torch.nn.Module"),
    "wrong_signature": ("def make(width):\n    return nn.Linear(width, 2)\n",
                        "cannot be called as make(n_features=..., n_classes=...)"),
    "not_callable": ("make = 3\n", "is not callable (type int)"),
    "import_fails": ("raise RuntimeError('broken on import')\n",
                     "could not be imported (RuntimeError: broken on import)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FACTORIES))
def test_bad_factory(tmp_path, monkeypatch, case):
    body, expected = BAD_FACTORIES[case]
    module = user_module(tmp_path, monkeypatch, f"tiny_models_{case}", body)
    with pytest.raises(UserInputError) as error:
        build_model(f"{module}:make", 64, 10)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_module_and_malformed_spec():
    with pytest.raises(UserInputError, match="module 'no_such_module_xyz' could not be imported"):
        build_model("no_such_module_xyz:make", 64, 10)
    with pytest.raises(UserInputError, match="not of the form 'module:factory'"):
        build_model("mymodels:", 64, 10)


def test_output_check_catches_wrong_shapes_and_failing_forward():
    with pytest.raises(UserInputError, match=r"returned \[3, 3\].*expected logits \[3, 10\]"):
        check_model_output(nn.Linear(64, 3), 64, 10, name="mine")
    with pytest.raises(UserInputError, match="failed on a float32 batch of shape"):
        check_model_output(nn.Linear(10, 10), 64, 10, name="mine")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_checkpoint_round_trip_is_plain_data(tmp_path, name):
    model = build_model(name, 64, 10).eval()
    path = tmp_path / "models" / "model.pt"
    save_checkpoint(path, model, name, 64, 10, extra={"epochs": 3})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]
    raw = torch.load(path, weights_only=True)
    assert {k: raw[k] for k in ("model_name", "n_features", "n_classes")} == {
        "model_name": name, "n_features": 64, "n_classes": 10}
    assert raw["extra"] == {"epochs": 3}
    loaded, checkpoint = load_checkpoint(path)
    assert not loaded.training
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert checkpoint["model_name"] == name


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
