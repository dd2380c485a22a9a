"""``seqdeploy``: a thin Click layer over the pipeline modules.

Every user-facing problem is a :class:`SeqdeployError`: one line on stderr, non-zero exit.
Set ``SEQDEPLOY_DEBUG=1`` to see tracebacks of unexpected errors.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from seqdeploy.errors import SeqdeployError
from seqdeploy.plugins import Registry, load_registry

DEFAULT_OUT = "exported"


# -- helpers ---------------------------------------------------------------------------------
def _registry(ctx: click.Context) -> Registry:
    return ctx.obj["registry"]


def _split(values: tuple[str, ...]) -> list[str]:
    """Accept both ``--engine a,b`` and ``--engine a --engine b``."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _device(ctx: click.Context) -> str:
    from seqdeploy.engines.base import resolve_device

    return resolve_device(ctx.obj["device"])


def _preset(registry: Registry, arch_name: str, preset: str | None, device: str) -> str:
    arch = registry.architecture(arch_name)
    if preset:
        arch.config(preset)  # validates the name
        return preset
    return arch.gpu_preset if device == "cuda" else arch.cpu_preset


def _artifact(ctx: click.Context, arch_name: str, preset: str | None):
    from seqdeploy.artifacts import Artifact

    registry = _registry(ctx)
    preset = _preset(registry, arch_name, preset, _device(ctx))
    artifact = Artifact.load(Path(ctx.obj["out"]) / arch_name / preset)
    found = (artifact.manifest["arch"], artifact.manifest["preset"])
    if found != (arch_name, preset):
        raise SeqdeployError(f"{artifact.dir}: the manifest says {found[0]}/{found[1]}, not "
                             f"{arch_name}/{preset}")
    from seqdeploy.pipeline import io_manifest

    artifact.check_io(io_manifest(registry.architecture(arch_name), artifact.manifest["config"]))
    return artifact


def _usable_engines(ctx: click.Context) -> list[str]:
    """Every registered engine but the reference that can run on this machine, by name."""
    from seqdeploy import pipeline

    return pipeline.engines_available(_registry(ctx), None, ctx.obj["device"])[0]


class _Progress:
    """Progress lines on stderr: a live spinner on a terminal, plain timed lines otherwise."""

    def __init__(self, title: str):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.title = title
        self.start = time.perf_counter()
        self.status = None

    def __enter__(self):
        if self.console.is_terminal:
            self.status = self.console.status(self.title)
            self.status.__enter__()
        return self

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        if self.status is not None:
            self.status.update(f"{self.title}: {message} [{elapsed:.0f}s]")
        else:
            click.echo(f"  [{elapsed:6.1f}s] {self.title}: {message}", err=True)

    def __exit__(self, *exc):
        if self.status is not None:
            self.status.__exit__(*exc)


def _echo_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="right" if c not in ("engine", "output", "case", "op") else "left")
    for r in rows:
        table.add_row(*r)
    Console(width=max(100, len(columns) * 14)).print(table)


# -- options every command takes, before or after the command name ------------------------
def _set_obj(ctx: click.Context, param: click.Parameter, value):
    if value is not None:
        ctx.ensure_object(dict)[param.name] = value
    return value


def _common(fn):
    """``--out`` and ``--device`` after the command name too (``export ten --out DIR``)."""
    fn = click.option("--out", type=click.Path(file_okay=False), expose_value=False,
                      callback=_set_obj, is_eager=True,
                      help=f"Artifact root: artifacts live in OUT/<arch>/<preset>/ "
                           f"[default: {DEFAULT_OUT}].")(fn)
    fn = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), expose_value=False,
                      callback=_set_obj, is_eager=True, help="Where engines run [default: auto].")(fn)
    return fn


def _command(*args, **kwargs):
    """A built-in command: a Click command with the common options, added to every group
    :func:`make_cli` builds (so no module-level group is ever mutated)."""
    def decorate(fn):
        cmd = click.command(*args, **kwargs)(_common(fn))
        BUILTIN_COMMANDS.append(cmd)
        return cmd

    return decorate


BUILTIN_COMMANDS: list[click.Command] = []


def make_cli() -> click.Group:
    """A fresh ``seqdeploy`` group holding the built-in commands."""

    @click.group(context_settings={"help_option_names": ["-h", "--help"]},
                 invoke_without_command=True)
    @click.option("--plugin", "plugins", multiple=True, metavar="MODULE",
                  help="Load a plugin module by name (repeatable; also SEQDEPLOY_PLUGINS).")
    @click.option("--out", default=DEFAULT_OUT, show_default=True, type=click.Path(file_okay=False),
                  help="Artifact root: artifacts live in OUT/<arch>/<preset>/.")
    @click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]),
                  show_default=True, help="Where engines run.")
    @click.version_option(package_name="seqdeploy")
    @click.pass_context
    def cli(ctx: click.Context, plugins, out, device):
        """seqdeploy: export, optimise, validate and benchmark sequence models."""
        ctx.ensure_object(dict)
        if "registry" not in ctx.obj:
            ctx.obj["registry"] = load_registry(plugins)
        ctx.obj.update(out=out, device=device)
        if ctx.invoked_subcommand is None:
            click.echo(ctx.get_help())

    for cmd in BUILTIN_COMMANDS:
        cli.add_command(cmd)
    return cli


@_command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def list_cmd(ctx, as_json):
    """Architectures, ops, engines and plugins (with any that failed to load)."""
    registry = _registry(ctx)
    data = {
        "architectures": [a.describe() for _, a in sorted(registry.architectures.items())],
        "ops": [{"name": o.name, "onnx": f"seqdeploy.{o.onnx_name}", "version": o.version}
                for _, o in sorted(registry.ops.items())],
        "engines": [{"name": e.name, "description": e.description}
                    for _, e in sorted(registry.engines.items())],
        "plugins": [{"name": p.name, "module": p.module, "source": p.source,
                     "version": p.version, "hooks": p.hooks} for p in registry.plugins],
        "failed_plugins": [{"name": f.name, "error": f.error} for f in registry.failures],
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo("architectures:")
    for a in data["architectures"]:
        click.echo(f"  {a['name']:<10} presets: {', '.join(a['presets']):<16} ops: "
                   f"{', '.join(a['ops'])}  {a['description']}")
    click.echo("engines:")
    for e in data["engines"]:
        click.echo(f"  {e['name']:<10} {e['description']}")
    click.echo("plugins:")
    for p in data["plugins"]:
        click.echo(f"  {p['name']:<10} {p['module']} ({p['source']}"
                   f"{', ' + p['version'] if p['version'] else ''})")
    for f in data["failed_plugins"]:
        click.echo(f"  {f['name']:<10} FAILED: {f['error']}")


@_command()
@click.pass_context
def doctor(ctx):
    """What is installed and usable: CUDA, Triton, ONNX Runtime providers, TensorRT."""
    import importlib.metadata as md

    import torch

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    rows = [("python", sys.version.split()[0])]
    for dist in ("torch", "triton", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
                 "tensorrt", "pluggy", "click", "safetensors"):
        rows.append((dist, version(dist)))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows.append(("cuda", f"{torch.version.cuda}: {props.name}, "
                             f"{props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"))
    else:
        rows.append(("cuda", "no CUDA device"))
    rows.append(("triton interpreter", os.environ.get("TRITON_INTERPRET", "off") or "off"))
    try:
        import onnxruntime

        rows.append(("ort providers", ", ".join(onnxruntime.get_available_providers())))
    except ImportError:
        rows.append(("ort providers", "onnxruntime is not installed"))
    registry = _registry(ctx)
    for name, engine in sorted(registry.engines.items()):
        try:
            engine.check(_device(ctx))
            state = "usable"
        except SeqdeployError as exc:
            state = f"unavailable: {exc}"
        rows.append((f"engine {name}", state))
        rows.extend(engine.doctor(_device(ctx)))
    for f in registry.failures:
        rows.append((f"plugin {f.name}", f"FAILED: {f.error}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@_command()
@click.argument("arch")
@click.option("--preset", help="Preset name (default: fits the hardware).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="safetensors weights to export (default: seeded random init).")
@click.option("--seed", default=0, show_default=True, help="Init seed when no checkpoint.")
@click.option("--streaming", is_flag=True,
              help="Also write the one-step graph model.step.onnx (x_t, state -> y_t, state').")
@click.pass_context
def export(ctx, arch, preset, checkpoint, seed, streaming):
    """Export ARCH to ONNX (fp32) with custom seqdeploy nodes and fallback functions."""
    from seqdeploy import pipeline

    registry = _registry(ctx)
    preset = _preset(registry, arch, preset, _device(ctx))
    with _Progress(f"export {arch}/{preset}") as progress:
        artifact = pipeline.export(registry, arch, preset, Path(ctx.obj["out"]),
                                   checkpoint=checkpoint, seed=seed, streaming=streaming,
                                   progress=progress)
    summary = artifact.manifest["onnx"]["model.onnx"]
    click.echo(f"exported {artifact.dir}: opset {summary['opset']}, custom nodes "
               f"{summary['custom_nodes']}, control flow in main graph: {summary['control_flow']}")


@_command()
@click.argument("arch")
@click.option("--preset")
@click.option("--fp16/--no-fp16", default=True, show_default=True,
              help="Write model.fp16.onnx under the FP16 precision policy.")
@click.pass_context
def optimize(ctx, arch, preset, fp16):
    """FP16 optimisation of an exported artifact."""
    from seqdeploy import pipeline

    artifact = _artifact(ctx, arch, preset)
    if not fp16:
        raise SeqdeployError("nothing to do: only --fp16 optimisation exists")
    with _Progress(f"optimize {arch}") as progress:
        summary = pipeline.optimize_fp16(_registry(ctx), artifact, progress=progress)
    click.echo(f"wrote {artifact.dir / 'model.fp16.onnx'}: fp32 islands {summary['fp32_islands']}")


def _validate(ctx, arch: str, preset, engines, precisions, long_seq, auto: bool = False) -> bool:
    """``auto``: the engines were not named by the user, so one that cannot run this model is
    left out (and said so) instead of failing the command."""
    from seqdeploy import pipeline

    artifact = _artifact(ctx, arch, preset)
    with _Progress(f"validate {arch}") as progress:
        result = pipeline.validate(_registry(ctx), artifact, engines, precisions,
                                   ctx.obj["device"], long_seq=long_seq, progress=progress,
                                   skip_unavailable=auto)
    for name, reason in result["skipped"].items():
        click.echo(f"{arch}: engine {name} left out: {reason}", err=True)
    rows = []
    for c in result["checks"]:
        m = c["metrics"]
        fmt = lambda v, f: "inf" if v is None else format(v, f)  # noqa: E731
        row = [c["engine"], c["precision"], c["case"], c["output"]]
        if m.get("agreement") is not None:      # an index output (a router's expert ids)
            row += ["-", "-", "-", f"{m['agreement']:.2%} agree"]
        else:
            compared = m.get("compared", 1.0)
            row += [fmt(m["max_abs"], ".2e"), fmt(m["rel_l2"], ".2e"), fmt(m["cosine"], ".7f"),
                    "all" if compared >= 1.0 else f"{compared:.2%}"]
        rows.append(row + ["PASS" if c["passed"] else "FAIL"])
    _echo_table(f"parity {arch}/{result['preset']} vs {result['reference']} ({result['device']})",
                ["engine", "prec", "case", "output", "max abs", "rel-L2", "cosine", "compared", ""],
                rows)
    for c in result["checks"]:
        if not c["passed"]:
            click.echo(f"FAIL {arch} {c['engine']} {c['precision']} {c['case']}: output "
                       f"{c['output']} diverged ({c['reason']})", err=True)
    click.echo(f"wrote {artifact.dir / 'parity.json'}")
    return result["passed"]


@_command()
@click.argument("archs", nargs=-1)
@click.option("--preset")
@click.option("--engine", "engines", multiple=True,
              help="Engines (default: every engine usable here but the reference).")
@click.option("--precision", "precisions", multiple=True, help="fp32, fp16 (default: both).")
@click.option("--long-seq", default=4096, show_default=True, type=click.IntRange(min=2),
              help="T of the long-sequence case.")
@click.pass_context
def validate(ctx, archs, preset, engines, precisions, long_seq):
    """Numerical parity of each engine against the PyTorch reference; exit 1 on any failure."""
    registry = _registry(ctx)
    archs = list(archs) or sorted(registry.architectures)
    auto = not _split(engines)
    engines = _split(engines) or _usable_engines(ctx)
    precisions = _split(precisions) or ["fp32", "fp16"]
    for p in precisions:
        if p not in ("fp32", "fp16"):
            raise SeqdeployError(f"unknown precision {p!r} (fp32 or fp16)")
    ok = all([_validate(ctx, a, preset, engines, precisions, long_seq, auto) for a in archs])
    if not ok:
        sys.exit(1)


def _bench(ctx, arch, preset, engines, precision, batch, seq_len, as_json, plot,
           auto: bool = False):
    from seqdeploy import pipeline

    registry = _registry(ctx)
    artifact = _artifact(ctx, arch, preset)
    arch_obj = registry.architecture(arch)
    config = artifact.manifest["config"]
    shapes = arch_obj.bench_shapes(config)
    if batch or seq_len:
        b0, t0 = shapes[0]
        shapes = [(batch or b0, seq_len or t0)]
    with _Progress(f"bench {arch}") as progress:
        result = pipeline.bench(registry, artifact, engines, precision, shapes,
                                ctx.obj["device"], progress=progress, skip_unavailable=auto)
    for name, reason in result["skipped"].items():
        click.echo(f"{arch}: engine {name} left out: {reason}", err=True)
    if plot:
        path = pipeline.plot_bench(artifact, result, registry.reference_engine().name)
        click.echo(f"wrote {path}", err=as_json)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    rows = [[r["engine"], f"{r['batch']}x{r['seq_len']}", f"{r['median_ms']:.3f}",
             f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['tokens_per_s']:,.0f}",
             "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:,.0f}",
             "noisy" if r["noisy"] else ""] for r in result["engines"]]
    _echo_table(f"bench {arch}/{result['preset']} {precision} on {result['gpu'] or 'CPU'}",
                ["engine", "BxT", "median ms", "p90 ms", "p99 ms", "tokens/s", "peak MiB", ""], rows)
    reference = registry.reference_engine().name
    base = {(r["batch"], r["seq_len"]): r["median_ms"] for r in result["engines"]
            if r["engine"] == reference}
    for r in result["engines"]:
        ref = base.get((r["batch"], r["seq_len"]))
        if ref and r["engine"] != reference:
            click.echo(f"  {r['engine']}: {ref / r['median_ms']:.1f}x {reference} at "
                       f"B={r['batch']} T={r['seq_len']}")
    for o in result["ops"]:
        frac = f", {100 * o['hbm_fraction']:.0f}% of HBM {result['hbm_gb_s']:.0f} GB/s" \
            if "hbm_fraction" in o else ""
        click.echo(f"  op {o['op']} {o['shape']}: {o['median_ms']:.4f} ms, {o['gb_s']:.0f} GB/s{frac}")
    click.echo(f"wrote {artifact.dir / 'bench.json'}")


@_command()
@click.argument("arch")
@click.option("--preset")
@click.option("--engine", "engines", multiple=True,
              help="Engines (default: the reference and every engine usable here).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]),
              help="Default: fp16 on CUDA, fp32 on CPU.")
@click.option("--batch", type=click.IntRange(min=1))
@click.option("--seq-len", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--plot", is_flag=True, help="Also write bench.png.")
@click.pass_context
def bench(ctx, arch, preset, engines, precision, batch, seq_len, as_json, plot):
    """Time engines side by side: tokens/s, percentiles, peak memory, op GB/s vs HBM."""
    auto = not _split(engines)
    engines = _split(engines) or [_registry(ctx).reference_engine().name, *_usable_engines(ctx)]
    precision = precision or ("fp16" if _device(ctx) == "cuda" else "fp32")
    _bench(ctx, arch, preset, engines, precision, batch, seq_len, as_json, plot, auto)


@_command()
@click.argument("arch")
@click.option("--preset")
@click.option("--inputs", "inputs_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help=".npz with one array per model input.")
@click.option("--engine", help="Default: the first engine usable here (by name), not the reference.")
@click.option("--precision", default="fp32", type=click.Choice(["fp32", "fp16"]), show_default=True)
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write outputs to this .npz (atomically).")
@click.pass_context
def predict(ctx, arch, preset, inputs_path, engine, precision, output_path):
    """Run one engine on your own inputs (checked against the model's IO first)."""
    import numpy as np
    import torch

    from seqdeploy import pipeline
    from seqdeploy.artifacts import atomic_write

    artifact = _artifact(ctx, arch, preset)
    try:
        data = np.load(inputs_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SeqdeployError(f"{inputs_path}: not a readable .npz ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise SeqdeployError(f"{inputs_path}: not an .npz archive (one array per model input)")
    with data:
        try:
            inputs = {k: torch.from_numpy(np.array(data[k])) for k in data.files}
        except (TypeError, ValueError) as exc:
            raise SeqdeployError(f"{inputs_path}: an array has an unsupported dtype ({exc})") from None
    engine = engine or next(iter(_usable_engines(ctx)), None)
    if engine is None:
        raise SeqdeployError("no engine can run here (see `seqdeploy doctor`)")
    session = pipeline.open_session(_registry(ctx), artifact, engine, precision, _device(ctx))
    outputs = session.run(inputs)
    for name, value in outputs.items():
        click.echo(f"{name}: shape {list(value.shape)} dtype {str(value.dtype)[6:]}")
    if output_path:
        arrays = {k: v.detach().cpu().numpy() for k, v in outputs.items()}
        atomic_write(output_path, lambda p: np.savez(open(p, "wb"), **arrays))
        click.echo(f"wrote {output_path}")


@_command()
@click.argument("archs", nargs=-1)
@click.option("--preset", help="Preset for every ARCH (default: fits the hardware).")
@click.option("--long-seq", default=4096, show_default=True, type=click.IntRange(min=2))
@click.option("--plot/--no-plot", default=True, show_default=True)
@click.pass_context
def run(ctx, archs, preset, long_seq, plot):
    """Every stage: export (with the one-step graph when the model streams), FP16,
    validate (every usable engine, fp32+fp16), bench."""
    from seqdeploy import pipeline

    registry = _registry(ctx)
    archs = list(archs) or sorted(registry.architectures)
    device = _device(ctx)
    engines, skipped = pipeline.engines_available(registry, None, device)
    for name, reason in skipped.items():
        click.echo(f"skipping engine {name}: {reason}", err=True)
    ok = True
    for arch in archs:
        chosen = _preset(registry, arch, preset, device)
        click.echo(f"== {arch}/{chosen} on {device}")
        streaming = bool(registry.architecture(arch).state_map)
        ctx.invoke(export, arch=arch, preset=chosen, checkpoint=None, seed=0, streaming=streaming)
        ctx.invoke(optimize, arch=arch, preset=chosen, fp16=True)
        ok = _validate(ctx, arch, chosen, engines, ["fp32", "fp16"], long_seq, auto=True) and ok
        _bench(ctx, arch, chosen, [registry.reference_engine().name, *engines],
               "fp16" if device == "cuda" else "fp32", None, None, False, plot, auto=True)
    if not ok:
        click.echo("validation failed: see the FAIL lines above", err=True)
        sys.exit(1)


# -- entry point -----------------------------------------------------------------------------
def _plugins_from_argv(argv: list[str]) -> list[str]:
    found = []
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            found.append(arg.split("=", 1)[1])
    return found


def build_cli(registry: Registry) -> click.Group:
    """A fresh group with the built-in commands, then every plugin's, added through the
    ``register_commands`` hook; a plugin whose hook raises is recorded, not fatal."""
    from seqdeploy.plugins import call_hook

    while True:   # a failing plugin may have added half its commands: start from a new group
        group = make_cli()
        failures = len(registry.failures)
        call_hook(registry, "register_commands", cli=group)
        if len(registry.failures) == failures:
            return group


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        registry = load_registry(_plugins_from_argv(argv))
        group = build_cli(registry)
        for failure in registry.failures:
            click.echo(f"warning: plugin {failure.name} failed to load: {failure.error}", err=True)
        group.main(args=argv, prog_name="seqdeploy", obj={"registry": registry},
                   standalone_mode=False)
    except SeqdeployError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:   # usage errors too: one line, not a usage block
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # an unexpected bug: one line unless debugging
        if os.environ.get("SEQDEPLOY_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"error: internal error {type(exc).__name__}: {first} "
                   f"(set SEQDEPLOY_DEBUG=1 for the traceback)", err=True)
        sys.exit(3)
