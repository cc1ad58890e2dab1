"""Tiny stand-ins for what the stages hand each other: an export directory of linear ONNX models,
a held-out split, a labelled table and synthetic training splits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

N_FEATURES, N_CLASSES = 8, 3

# What export and compress record for each variant, as the report and the gate read them.
VARIANT_RECORDS = [
    {"name": name, "test_accuracy": accuracy, "onnx_size_bytes": 400,
     "parity": {"max_abs_diff": 1e-6, "top1_agreement": 1.0, "passed": True},
     "acc_drop_pt": (0.95 - accuracy) * 100, "latency_b1_ms": 0.05}
    for name, accuracy in (("fp32", 0.95), ("pruned", 0.94))
]


def export_linear(path: Path, n_classes: int = N_CLASSES) -> Path:
    """A linear model at ``path`` with the serving contract's tensors: ``input`` [batch, 8] in,
    ``logits`` [batch, n_classes] out. Its weights come from torch's global seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter
        torch.onnx.export(
            torch.nn.Linear(N_FEATURES, n_classes).eval(), (torch.randn(2, N_FEATURES),),
            str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )
    return path


def write_onnx_dir(directory: Path, seed: int = 0, records: list[dict] | None = None) -> Path:
    """``directory`` as the export stage leaves it: ``<variant>/model.onnx`` for each record
    (one fp32 model by default) and ``variants.json``. The same seed gives the same weights."""
    records = records or [{"name": "fp32"}]
    torch.manual_seed(seed)
    for record in records:
        export_linear(directory / record["name"] / "model.onnx")
    (directory / "variants.json").write_text(json.dumps(records))
    return directory


def write_test_split(path: Path, rows: int = 256) -> Path:
    """A held-out split for the tiny models: ``x`` [rows, 8] float32, ``y`` int64 labels."""
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((rows, N_FEATURES)).astype(np.float32),
             y=rng.integers(0, N_CLASSES, rows).astype(np.int64))
    return path


def labelled_table(n: int = 60) -> pd.DataFrame:
    """A data source: four numeric feature columns a-d and a three-class ``label``."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(n, 4)), columns=["a", "b", "c", "d"])
    frame["label"] = np.arange(n) % 3
    return frame


def write_split(path: Path, x: np.ndarray, y: np.ndarray, n_classes: int) -> str:
    """A split at exactly ``path``, as prepare_data writes one."""
    with open(path, "wb") as handle:  # np.savez would add '.npz' to a bare name
        np.savez(handle, x=x.astype(np.float32), y=y.astype(np.int64),
                 class_names=np.array([f"class{i}" for i in range(n_classes)]))
    return str(path)


def synthetic_splits(directory: Path, rows: int, random_labels: bool = False,
                     features: int = 64, classes: int = 10) -> tuple[str, str]:
    """A train and a val split; labels from a fixed linear map, or random (to overfit)."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(features, classes))
    splits = []
    for name, n in (("train", rows), ("val", max(256, rows // 8))):
        x = rng.normal(size=(n, features))
        y = rng.integers(0, classes, n) if random_labels else (x @ weights).argmax(axis=1)
        splits.append(write_split(directory / name, x, y, classes))
    return splits[0], splits[1]


def write_rgb_image_folder(root: Path, per_class: int = 40, size: int = 32,
                           seed: int = 0) -> Path:
    """Four classes of noisy RGB images, `size` x `size`: class k has a bright patch of its own
    colour in quadrant k, a signal a small CNN learns in a few epochs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = [(255, 40, 40), (40, 255, 40), (40, 40, 255), (255, 255, 255)]
    half = size // 2
    for k, colour in enumerate(colours):
        folder = root / f"class{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
            r, c = divmod(k, 2)
            pixels[r * half:(r + 1) * half, c * half:(c + 1) * half] = np.clip(
                np.array(colour) - rng.integers(0, 40, 3), 0, 255)
            Image.fromarray(pixels, "RGB").save(folder / f"{i:03d}.png")
    return root


# Words of a two-class text task: a review is positive when it has more positive words.
POSITIVE = ["good", "great", "fine", "superb", "lovely", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "boring", "dull", "terrible"]
NEUTRAL = ["movie", "film", "plot", "actor", "the", "a", "was", "is", "very", "really"]


def write_text_table(path: Path, rows: int = 240, seed: int = 0, noise: float = 0.0) -> Path:
    """A CSV of short reviews (column `review`) and their sentiment (column `label`); `noise` is
    the fraction of rows whose label is flipped, so that no model reaches 100%."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(rows):
        positive = i % 2 == 0
        strong = list(rng.choice(POSITIVE if positive else NEGATIVE, 3))
        weak = list(rng.choice(NEGATIVE if positive else POSITIVE, 1))
        words = strong + weak + list(rng.choice(NEUTRAL, int(rng.integers(3, 9))))
        rng.shuffle(words)
        texts.append(" ".join(words))
        if noise and rng.random() < noise:
            positive = not positive
        labels.append("positive" if positive else "negative")
    pd.DataFrame({"review": texts, "label": labels}).to_csv(path, index=False)
    return path


def write_tiny_bert(directory: Path, texts: list[str], hidden: int = 32, layers: int = 2,
                    heads: int = 2, seed: int = 0, dropout: float = 0.1) -> Path:
    """A BERT-style classifier with random weights and a WordPiece tokenizer trained on `texts`,
    both saved with save_pretrained into `directory`: built offline, nothing from a hub."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200,
                                                                   special_tokens=special))
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[(t, wordpiece.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]",
                                  pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                  mask_token="[MASK]")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def digest(folder: Path) -> dict[str, str]:
    """The sha256 of every file under `folder`, by its relative path: what byte-identical means."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
