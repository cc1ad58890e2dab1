"""build_model: built-ins, a user's module:factory, the output check, and checkpoints."""

import textwrap

import pytest
import torch
from torch import nn

from torchship.components.contracts import TensorSpec
from torchship.components.errors import UserInputError
from torchship.components.models import (
    build_model,
    check_model_output,
    load_checkpoint,
    resize_to_state_dict,
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
        build_model("resnet9000", 64, 10)
    message = str(error.value)
    assert "'resnet9000'" in message and "mlp, cnn, resnet" in message
    assert "module:factory" in message


IMAGES = [TensorSpec("input", "float32", ("batch", 3, 32, 32))]


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_builtin_models_take_images(name):
    model = build_model(name, IMAGES, 4)
    check_model_output(model, IMAGES, 4, name=name)
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 4)


def test_resnet_has_residual_blocks_batchnorm_and_global_pooling():
    model = build_model("resnet", IMAGES, 4, {"width": 8, "blocks": [1, 2]})
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 3
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d) and model.head.in_features == 16
    with pytest.raises(UserInputError, match="model 'resnet' needs images"):
        build_model("resnet", 64, 10)
    with pytest.raises(UserInputError, match="pass only width, blocks"):
        build_model("resnet", IMAGES, 4, {"depth": 3})


def test_options_that_went_through_the_pipeline_as_doubles_still_build_the_model():
    # A KFP dict parameter is a protobuf Struct: every number in it arrives as a float.
    model = build_model("resnet", IMAGES, 4, {"width": 8.0, "blocks": [1.0, 2.0]})
    assert model.head.in_features == 16 and isinstance(model.head.in_features, int)
    reference = build_model("resnet", IMAGES, 4, {"width": 8, "blocks": [1, 2]})
    assert [tuple(p.shape) for p in model.parameters()] == [
        tuple(p.shape) for p in reference.parameters()]
    with pytest.raises(UserInputError, match=r"^model 'resnet' could not be built with options "
                       r"\{'width': 'wide'\} \(ValueError: .*\); pass numbers for width, blocks"):
        build_model("resnet", IMAGES, 4, {"width": "wide"})
    with pytest.raises(UserInputError, match=r"^model 'resnet': width 16 and blocks \[0\] must"):
        build_model("resnet", IMAGES, 4, {"blocks": [0.0]})  # the builder's own line, unwrapped

def test_a_factory_gets_the_input_spec_when_it_asks_for_it(tmp_path, monkeypatch):
    module = user_module(tmp_path, monkeypatch, "tiny_models_text", """
        import torch

        class Bag(nn.Module):
            def __init__(self, vocab, n_classes):
                super().__init__()
                self.embed = nn.EmbeddingBag(vocab, 8)
                self.head = nn.Linear(8, n_classes)

            def forward(self, input_ids, attention_mask):
                return self.head(self.embed(input_ids, per_sample_weights=None)
                                 * attention_mask[:, :1])

        def make(inputs, n_classes):
            assert [spec.name for spec in inputs] == ["input_ids", "attention_mask"]
            return Bag(100, n_classes)
    """)
    text = [TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "sequence"))]
    model = build_model(f"{module}:make", text, 3)
    check_model_output(model, text, 3)
    with pytest.raises(UserInputError, match="'mlp' takes one float input of fixed shape"):
        build_model("mlp", text, 3)


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


def test_options_build_a_narrower_model_and_bad_options_list_the_accepted():
    model = build_model("mlp", 64, 10, {"hidden": 32, "depth": 1})
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [32, 10]
    assert build_model("cnn", 64, 10, {"channels": 4}).features[0].out_channels == 4
    with pytest.raises(UserInputError, match="does not take options.*pass only hidden, depth"):
        build_model("mlp", 64, 10, {"width": 32})


def test_factory_gets_the_options(tmp_path, monkeypatch):
    module = user_module(tmp_path, monkeypatch, "tiny_models_options", """
        def make(n_features, n_classes, hidden=8):
            return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_classes))
    """)
    assert build_model(f"{module}:make", 64, 10, {"hidden": 5})[0].out_features == 5
    with pytest.raises(UserInputError, match=r"make\(n_features=..., n_classes=..., depth=...\)"):
        build_model(f"{module}:make", 64, 10, {"depth": 2})


def test_checkpoint_keeps_the_options(tmp_path):
    model = build_model("mlp", 64, 10, {"hidden": 16}).eval()
    save_checkpoint(tmp_path / "student.pt", model, "mlp", 64, 10, model_options={"hidden": 16})
    loaded, checkpoint = load_checkpoint(tmp_path / "student.pt")
    assert checkpoint["model_options"] == {"hidden": 16}
    assert loaded.layers[0].out_features == 16


def test_resized_checkpoint_loads_into_the_spec_narrowed():
    """A structurally pruned model: the spec's modules, each narrower than the spec builds."""
    narrow = build_model("mlp", 64, 10, {"hidden": 24}).eval()
    state = narrow.state_dict()
    spec = build_model("mlp", 64, 10)
    resize_to_state_dict(spec, state)
    spec.load_state_dict(state)
    spec.eval()
    assert (spec.layers[0].out_features, spec.layers[3].in_features) == (24, 24)
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(spec(x), narrow(x))


def test_resized_flag_round_trips(tmp_path):
    narrow = build_model("cnn", 64, 10, {"channels": 4}).eval()
    save_checkpoint(tmp_path / "model.pt", narrow, "cnn", 64, 10, resized=True)
    loaded, checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert checkpoint["resized"] and loaded.features[0].out_channels == 4
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), narrow(x))
    save_checkpoint(tmp_path / "plain.pt", narrow, "cnn", 64, 10)  # not marked: shapes must match
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_checkpoint(tmp_path / "plain.pt")
