"""Triton model repositories: built from ONNX exports, versions written, checked as Triton would.

Layout (what ``tritonserver`` loads)::

    <repository>/<model>/config.pbtxt        # ModelConfig in text format; its version_policy
                                             # lists the versions that are served
    <repository>/<model>/<version>/model.onnx (+ model.py for the local Python backend)
    <repository>/<model>/<version>/torchship-version.json  # {"variant": ...}: what it holds
    <repository>/<model>/warmup/<file>       # a real sample row, fed to the model when it loads
    <repository>/.torchship-deploy.lock      # flock'ed by whoever adds a version

``backend="onnxruntime"`` is the production form (``platform: "onnxruntime_onnx"``, served by the
Triton container on Vertex AI or KServe); ``backend="python"`` serves the same ``model.onnx``
through the Python backend (``model.py`` running ONNX Runtime), since the ``tritonserver`` inside
the nvidia-pytriton wheel has no ONNX Runtime backend.

A version is never overwritten: a new one is written under a staging directory beside the
repository and renamed into place; the config that lists it (the promotion) is written last, to a
temporary name and renamed. Whoever adds versions holds the repository lock, so two deploys into
the same repository get distinct versions.

The ``config.pbtxt`` itself comes from ``config``; versions and the lock from ``versions``; the
atomic writes and directory swaps from ``components.files``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np

from torchship.components.contracts import MODEL_ONNX, ServingSettings
from torchship.components.data.splits import load_inputs
from torchship.components.errors import ServingError, UserInputError, one_line
from torchship.components.files import staged_dir, write_bytes
from torchship.components.triton.config import (
    TRITON_TO_V2,
    InvalidRepositoryError,
    backend_of,
    check_backend,
    describe_config,
    model_config,
    onnx_io,
    read_model_config,
    write_config,
)
from torchship.components.triton.versions import (
    served_versions,
    version_dirs,
    write_version_record,
)

__all__ = [
    "WARMUP_DIR",
    "build_model_repository",
    "is_model_name",
    "onnx_variants",
    "validate_model_repository",
    "write_model",
]

PYTHON_MODEL_SOURCE = Path(__file__).with_name("python_model.py")
WARMUP_DIR = "warmup"

_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def is_model_name(name: str) -> bool:
    """Whether Triton can load and address a model of this name (a folder, a URL segment)."""
    return isinstance(name, str) and bool(_MODEL_NAME.fullmatch(name))


# -- writing a model ------------------------------------------------------------------------------


def _warmup_sample(
    inputs: list[dict], sample: dict[str, np.ndarray] | None, max_batch_size: int, name: str
) -> dict[str, bytes]:
    """Raw bytes of one real sample of every input (none where an input's shape varies, which
    Triton's warm-up cannot take)."""
    from tritonclient.utils import triton_to_np_dtype

    if not sample:
        return {}
    if any(d <= 0 for t in inputs for d in (t["shape"][1:] if max_batch_size > 0 else t["shape"])):
        return {}
    warmup = {}
    for tensor in inputs:
        x = sample.get(tensor["name"])
        if x is None:
            raise UserInputError(
                f"warmup_path: the split has no input '{tensor['name']}' (it has "
                f"{', '.join(sample)}), which model '{name}' takes; use a split of the same data"
            )
        dims = tensor["shape"][1:] if max_batch_size > 0 else tensor["shape"]
        row_size, need = int(np.prod(x.shape[1:])), int(np.prod(dims))
        if max_batch_size > 0:
            if row_size != need:
                raise UserInputError(
                    f"warmup_path: sample rows have shape {list(x.shape[1:])}, model '{name}' "
                    f"input '{tensor['name']}' wants {dims}; use a split of the same data"
                )
            data = x[:1]
        elif need % row_size == 0 and len(x) >= need // row_size:
            data = x[: need // row_size]  # no batching: the sample fills the model's full shape
        else:
            return {}
        dtype = triton_to_np_dtype(TRITON_TO_V2[tensor["data_type"]])
        warmup[tensor["name"]] = np.ascontiguousarray(data, dtype=dtype).tobytes()
    return warmup


def _warmup_filename(input_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", input_name) + ".bin"


def write_model(
    source: Path,
    model_dir: Path,
    version: int,
    *,
    backend: str,
    versions: list[int],
    sample: dict[str, np.ndarray] | None = None,
    serving: ServingSettings | None = None,
    variant: str | None = None,
) -> tuple[dict, object]:
    """Write ``<model_dir>/config.pbtxt``, ``warmup/`` and ``<version>/`` for ``source`` (an ONNX
    file), served with ``serving`` (default: ``ServingSettings()``); the version folder records
    ``variant`` (default: the source's folder name). ``model_dir`` is expected to be a staging
    directory nobody serves yet. Returns the plain description (with ``version``, ``versions``
    and ``variant``) and the ``ModelConfig``."""
    serving = serving or ServingSettings()
    if backend == "python" and not PYTHON_MODEL_SOURCE.is_file():
        raise ServingError(f"the Python-backend model source {PYTHON_MODEL_SOURCE} is missing")
    name = model_dir.name
    if not is_model_name(name):
        raise UserInputError(
            f"onnx_dir: '{name}' is not a usable Triton model name; name the model with up to "
            "128 letters, digits, '_', '-' or '.' (not starting with '.' or '-')"
        )
    variant = variant or source.parent.name
    inputs, outputs, external = onnx_io(source)
    warmup = _warmup_sample(inputs, sample, serving.max_batch_size, name)
    warmup_files = {k: _warmup_filename(k) for k in warmup}
    config = model_config(name, inputs, outputs, backend=backend, serving=serving,
                          versions=versions, warmup_files=warmup_files)
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True)
    shutil.copy2(source, version_dir / MODEL_ONNX)
    for location in external:
        target_file = version_dir / location
        target_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.parent / location, target_file)
    if backend == "python":
        shutil.copy2(PYTHON_MODEL_SOURCE, version_dir / "model.py")
    write_version_record(version_dir, variant)
    for input_name, data in warmup.items():
        write_bytes(model_dir / WARMUP_DIR / warmup_files[input_name], data)
    write_config(config, model_dir / "config.pbtxt")
    description = describe_config(config, backend)
    description.update({"version": int(version), "versions": sorted(versions),
                        "variant": variant})
    return description, config


def onnx_variants(onnx_dir: Path) -> list[Path]:
    """The ``<variant>`` directories of the export stage's ``onnx_dir`` that hold a ``model.onnx``."""
    if not onnx_dir.is_dir():
        raise UserInputError(f"onnx_dir: {onnx_dir} is not a directory; run the export stage first")
    variants = sorted(p.parent for p in onnx_dir.glob(f"*/{MODEL_ONNX}") if p.is_file())
    if not variants:
        raise UserInputError(
            f"onnx_dir: no <variant>/model.onnx under {onnx_dir}; run the export stage first"
        )
    return variants


def build_model_repository(
    onnx_dir: str | os.PathLike,
    repository_dir: str | os.PathLike,
    backend: str = "python",
    serving: ServingSettings | None = None,
    *,
    warmup_path: str | os.PathLike | None = None,
    version: int = 1,
    model_name: str | None = None,
) -> list[dict]:
    """Write a fresh Triton model repository for every ``onnx_dir/<variant>/model.onnx``, each
    model named after its variant, or, with ``model_name``, the one variant of ``onnx_dir`` (the
    gate's chosen model) served as ``model_name`` (its version folder records the variant).

    Each model gets ``config.pbtxt`` (a ``ModelConfig`` proto in text format, with ``serving``'s
    batching and instances), ``<version>/model.onnx`` (plus ``model.py`` for the python
    backend) and, when ``warmup_path`` (an ``.npz`` split) is given, a real sample under
    ``warmup/``. The repository is built in a staging directory beside ``repository_dir``,
    validated, and renamed into place, replacing a previous one. Returns one dict per model:
    ``name``, ``inputs``, ``outputs`` (each ``name``, ``data_type``, ``dims``),
    ``max_batch_size``, ``backend``, ``version``, ``versions``, ``variant``.
    """
    check_backend(backend)
    variants = onnx_variants(Path(onnx_dir))
    names = [model_name or variant.name for variant in variants]
    if model_name and len(variants) > 1:
        raise UserInputError(
            f"onnx_dir: {onnx_dir} holds {len(variants)} variants, but one model name "
            f"'{model_name}' serves one; pass the gate's chosen model (one <variant>/model.onnx)"
        )
    sample = load_inputs(warmup_path, "warmup_path", 1) if warmup_path is not None else None
    with staged_dir(repository_dir) as staging:
        models = [
            write_model(variant / MODEL_ONNX, staging / name, version, backend=backend,
                        versions=[version], sample=sample, serving=serving)[0]
            for variant, name in zip(variants, names)
        ]
        validate_model_repository(staging, backend=backend)
    return models


# -- validation -----------------------------------------------------------------------------------


def validate_model_repository(
    repository_dir: str | os.PathLike,
    *,
    backend: str | None = None,
    models: list[str] | None = None,
    load_onnx: bool = True,
) -> list[dict]:
    """Check a repository the way Triton will read it, before it leaves the stage.

    For every model (or those named): ``config.pbtxt`` parses as a ``ModelConfig`` and names its
    directory; its backend is ``backend`` (any of ``contracts.BACKENDS`` when None); every served
    version has a ``model.onnx`` that loads (with ONNX Runtime when ``load_onnx``) and whose inputs
    and outputs match the config by name, type and shape; the python backend has its
    ``model.py``; warmup files exist and hold a full
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
        config_backend = backend_of(config)
        if config_backend is None or (backend is not None and config_backend != backend):
            raise InvalidRepositoryError(
                f"{where}: platform '{config.platform}' / backend '{config.backend}' is not the "
                f"'{backend or 'python or onnxruntime'}' backend; rebuild it with the deploy stage"
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
        expected = describe_config(config, config_backend)
        for version in versions:
            _validate_version(model_dir / str(version), config, expected, config_backend,
                              load_onnx)
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
    version_dir: Path, config, expected: dict, backend: str, load_onnx: bool
) -> None:
    where = f"repository: {version_dir}"
    onnx_path = version_dir / MODEL_ONNX
    if not onnx_path.is_file():
        raise InvalidRepositoryError(f"{where} has no model.onnx")
    if backend == "python" and not (version_dir / "model.py").is_file():
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
