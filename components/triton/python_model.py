"""Triton Python-backend model that serves the ``model.onnx`` next to it with ONNX Runtime: on the
CPU, or, for a KIND_GPU instance, with the CUDA execution provider on the instance's GPU.

``repository.write_model(backend="python")`` copies this file to ``<repo>/<model>/<v>/model.py``.
It runs only inside Triton's Python-backend stub, where ``triton_python_backend_utils`` exists; it
is not meant to be imported from the ``torchship`` package.

Requests may arrive batched by Triton's dynamic batcher: the inputs of all requests are concatenated
along the batch dimension, run once, and the outputs are split back per request.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        model_path = os.path.join(version_dir, "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    "KIND_GPU instance, but this onnxruntime has no CUDAExecutionProvider; "
                    "install onnxruntime-gpu (the CUDA image) or serve on KIND_CPU")
            device = int(args.get("model_instance_device_id", 0))
            providers = [("CUDAExecutionProvider", {"device_id": device}), *providers]
        self.session = ort.InferenceSession(model_path, sess_options=options, providers=providers)
        self.batched = int(self.model_config.get("max_batch_size", 0)) > 0
        self.inputs = [
            (cfg["name"], pb_utils.triton_string_to_numpy(cfg["data_type"]))
            for cfg in self.model_config["input"]
        ]
        self.outputs = [
            (cfg["name"], pb_utils.triton_string_to_numpy(cfg["data_type"]))
            for cfg in self.model_config["output"]
        ]
        self.output_names = [name for name, _ in self.outputs]

    def _feeds(self, request):
        feeds = {}
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input tensor '{name}'")
            feeds[name] = np.ascontiguousarray(tensor.as_numpy(), dtype=dtype)
        return feeds

    def _response(self, values):
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=dtype))
            for (name, dtype), value in zip(self.outputs, values)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _error(exc):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))

    def _run_one(self, feeds):
        return self.session.run(self.output_names, feeds)

    def execute(self, requests):
        responses = [None] * len(requests)
        feeds_per_request = []
        for i, request in enumerate(requests):
            try:
                feeds_per_request.append((i, self._feeds(request)))
            except Exception as exc:  # noqa: BLE001 - reported to the client
                responses[i] = self._error(exc)

        if len(feeds_per_request) == 1 or (feeds_per_request and not self.batched):
            return self._run_each(feeds_per_request, responses)

        if feeds_per_request:
            sizes = [next(iter(feeds.values())).shape[0] for _, feeds in feeds_per_request]
            try:
                merged = {
                    name: np.concatenate([feeds[name] for _, feeds in feeds_per_request], axis=0)
                    for name, _ in self.inputs
                }
                outputs = self._run_one(merged)
            except Exception:  # noqa: BLE001 - shapes differ or one bad request: run one by one
                return self._run_each(feeds_per_request, responses)
            bounds = np.cumsum(sizes)[:-1]
            pieces = [np.split(out, bounds, axis=0) for out in outputs]
            for k, (i, _) in enumerate(feeds_per_request):
                responses[i] = self._response([piece[k] for piece in pieces])
        return responses

    def _run_each(self, feeds_per_request, responses):
        """Each request on its own: one failing request fails alone."""
        for i, feeds in feeds_per_request:
            try:
                responses[i] = self._response(self._run_one(feeds))
            except Exception as exc:  # noqa: BLE001 - reported to the client
                responses[i] = self._error(exc)
        return responses

    def finalize(self):
        self.session = None
