"""Streaming: the one-step graph and the Python step API, on every architecture that streams.
Feeding steps one at a time must equal the full-sequence run, on torch and on ort."""
from __future__ import annotations

import onnx
import pytest
import torch
from conftest import DEVICE, gpu, run_cli

from seqdeploy import pipeline
from seqdeploy.architecture import check_inputs
from seqdeploy.artifacts import Artifact
from seqdeploy.errors import EngineUnavailable, InputError, SeqdeployError
from seqdeploy.parity import compare
from seqdeploy.plugins import load_registry
from seqdeploy.precision import cast_inputs
from seqdeploy.streaming import STEP_FILES, open_stream, step_specs
from seqdeploy.value_flags import flag_bad_values

STREAMING_ARCHS = [name for name, arch in sorted(load_registry().architectures.items())
                   if arch.state_map]


@pytest.fixture(scope="module", params=STREAMING_ARCHS)
def streamed(request, tmp_path_factory):
    registry = load_registry()
    root = tmp_path_factory.mktemp(f"stream-{request.param}")
    artifact = pipeline.export(registry, request.param, "tiny", root, streaming=True)
    pipeline.optimize_fp16(registry, artifact)
    return registry, artifact


def test_step_graph_has_no_time_axis_and_one_node_per_layer(streamed):
    registry, artifact = streamed
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    for precision in ("fp32", "fp16"):
        model = onnx.load(str(artifact.path(STEP_FILES[precision])))
        onnx.checker.check_model(model, full_check=True)
        assert not [n for n in model.graph.node if n.op_type in ("Loop", "Scan")]
        custom = [n for n in model.graph.node if n.domain == "seqdeploy"]
        assert len(custom) == config["n_layers"] and len(custom) >= 2   # ten and cfc tiny: 2
        specs = step_specs(arch.input_specs(config))
        for value, spec in zip(model.graph.input, specs):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == list(spec.shape) and "seq" not in dims


@pytest.mark.parametrize("engine,precision,limit", [("torch", "fp32", 1e-5), ("ort", "fp32", 1e-5),
                                                     ("torch", "fp16", 5e-3), ("ort", "fp16", 5e-3)])
def test_steps_equal_full_sequence(streamed, engine, precision, limit):
    registry, artifact = streamed
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    inputs = arch.make_inputs(config, 3, 21, seed=4)
    full = pipeline.open_session(registry, artifact, "torch-ref", "fp32", "cpu").run(inputs)
    try:
        stream = open_stream(artifact.dir, engine=engine, precision=precision, device="cpu",
                             registry=registry)
    except EngineUnavailable as exc:     # e.g. the native ORT library has no kernel for its op
        pytest.skip(f"{arch.name}: engine {engine}: {exc}")
    stepped = pipeline.run_steps(stream, arch, cast_inputs(inputs, arch.input_specs(config), precision))
    for name, got in stepped.items():       # per-step and state outputs (pooled ones pool a step)
        assert compare(full[name], got).rel_l2 < limit, name
    # the state carried by the stream is the full run's final state
    for state_in, state_out in arch.state_map.items():
        assert compare(full[state_out], stream.state[state_in]).rel_l2 < limit


def test_stream_api_checks_inputs_and_resets(streamed):
    registry, artifact = streamed
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    stream = open_stream(artifact.dir, engine="torch", device="cpu", registry=registry)
    feeds = {k: v.select(1, 0) for k, v in arch.make_inputs(config, 2, 1).items()
             if k not in arch.state_map}
    first = stream.step(feeds)                       # zero state, batch taken from the input
    stream.step(feeds)
    stream.reset(batch=2)
    assert all(torch.equal(a, b) for a, b in zip(first.values(), stream.step(feeds).values()))
    bad = {k: v.unsqueeze(1) for k, v in feeds.items()}
    with pytest.raises(InputError, match="expected shape"):
        stream.step(bad)


def test_streaming_needs_the_step_graph_for_ort(tmp_path, registry):
    artifact = pipeline.export(registry, "ten", "tiny", tmp_path)        # no --streaming
    with pytest.raises(SeqdeployError, match="--streaming"):
        open_stream(artifact.dir, engine="ort", device="cpu", registry=registry)


def test_cli_export_streaming(tmp_path, capsys):
    code, out, err = run_cli(["--out", tmp_path, "--device", "cpu", "export", "ten", "--preset",
                              "tiny", "--streaming"], capsys)
    assert code == 0, err
    assert Artifact.load(tmp_path / "ten" / "tiny").has("model.step.onnx")


@gpu
@pytest.mark.parametrize("precision,limit", [("fp32", 1e-5), ("fp16", 5e-3)])
def test_cuda_graph_stream_equals_full_sequence(streamed, precision, limit):
    """The torch stream on CUDA replays a captured graph; resets and a new batch size
    (which recaptures) must keep it exact."""
    registry, artifact = streamed
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    full_session = pipeline.open_session(registry, artifact, "torch-ref", "fp32", "cpu")
    stream = open_stream(artifact.dir, engine="torch", precision=precision, device="cuda",
                         registry=registry, check_values=False)
    for batch, seed in ((3, 4), (3, 5), (2, 6)):
        inputs = arch.make_inputs(config, batch, 17, seed=seed)
        full = full_session.run(inputs)
        stepped = pipeline.run_steps(stream, arch, cast_inputs(inputs, arch.input_specs(config), precision))
        for name, got in stepped.items():
            assert compare(full[name], got).rel_l2 < limit, (batch, seed, name)


def test_stream_state_is_copied_and_batch_checked(streamed):
    registry, artifact = streamed
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    stream = open_stream(artifact.dir, engine="torch", device="cpu", registry=registry)
    inputs = arch.make_inputs(config, 3, 1, seed=2)
    state = {k: v for k, v in inputs.items() if k in arch.state_map}
    kept = {k: v.clone() for k, v in state.items()}
    feeds = {k: v.select(1, 0) for k, v in inputs.items() if k not in arch.state_map}
    stream.reset(batch=3, state=state)
    stream.step(feeds)
    assert all(torch.equal(state[k], kept[k]) for k in state)       # caller's tensors untouched
    one_row = {k: v[:1] for k, v in feeds.items()}
    with pytest.raises(InputError, match="batch is 3 in the stream's state but 1 here"):
        stream.step(one_row)
    with pytest.raises(InputError, match="unknown state"):
        stream.reset(batch=3, state={"nosuch": torch.zeros(1)})
    with pytest.raises(InputError, match="expected shape"):
        stream.reset(batch=2, state=state)
    with pytest.raises(SeqdeployError, match="unknown precision"):
        open_stream(artifact.dir, precision="bf16", device="cpu", registry=registry)


def _frames(arch, config, batch, steps, seed):
    inputs = arch.make_inputs(config, batch, steps, seed=seed)
    return [{k: v.select(1, t) for k, v in inputs.items() if k not in arch.state_map}
            for t in range(steps)]


def _spoil(spec, frame):
    """``frame`` with one bad value in input ``spec`` and the error it must raise, or None
    where the input has no value check (an unbounded integer)."""
    value = frame[spec.name].clone()
    if value.is_floating_point():
        value.view(-1)[1] = float("nan")
        match = "contains NaN or Inf"
    elif spec.bounds is not None:
        value.view(-1)[1] = spec.bounds[1]
        match = "values must lie in"
    else:
        return None
    return {**frame, spec.name: value}, f"input {spec.name}: {match}"


def test_bad_value_flags_agree_with_check_inputs(streamed):
    registry, artifact = streamed
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    specs = [s for s in step_specs(arch.input_specs(config)) if s.name not in arch.state_map]
    frame = {k: v.to(DEVICE) for k, v in _frames(arch, config, 2, 1, seed=3)[0].items()}

    def flags(inputs):
        host = torch.zeros(len(specs), dtype=torch.bool, pin_memory=DEVICE == "cuda")
        any_bad = torch.ones((), dtype=torch.bool, device=DEVICE)   # poisoned: the first kernel sets it
        flag_bad_values(specs, inputs, any_bad, host)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        assert bool(any_bad) == any(host.tolist())
        return host.tolist()

    assert not any(flags(frame))
    for i, spec in enumerate(specs):
        spoilt = _spoil(spec, frame)
        if spoilt is None:
            continue
        assert flags(spoilt[0]) == [j == i for j in range(len(specs))]
        with pytest.raises(InputError, match=spoilt[1]):
            check_inputs(specs, spoilt[0], "fp32")


def _checked_and_plain_cuda_streams(registry, artifact, batch):
    """Two torch streams on CUDA, value checks on and off, reset to ``batch`` rows."""
    streams = [open_stream(artifact.dir, engine="torch", device="cuda", registry=registry,
                           check_values=check) for check in (True, False)]
    for stream in streams:
        stream.reset(batch=batch)
    return streams


@gpu
def test_cuda_graph_stream_checks_values_inside_the_graph(streamed):
    """With value checks on (the default), a CUDA stream checks inside its graph: a bad value
    raises the same one-line error as elsewhere and leaves the state as it was, so the next
    good steps give exactly what a stream that never saw the bad one gives."""
    registry, artifact = streamed
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    specs = [s for s in step_specs(arch.input_specs(config)) if s.name not in arch.state_map]
    frames = _frames(arch, config, 2, 6, seed=7)
    checked, plain = _checked_and_plain_cuda_streams(registry, artifact, batch=2)
    for frame in frames[:3]:
        _step_both(checked, plain, frame)
    _refuses_each_bad_input(checked, specs, frames[3])
    for frame in frames[3:]:
        _step_both(checked, plain, frame)


def _step_both(checked, plain, frame, reference=None):
    """One step of each stream (``plain`` on ``reference``, by default the same feeds): the
    outputs must be equal bit for bit. Returns ``checked``'s."""
    a, b = checked.step(frame), plain.step(reference or frame)
    assert all(torch.equal(a[k], b[k]) for k in a)
    return a


def _refuses_each_bad_input(stream, specs, frame):
    """``frame`` with each checked input spoilt in turn raises that input's one-line error,
    and the stream's state stays as it was."""
    before = stream.state
    for spec in specs:
        spoilt = _spoil(spec, frame)
        if spoilt is None:
            continue
        with pytest.raises(InputError, match=spoilt[1]):
            stream.step(spoilt[0])
        assert all(torch.equal(before[k], v) for k, v in stream.state.items())


@gpu
def test_checked_cuda_graph_reads_cuda_feeds_where_they_are(streamed):
    """A checked CUDA stream's graph copies contiguous CUDA feeds in itself, from addresses
    the host writes into pinned slots; other feeds (strided, on the CPU) are copied into the
    buffers first. Every step equals the unchecked stream's (host-side copies), a bad value
    read this way is still refused with the state kept, and a feed changed after its step
    does not change that step's result."""
    registry, artifact = streamed
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    specs = [s for s in step_specs(arch.input_specs(config)) if s.name not in arch.state_map]
    frames = [{k: v.cuda() for k, v in f.items()} for f in _frames(arch, config, 2, 7, seed=8)]
    checked, plain = _checked_and_plain_cuda_streams(registry, artifact, batch=2)
    _step_both(checked, plain, frames[0])                     # captures
    out = _step_both(checked, plain, frames[1])               # read in place
    slots = checked._graphs[True][4]
    assert [int(slots[i]) for i in range(len(specs))] == \
        [frames[1][s.name].data_ptr() for s in specs]
    kept = {k: v.clone() for k, v in out.items()}
    for v in frames[1].values():
        v.zero_()                                             # after the step: no effect
    assert all(torch.equal(kept[k], out[k]) for k in out)
    strided = {k: torch.stack([v, v], -1)[..., 0] for k, v in frames[2].items()}
    _step_both(checked, plain, strided, frames[2])           # copied into the buffers
    assert [int(slots[i]) for i in range(len(specs))] == \
        [checked._static_in[s.name].data_ptr() for s in specs]
    _step_both(checked, plain, {k: v.cpu() for k, v in frames[3].items()}, frames[3])
    _refuses_each_bad_input(checked, specs, frames[4])
    for frame in frames[4:]:
        _step_both(checked, plain, frame)


@gpu
def test_cuda_graph_stream_still_checks_names_shapes_and_dtypes(streamed):
    """A CUDA stream skips the Python checks for feeds shaped as last time; any change of
    name, shape or dtype after that is still refused, and the state is untouched."""
    registry, artifact = streamed
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    frames = _frames(arch, config, 2, 3, seed=5)
    stream = open_stream(artifact.dir, engine="torch", device="cuda", registry=registry)
    stream.reset(batch=2)
    stream.step(frames[0])
    stream.step(frames[1])
    before = stream.state
    name, value = next(iter(frames[2].items()))
    wrong_dtype = value.to(torch.float64 if value.is_floating_point() else torch.int32)
    for feeds, match in (({**frames[2], name: value[:1]}, "batch is 2"),
                         ({**frames[2], name: value.unsqueeze(-1)}, f"input {name}"),
                         ({**frames[2], name: wrong_dtype}, "expected dtype"),
                         ({k: v for k, v in frames[2].items() if k != name}, name)):
        with pytest.raises(InputError, match=match):
            stream.step(feeds)
        assert all(torch.equal(before[k], v) for k, v in stream.state.items())
    stream.step(frames[2])


@gpu
def test_cuda_graph_stream_captures_on_the_current_feeds(streamed):
    """A new graph (the first step, or the first with the other check setting) warms up on
    that step's own feeds, copied into contiguous buffers: strided first feeds work, and a
    refused step just before it cannot reach the model (a token id out of range would
    fault the device)."""
    registry, artifact = streamed
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    specs = [s for s in step_specs(arch.input_specs(config)) if s.name not in arch.state_map]
    spec = next(s for s in specs if s.bounds is not None or s.dtype.startswith("float"))
    frames = _frames(arch, config, 2, 3, seed=9)
    stream, plain = _checked_and_plain_cuda_streams(registry, artifact, batch=2)

    def same(a, b):
        assert all(torch.equal(a[k], b[k]) for k in a)

    def strided(v):   # dense but permuted where it can be (what clone() would keep), else gapped
        v = v.cuda()
        return (v.transpose(0, -1).contiguous().transpose(0, -1) if v.dim() > 1
                else torch.stack([v, v], -1)[..., 0])

    strided = {k: strided(v) for k, v in frames[0].items()}
    assert not all(v.is_contiguous() for v in strided.values())
    same(stream.step(strided), plain.step(frames[0]))
    spoilt = _spoil(spec, frames[1])
    with pytest.raises(InputError, match=spoilt[1]):
        stream.step(spoilt[0])
    same(stream.step(frames[1], check_values=False), plain.step(frames[1]))
    same(stream.step(frames[2]), plain.step(frames[2]))
