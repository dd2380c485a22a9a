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


def describe_model(proto: onnx.ModelProto, arch: Architecture, config: dict[str, Any],
                   preset: str, precision: str, in_specs, out_specs, ops: dict[str, CustomOp],
                   streaming: bool) -> None:
    """Make the file readable by a deployment engineer and free of the build machine: drop
    the exporter's per-node stack traces and source paths, and write what the model is
    (architecture, preset, versions, what each state tensor means) into its metadata and
    every graph input and output's doc string."""
    import json

    import seqdeploy

    def scrub(nodes):
        for node in nodes:
            keep = [p for p in node.metadata_props if not p.key.startswith("pkg.torch")]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
            node.doc_string = ""
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    scrub(attr.g.node)
                for g in attr.graphs:
                    scrub(g.node)

    scrub(proto.graph.node)
    for fn in proto.functions:
        scrub(fn.node)
        del fn.metadata_props[:]
    for info in (*proto.graph.value_info, *proto.graph.input, *proto.graph.output):
        keep = [p for p in info.metadata_props if not p.key.startswith("pkg.torch")]
        del info.metadata_props[:]
        info.metadata_props.extend(keep)
    del proto.graph.metadata_props[:]
    proto.graph.doc_string = ""
    proto.producer_name = "seqdeploy"
    proto.producer_version = seqdeploy.__version__
    proto.doc_string = (f"{arch.name}/{preset} ({arch.description}), {precision}"
                        + (", one time step" if streaming else ""))
    by_name = {s.name: s for s in (*in_specs, *out_specs)}
    for value in (*proto.graph.input, *proto.graph.output):
        spec = by_name.get(value.name)
        if spec is not None:
            shape = "[" + ", ".join(str(d) for d in spec.shape) + "]"
            value.doc_string = f"{spec.kind} {shape}: {spec.doc}".rstrip(": ")
    used = {n.op_type for n in proto.graph.node if n.domain == DOMAIN}
    meta = {"seqdeploy.arch": arch.name, "seqdeploy.preset": preset,
            "seqdeploy.version": seqdeploy.__version__, "seqdeploy.precision": precision,
            "seqdeploy.streaming": str(streaming).lower(),
            "seqdeploy.ops": json.dumps({o.onnx_name: o.version for o in ops.values()
                                         if o.onnx_name in used}),
            "seqdeploy.config": json.dumps(config, sort_keys=True)}
    for state_in, state_out in arch.state_map.items():
        spec = by_name.get(state_in)
        if spec is not None:
            shape = "[" + ", ".join(str(d) for d in spec.shape) + "]"
            meta[f"seqdeploy.state.{state_in}"] = (
                f"{spec.doc}; shape {shape}, {spec.dtype}; feed the previous call's "
                f"{state_out} (zeros to start a sequence)")
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)


def export_onnx(arch: Architecture, config: dict[str, Any], model: torch.nn.Module,
                precision: str, registry: "Registry",
                streaming: bool = False, preset: str = "") -> tuple[onnx.ModelProto, dict[str, Any]]:
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
    describe_model(proto, arch, config, preset, precision, in_specs, out_specs, registry.ops,
                   streaming)
    onnx.checker.check_model(proto, full_check=True)
    return proto, {"opset": default_opset(proto), "precision": precision, "ops": used,
                   "streaming": streaming, **graph_summary(proto)}
