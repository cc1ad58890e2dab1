"""What a person watching a benchmark sees: a one-line progress bar fed per window, and one line
per finished level."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["ProgressBar", "level_line"]


class ProgressBar:
    """A one-line progress bar on a terminal stream, fed the per-window events of a run::

        benchmark_repository(..., on_window=ProgressBar())
    """

    def __init__(self, stream=None, width: int = 24):
        self.stream = stream if stream is not None else sys.stderr
        self.width = width

    def __call__(self, event: dict[str, Any]) -> None:
        done = (event["level"] - 1 + event["window"] / event["max_windows"]) / event["levels"]
        if event.get("stable") is not None:  # the level is over
            done = event["level"] / event["levels"]
        filled = round(done * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        p99 = event.get("p99_ms")
        text = (f"\r[{bar}] level {event['level']}/{event['levels']} {event['model']} "
                f"b={event['batch_size']} c={event['concurrency']} window {event['window']}: "
                f"{event['throughput_rps']:.0f} req/s p99 "
                f"{'-' if p99 is None else f'{p99:.2f}'} ms ")
        self.stream.write(text)
        if event["level"] == event["levels"] and event.get("stable") is not None:
            self.stream.write("\n")
        self.stream.flush()


def level_line(row: dict) -> str:
    server = row.get("server") or {}
    queue, infer = server.get("queue_us"), server.get("compute_infer_us")
    spreads = [row["stability"]["spread_pct"].get(m) for m in row["stability"]["metrics"]]
    spread = max((v for v in spreads if v is not None), default=float("nan"))
    stable = (f"stable ±{spread:.0f}%" if row["stable"]
              else f"UNSTABLE ±{spread:.0f}% after {len(row['windows'])} windows")
    text = (
        f"{row['model']:>10} b={row['batch_size']:<3} c={row['concurrency']:<3} "
        f"p50 {row['p50_ms']:7.2f} ms  p95 {row['p95_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
        f"{row['throughput_rps']:8.1f} req/s  {stable}"
    )
    if queue is not None and infer is not None:
        text += f"  server queue {queue:.0f} us compute {infer:.0f} us"
    client = row["client"]
    hint = "add client_processes" if client.get("name", "python") == "python" else "a faster host"
    text += (f"  client {client.get('name', 'python')} {client['cpu_cores']:.2f} cores"
             f"{f' (SATURATED: {hint})' if client['saturated'] else ''}"
             f"  ({row['requests']} requests, {row['errors']} errors)")
    return text
