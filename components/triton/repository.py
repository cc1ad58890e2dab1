"""Triton model repositories: built from ONNX exports, versions written, checked as Triton would.

Layout (what ``tritonserver`` loads)::

    <repository>/<model>/config.pbtxt        # ModelConfig in text format; its version_policy
                                             # lists the versions that are served
    <repository>/<model>/<version>/model.onnx (+ model.py for the local Python backend)
    <repository>/<model>/warmup/<file>       # a real sample row, fed to the model when it loads
    <repository>/.torchship-deploy.lock      # flock'ed by whoever adds a version

``target="triton"`` is the production form (``platform: "onnxruntime_onnx"``, served by the Triton
container on Vertex AI or KServe); ``target="local"`` serves the same ``model.onnx`` through the
Python backend (``model.py`` running ONNX Runtime), since the ``tritonserver`` inside the
nvidia-pytriton wheel has no ONNX Runtime backend.

A version is never overwritten: a new one is written under a staging directory beside the
repository and renamed into place; the config that lists it (the promotion) is written last, to a
temporary name and renamed. Whoever adds versions holds the repository lock, so two deploys into
the same repository get distinct versions.

The ``config.pbtxt`` itself comes from ``triton_config``; versions, the lock and the atomic writes
and swaps from ``repository_versions``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from torchship.components.errors import ServingError, UserInputError, one_line
from torchship.components.triton.versions import (
    atomic_write,
    served_versions,
    swap_into_place,
    version_dirs,
)
from torchship.components.triton.config import (
    TARGETS,
    TRITON_TO_V2,
    InvalidRepositoryError,
    describe_config,
    model_config,
    onnx_io,
    read_model_config,
    write_config,
)

__all__ = [
    "WARMUP_DIR",
    "build_model_repository",
    "load_sample",
    "onnx_variants",
    "validate_model_repository",
    "write_model",
]

PYTHON_MODEL_SOURCE = Path(__file__).with_name("python_model.py")
WARMUP_DIR = "warmup"

_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


# -- writing a model ------------------------------------------------------------------------------


def _warmup_sample(
    inputs: list[dict], sample: np.ndarray | None, max_batch_size: int, name: str
) -> dict[str, bytes]:
    """Raw bytes of one real sample per input (only for a single fixed-shape input)."""
    from tritonclient.utils import triton_to_np_dtype

    if sample is None or len(inputs) != 1:
        return {}
    tensor = inputs[0]
    dims = tensor["shape"][1:] if max_batch_size > 0 else tensor["shape"]
    if any(d <= 0 for d in dims):
        return {}
    row_size, need = int(np.prod(sample.shape[1:])), int(np.prod(dims))
    if max_batch_size > 0:
        if row_size != need:
            raise UserInputError(
                f"warmup_path: sample rows have shape {list(sample.shape[1:])}, model '{name}' "
                f"input '{tensor['name']}' wants {dims}; use a split of the same data"
            )
        data = sample[:1]
    elif need % row_size == 0 and len(sample) >= need // row_size:
        data = sample[: need // row_size]  # no batching: the sample fills the model's full shape
    else:
        return {}
    dtype = triton_to_np_dtype(TRITON_TO_V2[tensor["data_type"]])
    return {tensor["name"]: np.ascontiguousarray(data, dtype=dtype).tobytes()}


def _warmup_filename(input_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", input_name) + ".bin"


def write_model(
    source: Path,
    model_dir: Path,
    version: int,
    *,
    target: str,
    versions: list[int],
    sample: np.ndarray | None = None,
    **config_options,
) -> tuple[dict, object]:
    """Write ``<model_dir>/config.pbtxt``, ``warmup/`` and ``<version>/`` for ``source`` (an ONNX
    file). ``model_dir`` is expected to be a staging directory nobody serves yet. Returns the
    plain description (with ``version`` and ``versions``) and the ``ModelConfig``."""
    if target == "local" and not PYTHON_MODEL_SOURCE.is_file():
        raise ServingError(f"the Python-backend model source {PYTHON_MODEL_SOURCE} is missing")
    name = model_dir.name
    if not _MODEL_NAME.fullmatch(name):
        raise UserInputError(
            f"onnx_dir: '{name}' is not a usable Triton model name; name the variant directory "
            "with letters, digits, '_', '-' or '.' (not starting with '.')"
        )
    inputs, outputs, external = onnx_io(source)
    max_batch_size = int(config_options.get("max_batch_size", 64))
    warmup = _warmup_sample(inputs, sample, max_batch_size, name)
    warmup_files = {k: _warmup_filename(k) for k in warmup}
    config = model_config(
        name, inputs, outputs, target=target, versions=versions, warmup_files=warmup_files,
        **config_options,
    )
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True)
    shutil.copy2(source, version_dir / "model.onnx")
    for location in external:
        target_file = version_dir / location
        target_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.parent / location, target_file)
    if target == "local":
        shutil.copy2(PYTHON_MODEL_SOURCE, version_dir / "model.py")
    for input_name, data in warmup.items():
        atomic_write(model_dir / WARMUP_DIR / warmup_files[input_name], data)
    write_config(config, model_dir / "config.pbtxt")
    description = describe_config(config, target)
    description.update({"version": int(version), "versions": sorted(versions)})
    return description, config


def onnx_variants(onnx_dir: Path) -> list[Path]:
    """The ``<variant>`` directories of the export stage's ``onnx_dir`` that hold a ``model.onnx``."""
    if not onnx_dir.is_dir():
        raise UserInputError(f"onnx_dir: {onnx_dir} is not a directory; run the export stage first")
    variants = sorted(p.parent for p in onnx_dir.glob("*/model.onnx") if p.is_file())
    if not variants:
        raise UserInputError(
            f"onnx_dir: no <variant>/model.onnx under {onnx_dir}; run the export stage first"
        )
    return variants


def load_sample(path: str | os.PathLike | None, what: str = "warmup_path") -> np.ndarray | None:
    """The ``x`` rows of an ``.npz`` split (``None`` when no path is given)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what}: {path} does not exist; run prepare_data first")
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data:
            raise UserInputError(f"{what}: {path} has no 'x' array; run prepare_data")
        x = np.asarray(data["x"])
    if x.ndim < 2 or len(x) == 0:
        raise UserInputError(f"{what}: 'x' in {path} has shape {x.shape}; expected [N, F]")
    return x


def build_model_repository(
    onnx_dir: str | os.PathLike,
    repository_dir: str | os.PathLike,
    target: str = "local",
    max_batch_size: int = 64,
    *,
    max_queue_delay_us: int = 100,
    preferred_batch_sizes: tuple[int, ...] | None = None,
    instance_count: int = 1,
    instance_kind: str = "KIND_CPU",
    tensorrt_fp16: bool = False,
    warmup_path: str | os.PathLike | None = None,
    version: int = 1,
) -> list[dict]:
    """Write a fresh Triton model repository for every ``onnx_dir/<variant>/model.onnx``.

    Each model gets ``config.pbtxt`` (a ``ModelConfig`` proto in text format), ``<version>/model.onnx``
    (plus ``model.py`` for ``target="local"``) and, when ``warmup_path`` (an ``.npz`` split) is
    given, a real sample under ``warmup/``. The repository is built in a staging directory beside
    ``repository_dir``, validated, and renamed into place, replacing a previous one. Returns one
    dict per model: ``name``, ``inputs``, ``outputs`` (each ``name``, ``data_type``, ``dims``),
    ``max_batch_size``, ``target``, ``version``, ``versions``.
    """
    if target not in TARGETS:
        raise UserInputError(f"target: '{target}' is not one of {', '.join(TARGETS)}")
    if int(max_batch_size) < 0:
        raise UserInputError(f"max_batch_size: {max_batch_size} is negative; use 0 or more")
    onnx_dir = Path(onnx_dir)
    repository_dir = Path(repository_dir)
    variants = onnx_variants(onnx_dir)
    sample = load_sample(warmup_path)
    options = {
        "max_batch_size": int(max_batch_size),
        "max_queue_delay_us": max_queue_delay_us,
        "preferred_batch_sizes": preferred_batch_sizes,
        "instance_count": instance_count,
        "instance_kind": instance_kind,
        "tensorrt_fp16": tensorrt_fp16,
    }
    repository_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{repository_dir.name}.tmp-", dir=repository_dir.parent)
    )
    try:
        models = [
            write_model(
                variant / "model.onnx", staging / variant.name, version, target=target,
                versions=[version], sample=sample, **options,
            )[0]
            for variant in variants
        ]
        validate_model_repository(staging, target=target)
        swap_into_place(staging, repository_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return models


# -- validation -----------------------------------------------------------------------------------


def validate_model_repository(
    repository_dir: str | os.PathLike,
    *,
    target: str | None = None,
    models: list[str] | None = None,
    load_onnx: bool = True,
) -> list[dict]:
    """Check a repository the way Triton will read it, before it leaves the stage.

    For every model (or those named): ``config.pbtxt`` parses as a ``ModelConfig`` and names its
    directory; the backend matches ``target``; every served version has a ``model.onnx`` that
    loads (with ONNX Runtime when ``load_onnx``) and whose inputs and outputs match the config by
    name, type and shape; the local target has its ``model.py``; warmup files exist and hold a full
    sample. Raises ``InvalidRepositoryError`` naming the file; returns the model descriptions (with
    ``versions``, the served ones, and ``version``, the newest).
    """
    from tritonclient.grpc import model_config_pb2 as mc

    repository_dir = Path(repository_dir)
    if not repository_dir.is_dir():
        raise InvalidRepositoryError(f"repository: {repository_dir} is not a directory")
    model_dirs = sorted(p for p in repository_dir.iterdir() if p.is_dir())
    hidden = [p.name for p in model_dirs if p.name.startswith(".")]
    if hidden:
        raise InvalidRepositoryError(
            f"repository: {repository_dir} holds {', '.join(hidden)}, which Triton would try to "
            "load as models; remove them"
        )
    if models is not None:
        missing = [m for m in models if not (repository_dir / m).is_dir()]
        if missing:
            raise InvalidRepositoryError(
                f"repository: {repository_dir} has no model {', '.join(missing)}"
            )
        model_dirs = [repository_dir / m for m in models]
    if not model_dirs:
        raise InvalidRepositoryError(f"repository: {repository_dir} has no models")

    described = []
    for model_dir in model_dirs:
        config_path = model_dir / "config.pbtxt"
        if not config_path.is_file():
            raise InvalidRepositoryError(f"repository: {config_path} is missing")
        config = read_model_config(config_path)
        where = f"repository: model '{model_dir.name}'"
        if config.name and config.name != model_dir.name:
            raise InvalidRepositoryError(
                f"{where}: config.pbtxt names it '{config.name}'; the names must match"
            )
        config_target = "triton" if config.platform == "onnxruntime_onnx" else (
            "local" if config.backend == "python" else None
        )
        if config_target is None or (target is not None and config_target != target):
            raise InvalidRepositoryError(
                f"{where}: platform '{config.platform}' / backend '{config.backend}' is not the "
                f"'{target or 'local or triton'}' target; rebuild it with the deploy stage"
            )
        available = version_dirs(model_dir)
        if config.version_policy.WhichOneof("policy_choice") == "specific":
            absent = [v for v in config.version_policy.specific.versions if v not in available]
            if absent:
                raise InvalidRepositoryError(
                    f"{where}: config.pbtxt serves versions {absent}, which have no directory"
                )
        versions = served_versions(config, available)
        if not versions:
            raise InvalidRepositoryError(f"{where}: no version to serve under {model_dir}")
        expected = describe_config(config, config_target)
        for version in versions:
            _validate_version(model_dir / str(version), config, expected, config_target, load_onnx)
        for warmup in config.model_warmup:
            for input_name, entry in warmup.inputs.items():
                if not entry.input_data_file:
                    continue
                path = model_dir / WARMUP_DIR / entry.input_data_file
                item = np.dtype(_np_dtype(mc.DataType.Name(entry.data_type))).itemsize
                need = max(1, warmup.batch_size) * int(np.prod(list(entry.dims))) * item
                if not path.is_file() or path.stat().st_size < need:
                    raise InvalidRepositoryError(
                        f"{where}: warmup input '{input_name}' needs {need} bytes in {path}"
                    )
        expected.update({"versions": versions, "version": versions[-1]})
        described.append(expected)
    return described


def _validate_version(
    version_dir: Path, config, expected: dict, target: str, load_onnx: bool
) -> None:
    where = f"repository: {version_dir}"
    onnx_path = version_dir / "model.onnx"
    if not onnx_path.is_file():
        raise InvalidRepositoryError(f"{where} has no model.onnx")
    if target == "local" and not (version_dir / "model.py").is_file():
        raise InvalidRepositoryError(f"{where} has no model.py for the Python backend")
    try:
        inputs, outputs, _ = onnx_io(onnx_path, what="repository")
    except UserInputError as exc:
        raise InvalidRepositoryError(str(exc)) from exc
    batch = [-1] if config.max_batch_size > 0 else []
    for kind, graph_tensors in (("inputs", inputs), ("outputs", outputs)):
        in_graph = [(t["name"], t["data_type"]) for t in graph_tensors]
        in_config = [(t["name"], t["data_type"]) for t in expected[kind]]
        if sorted(in_graph) != sorted(in_config):
            raise InvalidRepositoryError(
                f"{where}/model.onnx has {kind} {in_graph}, config.pbtxt declares {in_config}"
            )
        shapes = {t["name"]: t["shape"] for t in graph_tensors}
        for tensor in expected[kind]:
            shape = shapes[tensor["name"]]
            declared = batch + tensor["dims"]
            if len(shape) != len(declared) and not (shape == batch and tensor["dims"] == [1]):
                raise InvalidRepositoryError(
                    f"{where}/model.onnx tensor '{tensor['name']}' has shape {shape}, config.pbtxt "
                    f"declares {declared}"
                )
            if any(s > 0 and d > 0 and s != d for s, d in zip(shape, declared)):
                raise InvalidRepositoryError(
                    f"{where}/model.onnx tensor '{tensor['name']}' has shape {shape}, config.pbtxt "
                    f"declares {declared}"
                )
    if load_onnx:
        import onnxruntime as ort

        try:
            ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InvalidRepositoryError(
                f"{where}/model.onnx does not load in ONNX Runtime ({one_line(exc)}); re-run the "
                "export stage"
            ) from exc


def _np_dtype(triton_type: str):
    from tritonclient.utils import triton_to_np_dtype

    return triton_to_np_dtype(TRITON_TO_V2[triton_type])
