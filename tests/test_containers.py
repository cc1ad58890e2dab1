"""The images install what pyproject.toml pins, and Cloud Build builds the Dockerfiles that exist."""

import re
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "containers").glob("Dockerfile.*"))


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
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
