"""Execute a compiled pipeline YAML on this machine with `kfp.local`, showing only progress."""

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from kfp import components, local

from torchship.components.progress import PREFIX
from torchship.components.scratch import make_scratch_dir, sweep_stale
from torchship.components.watchdog import Watchdog
from torchship.pipelines.spec import with_every_task

# The last line of a stage's traceback when the user's input was at fault, or a check failed.
_STAGE_ERROR = re.compile(
    r"^(?:[\w.]+\.)?(UserInputError|ParityError|ServingError|ValueError|RuntimeError): (.+)$"
)
# kfp.local's own lines worth showing: a task starting and a task ending.
_TASK_LINE = re.compile(r" - \w+ - ((?:Executing task|Task) '[\w-]+'(?: finished with status \w+)?)\s*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The folder kfp.local gives each run under the pipeline root: <pipeline name>-<timestamp>.
_RUN_DIR = re.compile(r"^[a-z0-9][a-z0-9-]*-(\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}-\d{6})$")


class PipelineFailed(RuntimeError):
    """A stage of a local run failed; the message is the stage's own error line, and
    `refused` says whether the stage refused its input (a ``UserInputError``)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class _ProgressFilter(io.TextIOBase):
    """Passes torchship's progress lines through to `out` and keeps the last stage error line.

    kfp.local echoes every task's executor input and output; a person running the pipeline wants
    the epochs, the benchmark levels and, on failure, the one line that says what to fix.
    """

    def __init__(self, out: TextIO, verbose: bool) -> None:
        self.out, self.verbose = out, verbose
        self.partial = ""
        self.error: str | None = None
        self.error_type: str | None = None

    def write(self, text: str) -> int:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            # kfp.local indents a task's output by four spaces.
            line = _ANSI.sub("", line).strip()
            match = _STAGE_ERROR.match(line)
            if match:
                self.error_type, self.error = match.group(1), match.group(2)
            if self.verbose:
                self.out.write(line + "\n")
            elif line.startswith(PREFIX):
                self.out.write("    " + line[len(PREFIX):] + "\n")
            elif task := _TASK_LINE.search(line):
                self.out.write(task.group(1) + "\n")
        self.out.flush()
        return len(text)


def run_pipeline(
    pipeline_yaml: str | Path,
    pipeline_root: str | Path,
    arguments: dict[str, Any],
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the compiled pipeline under kfp.local's SubprocessRunner; return the run summary.

    A stage that refuses its input leaves nothing behind: the run's folder is removed (and the
    pipeline root, when this run made it and nothing else is in it). Nor does a run killed
    half-way leave temporary files or servers (`scratch`, `watchdog`)."""
    sweep_stale()  # what earlier runs killed half-way left in the temporary folder
    watchdog = Watchdog()
    scratch = make_scratch_dir("run")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    # Every stage's temporary files (kfp.local's workspace and task scripts, the stages' scratch
    # folders) go under the run's scratch folder, removed at the end or, if this process is
    # killed, by the watchdog.
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch)
    try:
        return _run(pipeline_yaml, pipeline_root, arguments, verbose)
    finally:
        if saved[0] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[0]
        tempfile.tempdir = saved[1]
        shutil.rmtree(scratch, ignore_errors=True)
        watchdog.release()


def _run(pipeline_yaml: str | Path, pipeline_root: str | Path, arguments: dict[str, Any],
         verbose: bool) -> dict[str, Any]:
    pipeline = components.load_component_from_text(_without_retries(Path(pipeline_yaml)))
    root = Path(pipeline_root)
    made_root = not root.exists()
    before = set(_run_dirs(root))
    root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(Path(pipeline_root).resolve()),
        raise_on_error=True,
    )
    stdout = _ProgressFilter(sys.stdout, verbose)
    stderr = _ProgressFilter(sys.stderr, verbose)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            task = pipeline(**arguments)
    except Exception as exc:  # kfp.local raises a generic RuntimeError naming only the task
        failed = stdout if stdout.error else stderr
        refused = failed.error_type == "UserInputError"
        if refused:
            for entry in set(_run_dirs(root)) - before:
                shutil.rmtree(entry, ignore_errors=True)
            if made_root and not any(root.iterdir()):
                root.rmdir()
        raise PipelineFailed(failed.error or str(exc), refused=refused) from exc
    results = Path(task.outputs["results"].path)
    summary = json.loads(results.read_text())
    summary["gate"] = json.loads(Path(task.outputs["gate_record"].path).read_text())
    summary["paths"] = {"summary": task.outputs["summary"].path, "results": str(results),
                        "gate": task.outputs["gate_record"].path,
                        "report": task.outputs["report"].path}
    return summary


def _without_retries(pipeline_yaml: Path) -> str:
    """The compiled pipeline with no task retried: retries are for a cluster's passing faults
    (a node reclaimed, storage hiccups); on this machine a failure is real, and kfp.local would
    run a refused data step again after a back-off, printing its error each time."""
    return with_every_task(pipeline_yaml, lambda task: task.pop("retryPolicy", None))


def prune_runs(pipeline_root: str | Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` run folders kfp.local left under `pipeline_root`; return
    those removed. Nothing else there is touched (the persistent model repository, say)."""
    runs = _run_dirs(Path(pipeline_root))
    old = sorted(runs, key=lambda entry: runs[entry], reverse=True)[keep:]
    for entry in old:
        shutil.rmtree(entry)
    return old


def _run_dirs(root: Path) -> dict[Path, str]:
    """The run folders kfp.local made under `root`, with the timestamp in each name."""
    return {entry: match.group(1) for entry in (root.iterdir() if root.is_dir() else ())
            if entry.is_dir() and not entry.is_symlink()
            and (match := _RUN_DIR.match(entry.name))}
