"""make bench-vision: a ResNet on RGB images, and its int8 (post-training and QAT) and structured
variants, measured.

Generates an RGB image folder (8 classes, 32x32: a patch whose quadrant and colour make the
class, in heavy noise), prepares it as images [3, 32, 32], trains the built-in `resnet` (width
32, blocks 2-2-2) in this process, makes the `structured`, `int8` and `qat` variants with
compress_model, exports and measures them with export_variants, prints the variant table, and
ends with one `name = value` line per goal of issue 13:

| line | goal |
|---|---|
| resnet_int8_speedup_b64 | >= 2.0 (fp32 / int8 ONNX Runtime CPU latency at batch 64) |
| resnet_int8_acc_drop_pt | <= 1.0 (test accuracy points lost against fp32) |
| resnet_structured_speedup_b64 | >= 1.5 |
| resnet_structured_acc_drop_pt | <= 2.0 |
| resnet_qat_acc_drop_pt | <= 0.5, and at most resnet_int8_acc_drop_pt |

Latency: ONNX Runtime CPU provider on one thread for every variant, variants timed in
interleaved rounds (see export/measure.py); the int8 kernels depend on the CPU, so the CPU model
and its SIMD flags are printed with the numbers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_compress import _cpu, _free_port, clock, print_results

from torchship.components.compress.stage import compress_model
from torchship.components.data.stage import prepare_data
from torchship.components.export.stage import export_variants
from torchship.components.train.stage import train_model

SEED = 0
CLASSES_PER_COLOUR, COLOURS = 4, ((230, 70, 60), (230, 150, 40))
PER_CLASS, SIZE = 150, 32
MODEL = {"model_name": "resnet", "model_options": {"width": 32, "blocks": [2, 2, 2]},
         "epochs": 8, "batch_size": 16, "learning_rate": 2e-3}
COMPRESS = {"structured_ratio": 0.5, "prune_steps": 3, "finetune_epochs": 4,
            "calibration_method": "minmax", "qat_epochs": 3}
LATENCY = {"latency_threads": 1, "latency_rounds": 21, "latency_block_s": 0.05}


def write_images(root: Path) -> None:
    """Class = quadrant x colour of a jittered patch; noise makes the two colours close calls."""
    from PIL import Image

    rng = np.random.default_rng(SEED)
    half = SIZE // 2
    for colour_index, colour in enumerate(COLOURS):
        for quadrant in range(CLASSES_PER_COLOUR):
            folder = root / f"q{quadrant}_c{colour_index}"
            folder.mkdir(parents=True)
            for i in range(PER_CLASS):
                pixels = rng.integers(0, 120, (SIZE, SIZE, 3)).astype(np.int32)
                r, c = divmod(quadrant, 2)
                side = int(rng.integers(9, 14))
                top = r * half + int(rng.integers(0, half - side + 1))
                left = c * half + int(rng.integers(0, half - side + 1))
                patch = np.array(colour) + rng.integers(-45, 46, 3)
                pixels[top:top + side, left:left + side] = patch
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(
                    folder / f"{i:03d}.png")


def main() -> None:
    say = clock()

    say(f"cpu: {_cpu()}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench-vision-") as work:
        images = Path(work) / "images"
        write_images(images)
        paths = {name: str(Path(work) / name) for name in ("train", "val", "test")}
        meta = prepare_data(str(images), "", paths["train"], paths["val"], paths["test"],
                            seed=SEED)
        say(f"images: {meta['n_rows']} rows of {meta['contract']['inputs'][0]['shape']}, "
            f"{meta['n_classes']} classes")
        model_path = str(Path(work) / "model.pt")
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        threads = torch.get_num_threads()
        trained = train_model(paths["train"], paths["val"], model_path, seed=SEED,
                              progress=lambda line: say(f"train: {line}"), **MODEL)
        torch.set_num_threads(threads)
        say(f"trained resnet ({trained['n_parameters']:,} parameters): val accuracy "
            f"{trained['val_accuracy']:.4f}")
        variants_dir = str(Path(work) / "variants")
        compress_model(model_path, paths["train"], paths["val"], paths["test"], variants_dir,
                       variants=["structured", "int8", "qat"], seed=SEED,
                       progress=lambda line: say(f"compress: {line}"), **COMPRESS)
        say(f"measuring with ONNX Runtime: {LATENCY}; load average {os.getloadavg()[0]:.2f}")
        rows = export_variants(variants_dir, paths["test"], str(Path(work) / "onnx"),
                               progress=lambda line: say(f"export: {line}"), **LATENCY)
        say(f"done; load average {os.getloadavg()[0]:.2f}")

    by_name = {row["name"]: row for row in rows}
    results = [
        ("resnet_int8_speedup_b64", f"{by_name['int8']['speedup_b64']:.2f}"),
        ("resnet_int8_acc_drop_pt", f"{by_name['int8']['acc_drop_pt']:.2f}"),
        ("resnet_structured_speedup_b64", f"{by_name['structured']['speedup_b64']:.2f}"),
        ("resnet_structured_acc_drop_pt", f"{by_name['structured']['acc_drop_pt']:.2f}"),
        ("resnet_qat_acc_drop_pt", f"{by_name['qat']['acc_drop_pt']:.2f}"),
    ]
    print_results(rows, results)


if __name__ == "__main__":
    main()
