"""Streaming inference: feed one step at a time, the state carried between calls.

The one-step graph is the model with every sequence axis dropped: for ``cfc``,
``(x [B, in], h [B, L, H]) -> (y [B, out], h_out [B, L, H])``. ``seqdeploy export --streaming``
writes it as ``model.step.onnx`` (and ``optimize --fp16`` as ``model.step.fp16.onnx``).

    stream = open_stream("exported/cfc/tiny", engine="ort")
    stream.reset(batch=4)                      # zero state, or reset(state={"h": h0})
    for x_t in frames:                         # x_t: [4, in]
        y_t = stream.step({"x": x_t})["y"]     # stream.state holds h after this step

On CUDA the ``torch`` stream captures the step once as a CUDA graph and replays it, so a
step costs one graph launch instead of one Python launch per kernel; the graph's state
buffers are the stream's own copies. There the value checks (NaN, token range) run inside
the graph too: one small kernel per input stores a flag straight into pinned host memory
and the graph commits the new state only if no flag is set; the step reads the flags after
its one synchronisation, so a bad input raises and leaves the state as it was. Elsewhere
they run before the step. Loops that must not wait on the GPU pass ``check_values=False``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from seqdeploy.architecture import BATCH, SEQ, TensorSpec, check_inputs, raise_bad_values
from seqdeploy.errors import InputError, SeqdeployError

if TYPE_CHECKING:
    from seqdeploy.artifacts import Artifact
    from seqdeploy.plugins import Registry

STEP_FILES = {"fp32": "model.step.onnx", "fp16": "model.step.fp16.onnx"}


def step_specs(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The same tensors with their sequence axis removed."""
    return [replace(s, shape=tuple(d for d in s.shape if d != SEQ)) for s in specs]


class StepModule(nn.Module):
    """Wraps a sequence model as a one-step model: inputs and outputs lose their seq axis."""

    def __init__(self, model: nn.Module, in_specs: list[TensorSpec], out_specs: list[TensorSpec]):
        super().__init__()
        self.model = model
        self.in_axes = [s.shape.index(SEQ) if SEQ in s.shape else None for s in in_specs]
        self.out_axes = [s.shape.index(SEQ) if SEQ in s.shape else None for s in out_specs]
        self.in_names = [s.name for s in in_specs]

    def squeeze_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn T=1 example inputs into step inputs."""
        return {n: (inputs[n].squeeze(a) if a is not None else inputs[n])
                for n, a in zip(self.in_names, self.in_axes)}

    def forward(self, *inputs):
        args = [x.unsqueeze(a) if a is not None else x for x, a in zip(inputs, self.in_axes)]
        outputs = self.model(*args)
        return tuple(y.squeeze(a) if a is not None else y for y, a in zip(outputs, self.out_axes))


class Stream:
    """A stateful one-step session. ``step`` takes the non-state inputs of one time step and
    returns that step's other outputs; the state outputs become the next step's state."""

    def __init__(self, registry: "Registry", artifact: "Artifact", engine: str, precision: str,
                 device: str, check_values: bool = True):
        self.arch = registry.architecture(artifact.manifest["arch"])
        if not self.arch.state_map:
            raise SeqdeployError(f"{self.arch.name} has no recurrent state: it cannot stream")
        self.config = artifact.manifest["config"]
        self.engine, self.precision, self.device = engine, precision, device
        self.input_specs = step_specs(self.arch.input_specs(self.config))
        self.output_specs = step_specs(self.arch.output_specs(self.config))
        self.state_specs = [s for s in self.input_specs if s.name in self.arch.state_map]
        self.feed_specs = [s for s in self.input_specs if s.name not in self.arch.state_map]
        self.check_values = check_values
        self._state: dict[str, torch.Tensor] = {}
        # CUDA graphs of the step for self._batch rows, by whether they check values (reset()
        # drops them on a change of batch): (graph, static outputs, host and device bad-value
        # flags, the feeds' address slots as numpy and as the pinned tensor; all but the
        # first two None without checks)
        self._graphs: dict[bool, tuple] = {}
        self._static_in: dict[str, torch.Tensor] = {}
        self._batch = None
        self._accepted = None      # the feeds' (name, shape, dtype) last accepted by a graph step
        self._runner = self._open(registry, artifact)

    # -- engines ---------------------------------------------------------------------------
    def _open(self, registry, artifact):
        engine = registry.engine(self.engine)
        if not engine.streams:
            streaming = sorted(n for n, e in registry.engines.items() if e.streams)
            raise SeqdeployError(f"engine {self.engine} cannot stream (engines that can: "
                                 f"{', '.join(streaming)})")
        runner = engine.open_step(artifact, registry, self.precision, self.device)
        self._state_device = runner.device
        self._cuda_graphs = runner.cuda_graphs
        return runner.run

    # -- state -----------------------------------------------------------------------------
    def reset(self, batch: int = 1, state: dict[str, torch.Tensor] | None = None) -> None:
        """Start a new sequence: zero state for ``batch`` rows, or the given state (copied;
        the caller's tensors are never written)."""
        state = dict(state or {})
        unknown = sorted(set(state) - {s.name for s in self.state_specs})
        if unknown:
            raise InputError(f"unknown state(s) {', '.join(unknown)} (the state is "
                             f"{', '.join(s.name for s in self.state_specs)})")
        values = {}
        for spec in self.state_specs:
            shape = tuple(batch if isinstance(d, str) else d for d in spec.shape)
            value = state.get(spec.name)
            values[spec.name] = (torch.zeros(shape, dtype=spec.torch_dtype(self.precision))
                                 if value is None else value.to(spec.torch_dtype(self.precision)))
            if tuple(values[spec.name].shape) != shape:
                raise InputError(f"state {spec.name}: expected shape {list(shape)} for batch "
                                 f"{batch}, got {list(values[spec.name].shape)}")
        check_inputs(self.state_specs, values, self.precision)
        keep_graph = bool(self._graphs) and self._batch == batch
        self._accepted = None
        self._batch = batch
        device = self._state_device
        if keep_graph:
            for k, v in values.items():            # the captured graph reads these buffers
                self._state[k].copy_(v)
        else:
            self._graphs, self._static_in = {}, {}
            self._state = {k: v.to(device, copy=True) for k, v in values.items()}

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the current state (what the next step starts from)."""
        return {k: v.clone() for k, v in self._state.items()}

    def step(self, inputs: dict[str, torch.Tensor], check_values: bool | None = None
             ) -> dict[str, torch.Tensor]:
        """One time step. ``inputs`` hold the non-state inputs without a time axis; returns the
        step's non-state outputs (the state lives on in :attr:`state`).

        Names, shapes and dtypes are always checked. Values (NaN, token range) are checked
        unless ``check_values=False`` (default: the stream's ``check_values``): on a GPU that
        check synchronises with the device on every step."""
        check = self.check_values if check_values is None else check_values
        graphed = self._cuda_graphs
        # a CUDA graph step checks values itself, inside the graph; and feeds with the names,
        # shapes and dtypes it accepted last time pass again without the Python checks
        signature = [(k, v.shape, v.dtype) for k, v in inputs.items()] if graphed else None
        if signature is None or signature != self._accepted:
            check_inputs(self.feed_specs, inputs, self.precision, values=check and not graphed)
            if not self._state:
                first = next(iter(inputs.values()), None)
                self.reset(batch=int(first.shape[0]) if first is not None and first.dim() else 1)
            # the feeds must match the state's batch (a captured graph would broadcast them)
            for spec in self.feed_specs:
                batch = inputs[spec.name].shape[spec.shape.index(BATCH)] if BATCH in spec.shape \
                    else self._batch
                if batch != self._batch:
                    raise InputError(f"input {spec.name}: batch is {self._batch} in the stream's "
                                     f"state but {batch} here; reset(batch=...) first")
            self._accepted = signature
        if graphed:
            return self._graph_step(inputs, check)
        outputs = dict(zip((s.name for s in self.output_specs), self._runner({**inputs, **self._state})))
        for state_in, state_out in self.arch.state_map.items():
            self._state[state_in] = outputs.pop(state_out)
        return outputs

    def _graph_step(self, inputs: dict[str, torch.Tensor], check: bool) -> dict[str, torch.Tensor]:
        """Replay a CUDA graph of the step. The graph reads the inputs and state from static
        buffers and writes the new state back into the state buffers itself, so a step is a
        copy in per input, one replay and a clone per output. With ``check``, the graph first
        sets a flag per input with bad values (:func:`~seqdeploy.value_flags.flag_bad_values`,
        which stores them straight into pinned host memory) and keeps the old state if any
        is set; after the replay the step waits for the stream, reads them, and a set one
        raises as :func:`check_inputs` would have. Captured once per batch size and
        ``check``, on this step's feeds.

        A checked step waits for the graph anyway, so its graph also copies the feeds in
        itself: the same kernels read each feed from the address the host writes into a
        pinned slot before the replay (``sources`` of ``flag_bad_values``), which on the
        H200's host saves the 6-8 us of a ``copy_`` per input. A feed that cannot be read
        as it is (another dtype or device, not contiguous) is copied into its buffer first,
        and its slot points there."""
        if not self._static_in:   # contiguous, whatever the strides of the first feeds
            self._static_in = {k: torch.empty(v.shape, dtype=v.dtype, device=self.device)
                               for k, v in inputs.items()}
        captured = self._graphs.get(check)
        slots = captured[4] if captured is not None else None
        if slots is None:
            for k, v in inputs.items():
                self._static_in[k].copy_(v, non_blocking=True)
        else:
            for i, spec in enumerate(self.feed_specs):
                v, static = inputs[spec.name], self._static_in[spec.name]
                if not (v.dtype == static.dtype and v.is_cuda and v.is_contiguous()
                        and v.get_device() == static.get_device()):
                    static.copy_(v, non_blocking=True)
                    v = static
                slots[i] = v.data_ptr()
        if captured is None:   # (its warm-up runs on this step's feeds, copied in just above)
            captured = self._graphs[check] = self._capture(check)
        graph, static_out, host_flags = captured[:3]
        graph.replay()
        # clone (the next replay overwrites the static outputs) before waiting, so that the
        # copies are queued while the graph runs
        outputs = {k: v.clone() for k, v in static_out.items()}
        if host_flags is not None:
            torch.cuda.current_stream().synchronize()
            bad = host_flags.tolist()
            if any(bad):
                spec = next(s for s, flag in zip(self.feed_specs, bad) if flag)
                raise_bad_values(spec, self._static_in[spec.name])   # check_inputs' message
                raise InputError(f"input {spec.name}: bad values")
        return outputs

    def _capture(self, check: bool) -> tuple:
        from seqdeploy.value_flags import flag_bad_values   # Triton: loaded only here

        feeds = {**self._static_in, **self._state}
        host_flags = any_bad = sources = None
        if check:
            # written by the GPU itself (pinned memory is mapped into its address space)
            host_flags = torch.zeros(len(self.feed_specs), dtype=torch.bool, pin_memory=True)
            any_bad = torch.zeros((), dtype=torch.bool, device=self.device)
            # read by the GPU itself: each feed's address, rewritten by the host per step
            # (here the buffers' own, which hold this step's feeds: an in-place copy)
            sources = torch.tensor([self._static_in[s.name].data_ptr() for s in self.feed_specs],
                                   dtype=torch.int64).pin_memory()
            flag_bad_values(self.feed_specs, self._static_in, any_bad, host_flags, sources)

        def model_feeds(clamp: bool):
            if not clamp:
                return feeds
            # an index out of range would fault on the device: the model sees one in range
            # (a checked step raises and keeps the state all the same)
            return {**feeds, **{s.name: self._static_in[s.name].clamp(*_index_range(s))
                                for s in self.feed_specs if s.bounds is not None}}

        # warm up (compile kernels, settle the allocator), never on an index out of range
        self._runner(model_feeds(True))
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        names = [s.name for s in self.output_specs]
        with torch.cuda.graph(graph):
            if check:
                flag_bad_values(self.feed_specs, self._static_in, any_bad, host_flags, sources)
            outs = dict(zip(names, self._runner(model_feeds(check))))
            for state_in, state_out in self.arch.state_map.items():
                new = outs.pop(state_out)
                state = self._state[state_in]
                if check:   # keep the state where any input is bad: one kernel, as copy_ is
                    torch.where(any_bad, state, new.to(state.dtype), out=state)
                else:
                    state.copy_(new)
        # the graph writes any_bad and reads sources at fixed addresses: the tuple keeps them
        # allocated; sources' numpy view is what the step writes through (no torch call)
        return (graph, outs, host_flags, any_bad, None if sources is None else sources.numpy(),
                sources)


def _index_range(spec: TensorSpec) -> tuple[int, int]:
    lo, hi = spec.bounds
    return lo, hi - 1


def open_stream(artifact_dir: str | Path, engine: str = "torch", precision: str = "fp32",
                device: str = "auto", registry: "Registry | None" = None,
                check_values: bool = True) -> Stream:
    """Open a streaming session on an exported artifact folder (``exported/<arch>/<preset>``)."""
    from seqdeploy.artifacts import Artifact
    from seqdeploy.engines.base import resolve_device
    from seqdeploy.plugins import load_registry

    if precision not in STEP_FILES:
        raise SeqdeployError(f"unknown precision {precision!r} (fp32 or fp16)")
    registry = registry or load_registry()
    artifact = Artifact.load(Path(artifact_dir))
    device = resolve_device(device)
    registry.engine(engine).check(device)
    return Stream(registry, artifact, engine, precision, device, check_values)
