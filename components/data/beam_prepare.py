"""The data step as an Apache Beam pipeline: read tasks in parallel, split each row by its key,
write each chunk's rows of each split as one Parquet shard, and merge what every chunk saw (class
counts, training statistics, problems) into one small result the launcher turns into the indexes.

The pipeline never groups rows, only small per-chunk results, so a worker holds one chunk at a
time: memory stays flat however large the source. It runs on any Beam runner (`runners`):
DirectRunner here, DataflowRunner on Vertex AI, a portable runner (Flink, Spark) on Kubeflow.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from torchship.components.data.runners import quiet_beam_import

quiet_beam_import()
import apache_beam as beam

from torchship.components.data.beam_results import (
    image_header,
    merge_headers,
    merge_results,
    moments,
)
from torchship.components.data.chunks import (
    SPLIT_IDS,
    Chunk,
    ReadSpec,
    ReadTask,
    assign_splits,
    read_task,
)
from torchship.components.data.shards import encode_shard, write_file
from torchship.components.errors import UserInputError
from torchship.components.progress import report

__all__ = ["WriteShards", "run_pipeline"]


class WriteShards(beam.DoFn):
    """Read one task and write its chunks' shards; yield one small result per chunk."""

    def __init__(self, spec: ReadSpec, outputs: dict[str, str], seed: int, val_fraction: float,
                 test_fraction: float):
        super().__init__()
        self.spec, self.outputs, self.seed = spec, outputs, seed
        self.fractions = (val_fraction, test_fraction)

    def process(self, task: ReadTask, header: dict[str, Any] | None = None):
        try:
            if header and header.get("problem"):
                raise UserInputError(header["problem"])
            mode = (header or {}).get("mode", "")
            for chunk in read_task(self.spec, task, mode):
                yield self._write(chunk)
        except UserInputError as error:
            yield {"problems": [[task.number, str(error)]]}

    def _write(self, chunk: Chunk) -> dict[str, Any]:
        started = time.perf_counter()
        split, order = assign_splits(chunk.keys, self.seed, *self.fractions)
        axes = (0, 2, 3) if chunk.values.ndim == 4 else (0,)
        result: dict[str, Any] = {
            "rows": len(chunk), "shards": {}, "counts": {}, "chunks": [chunk.name],
            "spread": [moments(chunk.values, axes)] if len(chunk) else [],
            "shapes": {n: list(a.shape[1:]) for n, a in chunk.inputs.items()},
            "dtypes": {n: str(a.dtype) for n, a in chunk.inputs.items()},
            "extra": dict(chunk.extra),
        }
        written = 0
        for name, number in SPLIT_IDS.items():
            rows = order[split[order] == number]
            if not len(rows):
                continue
            data, groups = encode_shard({n: a[rows] for n, a in chunk.inputs.items()},
                                        chunk.labels[rows], chunk.keys[rows])
            entry = write_file(self.outputs[name], f"part-{chunk.name}.parquet", data)
            result["shards"][name] = [{**entry, "rows": len(rows), "row_groups": groups}]
            result["counts"][name] = dict(Counter(str(label) for label in chunk.labels[rows]))
            if name == "train":
                result["train"] = [{"chunk": chunk.name,
                                    **moments(chunk.values[rows], axes)}]
                if self.spec.bin_edges:
                    result["histograms"] = self.spec.histograms(chunk.values[rows])
            written += len(data)
        seconds = time.perf_counter() - started
        report(f"data: chunk {chunk.name}: {len(chunk):,} rows -> "
              f"{len(result['shards'])} shards, {written / 1e6:.1f} MB "
              f"({written / 1e6 / max(seconds, 1e-9):.0f} MB/s written)")
        return result


def run_pipeline(spec: ReadSpec, tasks: list[ReadTask], outputs: dict[str, str], seed: int,
                 val_fraction: float, test_fraction: float, runner, results_uri: str) -> None:
    """Build and run the Beam pipeline; its merged result is written to `results_uri`."""
    from torchship.components.files import write_json

    options = runner.options(job_name=f"torchship-prepare-data-{int(time.time())}")
    with beam.Pipeline(options=options) as pipeline:
        planned = (pipeline | "Tasks" >> beam.Create(tasks, reshuffle=False)
                   | "Spread" >> beam.Reshuffle())
        side: dict[str, Any] = {}
        if spec.kind == "images":
            header = (planned | "Headers" >> beam.Map(lambda t: image_header(spec, t))
                      | "Shape" >> beam.CombineGlobally(lambda parts: merge_headers(spec, parts)))
            side["header"] = beam.pvalue.AsSingleton(header)
        _ = (planned | "Write" >> beam.ParDo(
                 WriteShards(spec, outputs, seed, val_fraction, test_fraction), **side)
             | "Merge" >> beam.CombineGlobally(merge_results)
             | "Save" >> beam.Map(lambda result: write_json(result, results_uri)))
