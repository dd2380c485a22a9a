"""ONNX Runtime engines: the CUDA execution provider when onnxruntime-gpu is present and a GPU
is there, else the CPU provider.

- ``ort``: seqdeploy's native op library (``seqdeploy build-ort-ops``, built on first use) is
  registered, so every seqdeploy node runs the op's own kernel: a C++ loop on the CPU, the
  plugin's Triton kernel (compiled ahead of time) on CUDA. It never falls back to the fallback
  functions: if the library cannot be built or loaded, or the model uses an op the library has
  no kernel for, the engine is unavailable and says why in one line.
- ``ort-graph``: ``ort`` on the CUDA EP replaying CUDA graphs (ORT's ``enable_cuda_graph``):
  one graph per input shape, captured by ORT in the shape's first call and replayed after,
  so a run costs one graph launch instead of a host dispatch per node. CUDA only.
- ``ort-onnx``: plain ONNX Runtime; custom nodes run their model-local fallback functions
  (standard ops, a Scan): the proof that any ONNX runtime runs the file.

On CUDA, sessions bind torch CUDA tensors as inputs and outputs (IO binding), so a run moves no
data through the host, as the torch engine's does not.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqdeploy.engines.base import Engine, Session, StepRunner
from seqdeploy.errors import ArtifactError, EngineUnavailable, SeqdeployError
from seqdeploy.precision import ONNX_FILES

_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                 "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
                 "tensor(bool)": torch.bool}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise EngineUnavailable("onnxruntime is not installed (pip install onnxruntime or "
                                "onnxruntime-gpu)") from None
    return onnxruntime


def providers_for(device: str, cuda_graph: bool = False) -> list:
    """ORT's providers for ``device``; with ``cuda_graph``, the CUDA EP captures and replays
    graphs (every compute node must then be on it: ORT refuses the session otherwise)."""
    ort = _ort()
    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise EngineUnavailable("onnxruntime has no CUDAExecutionProvider here "
                                    "(install onnxruntime-gpu, or use --device cpu)")
        # TF32 matmuls would cost fp32 models their 1e-5 parity (measured: 8e-4 rel-L2)
        options = {"use_tf32": "0", **({"enable_cuda_graph": "1"} if cuda_graph else {})}
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_device(device: str) -> str:
    """ORT runs on CUDA only when onnxruntime-gpu offers it; else on the CPU, and says so."""
    if device == "cuda" and "CUDAExecutionProvider" not in _ort().get_available_providers():
        return "cpu"
    return device


def native_library(registry) -> Path:
    """The built (or cached) op library; :class:`EngineUnavailable` with the reason if it
    cannot be built here."""
    from seqdeploy.ort_native.build import BuildError, build_library

    try:
        return build_library(registry)
    except BuildError as exc:
        raise EngineUnavailable(f"the seqdeploy ORT op library cannot be built: {exc}") from None


def check_native_ops(path, registry) -> None:
    """Refuse a model using a seqdeploy op the library has no kernel for: registering the
    library would leave that node on its fallback function, silently."""
    import onnx

    from seqdeploy.ops import DOMAIN
    from seqdeploy.ort_native.build import ort_ops

    model = onnx.load(str(path), load_external_data=False)
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    missing = sorted(used - set(ort_ops(registry)))
    if missing:
        raise EngineUnavailable(f"the seqdeploy ORT op library has no kernel for "
                                f"{', '.join(missing)} (the op's plugin sets no extra['ort'])")


def open_inference_session(path, device: str, library: Path | None = None,
                           profile_prefix: str | None = None, cuda_graph: bool = False):
    """An ``InferenceSession`` on ``path`` (already checksum-verified) for ``device``, with the
    op ``library`` registered if given (and CUDA graphs enabled with ``cuda_graph``); returns
    it with the device ORT really runs on."""
    ort = _ort()
    device = ort_device(device)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if library is not None:
        try:
            options.register_custom_ops_library(str(library))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EngineUnavailable(f"onnxruntime {ort.__version__} cannot load {library} "
                                    f"({first})") from None
    try:
        session = ort.InferenceSession(str(path), options,
                                       providers=providers_for(device, cuda_graph))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if cuda_graph and "graph capture" in str(exc).lower():
            # the file is fine; ORT cannot capture this graph (a CPU compute node, a Loop)
            raise EngineUnavailable(f"ORT cannot capture {path.name} as a CUDA graph "
                                    f"({first})") from None
        raise ArtifactError(f"{path}: onnxruntime cannot load it ({first})") from None
    return session, device


class OrtSession(Session):
    def __init__(self, engine, arch, config, precision, device, session):
        super().__init__(engine, arch, config, precision, device)
        self.session = session
        self.provider = session.get_providers()[0]
        self._cuda = device == "cuda" and self.provider == "CUDAExecutionProvider"
        self._out_types = {o.name: _TORCH_DTYPES.get(o.type) for o in session.get_outputs()}

    def prepare(self, inputs):
        if self._cuda:
            return {k: torch.as_tensor(v).to("cuda", non_blocking=True).contiguous()
                    for k, v in inputs.items()}
        return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                for k, v in inputs.items()}

    def _run(self, inputs) -> dict[str, torch.Tensor]:
        names = [s.name for s in self.output_specs]
        if self._cuda:
            return self._run_bound(self.prepare(inputs), names)
        feeds = self.prepare(inputs) if any(isinstance(v, torch.Tensor) for v in inputs.values()) else inputs
        outputs = self.session.run(names, feeds)
        return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(names, outputs)}

    def _axes(self, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
        """Sizes of the named axes (batch, seq, ...) as the inputs have them."""
        sizes = {}
        for spec in self.input_specs:
            for axis, dim in zip(spec.shape, inputs[spec.name].shape):
                if isinstance(axis, str):
                    sizes[axis] = dim
        return sizes

    def _bind(self, inputs: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        """An IO binding of the CUDA tensors ``inputs`` and of new output tensors (shaped by
        the inputs' named axes); returns it with the outputs by name."""
        binding = self.session.io_binding()
        device_id = torch.cuda.current_device()
        for name, t in inputs.items():
            binding.bind_input(name, "cuda", device_id, _numpy_dtype(t.dtype), list(t.shape),
                               t.data_ptr())
        axes = self._axes(inputs)
        outputs = {}
        for spec in self.output_specs:
            shape = [axes[d] if isinstance(d, str) else d for d in spec.shape]
            out = torch.empty(shape, dtype=self._out_types[spec.name], device="cuda")
            binding.bind_output(spec.name, "cuda", device_id, _numpy_dtype(out.dtype), shape,
                                out.data_ptr())
            outputs[spec.name] = out
        return binding, outputs

    def _run_bound(self, inputs: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        binding, outputs = self._bind(inputs)
        torch.cuda.current_stream().synchronize()   # inputs copied before ORT's stream reads them
        self.session.run_with_iobinding(binding)
        return {n: outputs[n] for n in names}

    def synchronize(self) -> None:  # run / run_with_iobinding return after the outputs are ready
        pass

    def describe(self) -> str:
        return f"{self.engine}[{self.provider}] ({self.precision}, {self.device})"


@dataclass
class _GraphSlot:
    """The buffers ORT's CUDA graph for one input signature reads and writes: a captured graph
    replays on the addresses it was captured with, so every run of the signature copies its
    inputs into ``inputs`` and its outputs out of ``outputs`` (bound once in ``binding``).
    ``run_options`` carry the graph's id (ORT's ``gpu_graph_id``)."""

    graph_id: int
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    binding: Any
    run_options: Any


class OrtGraphSession(OrtSession):
    """:class:`OrtSession` whose runs ORT captures as CUDA graphs, one per input signature
    (shapes and dtypes): ORT runs a signature's graph normally first (its memory settles),
    then captures and replays it (recent versions do both within the first call); later
    calls replay. The
    :attr:`MAX_GRAPHS` signatures used last keep their buffers and graphs; the one used least
    recently is released, and its id is never used again, so a signature that returns is
    captured anew. A run that ORT fails (a capture it cannot make) ends the session's use in
    one line: the stream may be left mid-capture."""

    MAX_GRAPHS = 16

    def __init__(self, *args):
        super().__init__(*args)
        self._slots: dict[tuple, _GraphSlot] = {}
        self._next_id = 0
        self._broken: str | None = None

    def _run(self, inputs) -> dict[str, torch.Tensor]:
        if self._broken:
            raise SeqdeployError(self._broken)
        names = [s.name for s in self.output_specs]
        inputs = self.prepare(inputs)
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))
        slot = self._slots.pop(key, None) or self._open_slot(inputs)
        self._slots[key] = slot                      # the most recently used last
        for name, t in inputs.items():
            slot.inputs[name].copy_(t)
        torch.cuda.current_stream().synchronize()   # the copies are done before ORT's stream runs
        try:
            self.session.run_with_iobinding(slot.binding, slot.run_options)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._broken = (f"{self.engine}: ONNX Runtime failed to run or capture the CUDA "
                            f"graph for inputs {dict((k, s) for k, s, _ in key)} ({first})")
            raise SeqdeployError(self._broken) from None
        torch.cuda.synchronize()   # ORT's stream is done before torch's reads the outputs
        return {n: slot.outputs[n].clone() for n in names}

    def _open_slot(self, inputs: dict[str, torch.Tensor]) -> _GraphSlot:
        if len(self._slots) >= self.MAX_GRAPHS:
            evicted = self._slots.pop(next(iter(self._slots)))
            release = getattr(self.session, "release_captured_graph", None)   # ORT >= 1.32
            if release is not None:
                release(evicted.graph_id)
        static = {k: torch.empty_like(v) for k, v in inputs.items()}
        binding, outputs = self._bind(static)
        run_options = _ort().RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(self._next_id))
        slot = _GraphSlot(self._next_id, static, outputs, binding, run_options)
        self._next_id += 1
        return slot

    def describe(self) -> str:
        return f"{self.engine}[{self.provider}, CUDA graphs] ({self.precision}, {self.device})"


def _numpy_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
            torch.int32: np.int32, torch.bool: np.bool_}[dtype]


class OrtEngine(Engine):
    name = "ort"
    description = ("ONNX Runtime with seqdeploy's native op library (our kernels; CUDA EP with "
                   "onnxruntime-gpu, else CPU)")
    needs_onnx = True
    streams = True
    native = True        # registers seqdeploy's op library
    cuda_graph = False   # ORT captures and replays CUDA graphs

    def check(self, device: str) -> None:
        _ort()
        if self.native:
            import os

            from seqdeploy.ort_native.build import BuildError, compiler, ort_headers

            if os.environ.get("SEQDEPLOY_ORT_LIBRARY"):
                return
            try:
                compiler()
                ort_headers()
            except BuildError as exc:
                raise EngineUnavailable(f"the seqdeploy ORT op library cannot be built: "
                                        f"{exc}") from None

    def doctor(self, device: str) -> list[tuple[str, str]]:
        rows = []
        if self.native:
            from seqdeploy.ort_native.build import BuildError, header_version, ort_headers

            try:
                include = ort_headers(fetch=False)
                rows.append(("ORT C API headers", f"{include} (API {header_version(include)})"))
            except BuildError:
                rows.append(("ORT C API headers", "not here yet (build-ort-ops fetches them)"))
        return rows

    def inference_session(self, registry, path, device: str,
                          profile_prefix: str | None = None):
        """``open_inference_session`` on ``path`` as this engine runs it: with the op library
        registered and every seqdeploy node checked to have a kernel where the engine is
        ``native``, on the fallback functions otherwise, and with CUDA graphs where it
        replays them (``cuda_graph``)."""
        library = None
        if self.native:
            library = native_library(registry)
            check_native_ops(path, registry)
        return open_inference_session(Path(path), device, library, profile_prefix,
                                      cuda_graph=self.cuda_graph)

    def open_step(self, artifact, registry, precision: str, device: str) -> StepRunner:
        """The one-step graph (``model.step*.onnx``) in an ORT session; state on the host."""
        from seqdeploy.streaming import STEP_FILES, step_specs

        arch = registry.architecture(artifact.manifest["arch"])
        if not artifact.has(STEP_FILES[precision]):
            raise ArtifactError(f"{artifact.dir}: no {STEP_FILES[precision]}; export with "
                                f"`seqdeploy export {arch.name} --streaming`"
                                + (" and run `optimize --fp16`" if precision == "fp16" else ""))
        session, _ = self.inference_session(registry, artifact.path(STEP_FILES[precision]),
                                            device)
        names = [s.name for s in step_specs(arch.output_specs(artifact.manifest["config"]))]

        def run(inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
            return [torch.from_numpy(o) for o in session.run(names, feeds)]

        return StepRunner(run, "cpu")

    def load(self, artifact, registry, precision: str, device: str) -> Session:
        path = artifact.path(ONNX_FILES[precision])
        session, device = self.inference_session(registry, path, device)
        arch = registry.architecture(artifact.manifest["arch"])
        return OrtSession(self.name, arch, artifact.manifest["config"], precision, device, session)


class OrtOnnxEngine(OrtEngine):
    name = "ort-onnx"
    description = "plain ONNX Runtime; custom nodes run their fallback functions (portability)"
    native = False


class OrtGraphEngine(OrtEngine):
    name = "ort-graph"
    description = ("`ort` on the CUDA EP replaying a CUDA graph per input shape (ORT's "
                   "enable_cuda_graph): one launch a run instead of one per node")
    streams = False   # streaming steps run through `ort`
    cuda_graph = True

    def check(self, device: str) -> None:
        if device != "cuda":
            raise EngineUnavailable("ort-graph replays CUDA graphs: it needs a CUDA device and "
                                    "onnxruntime-gpu (here --engine ort runs)")
        providers_for(device)   # onnxruntime-gpu's CUDA EP, or the reason there is none
        super().check(device)

    def doctor(self, device: str) -> list[tuple[str, str]]:
        return []   # the op library's rows are `ort`'s

    open_step = Engine.open_step   # it does not stream (`ort` does): the base class says so

    def load(self, artifact, registry, precision: str, device: str) -> Session:
        path = artifact.path(ONNX_FILES[precision])
        session, device = self.inference_session(registry, path, device)
        if session.get_providers()[0] != "CUDAExecutionProvider":   # ORT fell back to its CPU
            raise EngineUnavailable("onnxruntime could not start its CUDA execution provider "
                                    f"(it offers {', '.join(session.get_providers())}), and "
                                    "ort-graph needs it")
        arch = registry.architecture(artifact.manifest["arch"])
        return OrtGraphSession(self.name, arch, artifact.manifest["config"], precision, device,
                               session)



def register_commands(cli) -> None:
    """``seqdeploy build-ort-ops``: build (or find cached) the op library, print its path."""
    import click

    @cli.command("build-ort-ops")
    @click.option("--force", is_flag=True, help="Rebuild even if a cached library matches.")
    @click.pass_context
    def build_ort_ops(ctx, force):
        """Build seqdeploy's native ONNX Runtime op library (CPU + CUDA kernels of every
        registered op); the last line of output is its path."""
        from seqdeploy.ort_native.build import build_library

        registry = ctx.obj["registry"]
        try:
            path = build_library(registry, force=force, echo=lambda m: click.echo(m, err=True))
        except SeqdeployError:
            raise
        click.echo(str(path))
