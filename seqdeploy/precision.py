"""FP16 conversion policy.

- Weights and activations are fp16.
- Parameters an architecture lists in ``fp32_parameters`` (decays, time constants) stay fp32;
  each op computes its recurrence state, exp/log and norm statistics in fp32 internally, and
  the ONNX fallback bodies do the same in fp32 islands.
- Integer inputs (ids, masks) keep their dtype.

The FP16 ONNX is exported from the model after :func:`cast_model`, so the graph carries
exactly the casts the PyTorch model performs; :func:`fp32_islands` reports them.
"""
from __future__ import annotations

from typing import Iterable

import onnx
import torch

PRECISIONS = ("fp32", "fp16")
ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx"}


#: dtype names as the kernels, their ahead-of-time variants and TensorRT's AOT launches spell
#: them; a model precision is one of ``PRECISIONS``
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise KeyError(precision)
    return TORCH_DTYPES[precision]


def cast_model(model: torch.nn.Module, precision: str,
               keep_fp32: Iterable[str] = ()) -> torch.nn.Module:
    """Cast floating parameters and buffers to ``precision``, except names containing any
    of ``keep_fp32``, which stay fp32. Works in place and returns the model."""
    dtype = torch_dtype(precision)
    keep = tuple(keep_fp32)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        target = torch.float32 if any(k in name for k in keep) else dtype
        tensor.data = tensor.data.to(target)
    return model


def cast_inputs(inputs: dict[str, torch.Tensor], specs, precision: str) -> dict[str, torch.Tensor]:
    """Cast example inputs to the dtypes the specs ask for at ``precision``."""
    by_name = {s.name: s for s in specs}
    return {k: v.to(by_name[k].torch_dtype(precision)) for k, v in inputs.items()}


def fp32_islands(model: onnx.ModelProto) -> dict[str, int]:
    """Count casts to fp32 in the main graph and in each local function: the places where
    an fp16 graph deliberately computes in fp32."""
    def count(nodes) -> int:
        return sum(1 for n in nodes if n.op_type == "Cast" and any(
            a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute))

    result = {"main": count(model.graph.node)}
    for fn in model.functions:
        result[f"{fn.domain}.{fn.name}"] = count(fn.node)
    return result
