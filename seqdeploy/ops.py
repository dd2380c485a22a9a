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
  so any ONNX runtime without seqdeploy kernels still runs the model;
- ``eager`` (optional): per device type, the function the op's kernel registration calls,
  which :func:`call` may call directly (see there);
- ``trt_aot`` (optional): a :class:`seqdeploy.trt.aot.TrtAot`, the op's workspace-free
  Triton entry kernel and its launch, for TensorRT's AOT plugin form (full TensorRT only);
  an op without one keeps the Python ``IPluginV3`` form in every engine.

Models call ops through :func:`call`, which honours :func:`reference_ops`.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import onnx
import onnx.defs
import torch
from onnx.defs import OpSchema

if TYPE_CHECKING:
    from seqdeploy.trt.aot import TrtAot

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
    eager: dict[str, Callable[..., Any]] = field(default_factory=dict)
    trt_aot: "TrtAot | None" = None

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


def in_reference_mode() -> bool:
    """Whether :func:`reference_ops` is on: model code that fuses ops on a fast path (a
    kernel doing two ops' work in one launch) takes the separate ops instead, so each
    runs its reference."""
    return _reference_mode.get()


def call(op: CustomOp, *args, **kwargs):
    """Run ``op``: its reference under :func:`reference_ops`; else, in plain eager inference,
    the device's ``eager`` function directly; else the registered torch op.

    The direct call skips the dispatcher's round trip through the custom op (tens of
    microseconds of Python per call on the H200's host, more than a short recurrence runs on
    the GPU) and runs exactly what the op's kernel registration would run. It is taken only
    when nothing could observe the difference (:func:`_direct_device`): every tensor argument
    is a plain ``torch.Tensor`` or ``nn.Parameter`` (no fake, functional, batched or other
    subclass), nothing is being traced, compiled or transformed (dynamo, ``torch.export``,
    ``torch.jit``, ``torch.func``), no dispatch or torch-function mode is active, and no
    input needs a gradient. Anything else goes through ``torch_op``, so export, compile,
    fake tensors, functorch, subclasses and autograd see the op."""
    if _reference_mode.get():
        return op.reference(*args, **kwargs)
    if op.eager:
        device = _direct_device(args, kwargs)
        kernel = op.eager.get(device) if device is not None else None
        if kernel is not None:
            return kernel(*args, **kwargs)
    return op.torch_op(*args, **kwargs)


def eager_device(*tensors: torch.Tensor) -> str | None:
    """The device type (``"cuda"``, ``"cpu"``, ...) of plain eager inference on ``tensors``,
    or None when anything could observe how it is computed: tracing, compiling, exporting,
    a dispatch or torch-function mode, a tensor subclass, or a tensor that needs a gradient.
    Model code uses it as :func:`call` does, to take a faster path that only eager
    inference may take (a kernel launched directly) and the exported graph's form
    everywhere else."""
    return _direct_device(tensors, None)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _direct_device(args, kwargs) -> str | None:
    """The device type of a call that nothing could tell from the registered op, else None
    (see :func:`call`). It runs on every eager call, so it reads torch's state through the
    fewest calls."""
    if torch.compiler.is_compiling() or torch._C._is_tracing() or _modes_active():
        return None
    device = None
    grad = torch.is_grad_enabled()
    for a in ((*args, *kwargs.values()) if kwargs else args):
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN or (grad and a.requires_grad):
                return None
            if device is None:
                device = "cuda" if a.is_cuda else a.device.type
    return device


def _state_probes():
    c = torch._C
    try:
        return (c._len_torch_dispatch_stack, c._is_torch_function_mode_enabled,
                c._functorch.peek_interpreter_stack)
    except AttributeError:
        return None


#: torch's calls that say whether a dispatch mode, a torch-function mode or a ``torch.func``
#: transform is on (None where this torch lacks one: then assume one is)
_PROBES = _state_probes()


def _modes_active() -> bool:
    """Whether a dispatch mode, a torch-function mode or a ``torch.func`` transform is on."""
    if _PROBES is None:
        return True
    dispatch_modes, function_modes, transforms = _PROBES
    return dispatch_modes() > 0 or function_modes() or transforms() is not None


def lazy_kernel(module: str, name: str) -> Callable[..., Any]:
    """A function that calls ``module.name``, imported on its first call: a plugin's CUDA
    kernel registration (and ``CustomOp.eager`` entry) without loading Triton kernels in
    CPU-only runs, and without an import statement on every call (the eager path's host
    time counts)."""
    target: list[Callable[..., Any]] = []

    def run(*args, **kwargs):
        if not target:
            target.append(getattr(importlib.import_module(module), name))
        return target[0](*args, **kwargs)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"``{module}.{name}``, imported on first use."
    return run


def define_op(name: str, onnx_name: str, cpu: Callable[..., Any], fake: Callable[..., Any],
              reference: Callable[..., Any], translation: Callable[..., Any],
              fallback: Callable[[int], onnx.FunctionProto], inputs: Sequence[str],
              outputs: Sequence[str], doc: str, cuda: tuple[str, str] | None = None,
              schema_doc: str | None = None, trt_aot: "TrtAot | None" = None,
              **schema_types: Sequence[str]) -> CustomOp:
    """Every form of one op from its parts, the way each plugin would otherwise repeat it:

    - ``cpu``: the function ``torch.library.custom_op("seqdeploy::<name>")`` wraps (typed
      like a custom op; it runs on every device without a kernel of its own);
    - ``fake``: its fake implementation (output shapes and dtypes);
    - ``cuda``: ``(module, function)`` of the CUDA kernel's launcher, imported on first use,
      so CPU-only runs never load Triton; also the op's eager fast path (:func:`call`);
    - the ONNX schema (``inputs``, ``outputs`` and ``schema_types`` as in
      :func:`make_schema`), registered with onnx once per process;
    - ``trt_aot``: the op's TensorRT AOT entry, if it has one (:class:`CustomOp`).
    """
    torch_op = torch.library.custom_op(f"{DOMAIN}::{name}", cpu, mutates_args=())
    torch_op.register_fake(fake)
    eager = {}
    if cuda is not None:
        eager["cuda"] = lazy_kernel(*cuda)
        torch_op.register_kernel("cuda")(eager["cuda"])
    schema = make_schema(onnx_name, inputs, outputs, doc=schema_doc or doc, **schema_types)
    register_schema(schema)
    return CustomOp(name=name, onnx_name=onnx_name, torch_op=torch_op, reference=reference,
                    schema=schema, translation=translation, fallback=fallback, doc=doc,
                    eager=eager, trt_aot=trt_aot)


def plugin_attributes() -> dict[str, str]:
    """The string attributes every seqdeploy node carries, so TensorRT finds its plugin."""
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}


def make_schema(onnx_name: str, inputs: Sequence[str], outputs: Sequence[str], doc: str,
                float_attrs: Sequence[str] = (), int_inputs: Sequence[str] = (),
                float_inputs: Sequence[str] = (), int_outputs: Sequence[str] = (),
                float_outputs: Sequence[str] = (), int_attrs: Sequence[str] = (),
                string_attrs: Sequence[str] = ()) -> OpSchema:
    """Build the OpSchema of a seqdeploy node.

    Inputs and outputs are of type ``T`` (fp32/fp16/bf16) unless listed in ``int_*`` (int64)
    or ``float_*`` (always fp32, e.g. router logits or recurrent state). Attributes named in
    ``float_attrs``, ``int_attrs`` and ``string_attrs`` are required, of that type.
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
    kinds = ((float_attrs, OpSchema.AttrType.FLOAT), (int_attrs, OpSchema.AttrType.INT),
             (string_attrs, OpSchema.AttrType.STRING))
    attributes += [OpSchema.Attribute(a, kind, a, required=True) for names, kind in kinds for a in names]
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
