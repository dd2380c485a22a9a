"""TensorRT engine: a strongly typed engine built from the artifact's ONNX with seqdeploy's
plugins (:mod:`seqdeploy.trt`), run through torch tensors.

Works with full TensorRT (>= 10.9) or TensorRT-RTX (>= 1.7), whichever is installed. Engines
are built on demand through the engine cache (or prebuilt by ``seqdeploy optimize --trt``);
a session runs any batch and sequence length inside the engine's optimisation profile, so a
stream can call it step by step or chunk by chunk with the state passed across calls.
TensorRT-RTX builds engines on any machine but runs them only on the compute capabilities
it supports (not Hopper): there ``check`` says so in one line instead of building.
"""
from __future__ import annotations

import click
import torch

from seqdeploy.engines.base import Engine, Session, StepRunner
from seqdeploy.errors import EngineUnavailable, InputError, SeqdeployError
from seqdeploy.hookspecs import hookimpl


def _rt():
    from seqdeploy.trt import adapter

    return adapter.load()


def _capability() -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


class TrtSession(Session):
    """One deserialized engine and its execution context. ``run`` takes torch tensors (any
    device), returns CUDA tensors written by ``execute_async_v3`` on torch's current stream."""

    def __init__(self, arch, config, precision, rt, plan: bytes, source: str):
        super().__init__("trt", arch, config, precision, "cuda")
        trt = rt.trt
        self.rt, self.source = rt, source
        self.logger = rt.logger()
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise SeqdeployError(f"{rt.describe()} could not deserialize the engine (built by "
                                 f"another TensorRT or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        from seqdeploy.trt.plugins import torch_dtype

        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.bounds = {n: self.engine.get_tensor_profile_shape(n, 0) for n in self.inputs}

    def prepare(self, inputs):
        return {k: v.to("cuda", self.dtypes[k]).contiguous() for k, v in inputs.items()}

    def _run(self, inputs) -> dict[str, torch.Tensor]:
        feeds = self.prepare(inputs)
        for name in self.inputs:
            shape = tuple(feeds[name].shape)
            lo, _, hi = self.bounds[name]
            if any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
                raise InputError(f"input {name}: shape {list(shape)} is outside the engine's "
                                 f"profile {list(lo)}..{list(hi)}")
            self.context.set_input_shape(name, shape)
            self.context.set_tensor_address(name, feeds[name].data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise SeqdeployError(f"{self.rt.describe()}: execute_async_v3 failed")
        return outs

    def describe(self) -> str:
        return f"trt[{self.rt.describe()}] ({self.precision}, cuda)"


class TrtEngine(Engine):
    name = "trt"
    description = "TensorRT (full or TensorRT-RTX): strongly typed engine, seqdeploy plugins"
    needs_onnx = True
    #: one step is the sequence engine at T = 1 (its profile starts at 1)
    streams = True

    def check(self, device: str) -> None:
        rt = _rt()
        if device != "cuda":
            raise EngineUnavailable(f"trt runs engines on a CUDA device only ({rt.describe()} is "
                                    f"installed: `seqdeploy optimize ARCH --trt` builds them here)")
        ok, why = rt.runs_on(_capability())
        if not ok:
            raise EngineUnavailable(f"{why}, so no TensorRT engine runs on this "
                                    f"{torch.cuda.get_device_name()}; full TensorRT >= 10.9 "
                                    f"would (pip install 'seqdeploy[tensorrt]'), and here "
                                    f"--engine torch or ort run")

    def load(self, artifact, registry, precision: str, device: str) -> Session:
        from seqdeploy.trt import engine_for
        from seqdeploy.trt.plugins import register_plugins

        self.check(device)
        rt = _rt()
        ops = [registry.ops[o] for o in registry.architecture(artifact.manifest["arch"]).ops]
        register_plugins(rt, ops)
        engine = engine_for(registry, artifact, precision, rt=rt)
        arch = registry.architecture(artifact.manifest["arch"])
        return TrtSession(arch, artifact.manifest["config"], precision, rt, engine.plan,
                          engine.source)

    def open_step(self, artifact, registry, precision: str, device: str) -> StepRunner:
        """One time step through the sequence engine at T = 1: step inputs get their time
        axis back, outputs lose it; the state stays on the GPU between steps."""
        from seqdeploy.architecture import SEQ

        session = self.load(artifact, registry, precision, device)
        seq_in = {s.name: s.shape.index(SEQ) for s in session.input_specs if SEQ in s.shape}
        seq_out = {s.name: s.shape.index(SEQ) for s in session.output_specs if SEQ in s.shape}
        names = [s.name for s in session.output_specs]

        def run(inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            feeds = {k: (v.unsqueeze(seq_in[k]) if k in seq_in else v) for k, v in inputs.items()}
            out = session._run(feeds)
            return [out[n].squeeze(seq_out[n]) if n in seq_out else out[n] for n in names]

        return StepRunner(run, "cuda")

    def doctor(self, device: str) -> list[tuple[str, str]]:
        """``seqdeploy doctor`` rows: flavour and version, whether this GPU runs its engines,
        whether every installed op's plugin registers, which plugin form is offered."""
        from seqdeploy.plugins import load_registry
        from seqdeploy.trt import adapter
        from seqdeploy.trt.plugins import register_plugins

        try:
            rt = adapter.load()
        except EngineUnavailable as exc:
            return [("trt flavour", str(exc))]
        rows = [("trt flavour", rt.describe())]
        cap = _capability()
        ok, why = rt.runs_on(cap)
        rows.append(("trt runs here", f"yes (compute capability {cap[0]}.{cap[1]})"
                     if ok else f"no: {why}"))
        state = register_plugins(rt, list(load_registry().ops.values()))
        bad = {k: v for k, v in state.items() if v != "registered"}
        rows.append(("trt plugins", (f"{len(state) - len(bad)} of {len(state)} register "
                                     f"(seqdeploy::{', seqdeploy::'.join(sorted(state))})"
                                     if not bad else
                                     "; ".join(f"{k}: {v}" for k, v in sorted(bad.items())))))
        rows.append(("trt plugin form", "python IPluginV3 (needs Python at run time); "
                     + ("tensorrt.plugin AOT offered by this TensorRT but not built by seqdeploy"
                        if rt.has_aot_plugins else "no AOT plugin API in this TensorRT")))
        return rows


# -- optimize --trt ---------------------------------------------------------------------------
@hookimpl
def register_commands(cli: click.Group) -> None:
    """The built-in ``optimize`` of this (fresh) group, plus ``--trt`` (prebuild the engines
    and record them in the manifest) and ``--no-plugins`` (the function form): the engine
    adds its own options, so the core CLI names no engine."""
    base = cli.commands.get("optimize")
    if base is None:
        return
    params = [*base.params,
              click.Option(["--trt"], is_flag=True,
                           help="Also prebuild the TensorRT engines (fp32, and fp16 when its "
                                "ONNX exists) and record them in the manifest."),
              click.Option(["--no-plugins"], is_flag=True,
                           help="With --trt: build the fallback-function form, without "
                                "seqdeploy's plugins.")]

    def optimize(trt: bool, no_plugins: bool, **kwargs):
        if no_plugins and not trt:
            raise SeqdeployError("--no-plugins applies to --trt only")
        if kwargs.get("fp16", True) or not trt:
            base.callback(**kwargs)
        if trt:
            _prebuild(kwargs["arch"], kwargs.get("preset"), not no_plugins)

    cli.add_command(click.Command("optimize", params=params, callback=optimize,
                                  help=(base.help or "") + " With --trt, TensorRT engines too.",
                                  short_help=base.short_help))


def _prebuild(arch: str, preset: str | None, use_plugins: bool) -> None:
    from seqdeploy.cli import _artifact, _Progress, _registry
    from seqdeploy.precision import ONNX_FILES
    from seqdeploy.trt import prebuild

    ctx = click.get_current_context()
    artifact = _artifact(ctx, arch, preset)
    for precision in ("fp32", "fp16"):
        if not artifact.has(ONNX_FILES[precision]):
            continue
        with _Progress(f"tensorrt {arch} {precision}") as progress:
            built = prebuild(_registry(ctx), artifact, precision, use_plugins=use_plugins,
                             progress=progress)
        layers = built["build"].get("plan_plugin_layers", {})
        click.echo(f"wrote {artifact.dir / built['file']} ({built['tensorrt']}, target "
                   f"{built['target']}, {built['source']}): plugin layers {layers}, "
                   f"sha256 {built['sha256'][:16]}")
