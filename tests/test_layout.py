"""The layout a newcomer changes things in: one package per stage, imports that only point back
along the pipeline, no import cycles, short files, and each default with one home."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from processes import TORCHSHIP

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"torchship.components": ROOT / "components", "torchship.pipelines": ROOT / "pipelines"}
# The stages in pipeline order; a stage may import only itself and the stages before it.
STAGES = ("data", "train", "compress", "export", "benchmark", "gate", "tune_serving", "deploy")
# Modules every stage shares. They import no stage, except the reader of the splits that
# prepare-data writes, which is what every later stage reads its rows with.
SHARED_MAY_IMPORT = {"torchship.components.data.splits"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The torchship modules `path` imports anywhere in it (a function's import counts too: a
    lazy import still makes a cycle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` names a module; `from module import name` does not.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
                     else node.module for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "components" and parts[2] in STAGES \
        else None


def test_a_stage_imports_only_itself_the_stages_before_it_and_shared_modules(graph):
    backwards = []
    for module, targets in graph.items():
        source = stage_of(module)
        for target in targets:
            into = stage_of(target)
            if module.startswith("torchship.pipelines") or into is None:
                continue
            if target.startswith("torchship.pipelines"):
                backwards.append(f"{module} -> {target} (components import no pipeline code)")
            elif source is None and target not in SHARED_MAY_IMPORT:
                backwards.append(f"{module} (shared) -> {target}")
            elif source is not None and STAGES.index(into) > STAGES.index(source):
                backwards.append(f"{module} ({source}) -> {target} ({into}, a later stage)")
    assert backwards == []


def test_there_is_no_import_cycle(graph):
    visiting, done, cycles = [], set(), []

    def visit(module: str) -> None:
        if module in done:
            return
        if module in visiting:
            cycles.append(visiting[visiting.index(module):] + [module])
            return
        visiting.append(module)
        for target in sorted(graph[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert cycles == []


def test_every_stage_is_a_package_with_a_readme():
    for stage in STAGES:
        package = ROOT / "components" / stage
        assert (package / "__init__.py").is_file() and (package / "README.md").is_file(), stage
    for shared in ("triton", "report"):
        assert (ROOT / "components" / shared / "README.md").is_file()
    assert (ROOT / "components" / "README.md").is_file()


def test_no_file_is_over_400_lines():
    long = {str(path.relative_to(ROOT)): n for path in modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_temporary_file_dance_is_written_once():
    """Only files.py makes temporary files to rename or syncs them; every stage writes through
    it (atomic_file, atomic_path, write_json, staged_dir)."""
    writers = [str(path.relative_to(ROOT)) for path in modules().values()
               if path.name != "files.py"
               and any(call in path.read_text() for call in ("mkstemp(", "fsync(", ".tmp\""))]
    assert writers == []


# -- one home for every default ------------------------------------------------------------------


def parameter_default(function, name: str):
    return inspect.signature(function).parameters[name].default


def test_the_target_concurrency_has_one_default_everywhere():
    from torchship.components.contracts import TARGET_CONCURRENCY
    from torchship.components.gate.checks import evaluate_gate
    from torchship.components.gate.stage import decide
    from torchship.components.tune_serving.stage import search_serving_config
    from torchship.pipelines.parameters import PARAMETERS

    defaults = {parameter_default(f, "target_concurrency")
                for f in (evaluate_gate, decide, search_serving_config)}
    defaults.add({n: d for n, _, d in PARAMETERS}["target_concurrency"])
    assert defaults == {TARGET_CONCURRENCY}


def test_pipeline_parameters_default_to_what_the_stages_define():
    from torchship.components.benchmark.method import Measurement
    from torchship.components.compress.variants import default_names, options
    from torchship.components.train.config import TrainConfig
    from torchship.pipelines.parameters import PARAMETERS

    pipeline = {name: default for name, _, default in PARAMETERS}
    train = TrainConfig("t", "v", "m")
    for name in ("model_name", "epochs", "batch_size", "learning_rate", "num_workers", "seed"):
        assert pipeline[name] == getattr(train, name), name
    measurement = Measurement()
    for name in ("batch_size", "duration_s", "warmup_s", "window_s", "min_windows",
                 "max_windows", "stability_pct"):
        assert pipeline[f"benchmark_{name}"] == getattr(measurement, name), name
    for name in ("target_sparsity", "finetune_epochs", "calibration_method"):
        assert pipeline[name] == options()[name].default, name
    assert pipeline["variants"] == default_names()


def test_serving_settings_have_one_default_for_every_target():
    from torchship.components.contracts import ServingSettings
    from torchship.components.deploy.targets.kserve import deploy_kserve
    from torchship.components.deploy.targets.local import deploy_local
    from torchship.components.deploy.targets.vertex import deploy_vertex
    from torchship.components.triton.config import model_config
    from torchship.components.triton.repository import build_model_repository

    # Every builder and target takes a ServingSettings (default: ServingSettings()), never its
    # own copy of max_batch_size / max_queue_delay_us / instance_count.
    for function in (model_config, build_model_repository, deploy_local, deploy_vertex,
                     deploy_kserve):
        parameters = inspect.signature(function).parameters
        assert parameters["serving"].default is None, function.__name__
        assert not {"max_batch_size", "max_queue_delay_us", "instance_count"} & set(parameters)
    assert ServingSettings().tuned() == {"instance_count": 1, "max_queue_delay_us": 100}


def test_no_budget_is_spelled_zero_in_the_pipeline_and_none_inside():
    from torchship.components.contracts import NOT_SET, limit
    from torchship.components.gate.stage import decide
    from torchship.components.tune_serving.stage import search_serving_config
    from torchship.pipelines.parameters import PARAMETERS, check_parameters

    assert {n: d for n, _, d in PARAMETERS}["latency_budget_p99_ms"] == NOT_SET
    assert limit(NOT_SET) is None and limit(2.5) == 2.5
    for function in (decide, search_serving_config):
        assert parameter_default(function, "latency_budget_p99_ms") is None
    assert check_parameters({"latency_budget_p99_ms": 0}) is None  # 0: no budget, accepted
    done = subprocess.run([*TORCHSHIP, "run", "--help"], capture_output=True, text=True,
                          check=True)
    help_text = " ".join(done.stdout.split())
    assert "--latency-budget-ms FLOAT" in help_text and "0 also means none" in help_text


def test_target_means_only_the_deploy_target():
    """Triton repositories say backend (python, onnxruntime); the compiled pipeline says
    platform (kfp, vertex); target is where a model is deployed (local, vertex, kserve)."""
    from torchship.components.contracts import BACKENDS
    from torchship.components.deploy.targets import target_names
    from torchship.pipelines.pipeline import PLATFORMS

    assert BACKENDS == ("python", "onnxruntime")
    assert PLATFORMS == ("kfp", "vertex")
    assert set(target_names()) == {"local", "vertex", "kserve"}
    done = subprocess.run([*TORCHSHIP, "compile", "--help"], capture_output=True, text=True,
                          check=True)
    assert "--platform [kfp|local|kubeflow|vertex]" in done.stdout
    assert "--target" not in done.stdout


def test_local_and_kubeflow_name_the_kfp_pipeline_by_where_it_runs(tmp_path):
    outputs, said = {}, {}
    for platform in ("kfp", "kubeflow", "local"):
        said[platform] = subprocess.run([*TORCHSHIP, "compile", "--platform", platform, "-o",
                                         str(tmp_path / f"{platform}.yaml")],
                                        capture_output=True, text=True, check=True).stdout
        outputs[platform] = (tmp_path / f"{platform}.yaml").read_text()
    assert outputs["kubeflow"] == outputs["kfp"] == outputs["local"]
    assert "(platform kubeflow (the kfp pipeline), image " in said["kubeflow"]
    assert "(platform local (the kfp pipeline), image " in said["local"]
    assert "(platform kfp, image " in said["kfp"]


def test_the_worker_entry_point_is_the_train_package():
    done = subprocess.run([sys.executable, "-m", "torchship.components.train", "--help"],
                          capture_output=True, text=True, check=True)
    assert "--train-path" in done.stdout and "--timeout-s" in done.stdout


@pytest.mark.parametrize("platform", ["kfp", "vertex"])
def test_the_compiled_pipeline_keeps_every_parameter(tmp_path, platform):
    """Every parameter of the compiled YAML, with its type and default, exactly as before the
    stages were reorganised (tests/data/pipeline_parameters.json was taken from that YAML), and
    the ones added since (image_size, model_options, text_column, tokenizer, max_length; the
    data step's Beam runner: data_runner, dataflow_*, beam_job_endpoint; benchmark_engine,
    benchmark_knee, benchmark_backend, throughput_target_rps)."""
    import json

    import yaml

    from torchship.pipelines.pipeline import compile_pipeline

    path = compile_pipeline(tmp_path / "pipeline.yaml", image="img:1", platform=platform)
    parameters = yaml.safe_load(path.read_text())["root"]["inputDefinitions"]["parameters"]
    before = json.loads((Path(__file__).parent / "data" / "pipeline_parameters.json").read_text())
    assert parameters == before[platform]
