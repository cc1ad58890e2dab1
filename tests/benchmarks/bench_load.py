"""`make bench-load`: the local Triton server under sustained load, for errors and memory growth.

Serves the default model (as `bench_serve`) on the bundled `tritonserver`, warms it up under load,
reads the resident memory of the server's whole process group (the server and its Python-backend
stubs, from /proc), runs concurrency 32 for 60 seconds in windows of 5 s, and reads the memory
again. Goals: zero errors, and resident memory at the end within 10 % of that after warm-up.
The last two lines are

    load_c32_errors = N
    load_rss_growth_pct = X
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import MAX_QUEUE_DELAY_US, build_repository

from torchship.components.benchmark.stage import benchmark_endpoint
from torchship.components.triton.server import TritonServer


def group_memory_kib(pgid: int) -> dict[str, int]:
    """Summed VmRSS (and PSS, which counts shared pages once) of every live process in the
    process group ``pgid``, in KiB, and how many processes that is."""
    rss = pss = count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            status = Path(f"/proc/{entry}/status").read_text()
            rollup = Path(f"/proc/{entry}/smaps_rollup").read_text()
        except (OSError, ValueError, IndexError):
            continue  # gone in between
        rss += _kib(status, "VmRSS:")
        pss += _kib(rollup, "Pss:")
        count += 1
    return {"rss_kib": rss, "pss_kib": pss, "processes": count}


def _kib(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> tuple[int, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--max-queue-delay-us", type=int, default=MAX_QUEUE_DELAY_US)
    parser.add_argument("--preferred-batch-sizes", type=int, nargs="*", default=[])
    parser.add_argument("--instance-count", type=int, default=1)
    args = parser.parse_args(argv)
    windows = max(1, round(args.duration_s / args.window_s))

    with tempfile.TemporaryDirectory(prefix="torchship-bench-load-") as tmp:
        repository, test_path = build_repository(Path(tmp), args)
        with TritonServer(repository) as server:
            url = server.grpc_url if args.protocol == "grpc" else f"http://{server.http_url}"
            common = {"concurrency": (args.concurrency,), "progress": print,
                      "request_timeout_s": 30.0}
            # Warm-up under the same load: connections, buffers and allocator pools settle.
            benchmark_endpoint(url, args.protocol, ["fp32"], test_path, warmup_s=0.0,
                               window_s=args.warmup_s, min_windows=1, max_windows=1, **common)
            warm = group_memory_kib(server.pid)
            print(f"after warm-up: RSS {warm['rss_kib'] / 1024:.1f} MiB, PSS "
                  f"{warm['pss_kib'] / 1024:.1f} MiB over {warm['processes']} processes")
            result = benchmark_endpoint(
                url, args.protocol, ["fp32"], test_path, warmup_s=0.0, window_s=args.window_s,
                min_windows=windows, max_windows=windows, **common,
            )
            end = group_memory_kib(server.pid)
            print(f"at the end:    RSS {end['rss_kib'] / 1024:.1f} MiB, PSS "
                  f"{end['pss_kib'] / 1024:.1f} MiB over {end['processes']} processes")
    (row,) = result["results"]
    per_window = ", ".join(f"{w['throughput_rps']:.0f}" for w in row["windows"])
    print(f"concurrency {args.concurrency} for {row['duration_s']:.0f} s over {args.protocol}: "
          f"{row['requests']} requests, {row['throughput_rps']:.0f} req/s (per window: "
          f"{per_window}), p99 {row['p99_ms']:.2f} ms, "
          f"{'stable' if row['stable'] else 'UNSTABLE'}, client "
          f"{row['client']['cpu_cores']:.2f} cores")
    growth = (end["rss_kib"] - warm["rss_kib"]) / warm["rss_kib"] * 100.0
    print(f"load_c{args.concurrency}_errors = {row['errors']}")
    print(f"load_rss_growth_pct = {growth:.2f}")
    return row["errors"], growth


if __name__ == "__main__":
    main(sys.argv[1:])
