"""The CustomOp contract: one op, every runtime.

A :class:`CustomOp` bundles, for one recurrence or router op:

- ``torch_op``: the opaque ``torch.library.custom_op("seqdeploy::<name>")`` (CPU: vectorised
  reference, CUDA: Triton kernel) with its fake implementation;
- ``reference``: a plain step loop in torch, used by the ``torch-ref`` engine (the honest
  "before" baseline); the float64 naive loop lives beside it in the plugin, for tests;
- ``schema``: the ``onnx.defs.OpSchema`` of the node in domain ``seqdeploy``;
- ``translation``: the onnxscript function for ``torch.onnx.export``'s
  ``custom_translation_table``, emitting one custom node;
- ``fallback``: builds a model-local ``FunctionProto`` of standard ONNX ops for a given opset,
  so any ONNX runtime without seqdeploy kernels still runs the model.

Models call ops through :func:`call`, which honours :func:`reference_ops`.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import onnx
import onnx.defs
from onnx.defs import OpSchema

DOMAIN = "seqdeploy"
PLUGIN_NAMESPACE = "seqdeploy"
PLUGIN_VERSION = "1"
FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")

_reference_mode: contextvars.ContextVar[bool] = contextvars.ContextVar("reference", default=False)


@dataclass
class CustomOp:
    """One op in every form. See the module docstring for what each field is."""

    name: str
    onnx_name: str
    torch_op: Any
    reference: Callable[..., Any]
    schema: OpSchema
    translation: Callable[..., Any]
    fallback: Callable[[int], onnx.FunctionProto]
    version: int = 1
    doc: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args, **kwargs):
        return call(self, *args, **kwargs)


@contextlib.contextmanager
def reference_ops(enabled: bool = True) -> Iterator[None]:
    """Within this block, :func:`call` runs each op's step-loop reference, not its kernel."""
    token = _reference_mode.set(enabled)
    try:
        yield
    finally:
        _reference_mode.reset(token)


def call(op: CustomOp, *args, **kwargs):
    if _reference_mode.get():
        return op.reference(*args, **kwargs)
    return op.torch_op(*args, **kwargs)


def plugin_attributes() -> dict[str, str]:
    """The string attributes every seqdeploy node carries, so TensorRT finds its plugin."""
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}


def make_schema(onnx_name: str, inputs: Sequence[str], outputs: Sequence[str], doc: str,
                float_attrs: Sequence[str] = (), int_inputs: Sequence[str] = (),
                float_inputs: Sequence[str] = (), int_outputs: Sequence[str] = (),
                float_outputs: Sequence[str] = ()) -> OpSchema:
    """Build the OpSchema of a seqdeploy node.

    Inputs and outputs are of type ``T`` (fp32/fp16/bf16) unless listed in ``int_*`` (int64)
    or ``float_*`` (always fp32, e.g. router logits).
    """
    formal = OpSchema.FormalParameter

    def param(name: str, ints: Sequence[str], floats: Sequence[str]):
        if name in ints:
            return formal(name, "tensor(int64)")
        if name in floats:
            return formal(name, "tensor(float)")
        return formal(name, "T")

    attributes = [OpSchema.Attribute(a, OpSchema.AttrType.STRING, f"TensorRT plugin {a}", required=False)
                  for a in plugin_attributes()]
    attributes += [OpSchema.Attribute(a, OpSchema.AttrType.FLOAT, a, required=True) for a in float_attrs]
    return OpSchema(
        onnx_name, DOMAIN, 1, doc=doc,
        inputs=[param(n, int_inputs, float_inputs) for n in inputs],
        outputs=[param(n, int_outputs, float_outputs) for n in outputs],
        type_constraints=[("T", list(FLOAT_TYPES), "activations")],
        attributes=attributes,
    )


def register_schema(schema: OpSchema) -> None:
    """Register with onnx once per process (plugins may be loaded by several registries)."""
    if not onnx.defs.has(schema.name, schema.domain):
        onnx.defs.register_schema(schema)


def make_function(onnx_name: str, inputs: Sequence[str], outputs: Sequence[str],
                  nodes: Sequence[onnx.NodeProto], opset: int,
                  attributes: Sequence[str] = ()) -> onnx.FunctionProto:
    """A model-local function named like the node, in domain ``seqdeploy``, standard ops only."""
    return onnx.helper.make_function(
        DOMAIN, onnx_name, list(inputs), list(outputs), list(nodes),
        opset_imports=[onnx.helper.make_opsetid("", opset)],
        attributes=[*plugin_attributes(), *attributes],
    )
