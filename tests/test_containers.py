"""The images install what pyproject.toml pins, and Cloud Build builds the Dockerfiles that exist."""

import re
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "containers").glob("Dockerfile.*"))


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # The optional groups too: the CUDA image installs the `gpu` one's onnxruntime-gpu itself.
    requirements = [Requirement(r) for r in project["dependencies"]] + [
        Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    return {r.name.lower(): r for r in requirements}


def image_pins(dockerfile: Path) -> dict[str, str]:
    """`name==version` pins on the Dockerfile's pip install lines."""
    pins = {}
    for line in dockerfile.read_text().splitlines():
        if "pip install" in line:
            pins.update({m[0].lower(): m[1] for m in re.findall(r"([\w.-]+)==([\w.+-]+)", line)})
    return pins


def test_image_pins_agree_with_pyproject():
    required = pyproject_requirements()
    makefile_torch = re.search(r"TORCH_PIN := torch==(\S+)", (ROOT / "Makefile").read_text())[1]
    python_images = [d for d in DOCKERFILES if "pip install" in d.read_text()]
    assert {d.name for d in python_images} >= {"Dockerfile.cpu", "Dockerfile.cuda"}
    for dockerfile in python_images:
        text = dockerfile.read_text()
        # The package itself is installed, so every other dependency takes pyproject's pin.
        assert re.search(r'pip install "?\.(\[[\w,-]+\])?"?( |$)', text, re.MULTILINE), (
            dockerfile.name)
        pins = image_pins(dockerfile)
        assert pins["torch"] == makefile_torch, dockerfile.name
        for name, version in pins.items():
            assert name in required, f"{dockerfile.name} pins {name}, which pyproject lacks"
            assert required[name].specifier.contains(version), (
                f"{dockerfile.name}: {name}=={version} outside pyproject's {required[name]}")


def test_pyproject_pins_every_dependency_but_torch_exactly():
    for name, requirement in pyproject_requirements().items():
        if name != "torch":
            assert str(requirement.specifier).startswith("=="), requirement


def test_cloud_build_builds_the_dockerfiles_and_publishes_the_pipeline():
    build = yaml.safe_load((ROOT / "containers" / "cloudbuild.yaml").read_text())
    built = {arg for step in build["steps"] for arg in step.get("args", [])
             if arg.startswith("containers/Dockerfile")}
    assert built == {f"containers/{d.name}" for d in DOCKERFILES}
    scripts = " ".join(a for step in build["steps"] for a in step.get("args", []))
    assert "torchship compile --platform vertex" in scripts and "torchship publish" in scripts


def test_trigger_function_requirements_agree_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    required = {**pyproject_requirements(), **{r.name.lower(): r for r in extras}}
    lines = (ROOT / "infra" / "trigger" / "requirements.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert {p.name for p in pins} >= {"functions-framework", "google-cloud-aiplatform"}
    for pin in pins:
        version = str(pin.specifier).removeprefix("==")
        assert required[pin.name.lower()].specifier.contains(version), pin


def test_the_cpu_image_runs_dataflow_workers_of_its_own_beam_and_python():
    """Dataflow starts the data step's workers in the CPU image: Beam's launcher there is of the
    Beam that the `dataflow` extra pins and of the image's Python, and the entry point hands it
    the harness's flags."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [beam] = [Requirement(r) for r in project["optional-dependencies"]["dataflow"]]
    assert beam.name == "apache-beam" and "gcp" in beam.extras
    text = (ROOT / "containers" / "Dockerfile.cpu").read_text()
    python = re.search(r"^FROM python:(\d+\.\d+)-slim", text, re.MULTILINE)[1]
    launcher = re.search(r"COPY --from=apache/beam_python([\d.]+)_sdk:(\S+) /opt/apache/beam ",
                         text)
    assert launcher[1] == python
    assert beam.specifier.contains(launcher[2]) and str(beam.specifier) == f"=={launcher[2]}"
    assert re.search(r'pip install "\.\[dataflow\]"', text)
    assert 'ENTRYPOINT ["/opt/torchship/beam-entrypoint.sh"]' in text
    entrypoint = (ROOT / "containers" / "beam-entrypoint.sh").read_text()
    assert 'exec /opt/apache/beam/boot "$@"' in entrypoint and entrypoint.rstrip().endswith(
        'exec "$@"')


def test_the_entry_point_hands_harness_flags_to_beam_and_runs_commands_as_given(tmp_path):
    import subprocess

    boot = tmp_path / "boot"
    boot.write_text('#!/bin/sh\necho "beam boot $*"\n')
    boot.chmod(0o755)
    script = tmp_path / "entrypoint.sh"
    script.write_text((ROOT / "containers" / "beam-entrypoint.sh").read_text()
                      .replace("/opt/apache/beam/boot", str(boot)))
    script.chmod(0o755)

    def start(*args: str) -> str:
        return subprocess.run([str(script), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert start("--id=1", "--control_endpoint=localhost:1") == (
        "beam boot --id=1 --control_endpoint=localhost:1")
    assert start("echo", "--not-for-beam") == "--not-for-beam"


# -- the Dockerfiles' shape, read statically (no Docker engine here) ----------------------------

def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in lines if line and not line.startswith("#")]


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each stage, in order (ARGs before the first FROM left out)."""
    found: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions(dockerfile):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, arguments))
    return found


PYTHON_IMAGES = ("Dockerfile.cpu", "Dockerfile.cuda")


@pytest.mark.parametrize("name", [d.name for d in DOCKERFILES])
def test_every_image_runs_as_a_numeric_user_that_is_not_root(name):
    final = stages(ROOT / "containers" / name)[-1]
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users, f"{name}: the final stage sets no USER, so it runs as root"
    assert users[-1].isdigit() and int(users[-1]) != 0, users[-1]  # runAsNonRoot checks a number


@pytest.mark.parametrize("name", PYTHON_IMAGES)
def test_python_images_build_in_one_stage_and_run_from_a_slim_one(name):
    build, runtime = stages(ROOT / "containers" / name)
    assert build[0][1].endswith(" AS build")
    # The runtime takes the built environment, not the source tree or pip's build leftovers.
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    assert not any(k == "COPY" and ("components" in a or "pipelines" in a) for k, a in runtime)
    assert not any("pip install" in a for _, a in runtime)


@pytest.mark.parametrize("name", [*PYTHON_IMAGES, "Dockerfile.triton"])
def test_dependencies_are_installed_before_the_source_is_copied(name, tmp_path):
    """Editing components/ rebuilds only the last layers: pyproject.toml alone is copied before
    the dependency layer, which installs exactly pyproject's dependencies."""
    import shlex
    import subprocess
    import sys

    build = stages(ROOT / "containers" / name)[0]
    steps = [f"{k} {a}" for k, a in build]
    requirements = next(i for i, s in enumerate(steps) if "pip install -r requirements.txt" in s)
    source = next(i for i, s in enumerate(steps) if s.startswith("COPY components"))
    assert requirements < source
    copied_before = [s for s in steps[:requirements] if s.startswith("COPY ")]
    assert copied_before == ["COPY pyproject.toml ./"]
    # The dependency layer's own command, run here on pyproject.toml.
    command = steps[requirements].removeprefix("RUN ").split(" > requirements.txt")[0]
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    argv = shlex.split(command)
    assert argv[:2] in (["python", "-c"], ["python3", "-c"])
    printed = subprocess.run([sys.executable, "-c", argv[2]], cwd=tmp_path, check=True,
                             capture_output=True, text=True).stdout.split()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = list(project["dependencies"])
    if name == "Dockerfile.cpu":
        expected += project["optional-dependencies"]["dataflow"]
    assert printed == [r.replace(" ", "") for r in expected]


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the repository root) out of the build
    context: a pattern matches it or a folder above it; `**/` matches at any depth."""
    from fnmatch import fnmatch

    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    parts = path.split("/")
    return any(fnmatch("/".join(parts[:depth]), pattern)
               or (pattern.startswith("**/") and fnmatch(parts[depth - 1], pattern[3:]))
               for depth in range(1, len(parts) + 1) for pattern in patterns)


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    for local in (".venv/bin/python", ".git/HEAD", "runs/torchship-1/x", "out/pipeline.yaml",
                  "components/train/__pycache__/stage.cpython-311.pyc", ".pytest_cache/v",
                  ".ruff_cache/x", "torchship.egg-info/PKG-INFO"):
        assert dockerignored(local), local
    # Everything an image copies from the context is still sent.
    copied = {arguments.split()[-2] for d in DOCKERFILES for keyword, arguments in instructions(d)
              if keyword == "COPY" and not arguments.startswith("--from")}
    assert copied == {"pyproject.toml", "README.md", "components", "pipelines",
                      "containers/beam-entrypoint.sh"}
    for path in (*copied, "components/train/stage.py", "pipelines/cli.py"):
        assert not dockerignored(path), path


# -- one tag scheme: Makefile, Cloud Build, and the GPU image compile derives ----------------------

REGISTRY = "europe-west4-docker.pkg.dev/acme/ml"


def makefile_tags() -> dict[str, str]:
    """Dockerfile -> tag, as `make images REGISTRY=...` would build them."""
    import shutil
    import subprocess

    if not shutil.which("make"):
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", "images", f"REGISTRY={REGISTRY}"], cwd=ROOT,
                          check=True, capture_output=True, text=True)
    builds = [line.split() for line in done.stdout.splitlines() if "docker build" in line]
    return {b[b.index("-f") + 1]: b[b.index("-t") + 1] for b in builds}


def cloud_build() -> dict:
    return yaml.safe_load((ROOT / "containers" / "cloudbuild.yaml").read_text())


def cloud_build_tags() -> dict[str, str]:
    """Dockerfile -> tag, as Cloud Build builds them for the same registry and pyproject's
    version."""
    build = cloud_build()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert build["substitutions"]["_VERSION"] == version  # bump it with pyproject's

    def resolve(text: str) -> str:
        return (text.replace("${_REGION}-docker.pkg.dev/${PROJECT_ID}/${_REPOSITORY}", REGISTRY)
                .replace("${_VERSION}", version))

    tags = {}
    for step in build["steps"]:
        args = step.get("args", [])
        if args[:1] == ["build"]:
            tags[args[args.index("-f") + 1]] = resolve(args[args.index("-t") + 1])
    assert {resolve(image) for image in build["images"]} == set(tags.values())
    return tags


def test_makefile_and_cloud_build_tag_every_image_alike():
    tags = makefile_tags()
    assert tags == cloud_build_tags()
    assert set(tags) == {f"containers/{d.name}" for d in DOCKERFILES}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tags["containers/Dockerfile.cpu"] == f"{REGISTRY}/torchship-cpu:{version}"
    assert tags["containers/Dockerfile.cuda"] == f"{REGISTRY}/torchship-cuda:{version}"
    assert tags["containers/Dockerfile.triton"] == f"{REGISTRY}/torchship-tritonserver:{version}"


def test_cloud_build_compiles_against_the_three_images_it_pushed():
    from torchship.pipelines.pipeline import default_gpu_image, default_serving_image

    [script] = [step["args"][-1] for step in cloud_build()["steps"]
                if step.get("id") == "compile-and-publish"]
    cpu = re.search(r"--image (\S+)", script)[1]
    gpu = re.search(r"--gpu-image (\S+)", script)[1]
    serving = re.search(r"--serving-image (\S+)", script)[1]
    assert cpu.endswith("/torchship-cpu:${_VERSION}") and gpu.endswith("/torchship-cuda:${_VERSION}")
    assert serving == cpu.replace("/torchship-cpu:", "/torchship-tritonserver:")
    # The tag scheme gives the same images when --gpu-image and --serving-image are left out.
    assert default_gpu_image(cpu) == gpu and default_serving_image(cpu) == serving


def test_the_serving_image_measures_with_its_own_triton():
    """The benchmark and the serving search run in the Triton serving image: it carries
    torchship and perf_analyzer, and points torchship's launcher at NGC's own tritonserver (its
    onnxruntime backend), which `find_tritonserver` then prefers to nvidia-pytriton's."""
    from torchship.components.triton.binary import HOME_ENV, NGC_HOME

    final = stages(ROOT / "containers" / "Dockerfile.triton")[-1]
    assert final[0][1].startswith("nvcr.io/nvidia/tritonserver:")
    env = " ".join(arguments for keyword, arguments in final if keyword == "ENV")
    assert f"{HOME_ENV}={NGC_HOME}" in env and "PATH=/opt/venv/bin:$PATH" in env
    runs = " ".join(arguments for keyword, arguments in final if keyword == "RUN")
    assert "/opt/venv/bin/pip install ." in runs
    assert "/opt/venv/bin/python -m torchship.components.benchmark.perf_analyzer --install" in runs
