"""Deploy stage, local target: ONNX files -> a new version in a Triton model repository, served on
the bundled ``tritonserver``, checked, and only then promoted.

The repository layout and validation live in ``triton.repository``, configs in ``triton.config``,
versions and the lock in ``triton.versions``; the checks in ``deploy.smoke``.

``deploy_local`` adds the next version of every model to a repository (a persistent one, when
given, else the stage's artifact directory), never overwriting one. With ``model_name`` (the
pipeline's ``serving_model_name``) the one chosen variant becomes the next version of that model,
whichever variant it is, so clients keep one name across retrains; the version folder
(``torchship-version.json``) and the repository's serving record say which variant it is:

1. under the repository lock, each new version is written to a staging directory beside the
   repository (config listing only that version, ``model.onnx``, ``model.py``, a warmup sample)
   and validated;
2. the bundled ``tritonserver`` serves the staging directory and the new version is checked at its
   version URL over gRPC and HTTP: ready, metadata as in the repository, answers equal to ONNX
   Runtime on held-out rows;
3. only then is each version directory renamed into the repository and the model's
   ``config.pbtxt`` rewritten (temporary name, rename) with a ``version_policy`` listing the last
   ``keep_versions`` versions, the new one included. Triton answers a request that names no
   version with the highest version loaded, so the new one; the one before stays loaded for an
   instant rollback (``/versions/<previous>``, or a config listing it last).

Any failure before step 3 changes nothing in the repository: the versions served before stay the
ones served, and the stage raises with the reason. A deploy killed half-way leaves at most a staging
directory (removed by the next deploy under the lock) or a version directory the config does not
list (never loaded).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from torchship.components.contracts import MODEL_ONNX, ServingSettings
from torchship.components.deploy.registry import DeployRequest, DeployTarget, register
from torchship.components.deploy.smoke import load_samples, rows_count, smoke_test_server
from torchship.components.errors import ServingError, UserInputError
from torchship.components.files import make_staging_dir, remove_stale_staging, staged_dir
from torchship.components.triton.config import (
    InvalidRepositoryError,
    describe_config,
    read_model_config,
    write_config,
)
from torchship.components.triton.repository import (
    WARMUP_DIR,
    onnx_variants,
    validate_model_repository,
    write_model,
)
from torchship.components.triton.server import TritonServer
from torchship.components.triton.versions import (
    repository_lock,
    served_versions,
    version_dirs,
    write_serving_record,
)

__all__ = ["deploy_local"]


def deploy_local(
    onnx_dir: str | os.PathLike,
    repository_dir: str | os.PathLike,
    test_path: str | os.PathLike,
    n_samples: int = 32,
    atol: float = 1e-4,
    *,
    persistent_repository: str | os.PathLike | None = None,
    model_name: str | None = None,
    keep_versions: int = 2,
    serving: ServingSettings | None = None,
    startup_timeout_s: float = 120.0,
    request_timeout_s: float = 30.0,
    lock_timeout_s: float = 900.0,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Add a version of every ``onnx_dir/<variant>/model.onnx`` to a local repository, serve it on
    the bundled ``tritonserver``, smoke-test it and promote it (see the module docstring).

    The repository that gains the version is ``persistent_repository`` when given (it outlives the
    run; ``torchship serve`` serves it), else ``repository_dir``. With ``persistent_repository``,
    ``model_name``: serve the one variant of ``onnx_dir`` under that name (see the module
    docstring); without it each variant is a model of its own name.
    ``repository_dir`` (the stage's artifact) receives a copy of what was deployed: each model's
    config listing only its new version, that version and the warmup sample, so the benchmark
    stage measures exactly the new version. The smoke test sends ``n_samples`` held-out rows of
    ``test_path`` over gRPC and HTTP to ``/v2/models/<model>/versions/<new>``; answers must match
    ONNX Runtime within ``atol``.

    Raises ``ServingError`` (or ``UserInputError`` for bad inputs) with the reason; the repository
    is then as before. Returns ``{"models": {name: {"version", "variant", "served_versions",
    "previous_versions", "max_abs_diff_grpc", "max_abs_diff_http", "ready", "n_samples", ...}},
    "versions": {name: version}, "variants": {name: variant}, "repository",
    "artifact_repository", "target", "n_samples",
    "atol", "server_startup_s", "passed"}``.
    """
    if int(keep_versions) < 1:
        raise UserInputError(f"keep_versions: {keep_versions} must be 1 or more")
    artifact = Path(repository_dir)
    served = Path(persistent_repository) if persistent_repository else artifact
    x_all = load_samples(test_path, n_samples)
    variants = onnx_variants(Path(onnx_dir))
    if model_name and len(variants) > 1:
        raise UserInputError(
            f"onnx_dir: {onnx_dir} holds {len(variants)} variants, but model '{model_name}' "
            "serves one; pass the gate's chosen model (one <variant>/model.onnx)")
    serving = serving or ServingSettings()
    say = progress or (lambda _message: None)

    with repository_lock(served, lock_timeout_s):
        # Under the lock no other deploy is staging: whatever staging is left, a dead one left.
        remove_stale_staging(served, max_idle_s=0, kind="deploy")
        staging = make_staging_dir(served, kind="deploy")
        plans: list[dict] = []
        try:
            try:
                for variant in variants:
                    plans.append(_stage_version(variant, model_name or variant.name, served,
                                                staging, x_all, serving))
                validate_model_repository(staging, backend="python")
                with TritonServer(staging, startup_timeout_s=startup_timeout_s) as server:
                    smoke = smoke_test_server(
                        [plan["model"] for plan in plans],
                        x_all,
                        http_url=server.http_url,
                        grpc_url=server.grpc_url,
                        atol=atol,
                        request_timeout_s=request_timeout_s,
                        log_tail=server.log_tail,
                        progress=say,
                    )
                    startup_s = server.startup_s
            except (ServingError, UserInputError) as exc:
                raise _not_promoted(exc, served, [p["name"] for p in plans]
                                    or [model_name or v.name for v in variants]) from exc
            for plan in plans:
                _promote(plan, served, staging, int(keep_versions))
                say(
                    f"{plan['name']}: version {plan['version']} ({plan['variant']}) promoted in "
                    f"{served} (serving versions {plan['served_versions']})"
                )
            validate_model_repository(
                served, backend="python", models=[p["name"] for p in plans], load_onnx=False
            )
            write_serving_record(served, plans[-1]["name"], plans[-1]["version"],
                                 plans[-1]["variant"])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if artifact.resolve() != served.resolve():
            _export_versions(served, {p["name"]: p["version"] for p in plans}, artifact)

    results = {
        plan["name"]: {
            **smoke[plan["name"]],
            "version": plan["version"],
            "variant": plan["variant"],
            "served_versions": plan["served_versions"],
            "previous_versions": plan["previous_versions"],
        }
        for plan in plans
    }
    return {
        "models": results,
        "versions": {plan["name"]: plan["version"] for plan in plans},
        "variants": {plan["name"]: plan["variant"] for plan in plans},
        "repository": str(served),
        "artifact_repository": str(artifact),
        "target": "local",
        "n_samples": rows_count(x_all),
        "atol": float(atol),
        "server_startup_s": startup_s,
        "passed": True,
    }


def _stage_version(
    variant: Path, name: str, repository: Path, staging: Path, x_all, serving: ServingSettings
) -> dict:
    """Write ``variant`` as the next version of model ``name`` into ``staging/<name>/``; plan its
    promotion."""
    model_dir = repository / name
    existing = None
    if (model_dir / "config.pbtxt").is_file():
        existing = read_model_config(model_dir / "config.pbtxt")
    elif model_dir.is_dir() and any(model_dir.iterdir()):
        raise InvalidRepositoryError(
            f"repository: {model_dir} has files but no config.pbtxt, so it is not a Triton model; "
            "move it away or deploy to another repository"
        )
    available = version_dirs(model_dir)
    version = max(available, default=0) + 1
    previous = served_versions(existing, available) if existing is not None else []
    model, config = write_model(
        variant / MODEL_ONNX, staging / name, version, backend="python", versions=[version],
        sample=x_all, serving=serving, variant=variant.name,
    )
    if existing is not None:
        _check_compatible(existing, config, model_dir)
    model["onnx_path"] = str(staging / name / str(version) / MODEL_ONNX)
    return {
        "name": name,
        "version": version,
        "variant": variant.name,
        "previous_versions": previous,
        "config": config,
        "model": model,
    }


def _check_compatible(existing, new, model_dir: Path) -> None:
    """All served versions share one config: a new version must keep the tensors and batching."""
    old, fresh = describe_config(existing), describe_config(new)
    for key in ("backend", "inputs", "outputs", "max_batch_size"):
        if old[key] != fresh[key]:
            raise UserInputError(
                f"onnx_dir: model '{new.name}' has {key} {fresh[key]}, but {model_dir} serves "
                f"{old[key]}; versions of one model must agree, so deploy to a new repository or "
                "under another serving_model_name"
            )


def _promote(plan: dict, repository: Path, staging: Path, keep_versions: int) -> None:
    """Move the checked version into the repository, then list it in the config (the switch)."""
    name, version = plan["name"], plan["version"]
    staged, model_dir = staging / name, repository / name
    keep = (plan["previous_versions"] + [version])[-keep_versions:]
    plan["served_versions"] = keep
    if not (model_dir / "config.pbtxt").is_file():
        # A new model appears whole: one rename of its directory (an empty one may be in the way).
        if model_dir.is_dir():
            model_dir.rmdir()
        staged.rename(model_dir)
        return
    (staged / str(version)).rename(model_dir / str(version))  # not served: the config omits it
    warmup = staged / WARMUP_DIR
    if warmup.is_dir():
        (model_dir / WARMUP_DIR).mkdir(exist_ok=True)
        for sample in warmup.iterdir():
            os.replace(sample, model_dir / WARMUP_DIR / sample.name)
    config = plan["config"]
    del config.version_policy.specific.versions[:]
    config.version_policy.specific.versions.extend(keep)
    write_config(config, model_dir / "config.pbtxt")


def _not_promoted(exc: BaseException, repository: Path, names: list[str]) -> BaseException:
    """``exc`` with the state of the repository (unchanged) in front of its message."""
    kept = []
    for name in names:
        config_path = repository / name / "config.pbtxt"
        if config_path.is_file():
            try:
                versions = served_versions(read_model_config(config_path),
                                           version_dirs(repository / name))
            except UserInputError:
                continue
            kept.append(f"'{name}' versions {versions}")
    state = f"{', '.join(kept)} stay served" if kept else "nothing was served before"
    return type(exc)(f"deploy to {repository} failed and was not promoted ({state}): {exc}")


def _export_versions(repository: Path, versions: dict[str, int], destination: Path) -> None:
    """Copy each model's given version (config listing only it, and its warmup sample) into a
    fresh ``destination``, published whole."""
    with staged_dir(destination) as staging:
        for name, version in versions.items():
            source, target = repository / name, staging / name
            shutil.copytree(source / str(version), target / str(version))
            if (source / WARMUP_DIR).is_dir():
                shutil.copytree(source / WARMUP_DIR, target / WARMUP_DIR)
            config = read_model_config(source / "config.pbtxt")
            del config.version_policy.specific.versions[:]
            config.version_policy.specific.versions.append(version)
            write_config(config, target / "config.pbtxt")
        validate_model_repository(staging, backend="python", load_onnx=False)


def _deploy(request: DeployRequest) -> dict:
    result = deploy_local(request.onnx_dir, request.repository_dir, request.test_path,
                          persistent_repository=request.local_repository or None,
                          model_name=request.model_name or None,
                          serving=request.serving, progress=request.progress)
    result["summary"] = {"versions": result.get("versions", {}),
                         "variants": result.get("variants", {})}
    return result


TARGET = register(DeployTarget(
    name="local", deploy=_deploy,
    description="a new version in a local Triton repository (the bundled tritonserver), "
                "smoke-tested on a staging server before it is promoted",
))
