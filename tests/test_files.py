"""components.files: every artifact appears whole or not at all."""

from __future__ import annotations

import json
import os
import stat

import pytest

from torchship.components.files import (
    atomic_file,
    atomic_path,
    make_staging_dir,
    publish_dir,
    read_json,
    staged_dir,
    write_json,
    write_text,
)


class Boom(RuntimeError):
    pass


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "record.json"
    write_json({"version": 1}, target)
    with pytest.raises(Boom), atomic_file(target, "w") as handle:
        handle.write('{"version": 2')  # half a document
        raise Boom
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_a_written_file_is_whole_readable_by_others_and_keeps_its_suffix_while_written(tmp_path):
    target = tmp_path / "out" / "pipeline.yaml"
    with atomic_path(target, durable=True) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".yaml")
        assert not target.exists()
        tmp.write_text("a: 1\n")
    assert target.read_text() == "a: 1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["pipeline.yaml"]
    write_text(target, "a: 2\n")
    assert target.read_text() == "a: 2\n"


def test_json_at_a_path_and_absent_documents(tmp_path):
    import numpy as np

    path = write_json({"x": np.float32(0.5), "n": np.int64(3), "a": np.arange(2)}, tmp_path / "r")
    assert read_json(path) == {"x": 0.5, "n": 3, "a": [0, 1]}
    assert read_json(tmp_path / "absent.json") is None


def test_a_staged_directory_is_published_whole_or_not_at_all(tmp_path):
    destination = tmp_path / "variants"
    with staged_dir(destination) as staging:
        (staging / "fp32").mkdir()
        (staging / "fp32" / "model.pt").write_bytes(b"weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variants"]
    assert (destination / "fp32" / "model.pt").read_bytes() == b"weights"

    # A failure half-way: the previous directory stays as it was, the staging goes.
    with pytest.raises(Boom), staged_dir(destination) as staging:
        (staging / "int8").mkdir()
        raise Boom
    assert sorted(p.name for p in destination.iterdir()) == ["fp32"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variants"]


def test_publish_puts_the_old_directory_back_when_the_new_one_cannot_move_in(tmp_path,
                                                                               monkeypatch):
    destination = tmp_path / "onnx"
    destination.mkdir()
    (destination / "old").write_text("served")
    staging = make_staging_dir(destination)
    (staging / "new").write_text("candidate")
    real_replace = os.replace

    def failing_replace(source, target):
        if str(source) == str(staging):
            raise OSError("disk full")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        publish_dir(staging, destination)
    monkeypatch.undo()
    assert sorted(p.name for p in destination.iterdir()) == ["old"]
    publish_dir(staging, destination)
    assert sorted(p.name for p in destination.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
