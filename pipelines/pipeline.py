"""The torchship DAG (data -> train -> compress -> export -> deploy -> benchmark) and its compiler."""

import os
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl
from kfp.dsl import Artifact, Markdown

from torchship.pipelines.components import build_components

PIPELINE_NAME = "torchship"
IMAGE_ENV = "TORCHSHIP_IMAGE"
STAGES = ("prepare-data", "train", "compress", "export", "deploy", "benchmark")


def default_image() -> str:
    """The component image: $TORCHSHIP_IMAGE, else the tag `make images` gives the local build."""
    return os.environ.get(IMAGE_ENV) or f"torchship-cpu:{version('torchship')}"


def build_pipeline(image: str) -> Callable:
    """The pipeline function with every component's base image set to `image`."""
    ops = build_components(image)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="PyTorch model from raw data to a benchmarked NVIDIA Triton deployment.",
    )
    def torchship_pipeline(
        data_source: str = "digits",
        label_column: str = "label",
        model_name: str = "mlp",
        epochs: int = 10,
        batch_size: int = 64,
        learning_rate: float = 0.001,
        num_workers: int = 2,
        seed: int = 0,
        target_sparsity: float = 0.8,
        finetune_epochs: int = 2,
        quantize: bool = True,
        deploy_target: str = "local",
        benchmark_concurrency: list[int] = [1, 4],  # noqa: B006 - KFP takes defaults from here
        benchmark_batch_size: int = 1,
        benchmark_duration_s: float = 3.0,
    ) -> NamedTuple("Outputs", summary=Markdown, results=Artifact):
        data = ops.prepare_data(data_source=data_source, label_column=label_column, seed=seed)
        trained = ops.train(
            train=data.outputs["train"], val=data.outputs["val"], model_name=model_name,
            epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
            num_workers=num_workers, seed=seed,
        )
        variants = ops.compress(
            model=trained.outputs["model"], train=data.outputs["train"],
            val=data.outputs["val"], test=data.outputs["test"],
            target_sparsity=target_sparsity, finetune_epochs=finetune_epochs,
            quantize=quantize, seed=seed,
        )
        exported = ops.export(variants=variants.outputs["variants"], test=data.outputs["test"])
        deployed = ops.deploy(
            onnx_models=exported.outputs["onnx_models"], test=data.outputs["test"],
            target=deploy_target,
        )
        measured = ops.benchmark(
            model_repository=deployed.outputs["model_repository"],
            onnx_models=exported.outputs["onnx_models"], test=data.outputs["test"],
            concurrency=benchmark_concurrency, batch_size=benchmark_batch_size,
            duration_s=benchmark_duration_s,
        )
        outputs = NamedTuple("Outputs", summary=Markdown, results=Artifact)  # noqa: UP014 - KFP's form
        return outputs(summary=measured.outputs["summary"], results=measured.outputs["results"])

    return torchship_pipeline


def compile_pipeline(output: str | Path, image: str | None = None) -> Path:
    """Write the pipeline YAML (the contract every runner executes) and return its path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.tmp{output.suffix}")  # kfp checks the suffix
    compiler.Compiler().compile(build_pipeline(image or default_image()), str(tmp))
    tmp.replace(output)
    return output
