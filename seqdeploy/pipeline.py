"""The stages: export, optimize (FP16), validate and bench, on an artifact folder.

Each stage is a function of (registry, artifact, options) returning a JSON-able result and
writing its files through :class:`~seqdeploy.artifacts.Artifact`. The CLI is a thin layer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import onnx
import torch

from seqdeploy.architecture import MASK, POOLED, STATE, Architecture, Case
from seqdeploy.artifacts import Artifact
from seqdeploy.bench import bench_op, hbm_bandwidth_gbs, time_fn
from seqdeploy.checkpoint import load_checkpoint, save_checkpoint
from seqdeploy.engines.base import REFERENCE, Session, resolve_device
from seqdeploy.engines.torch import WEIGHTS, load_model
from seqdeploy.errors import EngineUnavailable, SeqdeployError
from seqdeploy.export import export_onnx
from seqdeploy.parity import Check, check_outputs
from seqdeploy.plugins import Registry
from seqdeploy.precision import ONNX_FILES, cast_inputs, fp32_islands
from seqdeploy.streaming import STEP_FILES, Stream

Progress = Callable[[str], None]
STREAM_STEPS = 48  # length of the step-at-a-time validation case


def _quiet(_: str) -> None:
    pass


def io_manifest(arch: Architecture, config: dict[str, Any]) -> dict[str, Any]:
    def specs(items):
        return [{"name": s.name, "kind": s.kind, "dtype": s.dtype, "shape": list(s.shape),
                 "dynamic_axes": {str(k): v for k, v in s.dynamic_axes().items()}} for s in items]

    return {"inputs": specs(arch.input_specs(config)), "outputs": specs(arch.output_specs(config)),
            "state_map": dict(arch.state_map)}


# -- export ----------------------------------------------------------------------------------
def export(registry: Registry, arch_name: str, preset: str, out_root: Path,
           checkpoint: Path | None = None, seed: int = 0, streaming: bool = False,
           progress: Progress = _quiet) -> Artifact:
    """Build the model (seeded init, or a checkpoint), write weights and fp32 ONNX; with
    ``streaming``, also the one-step graph ``model.step.onnx``."""
    arch = registry.architecture(arch_name)
    config = arch.config(preset)
    missing_ops = [o for o in arch.ops if o not in registry.ops]
    if missing_ops:
        raise SeqdeployError(f"{arch_name}: ops not registered: {', '.join(missing_ops)}")
    if streaming and not arch.state_map:
        raise SeqdeployError(f"{arch_name} has no recurrent state: it cannot stream")
    torch.manual_seed(seed)
    model = arch.build(config).eval()
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        bad = [n for n, t in model.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise SeqdeployError(f"checkpoint {checkpoint}: NaN or Inf in {bad[0]}"
                                 + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                                 + "; refusing to export")
    directory = Path(out_root) / arch_name / preset
    ops = {o: {"onnx": f"{registry.ops[o].onnx_name}", "version": registry.ops[o].version}
           for o in arch.ops}
    # a transaction: the old artifact stays whole until the new one is complete
    artifact = Artifact.begin(directory, arch_name, preset, config, io=io_manifest(arch, config),
                              ops=ops, checkpoint=str(checkpoint) if checkpoint else None,
                              seed=seed)
    try:
        progress("writing weights")
        artifact.write(WEIGHTS, lambda p: save_checkpoint(model, p), kind="weights")
        progress("exporting fp32 ONNX")
        _export_precision(registry, artifact, arch, model, "fp32")
        if streaming:
            progress("exporting the fp32 one-step graph")
            _export_precision(registry, artifact, arch, model, "fp32", streaming=True)
        artifact.publish()
    except BaseException:
        artifact.abandon()
        raise
    return artifact


def _export_precision(registry, artifact, arch, model, precision: str,
                      streaming: bool = False) -> dict[str, Any]:
    proto, summary = export_onnx(arch, artifact.manifest["config"], model, precision, registry,
                                 streaming=streaming, preset=artifact.manifest["preset"])
    if precision == "fp16":
        summary["fp32_islands"] = fp32_islands(proto)
    name = (STEP_FILES if streaming else ONNX_FILES)[precision]
    artifact.write(name, lambda p: onnx.save_model(proto, str(p)), records={"onnx": summary},
                   kind="onnx", precision=precision, streaming=streaming)
    return summary


# -- optimize --------------------------------------------------------------------------------
def optimize_fp16(registry: Registry, artifact: Artifact, progress: Progress = _quiet) -> dict:
    """Write ``model.fp16.onnx``: the artifact's weights under the FP16 precision policy."""
    arch = registry.architecture(artifact.manifest["arch"])
    model = load_model(artifact, registry, "fp32", "cpu")
    progress("exporting fp16 ONNX")
    summary = _export_precision(registry, artifact, arch, model, "fp16")
    if artifact.has(STEP_FILES["fp32"]):
        progress("exporting the fp16 one-step graph")
        _export_precision(registry, artifact, arch, model, "fp16", streaming=True)
    return summary


# -- sessions --------------------------------------------------------------------------------
def open_session(registry: Registry, artifact: Artifact, engine_name: str, precision: str,
                 device: str) -> Session:
    arch = registry.architecture(artifact.manifest["arch"])
    artifact.check_io(io_manifest(arch, artifact.manifest["config"]))
    engine = registry.engine(engine_name)
    engine.check(device)
    if engine.needs_onnx and not artifact.has(ONNX_FILES[precision]):
        hint = "seqdeploy optimize --fp16" if precision == "fp16" else "seqdeploy export"
        raise SeqdeployError(f"{artifact.dir}: no {ONNX_FILES[precision]}; run `{hint}` first")
    return engine.load(artifact, registry, precision, device)


# -- validate --------------------------------------------------------------------------------
def validation_cases(arch: Architecture, config: dict[str, Any], long_seq: int = 4096) -> list[Case]:
    """The architecture's validation cases (:meth:`Architecture.validation_cases`)."""
    return arch.validation_cases(config, long_seq)


def case_inputs(arch: Architecture, config: dict[str, Any], case: Case,
                seed: int) -> dict[str, torch.Tensor]:
    """The case's inputs; for a ragged case, row ``i`` of every ``mask`` input keeps its first
    ``ceil(T / (i + 1))`` steps and is padding after them."""
    seed = case.seed if case.seed is not None else seed
    make = case.inputs or arch.make_inputs
    inputs = make(config, case.batch, case.seq_len, seed)
    if case.ragged:
        for spec in arch.input_specs(config):
            if spec.kind == MASK:
                mask = inputs[spec.name].clone()
                for i in range(mask.shape[0]):
                    mask[i, -(-case.seq_len // (i + 1)):] = 0
                inputs[spec.name] = mask
    return inputs


def _mask(arch: Architecture, config, inputs) -> torch.Tensor | None:
    spec = next((s for s in arch.input_specs(config) if s.kind == MASK), None)
    return None if spec is None else inputs[spec.name]


def run_steps(stream: Stream, arch: Architecture, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Feed ``inputs`` one time step at a time through ``stream``. Per-step outputs are
    stacked back along their time axis and the final state is the stream's; outputs with
    neither (pooled) are left out: one step's pooling is not the sequence's."""
    seq_in = {s.name: s.seq_axis for s in arch.input_specs(stream.config) if s.seq_axis is not None}
    seq_out = {s.name: s.seq_axis for s in arch.output_specs(stream.config) if s.seq_axis is not None}
    states = {k: v for k, v in inputs.items() if k in arch.state_map}
    batch = next(iter(inputs.values())).shape[0]
    stream.reset(batch=batch, state=states)
    steps = next(inputs[k].shape[a] for k, a in seq_in.items())
    collected: dict[str, list[torch.Tensor]] = {k: [] for k in seq_out}
    for t in range(steps):
        feeds = {k: inputs[k].select(a, t) for k, a in seq_in.items()}
        last = stream.step(feeds)
        for k in seq_out:
            collected[k].append(last[k].cpu())
    final = {arch.state_map[k]: v.cpu() for k, v in stream.state.items()}
    return {**final, **{k: torch.stack(v, dim=seq_out[k]) for k, v in collected.items()}}


def run_split(session: Session, arch: Architecture, inputs: dict[str, torch.Tensor],
              cut: int) -> dict[str, torch.Tensor]:
    """Run ``inputs`` as two calls, [0, cut) then [cut, T), passing the state across.
    Per-step outputs are joined, state outputs are the second call's; pooled outputs are
    left out (the second call pools only its own half)."""
    seq_in = {s.name: s.seq_axis for s in session.input_specs if s.seq_axis is not None}
    seq_out = {s.name: s.seq_axis for s in session.output_specs if s.seq_axis is not None}
    states = {s.name for s in session.output_specs if s.kind == STATE}
    first = {k: (v.narrow(seq_in[k], 0, cut) if k in seq_in else v) for k, v in inputs.items()}
    out1 = session.run(first)
    second = {k: (v.narrow(seq_in[k], cut, v.shape[seq_in[k]] - cut) if k in seq_in else v)
              for k, v in inputs.items()}
    for state_in, state_out in arch.state_map.items():
        second[state_in] = out1[state_out].to(inputs[state_in].dtype)
    out2 = session.run(second)
    joined = {k: torch.cat([out1[k].cpu(), out2[k].cpu()], dim=a) for k, a in seq_out.items()}
    return {**joined, **{k: out2[k] for k in states}}


def run_rows_alone(session: Session, arch: Architecture, inputs: dict[str, torch.Tensor],
                   mask: torch.Tensor) -> list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """For each row of a padded batch: ``(row, padded batch's outputs for it, outputs of the
    row run alone)``, trimmed to the row's length, for every per-step and pooled output."""
    full = {k: v.cpu() for k, v in session.run(inputs).items()}
    seq_in = {s.name: s.seq_axis for s in session.input_specs if s.seq_axis is not None}
    keep = [s for s in session.output_specs if s.kind != STATE]
    rows = []
    for i in range(mask.shape[0]):
        length = int(mask[i].sum())
        alone_in = {k: v[i:i + 1] for k, v in inputs.items()}
        alone_in = {k: (v.narrow(seq_in[k], 0, length) if k in seq_in else v)
                    for k, v in alone_in.items()}
        alone = session.run(alone_in)
        padded, single = {}, {}
        for spec in keep:
            p, a = full[spec.name][i:i + 1], alone[spec.name].cpu()
            if spec.seq_axis is not None:
                p = p.narrow(spec.seq_axis, 0, length)
            padded[spec.name], single[spec.name] = p, a
        rows.append((i, padded, single))
    return rows


def open_sessions(registry: Registry, artifact: Artifact, engines: list[str], precisions: list[str],
                  device: str, skip_unavailable: bool, progress: Progress
                  ) -> tuple[list[Session], dict[str, str]]:
    """A session per (engine, precision). An engine that cannot run this artifact raises,
    unless ``skip_unavailable`` (the engines were not asked for by name, as in ``run``): then
    it is left out and ``{engine: reason}`` says why."""
    sessions, skipped = [], {}
    for engine_name in engines:
        for precision in precisions:
            try:
                sessions.append(open_session(registry, artifact, engine_name, precision, device))
            except EngineUnavailable as exc:
                if not skip_unavailable:
                    raise
                skipped.setdefault(engine_name, str(exc))
                progress(f"{engine_name} ({precision}) left out: {exc}")
    return sessions, skipped


def validate(registry: Registry, artifact: Artifact, engines: list[str], precisions: list[str],
             device: str = "auto", long_seq: int = 4096, progress: Progress = _quiet,
             skip_unavailable: bool = False) -> dict:
    """Parity of every (engine, precision) against the fp32 run of the reference engine
    (the one whose role is ``reference``), at every validation case of the architecture,
    each output compared by its kind (:mod:`seqdeploy.parity`). Writes ``parity.json``;
    ``result["passed"]`` says whether all passed. See :func:`open_sessions` for
    ``skip_unavailable``."""
    device = resolve_device(device)
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    out_specs = arch.output_specs(config)
    sessions, skipped = open_sessions(registry, artifact, engines, precisions, device,
                                      skip_unavailable, progress)
    ref_engine = registry.reference_engine()
    reference = open_session(registry, artifact, ref_engine.name, "fp32", device)
    checks: list[Check] = []
    pooled = {s.name for s in out_specs if s.kind == POOLED}

    def whole(ref_out):   # what a split or step run can compare: not the pooled outputs
        return {k: v for k, v in ref_out.items() if k not in pooled}

    def check(session, case_name, ref_out, out, mask=None):
        checks.extend(check_outputs(
            session.engine, session.precision, case_name, ref_out, out, out_specs,
            lambda name: arch.limits_for(session.precision, config, name), mask))

    cases = validation_cases(arch, config, long_seq)
    for i, case in enumerate(cases):
        progress(f"[{i + 1}/{len(cases)}] {case.name}: reference")
        inputs = case_inputs(arch, config, case, seed=1000 + i)
        mask = _mask(arch, config, inputs)
        ref_out = {k: v.cpu() for k, v in reference.run(inputs).items()}
        for session in sessions:
            progress(f"[{i + 1}/{len(cases)}] {case.name}: {session.describe()}")
            cast = cast_inputs(inputs, session.input_specs, session.precision)
            if case.split:
                out = run_split(session, arch, cast, case.split)
                expected = whole(ref_out)
            else:
                out = session.run(cast)
                expected = ref_out
            check(session, case.name, expected, {k: v.cpu() for k, v in out.items()}, mask)
            del out
            if case.ragged and mask is not None:
                for row, padded, alone in run_rows_alone(session, arch, cast, mask):
                    check(session, f"{case.name}-row{row}-alone", padded, alone)
        del ref_out
    streaming = [s for s in sessions if registry.engine(s.engine).streams]
    if arch.state_map and streaming and artifact.has(STEP_FILES["fp32"]):
        # streaming: one step at a time must equal the full-sequence reference run
        steps = min(arch.seq_len(config), STREAM_STEPS)
        name = f"B2-T{steps}-steps"
        progress(f"{name}: reference")
        inputs = arch.make_inputs(config, 2, steps, seed=999)
        ref_out = {k: v.cpu() for k, v in reference.run(inputs).items()}
        for session in sessions:
            if session not in streaming:
                progress(f"{name}: {session.describe()} cannot stream; not checked")
                continue
            try:
                stream = Stream(registry, artifact, session.engine, session.precision, device)
            except SeqdeployError as exc:
                progress(f"{name}: {session.describe()} not checked ({exc})")
                continue
            progress(f"{name}: {session.describe()} one step at a time")
            out = run_steps(stream, arch, cast_inputs(inputs, session.input_specs, session.precision))
            check(session, name, whole(ref_out), out)
    failed = [c for c in checks if not c.passed]
    result = {"arch": arch.name, "preset": artifact.manifest["preset"], "device": device,
              "reference": f"{ref_engine.name} fp32",
              "sessions": [s.describe() for s in sessions], "skipped": skipped,
              "passed": not failed, "checks": [c.as_dict() for c in checks]}
    artifact.write_json("parity.json", result)
    return result


# -- bench -----------------------------------------------------------------------------------
def bench(registry: Registry, artifact: Artifact, engines: list[str], precision: str,
          shapes: list[tuple[int, int]], device: str = "auto", ops: bool = True,
          progress: Progress = _quiet, skip_unavailable: bool = False) -> dict:
    """Time each engine at each (batch, T); report tokens/s, peak memory and, per recurrence
    op, achieved GB/s against the HBM bandwidth measured in the same run. See
    :func:`open_sessions` for ``skip_unavailable``."""
    device = resolve_device(device)
    arch = registry.architecture(artifact.manifest["arch"])
    config = artifact.manifest["config"]
    for name in engines:             # unknown or unusable engines fail before any work
        try:
            registry.engine(name).check(device)
        except EngineUnavailable:
            if not skip_unavailable:
                raise
    hbm = hbm_bandwidth_gbs(device)
    rows = []
    skipped: dict[str, str] = {}
    for engine_name in engines:
        progress(f"loading {engine_name} ({precision})")
        opened, why = open_sessions(registry, artifact, [engine_name], [precision], device,
                                    skip_unavailable, progress)
        skipped.update(why)
        if not opened:
            continue
        session = opened[0]
        for batch, seq_len in shapes:
            progress(f"{session.describe()}: B={batch} T={seq_len}")
            inputs = cast_inputs(arch.make_inputs(config, batch, seq_len, seed=7),
                                 session.input_specs, precision)
            session.run(inputs)           # checked once; then time the raw path
            prepared = session.prepare(inputs)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            timing = time_fn(lambda: session._run(prepared), device)
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
            rows.append({"engine": engine_name, "session": session.describe(),
                         "precision": precision, "batch": batch, "seq_len": seq_len,
                         **timing.summary(),
                         "tokens_per_s": batch * seq_len / (timing.median_ms * 1e-3),
                         "peak_mem_bytes": peak if session.allocates_through_torch else None})
        del session
    op_rows = []
    if ops:
        dtype = torch.float16 if precision == "fp16" else torch.float32
        for batch, seq_len in shapes:
            for case in arch.op_benchmarks(config, batch, seq_len, dtype, device):
                progress(f"op {case.op} {case.shape}")
                op_rows.append(bench_op(case, device, hbm))
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    result = {"arch": arch.name, "preset": artifact.manifest["preset"], "device": device,
              "gpu": gpu, "precision": precision, "hbm_gb_s": hbm, "engines": rows, "ops": op_rows,
              "skipped": skipped}
    artifact.write_json("bench.json", result)
    return result


def plot_bench(artifact: Artifact, result: dict, reference: str | None = None) -> Path:
    """``bench.png``: one panel per (batch, T), a bar per engine on a linear tokens/s axis,
    labelled with its tokens/s and its speed-up over ``reference``; whiskers reach down to
    the tokens/s of the p90 (thick) and p99 (thin) call times."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SeqdeployError("--plot needs matplotlib (pip install matplotlib)") from None
    rows = result["engines"]
    shapes = sorted({(r["batch"], r["seq_len"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(max(4.5, 3.2 * len(shapes)), 4.2),
                             squeeze=False)
    for ax, (batch, seq_len) in zip(axes[0], shapes):
        here = [r for r in rows if (r["batch"], r["seq_len"]) == (batch, seq_len)]
        tokens = batch * seq_len
        median = [r["tokens_per_s"] for r in here]
        p90 = [tokens / (r["p90_ms"] * 1e-3) for r in here]
        p99 = [tokens / (r["p99_ms"] * 1e-3) for r in here]
        x = range(len(here))
        ax.bar(x, median, color="#3a6ea5")
        ax.errorbar(x, median, yerr=[[max(0.0, m - q) for m, q in zip(median, p90)], [0] * len(here)],
                    fmt="none", ecolor="black", elinewidth=2, capsize=0)
        ax.errorbar(x, median, yerr=[[max(0.0, m - q) for m, q in zip(median, p99)], [0] * len(here)],
                    fmt="none", ecolor="black", elinewidth=0.8, capsize=3)
        base = next((r["median_ms"] for r in here if r["engine"] == reference), None)
        for i, r in enumerate(here):
            label = f"{r['tokens_per_s']:,.0f}"
            if base and r["engine"] != reference:
                label += f"\n{base / r['median_ms']:.1f}x"
            ax.annotate(label, (i, median[i]), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(list(x), [r["engine"] for r in here], fontsize=8, rotation=20)
        ax.set_title(f"B={batch} T={seq_len}", fontsize=9)
        ax.set_ylim(0, max(median) * 1.25)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    axes[0][0].set_ylabel("tokens / s (bar: median; whiskers: p90, p99)")
    fig.suptitle(f"{result['arch']}/{result['preset']} {result['precision']} on "
                 f"{result['gpu'] or 'CPU'}" + (f" (speed-up over {reference})" if reference else ""),
                 fontsize=10)
    fig.tight_layout()

    def save(path):
        fig.savefig(path, dpi=120, format="png")

    path = artifact.write("bench.png", save, kind="plot")
    plt.close(fig)
    return path


def engines_available(registry: Registry, names: list[str] | None, device: str,
                      ) -> tuple[list[str], dict[str, str]]:
    """Split engine names (default: every registered engine but the reference) into those
    that can run here and {name: reason} for the rest."""
    if names is None:
        names = [n for n, e in sorted(registry.engines.items()) if e.role != REFERENCE]
    ok, skipped = [], {}
    for name in names:
        try:
            registry.engine(name).check(resolve_device(device))
            ok.append(name)
        except EngineUnavailable as exc:
            skipped[name] = str(exc)
    return ok, skipped
