"""torch -> ONNX: one custom-domain node per op call, plus model-local fallback functions.

``torch.onnx.export(dynamo=True)`` with a ``custom_translation_table`` turns each opaque
``seqdeploy::*`` op into a single node in domain ``seqdeploy``. The exporter inlines
onnxscript functions, so the fallback bodies (standard ops only, built for the model's own
opset) are attached afterwards as model-local ``FunctionProto``s.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from typing import TYPE_CHECKING, Any

import onnx
import torch

from seqdeploy.architecture import BATCH, SEQ, Architecture
from seqdeploy.errors import SeqdeployError
from seqdeploy.ops import DOMAIN, CustomOp
from seqdeploy.precision import cast_inputs, cast_model

if TYPE_CHECKING:
    from seqdeploy.plugins import Registry

OPSET = 20
EXPORT_BATCH, EXPORT_SEQ = 2, 8  # example shape for tracing; both axes are exported dynamic


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def attach_fallbacks(model: onnx.ModelProto, ops: dict[str, CustomOp]) -> list[str]:
    """Add a local function for every seqdeploy node type the graph uses; returns their names."""
    by_onnx = {op.onnx_name: op for op in ops.values()}
    used = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})
    unknown = [u for u in used if u not in by_onnx]
    if unknown:
        raise SeqdeployError(f"graph uses seqdeploy ops with no registered plugin: {unknown}")
    opset = default_opset(model)
    present = {(f.domain, f.name) for f in model.functions}
    for name in used:
        if (DOMAIN, name) not in present:
            model.functions.append(by_onnx[name].fallback(opset))
    return used


def graph_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Counts of custom nodes and control flow in the main graph (Loop/Scan must be absent)."""
    nodes = model.graph.node
    return {
        "custom_nodes": {t: sum(1 for n in nodes if n.domain == DOMAIN and n.op_type == t)
                         for t in sorted({n.op_type for n in nodes if n.domain == DOMAIN})},
        "control_flow": sum(1 for n in nodes if n.op_type in ("Loop", "Scan", "If")),
        "nodes": len(nodes),
        "functions": [f"{f.domain}.{f.name}" for f in model.functions],
    }


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and warnings meant for its own developers."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(arch: Architecture, config: dict[str, Any], model: torch.nn.Module,
                precision: str, registry: "Registry",
                streaming: bool = False) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Export ``model`` (already loaded with its weights) at ``precision``.

    ``streaming=True`` exports the one-step graph instead: every sequence axis is dropped
    (``x_t, state -> y_t, state'``; see :mod:`seqdeploy.streaming`). The model is cast with
    the FP16 policy on a copy; the result passes ``onnx.checker`` (``full_check=True``) and
    the caller writes it atomically. Returns the proto and a summary (opset, node counts).
    """
    import copy

    from seqdeploy.streaming import StepModule, step_specs

    model = cast_model(copy.deepcopy(model).cpu().eval(), precision, arch.fp32_parameters)
    in_specs, out_specs = arch.input_specs(config), arch.output_specs(config)
    inputs = cast_inputs(arch.make_inputs(config, EXPORT_BATCH, 1 if streaming else EXPORT_SEQ, seed=0),
                         in_specs, precision)
    if streaming:
        model = StepModule(model, in_specs, out_specs)
        inputs = model.squeeze_inputs(inputs)
        in_specs, out_specs = step_specs(in_specs), step_specs(out_specs)
    batch = torch.export.Dim(BATCH, min=1)
    seq_max = arch.max_seq_len(config)
    seq = torch.export.Dim(SEQ, min=1, **({"max": seq_max} if seq_max else {}))
    dims = {BATCH: batch, SEQ: seq,
            **{name: torch.export.Dim(name, **bounds) for name, bounds in arch.axes.items()}}
    undeclared = sorted({d for s in in_specs for d in s.dynamic_axes().values()} - set(dims))
    if undeclared:
        raise SeqdeployError(f"{arch.name}: symbolic axes {', '.join(undeclared)} are not "
                             f"declared in Architecture.axes")
    # positional, in input order: forward's own argument names may differ from the specs'
    dynamic_shapes = tuple({axis: dims[d] for axis, d in s.dynamic_axes().items()} or None
                           for s in in_specs)
    params = list(inspect.signature(model.forward).parameters.values())
    if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        dynamic_shapes = (dynamic_shapes,)        # forward(*inputs): one tuple argument
    table = {op.torch_op._opoverload if hasattr(op.torch_op, "_opoverload") else op.torch_op: op.translation
             for op in registry.ops.values()}
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                model, tuple(inputs[s.name] for s in in_specs), dynamo=True, opset_version=OPSET,
                input_names=[s.name for s in in_specs], output_names=[s.name for s in out_specs],
                dynamic_shapes=dynamic_shapes, custom_translation_table=table, optimize=True,
                verbose=False)
    except Exception as exc:  # the exporter's errors are walls of text; keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SeqdeployError(f"ONNX export of {arch.name} failed: {first}") from exc
    proto = program.model_proto
    used = attach_fallbacks(proto, registry.ops)
    proto.producer_name = "seqdeploy"
    onnx.checker.check_model(proto, full_check=True)
    return proto, {"opset": default_opset(proto), "precision": precision, "ops": used,
                   "streaming": streaming, **graph_summary(proto)}
