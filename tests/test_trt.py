"""The ``trt`` engine: real TensorRT engines built from the exported ONNX with seqdeploy's
plugins, the engine cache, the CLI, and each plugin's runtime half.

On a CPU-only machine TensorRT-RTX (installed by scripts/setup.sh) builds real engines, so
everything up to and including the serialized engine is tested here. Running an engine needs
a GPU that TensorRT runs on, which the device machine (Hopper, compute capability 9.0) is
not for TensorRT-RTX: the GPU tests below call each plugin's ``enqueue`` exactly as TensorRT
does instead (tensor descriptors, raw device pointers, a non-default stream).
"""
from __future__ import annotations

import shutil

import onnx
import pytest
import torch
from conftest import gpu, run_cli
from torch.utils._python_dispatch import TorchDispatchMode

from seqdeploy import pipeline
from seqdeploy.architecture import DEFAULT_LIMITS
from seqdeploy.artifacts import Artifact
from seqdeploy.engines.torch import load_model
from seqdeploy.errors import ArtifactError, EngineUnavailable
from seqdeploy.plugins import load_registry
from seqdeploy.precision import ONNX_FILES, cast_inputs

try:
    from seqdeploy.trt import adapter

    RT = adapter.load()
    NO_TRT = None
except EngineUnavailable as exc:   # only where the wheels could not be installed
    RT, NO_TRT = None, f"no TensorRT here ({exc}); scripts/setup.sh installs TensorRT-RTX"

needs_trt = pytest.mark.skipif(RT is None, reason=NO_TRT or "")
#: every architecture installed (ten and cfc at least; each one that lands joins here)
ARCHS = sorted(a for a, arch in load_registry().architectures.items() if "tiny" in arch.presets)
PRECISIONS = ["fp32", "fp16"]


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """ten/tiny and cfc/tiny exported (fp32 + fp16) into one module-private root."""
    root = tmp_path_factory.mktemp("trt-exported")
    registry = load_registry()
    for arch in ARCHS:
        artifact = pipeline.export(registry, arch, "tiny", root)
        pipeline.optimize_fp16(registry, artifact)
    return root


@pytest.fixture(scope="module")
def built(root):
    """One engine per (arch, precision), built once: ``{(arch, precision): Engine}``."""
    if RT is None:
        pytest.skip(NO_TRT)
    from seqdeploy.trt import engine_for

    registry = load_registry()
    return {(a, p): engine_for(registry, Artifact.load(root / a / "tiny"), p)
            for a in ARCHS for p in PRECISIONS}


@pytest.fixture
def copy(root, tmp_path):
    dst = tmp_path / "exported"
    shutil.copytree(root, dst)
    return dst


def custom_node_count(path) -> dict[str, int]:
    """Counted from the ONNX file itself, independently of the builder's own count."""
    model = onnx.load(str(path))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == "seqdeploy":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# -- the adapter and the plugin contract ------------------------------------------------------
@needs_trt
def test_adapter_loads_tensorrt_and_the_library_link_exists():
    assert RT.flavour in ("tensorrt", "tensorrt-rtx")
    assert RT.trt.__version__ == RT.version
    if RT.is_rtx:
        folder = adapter.rtx_library_dir()
        link = folder / "libtensorrt_rtx.so"
        assert link.exists() and link.resolve() == (folder / "libtensorrt_rtx.so.1").resolve()
        assert not RT.has_aot_plugins
        ok, why = RT.runs_on((9, 0))
        assert not ok and "compute capability 9.0" in why
        assert RT.runs_on((8, 9)) == (True, "")
    assert RT.runs_on(None) == (False, "no CUDA device")


def test_unwritable_library_folder_is_one_line(tmp_path, monkeypatch):
    """The parser's dlopen of the unversioned name would abort the process: seqdeploy makes
    the link, or says in one line how to."""
    folder = tmp_path / "tensorrt_rtx_libs"
    folder.mkdir()
    (folder / "libtensorrt_rtx.so.1").write_bytes(b"\x7fELF")
    monkeypatch.setattr(adapter, "rtx_library_dir", lambda: folder)
    adapter.ensure_rtx_library_link()
    assert (folder / "libtensorrt_rtx.so").is_symlink()
    assert (folder / "libtensorrt_rtx.so").resolve() == (folder / "libtensorrt_rtx.so.1").resolve()
    (folder / "libtensorrt_rtx.so").unlink()

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(adapter.os, "symlink", refuse)
    with pytest.raises(EngineUnavailable) as err:
        adapter.ensure_rtx_library_link()
    msg = str(err.value)
    assert "\n" not in msg and "ln -s libtensorrt_rtx.so.1" in msg and "not writable" in msg


def test_positions_come_from_the_schema():
    from seqdeploy.trt.plugins import default_shape_rule, io_positions, node_attributes

    registry = load_registry()
    ins, outs = io_positions(registry.ops["eigen_scan"])
    assert [(p.name, p.allowed) for p in ins] == [
        ("x_re", ("tensor(float)", "tensor(float16)")), ("x_im", ("tensor(float)", "tensor(float16)")),
        ("nu", ("tensor(float)",)), ("theta", ("tensor(float)",)),
        ("h0_re", ("tensor(float)", "tensor(float16)")), ("h0_im", ("tensor(float)", "tensor(float16)"))]
    assert [p.name for p in outs] == ["y_re", "y_im"]
    assert default_shape_rule(registry.ops["eigen_scan"]) == [("like", 0), ("like", 0)]
    cfc = registry.ops["cfc_scan"]
    assert [p.allowed for p in io_positions(cfc)[0]][3] == ("tensor(float)",)     # tau
    assert node_attributes(cfc) == ["dt"]
    for op in registry.ops.values():      # every registered op gets a plugin with non-empty sets
        ins, outs = io_positions(op)
        assert all(p.allowed for p in ins + outs), op.name


def test_output_shapes_come_from_the_exported_graph(root):
    """Each plugin output axis is a static size or the input axis with the same symbol."""
    from seqdeploy.trt.builder import graph_shape_rules

    ten = graph_shape_rules(onnx.load(str(root / "ten" / "tiny" / "model.fp16.onnx")))
    assert len(ten) == 2
    for rule in ten.values():   # y_re, y_im [batch, seq, k] like x_re (input 0)
        assert rule == [((0, 0), (0, 1), 16), ((0, 0), (0, 1), 16)]
    cfc = graph_shape_rules(onnx.load(str(root / "cfc" / "tiny" / "model.onnx")))
    assert list(cfc.values()) == [[((0, 0), (0, 1), 16)]] * 2     # y [batch, seq, hidden]


def _descs(trt, types):
    out = []
    for t in types:
        d = trt.DynamicPluginTensorDesc()
        desc = trt.PluginTensorDesc()
        desc.type, desc.format = t, trt.TensorFormat.LINEAR
        d.desc = desc
        out.append(d)
    return out


@needs_trt
@pytest.mark.parametrize("op_name", ["eigen_scan", "cfc_scan"])
def test_supports_exactly_the_graph_dtypes(op_name):
    """fp32 graphs: every position fp32; fp16 graphs: T positions fp16, pinned ones fp32.
    Anything else (a pinned position in fp16, T positions disagreeing, another format) is
    refused, position by position, as TensorRT asks."""
    from seqdeploy.trt.plugins import io_positions, plugin_classes

    trt = RT.trt
    op = load_registry().ops[op_name]
    Plugin, _ = plugin_classes(RT, op)
    plugin = Plugin({})
    ins, outs = io_positions(op)
    positions = ins + outs
    F, H = trt.DataType.FLOAT, trt.DataType.HALF
    for data in (F, H):
        types = [data if p.is_param else F for p in positions]
        descs = _descs(trt, types)
        assert all(plugin.supports_format_combination(i, descs, len(ins))
                   for i in range(len(positions)))
        for i, p in enumerate(positions):
            wrong = list(types)
            wrong[i] = trt.DataType.INT32 if types[i] != trt.DataType.INT32 else F
            assert not plugin.supports_format_combination(i, _descs(trt, wrong), len(ins))
    pinned = next(i for i, p in enumerate(positions) if not p.is_param)
    types = [H if p.is_param else F for p in positions]
    types[pinned] = H
    assert not plugin.supports_format_combination(pinned, _descs(trt, types), len(ins))
    last_t = max(i for i, p in enumerate(positions) if p.is_param)
    types = [H if p.is_param else F for p in positions]
    types[last_t] = F                       # T positions must agree with the first one
    assert not plugin.supports_format_combination(last_t, _descs(trt, types), len(ins))
    assert plugin.get_output_data_types([H if p.is_param else F for p in ins]) == \
        [H if p.is_param else F for p in outs]


@needs_trt
def test_creator_fields_round_trip():
    """The creator turns plugin fields into the op's keyword arguments, and the plugin
    serializes them back the same (what a deserialized engine's plugins are made from)."""
    from seqdeploy.trt.plugins import fields_of, plugin_classes

    trt = RT.trt
    op = load_registry().ops["cfc_scan"]
    _, Creator = plugin_classes(RT, op)
    creator = Creator()
    assert [f.name for f in creator.field_names] == ["dt"]
    assert (creator.name, creator.plugin_namespace, creator.plugin_version) == \
        ("CfCScan", "seqdeploy", "1")
    fields = trt.PluginFieldCollection(fields_of(trt, {"dt": 0.25}))
    plugin = creator.create_plugin("node_cfc_scan", fields, trt.TensorRTPhase.BUILD)
    assert plugin.attrs == {"dt": 0.25}
    again = creator.create_plugin("n", plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert again.attrs == {"dt": 0.25} and again.clone().attrs == {"dt": 0.25}
    assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version) == \
        ("CfCScan", "seqdeploy", "1")


class CaptureOps(TorchDispatchMode):
    """Records every ``seqdeploy::*`` op call (args, kwargs) a model makes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "seqdeploy":
            self.calls.append((func._schema.name.split("::")[1],
                               [a.clone() if isinstance(a, torch.Tensor) else a for a in args],
                               dict(kwargs), func._schema))
        return func(*args, **kwargs)


def captured_calls(root, arch_name, precision, device, cases):
    """The op calls of ``arch_name``'s model at each ``(batch, T)`` of ``cases``."""
    registry = load_registry()
    artifact = Artifact.load(root / arch_name / "tiny")
    arch = registry.architecture(arch_name)
    config = artifact.manifest["config"]
    model = load_model(artifact, registry, precision, device)
    specs = arch.input_specs(config)
    calls = []
    for i, (batch, seq) in enumerate(cases):
        inputs = cast_inputs(arch.make_inputs(config, batch, seq, seed=50 + i), specs, precision)
        with torch.no_grad(), CaptureOps() as capture:
            model(*[inputs[s.name].to(device) for s in specs])
        calls.extend(capture.calls)
    assert calls, f"{arch_name}: no seqdeploy op ran"
    return registry, calls


def split_call(op, args, schema):
    """Tensor inputs (schema order) and the attribute keyword arguments of a recorded call."""
    n = len(op.schema.inputs)
    names = [a.name for a in schema.arguments]
    return list(args[:n]), {names[i]: args[i] for i in range(n, len(args))}


def rel_l2(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "NaN/Inf in a plugin output (unwritten?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize("arch_name", ARCHS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_plugin_runtime_half_on_host_pointers(root, arch_name, precision):
    """What ``enqueue`` runs (:func:`run_op`), on raw host pointers: inputs and NaN-poisoned
    outputs passed as bare addresses, attributes as the plugin holds them; outputs against
    the op's step-loop reference (not the kernel it calls)."""
    from seqdeploy.trt.plugins import run_op

    registry, calls = captured_calls(root, arch_name, precision, "cpu", [(2, 63), (1, 1)])
    for name, args, _, schema in calls:
        op = registry.ops[name]
        tensors, attrs = split_call(op, args, schema)
        tensors = [t.contiguous() for t in tensors]
        ref = op.reference(*tensors, **attrs)
        refs = ref if isinstance(ref, tuple) else (ref,)
        # NaN for float outputs; an id no op produces for integer ones (a router's expert)
        outs = [torch.full_like(r, float("nan") if r.is_floating_point() else -7) for r in refs]
        run_op(op, attrs, [(t.data_ptr(), t.shape, t.dtype) for t in tensors],
               [(o.data_ptr(), o.shape, o.dtype) for o in outs], device="cpu")
        limit = DEFAULT_LIMITS[precision].rel_l2
        for o, r in zip(outs, refs):
            assert o.dtype == r.dtype
            assert rel_l2(o, r) <= limit, (name, precision)


# -- engines ----------------------------------------------------------------------------------
@needs_trt
@pytest.mark.parametrize("arch_name", ARCHS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_holds_one_plugin_layer_per_custom_node(root, built, arch_name, precision):
    from seqdeploy.trt.builder import plugin_layers_in_plan

    engine = built[(arch_name, precision)]
    nodes = custom_node_count(root / arch_name / "tiny" / ONNX_FILES[precision])
    assert sum(nodes.values()) >= 1
    if arch_name in ("ten", "cfc"):
        assert sum(nodes.values()) == 2                 # n_layers = 2 in both tiny presets
    assert dict(plugin_layers_in_plan(engine.plan, nodes)) == nodes
    report = engine.record["build"]
    assert report["plugin_layers"] == nodes and report["plan_plugin_layers"] == nodes
    assert report["form"] == "python-plugin" and report["precision"] == precision
    # one form per custom node; TensorRT-RTX has no AOT plugins, so every node is Python
    model = onnx.load(str(root / arch_name / "tiny" / ONNX_FILES[precision]))
    names = [n.name for n in model.graph.node if n.domain == "seqdeploy"]
    assert sorted(report["node_forms"]) == sorted(names) and len(names) == sum(nodes.values())
    if RT.is_rtx:
        assert set(report["node_forms"].values()) == {"python"}
    assert engine.plan[:4] == b"vtrt" or RT.flavour == "tensorrt"
    profile = report["profile"]
    first = next(iter(profile.values()))
    assert first[0][0] == 1 and first[2][0] >= 2                      # batch 1..>=2
    arch = load_registry().architecture(arch_name)
    config = Artifact.load(root / arch_name / "tiny").manifest["config"]
    long_t = min(4096, arch.max_seq_len(config) or 4096)
    seq_input = next(v for k, v in profile.items() if len(v[0]) >= 2 and v[2][1] >= long_t)
    assert seq_input[0][1] == 1                                         # T 1..long T


@needs_trt
def test_function_form_holds_no_plugin_and_differs(root, built):
    """``--no-plugins`` inlines the fallback functions: the plan has no seqdeploy plugin layer
    (the counter that finds two above finds none here), and it is another cache entry."""
    from seqdeploy.trt import engine_for
    from seqdeploy.trt.builder import plugin_layers_in_plan

    registry = load_registry()
    engine = engine_for(registry, Artifact.load(root / "cfc" / "tiny"), "fp32", use_plugins=False)
    assert sum(plugin_layers_in_plan(engine.plan, ["CfCScan"]).values()) == 0
    assert engine.record["build"]["form"] == "onnx-function"
    assert engine.record["build"]["node_forms"] == {}
    assert engine.key != built[("cfc", "fp32")].key


@needs_trt
def test_second_build_is_a_cache_hit(root, built):
    from seqdeploy.trt import engine_for

    registry = load_registry()
    for (arch_name, precision), first in built.items():
        again = engine_for(registry, Artifact.load(root / arch_name / "tiny"), precision)
        assert again.source == "cache" and again.key == first.key and again.plan == first.plan


@needs_trt
def test_changed_weight_is_a_cache_miss(copy, built):
    import numpy as np
    from onnx import numpy_helper

    from seqdeploy.trt import engine_for

    registry = load_registry()
    artifact = Artifact.load(copy / "cfc" / "tiny")
    model = onnx.load(str(artifact.path("model.onnx")))
    init = next(i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                and len(i.dims) == 2)
    array = numpy_helper.to_array(init).copy()
    array.flat[0] += np.float32(0.25)
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    artifact.write("model.onnx", lambda p: onnx.save_model(model, str(p)), kind="onnx")
    engine = engine_for(registry, Artifact.load(copy / "cfc" / "tiny"), "fp32")
    assert engine.source == "built" and engine.key != built[("cfc", "fp32")].key
    assert engine.plan != built[("cfc", "fp32")].plan


@needs_trt
def test_corrupted_cached_engine_is_refused_by_its_checksum(copy, built):
    from seqdeploy.trt import engine_for
    from seqdeploy.trt.cache import EngineCache, cache_dir

    registry = load_registry()
    artifact = Artifact.load(copy / "ten" / "tiny")
    key = built[("ten", "fp16")].key
    plan = EngineCache(cache_dir(artifact.dir)).plan_path(key)
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0x01                                     # one bit, same size
    plan.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as err:
        engine_for(registry, artifact, "fp16")
    assert "checksum mismatch" in str(err.value) and "\n" not in str(err.value)
    plan.write_bytes(bytes(data[:-10]))                              # truncated
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        engine_for(registry, artifact, "fp16")


@needs_trt
def test_inlined_function_fails_the_build_in_one_line(copy):
    """A node whose plugin version no creator has: the parser inlines its function, and the
    build says so instead of shipping an engine without the kernel."""
    from seqdeploy.trt import engine_for
    from seqdeploy.trt.builder import BuildError

    artifact = Artifact.load(copy / "cfc" / "tiny")
    model = onnx.load(str(artifact.path("model.onnx")))
    node = next(n for n in model.graph.node if n.domain == "seqdeploy")
    for attr in node.attribute:
        if attr.name == "plugin_version":
            attr.s = b"7"
    artifact.write("model.onnx", lambda p: onnx.save_model(model, str(p)), kind="onnx")
    with pytest.raises(BuildError) as err:
        engine_for(load_registry(), Artifact.load(copy / "cfc" / "tiny"), "fp32")
    msg = str(err.value)
    assert "\n" not in msg and "2 CfCScan node(s) but 1" in msg and "--no-plugins" in msg


# -- the CLI ----------------------------------------------------------------------------------
@needs_trt
def test_optimize_trt_records_verified_engines(copy, capsys, built):
    from seqdeploy.trt import current_target, plan_name

    code, out, err = run_cli(["--out", copy, "--device", "cpu", "optimize", "ten", "--no-fp16",
                              "--trt"], capsys)
    assert code == 0, err
    artifact = Artifact.load(copy / "ten" / "tiny")
    target = current_target(RT)
    assert target == "cpu-build" or torch.cuda.is_available()
    for precision in PRECISIONS:
        name = plan_name(precision, target)
        assert name in out
        record = artifact.manifest["trt"][name]
        assert record["key"] == built[("ten", precision)].key and record["source"] == "cache"
        assert artifact.path(name).read_bytes() == built[("ten", precision)].plan  # sha256 checked
        assert artifact.manifest["files"][name]["sha256"] == record["sha256"]
        assert record["form"] == "python-plugin" and len(record["node_forms"]) == 2
    # the recorded engine is what engine_for returns now; an edited one is refused
    from seqdeploy.trt import engine_for

    assert engine_for(load_registry(), artifact, "fp32").source == "artifact"
    path = artifact.dir / plan_name("fp32", target)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        engine_for(load_registry(), Artifact.load(artifact.dir), "fp32")


@needs_trt
def test_bench_and_validate_trt_without_a_runnable_gpu_say_why(copy, capsys):
    for cmd in (["bench", "ten", "--preset", "tiny", "--engine", "trt"],
                ["validate", "ten", "--preset", "tiny", "--engine", "trt", "--precision", "fp32"]):
        code, out, err = run_cli(["--out", copy, *cmd], capsys)
        assert code != 0
        lines = [l for l in err.splitlines() if l.strip() and not l.startswith("  [")]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            assert f"compute capability {major}.{minor}" in lines[0] or RT.flavour == "tensorrt"
        else:
            assert "CUDA device" in lines[0] and "optimize ARCH --trt" in lines[0]


def test_doctor_reports_tensorrt(capsys):
    code, out, err = run_cli(["doctor"], capsys)
    assert code == 0, err
    rows = {}
    for line in out.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    if RT is None:
        assert "not installed" in rows["trt flavour"]
        return
    assert rows["trt flavour"] == RT.describe()
    assert rows["trt plugins"].startswith("2 of 2 register") or "of" in rows["trt plugins"]
    assert "seqdeploy::CfCScan" in rows["trt plugins"] and "seqdeploy::EigenScan" in rows["trt plugins"]
    if not torch.cuda.is_available():
        assert rows["trt runs here"] == "no: no CUDA device"


@needs_trt
def test_optimize_trt_no_plugins_needs_trt(copy, capsys):
    code, _, err = run_cli(["--out", copy, "optimize", "ten", "--no-plugins"], capsys)
    assert code == 2 and "--no-plugins applies to --trt only" in err


# -- GPU: each plugin's enqueue as TensorRT calls it -------------------------------------------
@gpu
@needs_trt
@pytest.mark.gpu
@pytest.mark.parametrize("arch_name", ARCHS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_plugin_enqueue_as_tensorrt_calls_it(root, arch_name, precision):
    """For every op call the model makes at the validation cases' shapes: the plugin is made
    by its creator from plugin fields (RUNTIME phase), ``enqueue`` gets PluginTensorDesc
    objects, raw device pointers of the inputs and of NaN-poisoned outputs, and a
    non-default stream; outputs match the op's reference within the fp32/fp16 limits."""
    import numpy as np

    from seqdeploy.trt.plugins import fields_of, plugin_classes, trt_dtype

    trt = RT.trt
    registry = load_registry()
    arch = registry.architecture(arch_name)
    config = Artifact.load(root / arch_name / "tiny").manifest["config"]
    cases = [(c.batch, c.seq_len) for c in pipeline.validation_cases(arch, config)]
    registry, calls = captured_calls(root, arch_name, precision, "cuda", cases)
    torch_to_trt = {torch.float32: "tensor(float)", torch.float16: "tensor(float16)",
                    torch.int64: "tensor(int64)"}
    stream = torch.cuda.Stream()
    assert stream.cuda_stream != torch.cuda.default_stream().cuda_stream
    for name, args, _, schema in calls:
        op = registry.ops[name]
        tensors, attrs = split_call(op, args, schema)
        tensors = [t.contiguous() for t in tensors]
        _, Creator = plugin_classes(RT, op)
        fields = trt.PluginFieldCollection(fields_of(trt, {k: float(v) if isinstance(v, float)
                                                           else v for k, v in attrs.items()}))
        plugin = Creator().create_plugin(op.onnx_name, fields, trt.TensorRTPhase.RUNTIME)
        plugin = plugin.attach_to_context(None)
        ref = op.reference(*tensors, **attrs)
        refs = ref if isinstance(ref, tuple) else (ref,)
        # NaN for float outputs; an id no op produces for integer ones (a router's expert)
        outs = [torch.full_like(r, float("nan") if r.is_floating_point() else -7) for r in refs]

        def desc(t):
            d = trt.PluginTensorDesc()
            d.dims = trt.Dims(list(t.shape))
            d.type = trt_dtype(trt, torch_to_trt[t.dtype])
            d.format = trt.TensorFormat.LINEAR
            return d

        torch.cuda.synchronize()
        status = plugin.enqueue([desc(t) for t in tensors], [desc(o) for o in outs],
                                [t.data_ptr() for t in tensors], [o.data_ptr() for o in outs],
                                0, stream.cuda_stream)
        stream.synchronize()
        assert status in (0, None)
        limit = DEFAULT_LIMITS[precision].rel_l2
        for o, r in zip(outs, refs):
            err = rel_l2(o, r)
            assert err <= limit, (name, precision, tuple(tensors[0].shape), err)
        np.testing.assert_equal(len(outs), len(op.schema.outputs))
