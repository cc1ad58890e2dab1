"""Models: the built-in ones (`builtin`), building one for a tensor contract (`specs`),
checkpoints (`checkpoints`) and the ONNX graph (`onnx_export`). The names most stages use are
here too."""

from torchship.components.models.builtin import CNN, MLP, ResNet
from torchship.components.models.checkpoints import (
    contract_of,
    load_checkpoint,
    resize_to_state_dict,
    save_checkpoint,
)
from torchship.components.models.onnx_export import export_onnx
from torchship.components.models.specs import (
    BUILTIN_MODELS,
    as_contract,
    build_model,
    check_model_output,
    check_model_spec,
    count_parameters,
    example_inputs,
)

__all__ = ["BUILTIN_MODELS", "CNN", "MLP", "ResNet", "as_contract", "build_model",
           "check_model_output", "check_model_spec", "contract_of", "count_parameters", "example_inputs",
           "export_onnx", "load_checkpoint", "resize_to_state_dict", "save_checkpoint"]
