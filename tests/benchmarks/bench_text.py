"""make bench-text: a BERT-style classifier on token ids, its dynamic int8 variant, and Triton.

Three parts, each ending in one `name = value` line for a goal of issue 13:

| line | goal | how |
|---|---|---|
| bert_int8_dynamic_speedup_b16 | >= 1.8 | BERT-small shape (4 layers, hidden 512, 8 heads, FFN 2048), random weights (a speed ratio needs no training), sequence 128, batch 16: fp32 ONNX over the int8 variant's graph, ONNX Runtime CPU on one thread, interleaved rounds |
| bert_int8_dynamic_acc_drop_pt | <= 1.0 | a smaller BERT (2 layers, hidden 64) with a WordPiece tokenizer trained here, fine-tuned by the train stage on a generated text table (10% of labels flipped, so accuracy is not saturated), compressed and exported by the stages: test accuracy points the int8 variant loses against fp32 |
| bert_triton_c8_over_c1_throughput | >= 2.0 | that trained model (fp32) in the bundled `tritonserver` (Python backend, dynamic batching), requests of one row of held-out token ids over HTTP, concurrency 1 and 8 alternated; each level's best round |

Everything is built offline; the CPU model and its SIMD flags are printed with the numbers.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_compress import _cpu, _free_port, clock, print_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared builders

from artifacts import write_text_table, write_tiny_bert

from torchship.components.benchmark.stage import benchmark_repository
from torchship.components.compress.context import pre_process
from torchship.components.compress.stage import compress_model
from torchship.components.compress.variants.int8_dynamic import quantize_int8_dynamic
from torchship.components.contracts import BATCH, ServingSettings, TensorContract, TensorSpec
from torchship.components.data.stage import prepare_data
from torchship.components.data.text import TEXT_INPUTS
from torchship.components.export.measure import interleaved_latency, latency_session
from torchship.components.export.stage import export_variants
from torchship.components.models import build_model, export_onnx
from torchship.components.train.stage import train_model
from torchship.components.triton.repository import build_model_repository

SEED = 0
BERT_SMALL = {"vocab_size": 30522, "hidden_size": 512, "num_hidden_layers": 4,
              "num_attention_heads": 8, "intermediate_size": 2048}
SEQUENCE, BATCH_SIZE = 128, 16
ROUNDS, BLOCK_S = 15, 0.3
TEXT_ROWS, MAX_LENGTH, LABEL_NOISE = 1200, 24, 0.1
TRAIN = {"epochs": 6, "batch_size": 32, "learning_rate": 1e-3}
TRITON_ROUNDS, WINDOW_S = 3, 1.0


def text_contract(n_classes: int) -> TensorContract:
    return TensorContract.classifier(
        [TensorSpec(name, "int64", (BATCH, "sequence")) for name in TEXT_INPUTS], n_classes)


def speedup(work: Path, say) -> float:
    """fp32 over dynamic int8 latency on the BERT-small shape (random weights)."""
    from transformers import BertConfig, BertForSequenceClassification

    directory = work / "bert-small"
    torch.manual_seed(SEED)
    BertForSequenceClassification(BertConfig(**BERT_SMALL, num_labels=2)).save_pretrained(directory)
    contract = text_contract(2)
    model = build_model(f"hf:{directory}", contract, 2)
    rng = np.random.default_rng(SEED)
    ids = rng.integers(1000, BERT_SMALL["vocab_size"], (BATCH_SIZE, SEQUENCE)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    fp32 = export_onnx(model, contract, work / "bert-fp32" / "model.onnx", rows=feed)
    prepared = pre_process(fp32, work / "bert-prepared.onnx", work, symbolic=False)
    int8 = work / "bert-int8" / "model.onnx"
    int8.parent.mkdir()
    quantize_int8_dynamic(prepared, int8)
    say(f"BERT-small ({sum(p.numel() for p in model.parameters()):,} parameters): fp32 "
        f"{fp32.stat().st_size / 2**20:.0f} MiB, int8 {int8.stat().st_size / 2**20:.0f} MiB; "
        f"timing batch {BATCH_SIZE} x sequence {SEQUENCE} on one thread, {ROUNDS} rounds")
    sessions = {"fp32": latency_session(fp32, 1), "int8": latency_session(int8, 1)}
    latency = interleaved_latency(sessions, {BATCH_SIZE: feed}, ROUNDS, BLOCK_S)
    fp32_ms, int8_ms = latency["fp32", BATCH_SIZE], latency["int8", BATCH_SIZE]
    say(f"BERT-small batch {BATCH_SIZE}: fp32 {fp32_ms:.1f} ms, dynamic int8 {int8_ms:.1f} ms")
    return fp32_ms / int8_ms


def train_and_compress(work: Path, say) -> tuple[list[dict], Path, Path]:
    """The stages on a generated text table: prepare (tokenise), train, compress int8, export."""
    table = write_text_table(work / "reviews.csv", rows=TEXT_ROWS, seed=SEED,
                             noise=LABEL_NOISE)
    texts = list(__import__("pandas").read_csv(table)["review"])
    model_dir = write_tiny_bert(work / "tiny-bert", texts, hidden=64, layers=2, heads=2,
                                seed=SEED)
    paths = {name: str(work / name) for name in ("train", "val", "test")}
    meta = prepare_data(str(table), "label", paths["train"], paths["val"], paths["test"],
                        seed=SEED, text_column="review", max_length=MAX_LENGTH,
                        model_name=f"hf:{model_dir}")
    say(f"text: {sum(meta['n_rows'].values())} rows ({LABEL_NOISE:.0%} of labels flipped) tokenised to {MAX_LENGTH} tokens, "
        f"{meta['n_classes']} classes")
    model_path = str(work / "model.pt")
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    threads = torch.get_num_threads()
    trained = train_model(paths["train"], paths["val"], model_path, seed=SEED,
                          model_name=f"hf:{model_dir}",
                          progress=lambda line: say(f"train: {line}"), **TRAIN)
    torch.set_num_threads(threads)
    say(f"trained ({trained['n_parameters']:,} parameters): val accuracy "
        f"{trained['val_accuracy']:.4f}")
    variants_dir = work / "variants"
    compress_model(model_path, paths["train"], paths["val"], paths["test"], str(variants_dir),
                   variants=["int8"], seed=SEED, progress=lambda line: say(f"compress: {line}"))
    onnx_dir = work / "onnx"
    rows = export_variants(str(variants_dir), paths["test"], str(onnx_dir),
                           progress=lambda line: say(f"export: {line}"), latency_threads=1,
                           latency_rounds=9, latency_block_s=0.05)
    return rows, onnx_dir, Path(paths["test"])


def triton_scaling(work: Path, onnx_dir: Path, test_path: Path, say) -> float:
    """Throughput at concurrency 8 over 1, one row per request, the trained fp32 model."""
    repository = work / "repository"
    build_model_repository(onnx_dir, repository, "python", ServingSettings(max_queue_delay_us=100))
    result = benchmark_repository(
        repository, test_path, models=["fp32"], concurrency=(1, 8) * TRITON_ROUNDS,
        batch_size=1, warmup_s=0.5, duration_s=3 * WINDOW_S, window_s=WINDOW_S, max_windows=6,
        protocol="http", progress=lambda line: say(f"triton: {line}"))
    best: dict[int, dict] = {}
    for row in result["results"]:
        level = row["concurrency"]
        if level not in best or row["throughput_rps"] > best[level]["throughput_rps"]:
            best[level] = row
    for level, row in sorted(best.items()):
        say(f"triton concurrency {level}: best {row['throughput_rps']:.0f} req/s (p50 "
            f"{row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, server avg batch "
            f"{(row['server'] or {}).get('avg_batch_size') or 0:.2f})")
    return best[8]["throughput_rps"] / best[1]["throughput_rps"]


def main() -> None:
    say = clock()

    say(f"cpu: {_cpu()}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench-text-") as tmp:
        work = Path(tmp)
        ratio = speedup(work, say)
        rows, onnx_dir, test_path = train_and_compress(work, say)
        scaling = triton_scaling(work, onnx_dir, test_path, say)
        say(f"done; load average {os.getloadavg()[0]:.2f}")

    by_name = {row["name"]: row for row in rows}
    results = [
        ("bert_int8_dynamic_speedup_b16", f"{ratio:.2f}"),
        ("bert_int8_dynamic_acc_drop_pt", f"{by_name['int8']['acc_drop_pt']:.2f}"),
        ("bert_triton_c8_over_c1_throughput", f"{scaling:.2f}"),
    ]
    print_results(rows, results)


if __name__ == "__main__":
    main()
