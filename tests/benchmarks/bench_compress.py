"""make bench-compress: every compression variant of the default mlp on digits, measured.

Trains the default model (mlp, 1.1M parameters) on the built-in digits data in this process,
makes every variant with compress_model, exports and measures them with export_variants, prints
the variant table, and ends with one `name = value` line per goal of issue 4:

| line | goal |
|---|---|
| int8_size_ratio | >= 3.5 (fp32 ONNX bytes / int8 ONNX bytes) |
| int8_speedup_b64 | >= 2.0 (fp32 / int8 ONNX Runtime CPU latency at batch 64) |
| int8_acc_drop_pt | <= 1.0 (test accuracy points lost against fp32) |
| unstructured_sparsity | >= 0.80 (zero fraction of the Linear weights) |
| unstructured_acc_drop_pt | <= 1.0 |
| structured_speedup_b64 | >= 1.5 |
| structured_acc_drop_pt | <= 2.0 |
| distilled_param_ratio | >= 4 (fp32 parameters / student parameters) |
| distilled_acc_drop_pt | <= 2.0 |

Latency: ONNX Runtime CPU provider, intra_op_num_threads=1 for every variant (so a ratio
compares kernels, not core counts), graph optimisation ALL, variants timed in interleaved
rounds and the median per-call time taken (see compress_measure). The int8 kernels ONNX
Runtime picks depend on the CPU (AVX2, AVX-512, VNNI), so the printed CPU flags go with the
numbers. Accuracy is on the held-out test split (270 rows: one row is 0.37 points).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from torchship.components.compress.stage import compress_model
from torchship.components.data.stage import prepare_data
from torchship.components.export.stage import export_variants
from torchship.components.export.table import format_variant_table
from torchship.components.train.stage import train_model

EPOCHS = 20
SEED = 0
COMPRESS = {
    "target_sparsity": 0.9, "prune_steps": 3, "finetune_epochs": 3,
    "structured_ratio": 0.5, "calibration_method": "minmax", "student_hidden": 256,
    "distill_epochs": 30, "distill_temperature": 4.0,
}
LATENCY = {"latency_threads": 1, "latency_rounds": 31, "latency_block_s": 0.05}


def clock() -> Callable[[str], None]:
    """A progress printer that starts each line with the seconds since it was made."""
    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    return say


def print_results(rows: list[dict], results: list[tuple[str, str]]) -> None:
    """The variant table, then one `name = value` line per goal: what every bench ends with."""
    print()
    print(format_variant_table(rows))
    print()
    for name, value in results:
        print(f"{name} = {value}")


def main() -> None:
    say = clock()

    say(f"cpu: {_cpu()}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as work:
        paths = {name: str(Path(work) / name) for name in ("train", "val", "test")}
        prepare_data("digits", "", paths["train"], paths["val"], paths["test"], seed=SEED)
        model_path = str(Path(work) / "model.pt")
        # One worker in this process (no launcher): the environment a launcher would set.
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        threads = torch.get_num_threads()
        trained = train_model(paths["train"], paths["val"], model_path, model_name="mlp",
                              epochs=EPOCHS, seed=SEED, progress=lambda _: None)
        torch.set_num_threads(threads)
        say(f"trained mlp ({trained['n_parameters']:,} parameters) for {EPOCHS} epochs: "
            f"val accuracy {trained['val_accuracy']:.4f}")

        variants_dir = str(Path(work) / "variants")
        compress_model(model_path, paths["train"], paths["val"], paths["test"], variants_dir,
                       seed=SEED, progress=lambda line: say(f"compress: {line}"), **COMPRESS)
        say(f"measuring with ONNX Runtime: {LATENCY}; load average {os.getloadavg()[0]:.2f}")
        rows = export_variants(variants_dir, paths["test"], str(Path(work) / "onnx"),
                               progress=lambda line: say(f"export: {line}"), **LATENCY)
        say(f"done; load average {os.getloadavg()[0]:.2f}")

    by_name = {row["name"]: row for row in rows}
    int8, pruned = by_name["int8"], by_name["pruned"]
    structured, distilled = by_name["structured"], by_name["distilled"]
    results = [
        ("int8_size_ratio", f"{int8['size_ratio']:.2f}"),
        ("int8_speedup_b64", f"{int8['speedup_b64']:.2f}"),
        ("int8_acc_drop_pt", f"{int8['acc_drop_pt']:.2f}"),
        ("unstructured_sparsity", f"{pruned['sparsity']:.3f}"),
        ("unstructured_acc_drop_pt", f"{pruned['acc_drop_pt']:.2f}"),
        ("structured_speedup_b64", f"{structured['speedup_b64']:.2f}"),
        ("structured_acc_drop_pt", f"{structured['acc_drop_pt']:.2f}"),
        ("distilled_param_ratio", f"{distilled['param_ratio']:.2f}"),
        ("distilled_acc_drop_pt", f"{distilled['acc_drop_pt']:.2f}"),
    ]
    print_results(rows, results)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu() -> str:
    """The CPU model and the SIMD flags that decide which int8 kernels ONNX Runtime runs."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return sys.platform
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    simd = [flag for flag in flags if flag.startswith(("avx", "amx")) or "vnni" in flag]
    return f"{model}, {' '.join(simd) or 'no AVX'}"


if __name__ == "__main__":
    main()
