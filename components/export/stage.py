"""export_variants: ONNX files for every variant, each checked by onnx.checker and for parity."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from torchship.components.data.stage import load_split
from torchship.components.errors import ParityError, UserInputError
from torchship.components.models import load_checkpoint

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Variants in the order a reader expects them (the baseline, the torch variants, then those
# made on the ONNX graph); any others follow by name.
VARIANT_ORDER = ("fp32", "pruned", "structured", "distilled", "int8", "int8_dynamic", "fp16")
# Batch sizes every exported model must accept: 1 and an odd size the example never used.
BATCH_SIZES_CHECKED = (1, 7)
# Held-out rows used for parity; enough for a stable top-1 agreement, cheap to run.
MAX_PARITY_ROWS = 2048
# A staging directory in which nothing changed for this long was left by a run that was killed
# (SIGKILL, a lost machine): a live one writes each variant as it finishes, in seconds to minutes.
STALE_STAGING_S = 3600.0
# The random part tempfile.mkdtemp puts after a staging directory's prefix.
_MKDTEMP_NAME = re.compile(r"[a-z0-9_]{8}")


def export_onnx(
    model: nn.Module, n_features: int, path: str | os.PathLike, opset: int = 17,
    dynamo: bool = False,
) -> Path:
    """Export `model` to ONNX at `path` (input `input` [batch, n_features], output `logits`).

    The TorchScript exporter is the default: for these models it gives the same graph as the
    torch.export-based one (Gemm/Conv, dynamic batch) at native opset 17, in a tenth of a second
    instead of several. `dynamo=True` uses torch.export (which implements opset 18 and up).
    """
    model = model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # Batch 2, not 1: a tracer may treat a dimension of size 1 as a constant.
    example = torch.zeros(2, n_features, device=device)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter announces its own deprecation on every call.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message="The feature will be removed")
            if dynamo:
                torch.onnx.export(
                    model, (example,), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    opset_version=opset, dynamo=True, verbose=False,
                )
            else:
                torch.onnx.export(
                    model, (example,), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=opset, dynamo=False, do_constant_folding=True,
                )
        onnx.checker.check_model(tmp, full_check=True)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; Triton and other stages read it
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


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
    also gets the variant table's measures (compress_measure.measure_records: accuracy and drop
    from fp32, compressed size, ONNX Runtime CPU latency at batch 1 and 64 on
    `latency_threads` threads, agreement with fp32).
    """
    variants_dir = Path(variants_dir)
    variants = read_variants(variants_dir)
    test = load_split(test_path)
    x = test["x"][:MAX_PARITY_ROWS]
    references: dict[str, nn.Module] = {}

    def torch_model(name: str) -> nn.Module:
        if name not in references:
            references[name], _ = load_checkpoint(variants_dir / name / "model.pt")
        return references[name]

    staging = make_staging_dir(onnx_dir)
    try:
        records = []
        for variant in variants:
            name = variant["name"]
            onnx_path = staging / name / "model.onnx"
            if variant["format"] == "torch":
                reference_name = name
                export_onnx(torch_model(name), variant["n_features"], onnx_path)
            elif variant["format"] == "onnx":
                reference_name = variant["source"]
                if not (variants_dir / reference_name / "model.pt").exists():
                    raise UserInputError(
                        f"variant '{name}' comes from '{reference_name}', which is not in "
                        f"'{variants_dir}'; pass the variants directory that compress wrote"
                    )
                source_path = variants_dir / name / "model.onnx"
                try:
                    onnx.checker.check_model(str(source_path))
                except Exception as error:  # unreadable or invalid: the variant file is bad
                    raise UserInputError(
                        f"variant '{name}': {source_path} is not a valid ONNX model "
                        f"({str(error).splitlines()[0][:160]}); re-run the compress stage"
                    ) from error
                onnx_path.parent.mkdir(parents=True)
                shutil.copyfile(source_path, onnx_path)
            else:
                raise UserInputError(
                    f"variant '{name}' in '{variants_dir}' has unknown format "
                    f"{variant['format']!r}; pass variants written by compress"
                )
            onnx.checker.check_model(str(onnx_path), full_check=True)
            parity = check_parity(
                name, onnx_path, torch_model(reference_name), reference_name, x,
                quantized=variant["format"] == "onnx", atol=atol,
                min_top1_agreement=min_top1_agreement,
            )
            records.append(
                {**variant, "onnx_size_bytes": onnx_path.stat().st_size, "parity": parity}
            )
            progress(f"{name}: model.onnx passes onnx.checker; parity with PyTorch "
                     f"'{reference_name}': max |diff| {parity['max_abs_diff']:.2g}, "
                     f"top-1 agreement {parity['top1_agreement']:.4f}")
        if measure:
            from torchship.components.export.measure import measure_records

            records = measure_records(
                records, staging, test, threads=latency_threads,
                rounds=latency_rounds, block_s=latency_block_s, progress=progress,
            )
        (staging / "variants.json").write_text(json.dumps(records, indent=2))
        publish_dir(staging, onnx_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return records


def read_variants(variants_dir: Path) -> list[dict[str, Any]]:
    """The variant.json records under `variants_dir`, in VARIANT_ORDER."""
    if not variants_dir.is_dir():
        raise UserInputError(
            f"variants directory '{variants_dir}' does not exist; pass the directory that "
            "compress wrote"
        )
    variants = [json.loads(p.read_text()) for p in variants_dir.glob("*/variant.json")]
    if not variants:
        raise UserInputError(
            f"variants directory '{variants_dir}' has no <name>/variant.json; pass the directory "
            "that compress wrote"
        )

    def order(variant: dict[str, Any]) -> tuple[int, str]:
        name = variant["name"]
        rank = VARIANT_ORDER.index(name) if name in VARIANT_ORDER else len(VARIANT_ORDER)
        return rank, name

    return sorted(variants, key=order)


def check_parity(
    name: str,
    onnx_path: Path,
    reference: nn.Module,
    reference_name: str,
    x: np.ndarray,
    quantized: bool,
    atol: float,
    min_top1_agreement: float,
) -> dict[str, Any]:
    """Compare ONNX Runtime's logits with PyTorch's on `x`; raise ParityError beyond tolerance."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch_dim = session.get_inputs()[0].shape[0]
    for batch_size in BATCH_SIZES_CHECKED:
        try:
            (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x[:batch_size]})
        except Exception as error:  # ORT raises its own exception types for shape errors
            raise ParityError(
                f"variant '{name}': the ONNX model fails at batch size {batch_size} "
                f"({' '.join(str(error).split())[:200]}); keep the batch dimension free in forward"
            ) from error
        if logits.shape[0] != batch_size:
            raise ParityError(
                f"variant '{name}': the ONNX model returns {logits.shape[0]} rows for a batch of "
                f"{batch_size}; keep the batch dimension free in forward"
            )

    (onnx_logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    with torch.no_grad():
        torch_logits = reference.eval()(torch.from_numpy(x)).numpy()
    max_abs_diff = float(np.max(np.abs(onnx_logits - torch_logits)))
    top1_agreement = float(np.mean(onnx_logits.argmax(axis=1) == torch_logits.argmax(axis=1)))
    # Quantised logits move by design; what must hold is the decision. Float exports must
    # reproduce the logits themselves.
    criterion = "top1_agreement" if quantized else "max_abs_diff"
    passed = (top1_agreement >= min_top1_agreement) if quantized else (max_abs_diff <= atol)
    parity = {
        "reference": reference_name,
        "rows": len(x),
        "max_abs_diff": max_abs_diff,
        "top1_agreement": top1_agreement,
        "criterion": criterion,
        "atol": atol,
        "min_top1_agreement": min_top1_agreement,
        "batch_sizes_checked": list(BATCH_SIZES_CHECKED),
        "dynamic_batch": isinstance(batch_dim, str) or batch_dim is None,
        "passed": passed,
    }
    if not passed:
        measured, required = (
            (f"top-1 agreement {top1_agreement:.4f}", f"at least {min_top1_agreement}")
            if quantized else (f"max abs logit difference {max_abs_diff:.3g}", f"at most {atol}")
        )
        raise ParityError(
            f"variant '{name}' disagrees with PyTorch '{reference_name}' on {len(x)} test rows: "
            f"{measured}, required {required}; fix the export or loosen the tolerance"
        )
    return parity


def make_staging_dir(destination: str | os.PathLike) -> Path:
    """A fresh directory beside `destination`, to build an artifact in before publish_dir.

    Staging directories of `destination` that killed runs left behind are removed first.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(destination)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(destination), dir=destination.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the published artifact is read by others
    return staging


def remove_stale_staging(destination: str | os.PathLike,
                         max_idle_s: float = STALE_STAGING_S) -> list[Path]:
    """Remove the staging directories of `destination` (and of no other) in which nothing has
    changed for `max_idle_s`, and return them; those still being written are left alone."""
    destination = Path(destination)
    prefix = _staging_prefix(destination)
    removed = []
    for entry in destination.parent.iterdir():
        if not (entry.name.startswith(prefix) and _MKDTEMP_NAME.fullmatch(entry.name[len(prefix):])
                and entry.is_dir() and not entry.is_symlink()):
            continue
        try:
            idle_s = time.time() - _last_change(entry)
        except FileNotFoundError:  # its own run just published or removed it
            continue
        if idle_s >= max_idle_s:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _staging_prefix(destination: Path) -> str:
    return f".{destination.name}.tmp-"


def _last_change(directory: Path) -> float:
    """The newest modification time of `directory` and of everything under it."""
    newest = directory.stat().st_mtime
    for root, dirs, files in os.walk(directory):
        for name in (*dirs, *files):
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:  # removed while we looked
                pass
    return newest


def publish_dir(staging: Path, destination: str | os.PathLike) -> None:
    """Move a fully built `staging` directory to `destination`, replacing what was there."""
    destination = Path(destination)
    if destination.is_dir() and any(destination.iterdir()):
        # rename() cannot replace a non-empty directory: move the old one aside first, so the
        # destination is never half old and half new.
        retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
        os.replace(destination, retired / destination.name)
        os.replace(staging, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, destination)
