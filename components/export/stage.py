"""export_variants: ONNX files for every variant, each checked by onnx.checker and for parity."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from torchship.components.contracts import (
    MODEL_ONNX,
    MODEL_PT,
    SKIPPED_JSON,
    VARIANT_JSON,
    VARIANTS_JSON,
    TensorContract,
)
from torchship.components.data.splits import EVALUATION_ROWS, load_split
from torchship.components.errors import UserInputError
from torchship.components.export.measure import measure_records
from torchship.components.export.parity import check_parity
from torchship.components.files import read_json, staged_dir, write_json
from torchship.components.models import export_onnx, load_checkpoint

# Held-out rows used for parity; enough for a stable top-1 agreement, cheap to run.
MAX_PARITY_ROWS = 2048


def export_variants(
    variants_dir: str | os.PathLike,
    test_path: str,
    onnx_dir: str | os.PathLike,
    atol: float = 1e-4,
    min_top1_agreement: float = 0.97,
    progress: Callable[[str], None] = print,
    measure: bool = True,
    latency_threads: int = 1,
    latency_rounds: int = 5,
    latency_block_s: float = 0.01,
) -> list[dict[str, Any]]:
    """Write `onnx_dir/<variant>/model.onnx` and `onnx_dir/variants.json`; every model must pass.

    Variants exported from PyTorch (fp32, pruned, structured, distilled) must match their own
    PyTorch model within `atol` (max abs logit difference); variants made on the ONNX graph
    (int8, int8_dynamic, fp16), from their `source` checkpoint, must agree with it on the top-1
    class for at least `min_top1_agreement` of the held-out test rows. With `measure`, each row
    also gets the variant table's measures (measure.measure_records: accuracy and drop
    from fp32, compressed size, ONNX Runtime CPU latency at batch 1 and 64 on
    `latency_threads` threads, agreement with fp32).
    """
    variants_dir = Path(variants_dir)
    variants = read_variants(variants_dir)
    test = load_split(test_path, rows=EVALUATION_ROWS)
    rows = test.rows(slice(0, MAX_PARITY_ROWS))
    references: dict[str, nn.Module] = {}

    def torch_model(name: str) -> nn.Module:
        if name not in references:
            references[name], _ = load_checkpoint(variants_dir / name / MODEL_PT)
        return references[name]

    with staged_dir(onnx_dir) as staging:
        records = []
        for variant in variants:
            name = variant["name"]
            onnx_path = staging / name / MODEL_ONNX
            if variant["format"] == "torch":
                reference_name = name
                export_onnx(torch_model(name), contract_of_record(variant), onnx_path, rows=rows)
            elif variant["format"] == "onnx":
                reference_name = variant["source"]
                _copy_onnx_variant(variants_dir, variant, onnx_path)
            else:
                raise UserInputError(
                    f"variant '{name}' in '{variants_dir}' has unknown format "
                    f"{variant['format']!r}; pass variants written by compress"
                )
            onnx.checker.check_model(str(onnx_path), full_check=True)
            criterion = variant.get("parity_criterion") or (
                "top1_agreement" if variant["format"] == "onnx" else "max_abs_diff")
            parity = check_parity(
                name, onnx_path, torch_model(reference_name), reference_name, rows,
                criterion=criterion, atol=atol, min_top1_agreement=min_top1_agreement,
            )
            records.append(
                {**variant, "onnx_size_bytes": onnx_path.stat().st_size, "parity": parity}
            )
            progress(f"{name}: model.onnx passes onnx.checker; parity with PyTorch "
                     f"'{reference_name}': max |diff| {parity['max_abs_diff']:.2g}, "
                     f"top-1 agreement {parity['top1_agreement']:.4f}")
        if measure:
            records = measure_records(
                records, staging, test, threads=latency_threads,
                rounds=latency_rounds, block_s=latency_block_s, progress=progress,
            )
        write_json(records, staging / VARIANTS_JSON)
        write_json(read_json(variants_dir / SKIPPED_JSON) or [], staging / SKIPPED_JSON)
    return records


def _copy_onnx_variant(variants_dir: Path, variant: dict[str, Any], onnx_path: Path) -> None:
    """An ONNX variant's file as compress wrote it, after checking it and its PyTorch source."""
    name, source = variant["name"], variant["source"]
    if not (variants_dir / source / MODEL_PT).exists():
        raise UserInputError(
            f"variant '{name}' comes from '{source}', which is not in '{variants_dir}'; pass "
            "the variants directory that compress wrote"
        )
    source_path = variants_dir / name / MODEL_ONNX
    try:
        onnx.checker.check_model(str(source_path))
    except Exception as error:  # unreadable or invalid: the variant file is bad
        raise UserInputError(
            f"variant '{name}': {source_path} is not a valid ONNX model "
            f"({str(error).splitlines()[0][:160]}); re-run the compress stage"
        ) from error
    onnx_path.parent.mkdir(parents=True)
    shutil.copyfile(source_path, onnx_path)


def read_variants(variants_dir: Path) -> list[dict[str, Any]]:
    """The variant.json records under `variants_dir`, in the order compress gave them."""
    if not variants_dir.is_dir():
        raise UserInputError(
            f"variants directory '{variants_dir}' does not exist; pass the directory that "
            "compress wrote"
        )
    variants = [json.loads(p.read_text()) for p in variants_dir.glob(f"*/{VARIANT_JSON}")]
    if not variants:
        raise UserInputError(
            f"variants directory '{variants_dir}' has no <name>/variant.json; pass the directory "
            "that compress wrote"
        )

    return sorted(variants, key=lambda variant: (variant.get("order", 1 << 30), variant["name"]))


def contract_of_record(variant: dict[str, Any]) -> TensorContract:
    """The tensor contract of a variant record (a table's, for a record from before it)."""
    if "contract" in variant:
        return TensorContract.from_dict(variant["contract"])
    return TensorContract.table(variant["n_features"], variant["n_classes"])
