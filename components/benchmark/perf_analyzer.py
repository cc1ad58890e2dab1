"""NVIDIA's ``perf_analyzer`` as the benchmark's measurement engine, where it is present (as Triton
Model Analyzer uses it): where it is, how it is installed, and one level measured by it.

Where: ``$PERF_ANALYZER``, else ``perf_analyzer`` on ``PATH`` (the Triton SDK image has it), else
``<venv>/perf_analyzer/bin/perf_analyzer``, which ``make install`` puts there (``python -m
torchship.components.benchmark.perf_analyzer --install``: ``pip download --no-deps
tritonclient==2.51.0``, only the binary extracted). It runs with ``libb64.so.0d`` and
``libcudart.so.12`` from the ``nvidia_pytriton.libs`` folder that nvidia-pytriton installs, linked
under their plain names in ``<venv>/perf_analyzer/lib``.

A level is one or more ``perf_analyzer`` runs of 3 windows each (its fixed stability window;
``-s`` wide open, so it always reports): ``--concurrency-range C``, ``--measurement-interval`` of
the method's window, real held-out rows (``--input-data``), its CSV (``-f --verbose-csv``: client
send/receive, server queue and compute) and every request's timestamps
(``--profile-export-file``), from which the windows, the percentiles and the histogram are
computed exactly as for the Python client; the caller judges stability as for the Python client
and runs perf_analyzer again (3 more windows) until the last ``min_windows`` agree or
``max_windows`` ran.

perf_analyzer 2.51.0 has no warm-up option, and its first window would start on a cold level.
So where the method's ``warmup_s`` is above 0, ``warm_up`` first runs perf_analyzer at the same
level for that long (3 windows of ``warmup_s / 3``, at least 50 ms each) and discards its
measurement; the row records it (``perf_analyzer.warmup``).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from torchship.components.errors import UserInputError, one_line

__all__ = ["VERSION", "PerfAnalyzerFailed", "export_windows", "find_perf_analyzer", "install",
           "measure", "warm_up"]

VERSION = "2.51.0"
WHEEL = f"tritonclient=={VERSION}"
MEMBER = f"tritonclient-{VERSION}.data/data/bin/perf_analyzer"
STABLE_WINDOWS = 3  # perf_analyzer's own stability window (fixed)
# The profile export holds every request's inputs: above this many values a request, the Python
# client measures instead (the export would grow to gigabytes).
MAX_EXPORTED_VALUES = 2048
_LIBS = {"libb64.so.0d": "libb64", "libcudart.so.12": "libcudart"}


class PerfAnalyzerFailed(RuntimeError):
    """perf_analyzer did not measure the level; the message is its last line."""


def venv_home() -> Path:
    """Where ``install`` puts perf_analyzer: ``<venv>/perf_analyzer``."""
    return Path(sys.prefix) / "perf_analyzer"


def find_perf_analyzer() -> Path | None:
    """The perf_analyzer binary to use, or None. A ``$PERF_ANALYZER`` that is not an executable
    file is a ``UserInputError``."""
    named = os.environ.get("PERF_ANALYZER")
    if named:
        path = Path(named)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UserInputError(f"PERF_ANALYZER: {named} is not an executable file; point it "
                                 "at a perf_analyzer binary or unset it")
        return path
    on_path = shutil.which("perf_analyzer")
    if on_path:
        return Path(on_path)
    local = venv_home() / "bin" / "perf_analyzer"
    return local if os.access(local, os.X_OK) else None


def _pytriton_libs() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    return libs if libs.is_dir() else None


def _library_dir() -> Path | None:
    """A folder with ``libb64.so.0d`` and ``libcudart.so.12`` linked to nvidia-pytriton's copies
    (which carry hashed names); made on first use."""
    libs = _pytriton_libs()
    if libs is None:
        return None
    target = venv_home() / "lib"
    if not os.access(target.parent if target.parent.exists() else Path(sys.prefix), os.W_OK):
        target = Path(tempfile.gettempdir()) / f"torchship-perf-analyzer-lib-{os.getuid()}"
    target.mkdir(parents=True, exist_ok=True)
    for soname, stem in _LIBS.items():
        found = sorted(libs.glob(f"{stem}-*.so*"))
        link = target / soname
        if found and not link.exists():
            try:
                link.symlink_to(found[0])
            except FileExistsError:
                pass
    return target


def environment() -> dict[str, str]:
    env = dict(os.environ)
    extra = [str(p) for p in (_library_dir(), _pytriton_libs()) if p is not None]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(extra + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    return env


def install(home: Path | None = None, progress=print) -> Path:
    """Download the ``tritonclient==2.51.0`` wheel (``pip download --no-deps``) and extract only
    perf_analyzer into ``home`` (default ``<venv>/perf_analyzer``); returns the binary."""
    home = home or venv_home()
    binary = home / "bin" / "perf_analyzer"
    if os.access(binary, os.X_OK):
        return binary
    with tempfile.TemporaryDirectory(prefix="torchship-perf-analyzer-") as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--no-deps", WHEEL, "-d", tmp], capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("tritonclient-*.whl"))
        if done.returncode != 0 or not wheels:
            raise UserInputError(f"perf_analyzer: `pip download --no-deps {WHEEL}` failed "
                                 f"({one_line(done.stderr or done.stdout, 200)}); check the "
                                 "network or set PERF_ANALYZER to a perf_analyzer binary")
        binary.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel, open(f"{binary}.part", "wb") as out:
            shutil.copyfileobj(wheel.open(MEMBER), out)
        os.chmod(f"{binary}.part", 0o755)
        os.replace(f"{binary}.part", binary)
    _library_dir()
    progress(f"perf_analyzer {VERSION} installed at {binary}")
    return binary


# -- one level ------------------------------------------------------------------------------------


@dataclass
class Measured:
    """What one perf_analyzer level gives: per-window latencies (ms) and lengths (s), its CSV
    row, its CPU time over the run and the run's wall time."""

    windows: list[np.ndarray]
    lengths_s: list[float]
    slowest_ms: float  # the slowest request of the whole run, windows or not
    csv: dict[str, float]
    cpu_s: float
    wall_s: float
    command: list[str]


def exported_values(rows: dict[str, np.ndarray], batch_size: int) -> int:
    return batch_size * sum(int(np.prod(a.shape[1:])) for a in rows.values())


def _input_data(rows: dict[str, np.ndarray], batched: bool, path: Path, steps: int = 64) -> None:
    n = len(next(iter(rows.values())))
    data = []
    for i in range(min(n, steps)):
        data.append({name: {"content": np.asarray(a[i]).ravel().tolist(),
                            "shape": list(a[i].shape)}
                     for name, a in rows.items()})
    if not batched:  # a model without a batch dimension takes [1, ...] tensors
        for step in data:
            for value in step.values():
                value["shape"] = [1] + value["shape"]
    path.write_text(json.dumps({"data": data}))


def csv_row(path: Path) -> dict[str, float]:
    lines = path.read_text().strip().splitlines()
    head, values = lines[0].split(","), lines[1].split(",")
    return {key: float(value) for key, value in zip(head, values) if value.strip()}


def export_windows(export: Path) -> tuple[list[np.ndarray], list[float], float]:
    """A ``--profile-export-file``'s requests: each window's latencies (ms), the windows'
    lengths (s) and the slowest latency."""
    experiment = json.loads(export.read_text())["experiments"][0]
    bounds = np.asarray(experiment["window_boundaries"], dtype=np.int64)
    ends, latencies = [], []
    for request in experiment["requests"]:
        if request.get("response_timestamps"):
            ends.append(request["response_timestamps"][-1])
            latencies.append(request["response_timestamps"][-1] - request["timestamp"])
    ends_a, lat = np.asarray(ends, dtype=np.int64), np.asarray(latencies, dtype=np.float64) / 1e6
    which = np.searchsorted(bounds, ends_a, side="right") - 1
    windows = [lat[which == k] for k in range(len(bounds) - 1)]
    lengths = [float(b - a) / 1e9 for a, b in itertools.pairwise(bounds)]
    return windows, lengths, float(lat.max()) if lat.size else 0.0


def _run(command: list[str], deadline_s: float) -> tuple[subprocess.CompletedProcess, float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=deadline_s,
                              env=environment(), check=False)
    except subprocess.TimeoutExpired as exc:
        raise PerfAnalyzerFailed(f"perf_analyzer did not finish in {deadline_s:.0f} s") from exc
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done, cpu, time.monotonic() - started


def last_line(text: str) -> str:
    """The line that says what went wrong: the last naming an error, else the last."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    telling = [line for line in lines
               if re.search(r"error|fail|no valid|unable|cannot|invalid", line, re.IGNORECASE)]
    return one_line((telling or lines or ["no output"])[-1], 300)


def _command(binary: Path, protocol: str, url: str, model: str, batched: bool,
             batch_size: int, concurrency: int, interval_ms: int, data: Path) -> list[str]:
    command = [str(binary), "-m", model, "-u", url, "-i", protocol,
               "--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms),
               "-s", "100000", "--max-trials", str(STABLE_WINDOWS), "--input-data", str(data)]
    return command + (["-b", str(batch_size)] if batched else [])


def warm_up(binary: Path, *, protocol: str, url: str, model: str, batched: bool,
            rows: dict[str, np.ndarray], batch_size: int, concurrency: int, warmup_s: float,
            request_timeout_s: float) -> dict:
    """Load the level for ``warmup_s`` with perf_analyzer itself, its report discarded;
    returns what was run (``PerfAnalyzerFailed`` when it could not)."""
    interval_ms = max(50, round(warmup_s * 1000 / STABLE_WINDOWS))
    with tempfile.TemporaryDirectory(prefix="torchship-pa-warmup-") as tmp:
        _input_data(rows, batched, Path(tmp) / "data.json")
        command = _command(binary, protocol, url, model, batched, batch_size, concurrency,
                           interval_ms, Path(tmp) / "data.json")
        deadline = STABLE_WINDOWS * interval_ms / 1e3 * 2 + request_timeout_s + 10.0
        done, _, wall = _run(command, deadline)
    if done.returncode != 0:
        raise PerfAnalyzerFailed(f"perf_analyzer's warm-up exited with {done.returncode}: "
                                 f"{last_line(done.stderr + chr(10) + done.stdout)}")
    found = re.search(r"Request count:\s*(\d+)", done.stdout)
    return {"by": "perf_analyzer", "warmup_s": STABLE_WINDOWS * interval_ms / 1e3,
            "windows": STABLE_WINDOWS, "measurement_interval_ms": interval_ms,
            "requests": int(found.group(1)) if found else None, "wall_s": wall,
            "command": " ".join([os.path.basename(command[0])] + command[1:])}


def measure(binary: Path, *, protocol: str, url: str, model: str, batched: bool,
            rows: dict[str, np.ndarray], batch_size: int, concurrency: int, window_s: float,
            percentile: int | None, request_timeout_s: float) -> Measured:
    """``STABLE_WINDOWS`` windows of one level measured by one perf_analyzer run (its stability
    band set wide open: the caller judges the windows); ``PerfAnalyzerFailed`` when it cannot."""
    with tempfile.TemporaryDirectory(prefix="torchship-pa-") as tmp:
        work = Path(tmp)
        _input_data(rows, batched, work / "data.json")
        command = _command(binary, protocol, url, model, batched, batch_size, concurrency,
                           max(50, round(window_s * 1000)), work / "data.json")
        command += ["-f", str(work / "levels.csv"), "--verbose-csv",
                    "--profile-export-file", str(work / "export.json")]
        if percentile is not None:
            command += ["--percentile", str(percentile)]
        deadline = STABLE_WINDOWS * window_s * 2 + request_timeout_s + 10.0
        done, cpu, wall = _run(command, deadline)
        if done.returncode != 0 or not (work / "export.json").is_file():
            raise PerfAnalyzerFailed(
                f"perf_analyzer exited with {done.returncode}: "
                f"{last_line(done.stderr + chr(10) + done.stdout)}")
        windows, lengths, slowest = export_windows(work / "export.json")
        return Measured(windows, lengths, slowest, csv_row(work / "levels.csv"), cpu, wall,
                        command)


@functools.lru_cache(maxsize=8)
def version_of(binary: Path) -> str:
    """The version perf_analyzer reports (``2.51.0``), or ``unknown``."""
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                              timeout=20, env=environment(), check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = re.search(r"Version\s+([0-9][0-9.]*)", done.stdout + done.stderr)
    return found.group(1) if found else "unknown"


def main(argv: list[str]) -> int:
    if argv[:1] != ["--install"]:
        print("usage: python -m torchship.components.benchmark.perf_analyzer --install",
              file=sys.stderr)
        return 2
    try:
        install()
    except UserInputError as exc:
        print(f"warning: {exc}; the benchmark measures with its Python client", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
