"""Building TensorRT engines from an artifact's ONNX, with seqdeploy's plugins.

:func:`build_engine` parses ``model.onnx`` / ``model.fp16.onnx`` into a strongly typed
network (the ONNX's own dtypes decide every layer's precision: fp16 data, fp32 islands),
checks that every custom node became a ``PLUGIN_V3`` layer (the parser silently inlines the
node's fallback function when no plugin matches), adds one optimisation profile over the
batch and sequence sizes validate and bench use (:func:`profile_shapes`), reuses a timing
cache, builds, and checks the serialized engine again (:func:`plugin_layers_in_plan`).

Each op's nodes take one of two plugin forms (:func:`seqdeploy.trt.aot.plugin_forms`): the
AOT form (the op's Triton entry kernel's PTX embedded in the engine, no Python at run time)
where this TensorRT offers ``tensorrt.plugin`` (full TensorRT >= 10.9) and the op declares an
entry; else the Python ``IPluginV3`` (:mod:`seqdeploy.trt.plugins`), which calls the op's
torch op on every enqueue: every node under TensorRT-RTX, and the nodes of ops whose kernels
need a workspace or several launches. The build report says which form each node holds.
"""
from __future__ import annotations

import re
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import onnx

from seqdeploy.errors import SeqdeployError
from seqdeploy.ops import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION
from seqdeploy.trt import aot, plugins

if TYPE_CHECKING:
    from seqdeploy.architecture import Architecture
    from seqdeploy.trt.adapter import TensorRT

Progress = Callable[[str], None]
#: the long validation case's T (``validate --long-seq`` default): the profile's largest T
LONG_SEQ = 4096


class BuildError(SeqdeployError):
    """TensorRT could not build the engine, or built one without seqdeploy's plugins."""


@dataclass
class Profile:
    """One optimisation profile: ``{input name: (min, opt, max) shape}``."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def as_json(self) -> dict[str, list[list[int]]]:
        return {k: [list(s) for s in v] for k, v in sorted(self.shapes.items())}


def profile_shapes(arch: "Architecture", config: dict[str, Any], long_seq: int = LONG_SEQ) -> Profile:
    """min = batch 1, T 1; opt = the preset (bench batch, preset T); max = the largest batch
    of the validation cases and bench shapes, and the long validation T (capped at the
    model's maximum) or the longest bench T. Shapes come from the architecture's own
    ``make_inputs`` at those sizes, so axes other than batch and seq keep their real sizes."""
    limit = arch.max_seq_len(config)
    long_t = min(long_seq, limit) if limit else long_seq
    bench = arch.bench_shapes(config)
    opt_b, opt_t = bench[0][0], arch.seq_len(config)
    max_b = max([2, opt_b, *(b for b, _ in bench)])
    max_t = max([long_t, opt_t, *(t for _, t in bench)])
    sizes = [(1, 1), (opt_b, opt_t), (max_b, max_t)]
    made = [arch.make_inputs(config, b, t, seed=0) for b, t in sizes]
    shapes = {}
    for name in made[0]:
        lo, opt, hi = (tuple(int(d) for d in m[name].shape) for m in made)
        shapes[name] = (tuple(map(min, lo, opt, hi)), opt, tuple(map(max, lo, opt, hi)))
    return Profile(shapes)


@dataclass
class BuildReport:
    """What a build did, recorded beside the engine."""

    onnx_file: str
    precision: str
    plugins: bool
    custom_nodes: dict[str, int]
    plugin_layers: dict[str, int]
    plan_plugin_layers: dict[str, int]
    profile: dict[str, list[list[int]]]
    seconds: float
    tensorrt: str
    target: str
    form: str = "python-plugin"
    extra: dict[str, Any] = field(default_factory=dict)
    #: node name -> "aot" or "python": the plugin form each custom node holds (empty for the
    #: function form, where no node holds a plugin)
    node_forms: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"onnx": self.onnx_file, "precision": self.precision, "plugins": self.plugins,
                "form": self.form, "node_forms": self.node_forms,
                "custom_nodes": self.custom_nodes,
                "plugin_layers": self.plugin_layers,
                "plan_plugin_layers": self.plan_plugin_layers, "profile": self.profile,
                "build_seconds": round(self.seconds, 3), "tensorrt": self.tensorrt,
                "target": self.target, **self.extra}


def custom_nodes(model: onnx.ModelProto) -> Counter:
    """``{op_type: count}`` of the seqdeploy nodes in the main graph."""
    return Counter(n.op_type for n in model.graph.node if n.domain == DOMAIN)


def node_forms(model: onnx.ModelProto, forms: dict[str, str]) -> dict[str, str]:
    """``{node name: "aot" | "python"}`` for every seqdeploy node of the main graph, from
    ``forms`` (``{op type: form}``, :func:`seqdeploy.trt.aot.plugin_forms`)."""
    return {n.name or f"{n.op_type}_{i}": forms.get(n.op_type, aot.FORM_PYTHON)
            for i, n in enumerate(model.graph.node) if n.domain == DOMAIN}


def engine_form(forms: dict[str, str], use_plugins: bool) -> str:
    """The engine's form in one word: ``onnx-function`` (no plugins), ``python-plugin``,
    ``aot-plugin`` or ``aot+python-plugin`` (some nodes of each)."""
    if not use_plugins:
        return "onnx-function"
    kinds = set(forms.values())
    if kinds == {aot.FORM_AOT}:
        return "aot-plugin"
    return "aot+python-plugin" if aot.FORM_AOT in kinds else "python-plugin"


def plugin_layers(rt: "TensorRT", network) -> Counter:
    """``{plugin name: count}`` of the network's ``PLUGIN_V3`` layers in namespace seqdeploy."""
    trt = rt.trt
    found: Counter = Counter()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        layer.__class__ = trt.IPluginV3Layer    # get_layer returns the base ILayer binding
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        if getattr(core, "plugin_namespace", None) == PLUGIN_NAMESPACE:
            found[core.plugin_name] += 1
    return found


def plugin_layers_in_plan(plan: bytes, names) -> Counter:
    """``{plugin name: count}`` of plugin layers recorded in a serialized engine, read without
    deserializing it (which needs a GPU the engine runs on).

    Each plugin layer of a TensorRT 10 / TensorRT-RTX 1.x plan records its creator as three
    length-prefixed strings: name, version, namespace (each an 8-byte little-endian length,
    then the bytes, a few bytes of tags apart). Counting that triple counts the layers; the
    plugin's serialized fields appear elsewhere and do not match it."""
    found: Counter = Counter()
    for name in names:
        enc = name.encode()
        pattern = (re.escape(struct.pack("<Q", len(enc)) + enc) + b".{1,24}?"
                   + re.escape(struct.pack("<Q", len(PLUGIN_VERSION)) + PLUGIN_VERSION.encode())
                   + b".{1,24}?"
                   + re.escape(struct.pack("<Q", len(PLUGIN_NAMESPACE)) + PLUGIN_NAMESPACE.encode()))
        found[name] = len(re.findall(pattern, plan, flags=re.DOTALL))
    return found


def inspect_engine(rt: "TensorRT", plan: bytes) -> int | None:
    """The number of plugin layers TensorRT's own engine inspector lists (layer information
    as JSON, detailed profiling verbosity), or None where this machine cannot deserialize
    the engine (no GPU, or one this TensorRT cannot run on). Never run so far: no machine
    here deserializes a TensorRT engine."""
    import json

    import torch

    if not torch.cuda.is_available() or not rt.runs_on(torch.cuda.get_device_capability())[0]:
        return None
    trt = rt.trt
    runtime = trt.Runtime(rt.logger())
    try:
        if runtime.get_engine_validity(plan)[0] != trt.EngineValidity.VALID:
            return None
        engine = runtime.deserialize_cuda_engine(plan)
    except Exception:
        return None
    if engine is None:
        return None
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = [layer for layer in info.get("Layers", []) if isinstance(layer, dict)]
    return sum(1 for layer in layers if "Plugin" in str(layer.get("LayerType", "")))


def graph_shape_rules(model: onnx.ModelProto) -> dict[str, list]:
    """``{node name: rule}`` for every seqdeploy node whose output shapes the exported graph
    records. A rule lists, per output, one entry per axis: an int (a static size) or
    ``(input index, axis)``, the first input axis carrying the same symbolic dimension. A
    symbolic output axis no input carries is a :class:`BuildError` (TensorRT must know every
    plugin output's shape from its inputs)."""
    shapes: dict[str, list] = {}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_param if d.dim_param else
                              (d.dim_value if d.HasField("dim_value") else None)
                              for d in v.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    rules = {}
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        ins = [shapes.get(n) for n in node.input]
        outs = [shapes.get(n) for n in node.output]
        if any(o is None for o in outs) or any(i is None for i in ins):
            continue
        rule = []
        for name, out in zip(node.output, outs):
            entry = []
            for axis, dim in enumerate(out):
                if isinstance(dim, int):
                    entry.append(dim)
                    continue
                src = next(((i, a) for i, shape in enumerate(ins)
                            for a, d in enumerate(shape) if d == dim and isinstance(d, str)), None)
                if src is None:
                    raise BuildError(f"{node.op_type} node {node.name}: output {name} axis {axis} "
                                     f"({dim}) is no input's axis; TensorRT cannot size it")
                entry.append(src)
            rule.append(tuple(entry))
        rules[node.name] = rule
    return rules


class _Monitor:
    """Forwards TensorRT's build phases to a progress callback."""

    @staticmethod
    def make(trt, progress: Progress):
        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)
                self.phases: dict[str, tuple[int, int]] = {}

            def phase_start(self, phase_name, parent_phase, num_steps):
                self.phases[phase_name] = (0, num_steps)
                if parent_phase is None:         # top-level phases only: one line each
                    progress(f"TensorRT: {phase_name}")

            def step_complete(self, phase_name, step):
                done, total = self.phases.get(phase_name, (0, 0))
                self.phases[phase_name] = (step + 1, total)
                return True

            def phase_finish(self, phase_name):
                self.phases.pop(phase_name, None)

        return Monitor()


def build_engine(rt: "TensorRT", onnx_path: Path, precision: str, profile: Profile,
                 ops, use_plugins: bool = True, timing_cache: Path | None = None,
                 target: str = "cpu-build", progress: Progress = lambda m: None
                 ) -> tuple[bytes, BuildReport]:
    """Build a serialized engine from ``onnx_path`` (already checksum-verified).

    With ``use_plugins`` every custom node must become a ``PLUGIN_V3`` layer (of the form
    :func:`seqdeploy.trt.aot.plugin_forms` gives its op: AOT where this TensorRT and the op
    allow, else Python; the report's ``node_forms`` lists each node's), in the parsed
    network and in the serialized engine, or :class:`BuildError` says which did not; without
    it seqdeploy's creators are deregistered while parsing, so the parser inlines each node's
    fallback function (and the engine must then hold no seqdeploy plugin)."""
    trt = rt.trt
    model = onnx.load(str(onnx_path), load_external_data=False)
    expected = custom_nodes(model)
    forms = aot.plugin_forms(rt, ops)
    python_ops = [op for op in ops if forms[op.onnx_name] == aot.FORM_PYTHON]
    aot_ops = [op for op in ops if forms[op.onnx_name] == aot.FORM_AOT]
    state = {**plugins.register_plugins(rt, python_ops), **aot.register_aot_plugins(rt, aot_ops)}
    broken = {k: v for k, v in state.items() if v != "registered"}
    if use_plugins and broken:
        name, why = next(iter(broken.items()))
        raise BuildError(f"seqdeploy TensorRT plugin {name} does not register ({why})")
    start = time.perf_counter()
    logger = rt.logger()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    progress(f"parsing {onnx_path.name}")
    data = onnx_path.read_bytes()
    if use_plugins:
        with plugins.node_shapes(graph_shape_rules(model)):
            ok = parser.parse(data, str(onnx_path))
    else:
        with plugins.suspended(rt):
            ok = parser.parse(data, str(onnx_path))
    if not ok:
        errors = "; ".join(str(parser.get_error(i)).strip().splitlines()[0]
                           for i in range(parser.num_errors)) or "no detail"
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed ({errors})")
    layers = plugin_layers(rt, network)
    _check_plugins(onnx_path, "network", expected, layers, use_plugins)
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if rt.is_rtx and target == "cpu-build":
        # TensorRT-RTX away from a GPU it runs on: build for every compute capability it runs
        # on, stated explicitly, so the same engine comes out on a CPU machine and on a Hopper
        from seqdeploy.trt.adapter import RTX_RUNS_ON

        caps = [getattr(trt.ComputeCapability, f"SM{a}{b}", None) for a, b in RTX_RUNS_ON]
        caps = [c for c in caps if c is not None]
        config.num_compute_capabilities = len(caps)
        for i, cap in enumerate(caps):
            config.set_compute_capability(cap, i)
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in profile.shapes:
            raise BuildError(f"{onnx_path}: input {tensor.name} has no profile shape")
        lo, mid, hi = profile.shapes[tensor.name]
        opt.set_shape(tensor.name, lo, mid, hi)
    config.add_optimization_profile(opt)
    cache = None
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None and blob:            # unreadable (another version): start afresh
            cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    config.progress_monitor = _Monitor.make(trt, progress)
    progress(f"building the {precision} engine ({rt.describe()}, target {target})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"{onnx_path}: TensorRT could not build the engine (rerun with "
                         f"SEQDEPLOY_TRT_VERBOSE=1 for TensorRT's log)")
    plan = bytes(serialized)
    if cache is not None:
        from seqdeploy.artifacts import atomic_write

        blob = bytes(cache.serialize())
        atomic_write(timing_cache, lambda p: p.write_bytes(blob))
    in_plan = plugin_layers_in_plan(plan, set(expected) | set(layers))
    inspected = inspect_engine(rt, plan) if use_plugins else None
    if inspected is not None and inspected != sum(expected.values()):
        raise BuildError(f"{onnx_path.name}: {sum(expected.values())} seqdeploy node(s) but "
                         f"TensorRT's engine inspector lists {inspected} plugin layer(s)")
    # the plan's byte layout was read from TensorRT-RTX 1.7's engines; full TensorRT builds
    # on a GPU, where its own inspector above is the check and the byte count only a record
    if rt.is_rtx or inspected is None:
        _check_plugins(onnx_path, "serialized engine", expected, in_plan, use_plugins)
    report = BuildReport(onnx_path.name, precision, use_plugins, dict(expected), dict(layers),
                         dict(in_plan), profile.as_json(), time.perf_counter() - start,
                         rt.describe(), target,
                         form=engine_form({o: forms.get(o, aot.FORM_PYTHON) for o in expected},
                                          use_plugins),
                         extra={"inspector_plugin_layers": inspected},
                         node_forms=node_forms(model, forms) if use_plugins else {})
    return plan, report


def _check_plugins(path: Path, where: str, expected: Counter, found: Counter,
                   use_plugins: bool) -> None:
    if use_plugins:
        for name, count in sorted(expected.items()):
            if found.get(name, 0) != count:
                raise BuildError(
                    f"{path.name}: {count} {name} node(s) but {found.get(name, 0)} seqdeploy "
                    f"PLUGIN_V3 layer(s) in the {where}: TensorRT inlined the fallback function "
                    f"(pass --no-plugins to build the function form on purpose)")
    elif sum(found.values()):
        raise BuildError(f"{path.name}: --no-plugins, yet the {where} holds seqdeploy plugin "
                         f"layers {dict(found)}")
