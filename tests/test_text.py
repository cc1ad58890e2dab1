"""Text: a table's text column tokenised by a tokenizer directory, an `hf:DIR` model trained,
compressed and exported with token inputs; and the mistakes people make with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from artifacts import write_text_table, write_tiny_bert
from processes import one_process_job

from torchship.components.compress.stage import compress_model
from torchship.components.data.splits import load_split
from torchship.components.data.stage import prepare_data
from torchship.components.errors import UserInputError
from torchship.components.export.stage import export_variants
from torchship.components.models import build_model, load_checkpoint
from torchship.components.train.stage import train_model


def split_paths(directory: Path) -> list[str]:
    return [str(directory / name) for name in ("train", "val", "test")]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("text")
    reviews = write_text_table(work / "reviews.csv")
    bert = write_tiny_bert(work / "bert", pd.read_csv(reviews)["review"].tolist())
    paths = split_paths(work / "splits")
    meta = prepare_data(str(reviews), "label", *paths, text_column="review", max_length=16,
                        model_name=f"hf:{bert}")
    return {"work": work, "reviews": reviews, "bert": bert, "paths": paths, "meta": meta,
            "model": f"hf:{bert}"}


def test_text_is_tokenised_by_the_model_directorys_tokenizer(text):
    meta = text["meta"]
    assert meta["contract"]["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}]
    assert meta["class_names"] == ["negative", "positive"]
    split = load_split(text["paths"][0])
    ids, mask = split.inputs["input_ids"], split.inputs["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == (len(split), 16)
    assert (ids[:, 0] == ids[0, 0]).all()  # every text starts with [CLS]
    assert set(np.unique(mask)) == {0, 1} and (ids[mask == 0] == 0).all()  # padded with [PAD]
    assert ids.max() < int(split.extra["vocab_size"])
    assert meta["statistics"]["features"]["tokens"]["max"] <= 16


def test_a_bert_directory_trains_and_every_variant_of_its_family_is_made_and_exported(
        text, tmp_path):
    with one_process_job():
        metrics = train_model(*text["paths"][:2], str(tmp_path / "model.pt"),
                              model_name=text["model"], epochs=6, batch_size=16,
                              learning_rate=3e-3, progress=lambda _: None)
    assert metrics["val_accuracy"] > 0.8  # two classes
    rows = compress_model(str(tmp_path / "model.pt"), *text["paths"], str(tmp_path / "variants"),
                          variants=["structured", "distilled", "int8", "fp16", "qat"],
                          finetune_epochs=2, prune_steps=2, distill_epochs=6,
                          progress=lambda _: None)
    by_name = {row["name"]: row for row in rows}
    assert list(by_name) == ["fp32", "structured", "distilled", "int8", "fp16"]
    # Heads and feed-forward neurons removed: every layer keeps 1 of 2 heads, a narrower FFN.
    widths = by_name["structured"]["settings"]["heads_and_ffn_width"]
    assert widths == {"layer0": [1, 64], "layer1": [1, 64]}
    assert by_name["structured"]["n_parameters"] < by_name["fp32"]["n_parameters"]
    # The student is the same family with half the layers, started from the teacher's.
    student, checkpoint = load_checkpoint(tmp_path / "variants" / "distilled" / "model.pt")
    assert checkpoint["model_options"] == {"layers": 1}
    assert len(student.model.bert.encoder.layer) == 1
    assert by_name["int8"]["kind"] == "dynamic_quantisation"
    skipped = json.loads((tmp_path / "variants" / "skipped.json").read_text())
    assert [item["name"] for item in skipped] == ["qat"]
    for row in rows:
        assert row["test_accuracy"] >= by_name["fp32"]["test_accuracy"] - 0.1, row["name"]

    exported = export_variants(tmp_path / "variants", text["paths"][2], str(tmp_path / "onnx"),
                               measure=False, progress=lambda _: None)
    assert all(row["parity"]["passed"] for row in exported)
    import onnx

    graph = onnx.load(str(tmp_path / "onnx" / "fp32" / "model.onnx")).graph
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in graph.input]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert dims == [["batch", "sequence"], ["batch", "sequence"]]


def test_a_tokenizer_that_does_not_match_the_models_vocabulary_is_refused(text, tmp_path):
    other = write_tiny_bert(tmp_path / "other", ["only a handful of words here"] * 3)
    paths = split_paths(tmp_path / "splits")
    # Given with the model, prepare-data refuses it from the model's config.json alone...
    with pytest.raises(UserInputError, match=f"tokenizer '{other}' has a vocabulary of .* but "
                       f"model '{text['model']}' embeds"):
        prepare_data(str(text["reviews"]), "label", *paths, text_column="review", max_length=16,
                     tokenizer=str(other), model_name=text["model"])
    assert not (tmp_path / "splits").exists()
    # ...and splits tokenised by it without naming the model are refused by train.
    prepare_data(str(text["reviews"]), "label", *paths, text_column="review", max_length=16,
                 tokenizer=str(other))
    with pytest.raises(UserInputError) as error:
        train_model(*paths[:2], str(tmp_path / "model.pt"), model_name=text["model"],
                    num_workers=1)
    message = str(error.value)
    assert f"tokenizer '{other}' has a vocabulary of" in message
    assert f"but model '{text['model']}' embeds" in message and "\n" not in message
    assert not (tmp_path / "model.pt").exists()


def test_bad_text_inputs_are_one_line_each(text, tmp_path):
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((Path(text["bert"]) / "config.json").read_text())
    with pytest.raises(UserInputError, match=r"has no weights \(model.safetensors or "):
        build_model(f"hf:{weightless}", load_split(text["paths"][0]).contract, 2)
    with pytest.raises(UserInputError, match="is not a directory"):
        build_model(f"hf:{tmp_path / 'nowhere'}", load_split(text["paths"][0]).contract, 2)
    with pytest.raises(UserInputError, match="takes token inputs"):
        build_model(text["model"], 64, 10)
    out = split_paths(tmp_path / "out")
    with pytest.raises(UserInputError, match="has no column 'body'.*pass --text-column"):
        prepare_data(str(text["reviews"]), "label", *out, text_column="body",
                     tokenizer=str(text["bert"]))
    with pytest.raises(UserInputError, match="needs a tokenizer; pass --tokenizer DIR"):
        prepare_data(str(text["reviews"]), "label", *out, text_column="review")
    with pytest.raises(UserInputError, match="could not be loaded"):
        prepare_data(str(text["reviews"]), "label", *out, text_column="review",
                     tokenizer=str(tmp_path))
    # Longer sequences than the model's position embeddings (64 here): refused by prepare-data
    # from config.json when the model is named, else by train before any worker starts.
    with pytest.raises(UserInputError, match="max_length 100 is longer than model .* takes "
                       r"\(max_position_embeddings 64\); pass --max-length 64 or less"):
        prepare_data(str(text["reviews"]), "label", *out, text_column="review", max_length=100,
                     model_name=text["model"])
    assert not (tmp_path / "out").exists()
    prepare_data(str(text["reviews"]), "label", *out, text_column="review", max_length=100,
                 tokenizer=str(text["bert"]))
    with pytest.raises(UserInputError, match="sequences are 100 tokens but model .* takes at most "
                       "64"):
        train_model(*out[:2], str(tmp_path / "model.pt"), model_name=text["model"],
                    num_workers=1)
    assert not (tmp_path / "model.pt").exists()


def test_a_bert_trains_under_ddp_with_accumulation_and_resumes_exactly(text, tmp_path):
    """Two gloo workers, gradient accumulation, a checkpoint per epoch: a run resumed after
    losing its last epoch ends with the same weights as one that was not interrupted. FLOPs
    are counted on the token inputs. (Dropout off: the comparison is exact.)"""
    bert = write_tiny_bert(tmp_path / "bert", pd.read_csv(text["reviews"])["review"].tolist(),
                           dropout=0.0)
    common = {"model_name": f"hf:{bert}", "epochs": 3, "batch_size": 16, "learning_rate": 3e-3,
              "num_workers": 2, "gradient_accumulation_steps": 2}
    straight = train_model(*text["paths"][:2], str(tmp_path / "straight.pt"),
                           progress=lambda _: None, **common)
    assert straight["world_size"] == 2 and straight["flops_per_sample"] > 0
    train_model(*text["paths"][:2], str(tmp_path / "resumed.pt"), progress=lambda _: None,
                **common)
    (tmp_path / "resumed.pt.checkpoints" / "epoch-0003.pt").unlink()  # as if killed in epoch 3
    resumed = train_model(*text["paths"][:2], str(tmp_path / "resumed.pt"),
                          progress=lambda _: None, **common)
    assert resumed["resumed_from_epoch"] == 2

    def final(name: str) -> dict:
        return torch.load(tmp_path / f"{name}.pt.checkpoints" / "epoch-0003.pt",
                          weights_only=True)["model"]

    ours, theirs = final("resumed"), final("straight")
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) == 0


def test_a_model_directory_at_an_fsspec_url_is_read_like_a_local_one(text, tmp_path):
    """`hf:gs://...` goes through fsspec; fsspec's in-memory filesystem stands in for the bucket
    (the same code path: the directory is copied to a temporary folder, config.json read alone)."""
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.put(str(text["bert"]) + "/", "/models/bert/", recursive=True)
    try:
        out = split_paths(tmp_path / "splits")
        meta = prepare_data(str(text["reviews"]), "label", *out, text_column="review",
                            max_length=16, model_name="hf:memory://models/bert")
        assert meta["contract"]["inputs"][0]["name"] == "input_ids"
        local = load_split(text["paths"][0])
        assert (load_split(out[0]).inputs["input_ids"] == local.inputs["input_ids"]).all()
        model = build_model("hf:memory://models/bert", local.contract, 2)
        reference = build_model(text["model"], local.contract, 2)
        ids = torch.from_numpy(local.inputs["input_ids"][:4])
        mask = torch.from_numpy(local.inputs["attention_mask"][:4])
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(ids, mask), reference.eval()(ids, mask))
        with pytest.raises(UserInputError, match="max_length 100 is longer than model"):
            prepare_data(str(text["reviews"]), "label", *split_paths(tmp_path / "long"),
                         text_column="review", max_length=100,
                         model_name="hf:memory://models/bert")
    finally:
        memory.rm("/models", recursive=True)
