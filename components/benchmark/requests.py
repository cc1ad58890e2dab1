"""What a benchmark sends: held-out rows as request bodies, and the checked preflight request."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from torchship.components.benchmark.server import Endpoint, Model, call
from torchship.components.benchmark.transport import HttpConnection, http_error
from torchship.components.errors import ServingError, UserInputError, one_line

__all__ = ["payloads", "preflight", "rows_for"]

PAYLOADS_PER_CLIENT = 16  # distinct held-out batches each client cycles through


Rows = dict[str, np.ndarray]  # every input of the model, by name: held-out rows


def rows_for(model: Model, rows: Rows) -> Rows:
    """The test rows of every input of ``model``, in its types; ``UserInputError`` when one is
    missing or its shape does not fit."""
    from tritonclient.utils import triton_to_np_dtype

    fitted = {}
    for spec in model.inputs:
        x = rows.get(spec.name)
        if x is None:
            raise UserInputError(
                f"test_path: the split has no input '{spec.name}' (it has "
                f"{', '.join(rows)}), which model '{model.name}' takes; use the test split of "
                "the same data"
            )
        dims = spec.dims if model.max_batch_size > 0 else spec.dims[1:]
        if len(dims) != x.ndim - 1 or any(d not in (-1, n) for d, n in zip(dims, x.shape[1:])):
            raise UserInputError(
                f"test_path: rows of shape {list(x.shape[1:])} do not fit model '{model.name}' "
                f"input '{spec.name}' {spec.dims}; use the test split of the same data"
            )
        fitted[spec.name] = np.ascontiguousarray(
            x.astype(triton_to_np_dtype(spec.datatype), copy=False))
    return fitted


def _batch(rows: Rows, batch_size: int, offset: int, model: Model) -> Rows:
    """``batch_size`` rows of every input from ``offset`` on (wrapping round)."""
    index = (offset + np.arange(batch_size)) % len(next(iter(rows.values())))
    if model.max_batch_size == 0:
        return {name: array[index][0] for name, array in rows.items()}
    return {name: np.ascontiguousarray(array[index]) for name, array in rows.items()}


def payloads(endpoint: Endpoint, model: Model, rows: Rows, batch_size: int,
             offset: int) -> tuple[list[bytes], dict[str, str]]:
    """Request bodies for one client (real rows from ``offset`` on) and their extra headers."""
    batches = [
        _batch(rows, batch_size, offset + k * batch_size, model)
        for k in range(PAYLOADS_PER_CLIENT)
    ]
    if endpoint.protocol == "grpc":
        from tritonclient.grpc import service_pb2

        bodies = []
        for batch in batches:
            request = service_pb2.ModelInferRequest(model_name=model.name)
            for spec in model.inputs:
                tensor = request.inputs.add(name=spec.name, datatype=spec.datatype)
                tensor.shape.extend(batch[spec.name].shape)
                request.raw_input_contents.append(batch[spec.name].tobytes())
            for name in model.outputs:
                request.outputs.add(name=name)
            bodies.append(request.SerializeToString())
        return bodies, {}

    import tritonclient.http as httpclient

    binary = endpoint.protocol == "http"
    bodies, header_sizes = [], set()
    for batch in batches:
        tensors = []
        for spec in model.inputs:
            tensor = httpclient.InferInput(spec.name, list(batch[spec.name].shape), spec.datatype)
            tensor.set_data_from_numpy(batch[spec.name], binary_data=binary)
            tensors.append(tensor)
        outputs = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in model.outputs]
        body, json_size = httpclient.InferenceServerClient.generate_request_body(
            tensors, outputs=outputs
        )
        bodies.append(body if isinstance(body, bytes) else body.encode())
        header_sizes.add(json_size)
    if binary:
        (json_size,) = header_sizes  # same shapes and names: the same JSON header length
        return bodies, {"Content-Type": "application/octet-stream",
                        "Inference-Header-Content-Length": str(json_size)}
    return bodies, {"Content-Type": "application/json",
                    "X-Vertex-Ai-Triton-Redirect": f"v2/models/{model.name}/infer"}


def preflight(endpoint: Endpoint, client: Any, model: Model, rows: Rows, batch_size: int,
              timeout_s: float) -> None:
    """One real request, its answer checked: a broken endpoint fails here, within the timeout."""
    batch = _batch(rows, batch_size, 0, model)
    expected_rows = batch_size if model.max_batch_size > 0 else None
    where = f"model '{model.name}' at {endpoint.describe()}"
    if endpoint.protocol == "vertex":
        bodies, extra = payloads(endpoint, model, rows, batch_size, 0)
        target = endpoint.target(model, extra)
        connection = HttpConnection(target, timeout_s)
        try:
            status, body = connection.post(connection.message(bodies[0]))
        except TimeoutError as exc:
            raise ServingError(f"{where}: the request timed out after {timeout_s:g} s") from exc
        except OSError as exc:
            raise ServingError(f"{where}: cannot reach the endpoint ({one_line(exc)})") from exc
        finally:
            connection.close()
        if status != 200:
            raise ServingError(f"{where} answers {http_error(status, body)}")
        try:
            outputs = json.loads(body).get("outputs")
        except (ValueError, AttributeError):
            outputs = None
        if not outputs:
            raise ServingError(f"{where}: the answer has no KServe v2 'outputs': {body[:200]!r}")
        if expected_rows and int(outputs[0].get("shape", [0])[0]) != expected_rows:
            raise ServingError(
                f"{where}: {outputs[0].get('shape')} rows answered for {expected_rows} sent"
            )
        return

    if endpoint.protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    tensors = []
    for spec in model.inputs:
        tensor = module.InferInput(spec.name, list(batch[spec.name].shape), spec.datatype)
        tensor.set_data_from_numpy(batch[spec.name])
        tensors.append(tensor)
    requested = [module.InferRequestedOutput(o) for o in model.outputs]
    try:
        result = call(client, endpoint.protocol, "infer", model.name, tensors, outputs=requested,
                      headers=endpoint.headers or None, timeout_s=timeout_s)
    except Exception as exc:
        text = one_line(exc)
        if "deadline" in text.lower() or "timed out" in text.lower() or "timeout" in text.lower():
            raise ServingError(
                f"{where}: the request timed out after {timeout_s:g} s ({text}); the server is "
                "stuck or far too slow"
            ) from exc
        raise ServingError(f"{where}: inference failed: {text}") from exc
    for name in model.outputs:
        out = result.as_numpy(name)
        if out is None or (expected_rows and out.shape[0] != expected_rows):
            raise ServingError(
                f"{where}: output '{name}' has shape {None if out is None else out.shape} for a "
                f"batch of {batch_size}"
            )


