"""The two registries, exercised the way components/README.md says to extend them: a variant
registered in a module of its own is made, exported and accepted by the pipeline with no other
change; so is a deploy target."""

from __future__ import annotations

import copy
import importlib
import pkgutil
import shutil
from pathlib import Path

import pytest
import torch

from torchship.components.compress import registry
from torchship.components.compress import variants as catalog
from torchship.components.compress.stage import compress_model
from torchship.components.deploy import registry as deploy_registry
from torchship.components.deploy.stage import check_deploy_settings, deploy_to
from torchship.components.deploy.targets import target_names
from torchship.components.errors import UserInputError
from torchship.components.export.stage import export_variants
from torchship.components.models import build_model, save_checkpoint
from torchship.pipelines.parameters import check_parameters


def rounded(ctx):
    """A variant as a module would define it: the fp32 weights rounded to a few decimals."""
    model = copy.deepcopy(ctx.fp32)
    decimals = ctx.options["round_decimals"]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.round(parameter, decimals=decimals))
    return registry.Made(model=model, settings={"decimals": decimals})


@pytest.fixture
def with_rounded(monkeypatch):
    """Register `rounded` and its option, and take them out again after the test."""
    monkeypatch.setattr(registry, "_VARIANTS", dict(registry._VARIANTS))
    monkeypatch.setattr(registry, "_OPTIONS", dict(registry._OPTIONS))
    registry.option("round_decimals", 3, registry.whole_at_least(0), "pass e.g. 3")
    return registry.register(registry.Variant(
        name="rounded", order=35, kind="weight_rounding", format="torch", make=rounded,
        options=("round_decimals",), default=False))


@pytest.fixture(scope="module")
def untrained(digits, tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, build_model("mlp", 64, 10, {"hidden": 32}), "mlp", 64, 10,
                    model_options={"hidden": 32})
    return str(path)


def test_every_variant_module_registers_one_variant():
    modules = {m.name for m in pkgutil.iter_modules(catalog.__path__)}
    registered = {variant.name: variant for variant in catalog.all_variants()}
    for module in modules:
        variant = importlib.import_module(f"{catalog.__name__}.{module}").VARIANT
        assert registered[variant.name] is variant
    assert len(registered) == len(modules)
    assert [v.order for v in catalog.all_variants()] == sorted(v.order for v in registered.values())


def test_a_registered_variant_is_made_exported_and_accepted_with_nothing_else_changed(
        with_rounded, untrained, digits, tmp_path):
    assert "rounded" in catalog.names() and "rounded" not in catalog.default_names()
    check_parameters({"variants": ["fp32", "rounded"]})  # the pipeline accepts it
    rows = compress_model(untrained, digits["train"], digits["val"], digits["test"],
                          str(tmp_path / "variants"), variants=["rounded", "int8"],
                          round_decimals=2, progress=lambda _: None)
    assert [row["name"] for row in rows] == ["fp32", "rounded", "int8"]  # by order
    assert rows[1]["settings"] == {"decimals": 2} and rows[1]["kind"] == "weight_rounding"
    exported = export_variants(tmp_path / "variants", digits["test"], str(tmp_path / "onnx"),
                               measure=False, progress=lambda _: None)
    assert [row["name"] for row in exported] == ["fp32", "rounded", "int8"]
    assert exported[1]["parity"]["passed"] and exported[1]["parity"]["reference"] == "rounded"
    with pytest.raises(UserInputError, match="--round-decimals -1 is not a whole number >= 0"):
        compress_model(untrained, digits["train"], digits["val"], digits["test"],
                       str(tmp_path / "again"), variants=["rounded"], round_decimals=-1)
    assert not (tmp_path / "again").exists()


def copy_to(path: str, overwrite: bool = False) -> None:
    """What a target's settings are: the keyword arguments of this function."""


@pytest.fixture
def with_directory_target(monkeypatch):
    monkeypatch.setattr(deploy_registry, "_TARGETS", dict(deploy_registry._TARGETS))
    seen = []

    def deploy(request: deploy_registry.DeployRequest) -> dict:
        seen.append(request)
        destination = Path(request.settings["path"])
        shutil.copytree(request.onnx_dir, destination, dirs_exist_ok=request.settings.get(
            "overwrite", False))
        return {"path": str(destination), "summary": {"path": str(destination)}}

    deploy_registry.register(deploy_registry.DeployTarget(
        name="directory", deploy=deploy, settings_of=copy_to, required_settings=("path",),
        filled_by_stage=()))
    return seen


def test_a_registered_deploy_target_is_routed_to_and_its_settings_checked(
        with_directory_target, onnx_dir, test_path, tmp_path):
    assert "directory" in target_names()
    result = deploy_to("directory", onnx_dir, tmp_path / "repository", "", test_path,
                       settings={"path": str(tmp_path / "copy"), "instance_count": 2},
                       serving={"max_queue_delay_us": 500}, progress=lambda _: None)
    assert (tmp_path / "copy" / "fp32" / "model.onnx").is_file()
    assert result["summary"] == {"path": str(tmp_path / "copy")}
    (request,) = with_directory_target
    # Serving settings reach every target: the search's, overridden by the target's settings.
    assert (request.serving.max_queue_delay_us, request.serving.instance_count) == (500, 2)
    assert request.settings == {"path": str(tmp_path / "copy")}

    with pytest.raises(UserInputError, match="needs deploy_settings path"):
        check_deploy_settings("directory", {})
    with pytest.raises(UserInputError, match="colour are not settings of the 'directory'"):
        check_deploy_settings("directory", {"path": "x", "colour": "red"})
    check_parameters({"deploy_target": "directory", "deploy_settings": {"path": "x"}})
    with pytest.raises(UserInputError, match="deploy target 'ftp' is unknown; pass one of "
                                             "directory, kserve, local, vertex"):
        check_deploy_settings("ftp", {})


def test_a_variant_that_does_not_apply_is_named_with_its_reason_in_the_table(
        monkeypatch, untrained, digits, tmp_path):
    from torchship.components.report.summary import build_summary, format_table

    monkeypatch.setattr(registry, "_VARIANTS", dict(registry._VARIANTS))
    registry.register(registry.Variant(
        name="heads", order=70, kind="head_pruning", format="torch", default=False,
        make=lambda ctx: registry.Made(skipped="the model has no attention heads")))
    rows = compress_model(untrained, digits["train"], digits["val"], digits["test"],
                          str(tmp_path / "variants"), variants=["heads"],
                          progress=lambda _: None)
    assert [row["name"] for row in rows] == ["fp32"]
    export_variants(tmp_path / "variants", digits["test"], str(tmp_path / "onnx"),
                    measure=False, progress=lambda _: None)
    summary = build_summary(str(tmp_path / "onnx"), {"results": []})
    assert summary["skipped"] == [{"name": "heads", "reason": "the model has no attention heads"}]
    assert "not made: heads: the model has no attention heads" in format_table(summary)
