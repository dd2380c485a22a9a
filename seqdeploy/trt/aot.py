"""The AOT form of seqdeploy's TensorRT plugins: a Triton kernel's PTX embedded in the engine.

Full TensorRT >= 10.9 offers ``tensorrt.plugin`` (quickly deployable plugins): a plugin
registered with ``@register`` and given an ``@aot_impl`` hands TensorRT, at build time, the
name and PTX of one kernel, its launch parameters (grid, block, shared memory) and its extra
scalar arguments, all as symbolic expressions of the input shapes. TensorRT embeds the PTX
and launches the kernel itself, so such an engine runs with no Python at all; the Python
``IPluginV3`` form (:mod:`seqdeploy.trt.plugins`) calls back into torch on every enqueue.
TensorRT-RTX has no such API: there every node holds the Python form.

What TensorRT's AOT launch demands of a kernel, and so of an op's entry:

- one launch per node, no workspace, no cluster or cooperative launch, no Triton scratch
  memory (TensorRT passes nothing but the tensors and the scalars);
- the kernel's parameters in the order (input pointers..., int32 scalars..., output
  pointers...), every tensor dense in TensorRT's linear layout (so strides follow from the
  shapes, and the entry computes them);
- scalars are 32-bit integers only (``SymInt32``): a float attribute travels as its fp32
  bit pattern (:func:`fp32_bits`), bit-cast back in the kernel;
- plugin attributes are not serialized with an AOT implementation: whatever they decide is
  baked into the PTX (constexprs) or into the scalar expressions at build time.

An op opts in by carrying a :class:`TrtAot` in ``CustomOp.trt_aot``: its ``@triton.jit`` entry
kernel (in the plugin's ``kernels.py``, built from the plugin's own jit pieces) and one
function, :attr:`TrtAot.launch`, from input sizes, dtype, attributes and GPU to the grid,
the scalars, the constexprs and ``num_warps``. The same function serves TensorRT (sizes are
symbolic expressions) and the tests (sizes are ints, the kernel runs in Triton's
interpreter): so it may use only ``+``, ``-``, ``*``, ``//`` and :func:`cdiv` on sizes, and
:meth:`Sizes.constant` for a size the model fixes (a width such as K or H). An op whose
fastest kernel needs a workspace or several launches (a decoupled look-back, a grouped
GEMM's routing pass) either has a workspace-free entry of its own or keeps the Python form;
:func:`plugin_forms` says which form each op's nodes hold, and the builder records it per
node.

Triton >= 3.3 appends hidden parameters (global and profile scratch pointers) to every
kernel. TensorRT launches with exactly inputs + scalars + outputs arguments, and the driver
would read the missing ones past the end of TensorRT's argument array. A kernel that needs
no scratch memory never reads them, so :func:`strip_hidden_params` removes them from the
PTX entry, after checking that the body never names them; a kernel that does need scratch
is refused (:func:`compile_entry`).

Never run here: the registration with ``tensorrt.plugin`` (``_register_one``, which
:func:`register_aot_plugins` calls only where :func:`aot_unavailable` finds the API) and the
engines it builds need full TensorRT, which these machines cannot install; nor has an entry
kernel run on a GPU. Everything before it (the entry kernels in Triton's interpreter with
their declared launches against the float64 references, their PTX, the skip under
TensorRT-RTX, the per-node forms in the build report) is tested in CI.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import struct
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    from seqdeploy.ops import CustomOp
    from seqdeploy.trt.adapter import TensorRT

#: a size: an int (tests, the interpreter) or a symbolic expression (a TensorRT build)
Size = Any

#: Triton element types of the ONNX element types seqdeploy's nodes use
TRITON_TYPES = {"tensor(float)": "fp32", "tensor(float16)": "fp16", "tensor(bfloat16)": "bf16",
                "tensor(int64)": "i64", "tensor(int32)": "i32", "tensor(int8)": "i8",
                "tensor(uint8)": "u8", "tensor(bool)": "i1"}

FORM_AOT = "aot"
FORM_PYTHON = "python"


def cdiv(a: Size, b: int) -> Size:
    """``ceil(a / b)`` for a size ``a`` and a positive int ``b`` (int or symbolic)."""
    return (a + (b - 1)) // b


def fp32_bits(value: float) -> int:
    """The bit pattern of ``value`` rounded to fp32, as a signed int32 (a float attribute as
    a TensorRT AOT scalar, which is an integer; the kernel bit-casts it back)."""
    return struct.unpack("<i", struct.pack("<f", float(value)))[0]


class Sizes(Protocol):
    """Sizes of a node's inputs, by input name and axis."""

    def __call__(self, tensor: str, axis: int) -> Size:
        """The size (int, or symbolic in a TensorRT build)."""

    def constant(self, tensor: str, axis: int) -> int:
        """The size as an int; raises :class:`AotError` where it is not a build-time
        constant (a constexpr may depend only on sizes the model fixes)."""


class AotError(ValueError):
    """An op's AOT entry cannot serve this node (a size that must be constant is not, a
    kernel needs scratch memory, a parameter count does not match)."""


@dataclass(frozen=True)
class ShapeSizes:
    """:class:`Sizes` of concrete shapes: ``{input name: shape}``."""

    shapes: Mapping[str, Sequence[int]]

    def __call__(self, tensor: str, axis: int) -> int:
        return int(self.shapes[tensor][axis])

    def constant(self, tensor: str, axis: int) -> int:
        return int(self.shapes[tensor][axis])


@dataclass(frozen=True)
class LaunchQuery:
    """What an entry's launch depends on: the node's input ``sizes``, ``dtype`` (the Triton
    type of the op's type parameter ``T``: ``fp32``/``fp16``/``bf16``; of the first input where
    the schema pins every position), its ``attributes`` (ONNX attribute name -> value) and
    the GPU's compute ``capability`` (None: Triton's interpreter, which lacks inline PTX)."""

    sizes: Sizes
    dtype: str
    attributes: Mapping[str, Any]
    capability: tuple[int, int] | None

    @property
    def torch_dtype(self):
        """``dtype`` as a torch dtype (for the plugins' own tile choosers)."""
        from seqdeploy.precision import TORCH_DTYPES

        return TORCH_DTYPES[self.dtype]


@dataclass(frozen=True)
class EntryLaunch:
    """One launch of an entry kernel: ``grid`` (1 to 3 sizes), ``scalars`` (the values of the
    entry's scalar parameters, in order: sizes or ints), ``constexprs`` (every constexpr
    parameter by name) and ``num_warps``."""

    grid: tuple[Size, ...]
    scalars: tuple[Size, ...]
    constexprs: Mapping[str, Any]
    num_warps: int


@dataclass(frozen=True)
class TrtAot:
    """An op's AOT entry for TensorRT (``CustomOp.trt_aot``).

    - ``kernel``: ``"package.module:function"`` of the ``@triton.jit`` entry; its non-constexpr
      parameters are the op's inputs (schema order), then ``scalars``, then its outputs;
    - ``scalars``: the names of the scalar parameters (int32), in order;
    - ``launch``: :class:`LaunchQuery` -> :class:`EntryLaunch` (see the module docstring for
      what it may do with sizes);
    - ``output_shapes``: :class:`Sizes` -> one shape (tuple of sizes) per output, in schema
      order (TensorRT asks for them before any kernel exists);
    - ``dtypes``: the Triton types of ``T`` the entry serves (seqdeploy's graphs: fp32, fp16).
    """

    kernel: str
    scalars: tuple[str, ...]
    launch: Callable[[LaunchQuery], EntryLaunch]
    output_shapes: Callable[[Sizes], tuple[tuple[Size, ...], ...]]
    dtypes: tuple[str, ...] = ("fp32", "fp16")

    def entry(self):
        """The entry kernel (imported now)."""
        module, name = self.kernel.split(":")
        return getattr(importlib.import_module(module), name)

    def digest(self) -> str:
        """sha256 of what the embedded PTX comes from: the entry's package sources (the entry
        calls the plugin's other jit functions) and the Triton version; an AOT engine bakes
        the kernel in, so the engine cache key carries this."""
        import hashlib
        import importlib.metadata
        import importlib.util
        from pathlib import Path

        spec = importlib.util.find_spec(self.kernel.split(":")[0])
        h = hashlib.sha256(self.kernel.encode())
        for path in sorted(Path(spec.origin).parent.glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        try:
            h.update(importlib.metadata.version("triton").encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(b"no-triton")
        return h.hexdigest()


@dataclass(frozen=True)
class AotPlan:
    """Everything one node's AOT kernel needs: the entry, its Triton ``signature`` (every
    non-constexpr parameter by name: ``*fp32``-style pointers, ``i32`` scalars), the
    ``launch``, the ``output_shapes`` and the per-position Triton types of the outputs."""

    entry: TrtAot
    signature: dict[str, str]
    launch: EntryLaunch
    output_shapes: tuple[tuple[Size, ...], ...]
    n_inputs: int
    n_outputs: int

    @property
    def n_args(self) -> int:
        return len(self.signature)


def entry_parameters(kernel) -> tuple[list[str], list[str]]:
    """``(runtime parameter names, constexpr names)`` of a ``@triton.jit`` kernel, in order
    (also for the interpreter's wrapped kernels)."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    runtime, constexprs = [], []
    for name, p in inspect.signature(fn).parameters.items():
        note = p.annotation
        text = note if isinstance(note, str) else getattr(note, "__name__", repr(note))
        (constexprs if text.endswith("constexpr") else runtime).append(name)
    return runtime, constexprs


def type_parameter(op: "CustomOp", io_types: Sequence[str]) -> str:
    """The Triton type of the op's type parameter ``T`` in this node (``io_types``: one Triton
    type per input then output position); the first input's where no position is ``T``."""
    from seqdeploy.trt.plugins import io_positions

    inputs, outputs = io_positions(op)
    for p, t in zip([*inputs, *outputs], io_types):
        if p.is_param:
            return t
    return io_types[0]


def plan(op: "CustomOp", sizes: Sizes, io_types: Sequence[str], attributes: Mapping[str, Any],
         capability: tuple[int, int] | None) -> AotPlan:
    """The :class:`AotPlan` of a node of ``op`` (which must carry ``trt_aot``): ``io_types``
    gives each input and output position's Triton type (``fp32``, ``fp16``, ``i64`` ...).
    Checks that the entry's parameters are inputs + scalars + outputs."""
    from seqdeploy.trt.plugins import io_positions

    entry = op.trt_aot
    if entry is None:
        raise AotError(f"{op.onnx_name} has no AOT entry (it keeps the Python plugin form)")
    inputs, outputs = io_positions(op)
    if len(io_types) != len(inputs) + len(outputs):
        raise AotError(f"{op.onnx_name}: {len(io_types)} types for "
                       f"{len(inputs) + len(outputs)} positions")
    dtype = type_parameter(op, io_types)
    if dtype not in entry.dtypes:
        raise AotError(f"{op.onnx_name}: the AOT entry serves {entry.dtypes}, not {dtype}")
    runtime, _ = entry_parameters(entry.entry())
    want = len(inputs) + len(entry.scalars) + len(outputs)
    if len(runtime) != want:
        raise AotError(f"{entry.kernel}: {len(runtime)} runtime parameters, expected {want} "
                       f"(inputs {len(inputs)} + scalars {len(entry.scalars)} + outputs "
                       f"{len(outputs)})")
    scalar_names = runtime[len(inputs):len(inputs) + len(entry.scalars)]
    if tuple(scalar_names) != tuple(entry.scalars):
        raise AotError(f"{entry.kernel}: scalar parameters {scalar_names}, declared "
                       f"{list(entry.scalars)}")
    kinds = ([f"*{t}" for t in io_types[:len(inputs)]] + ["i32"] * len(entry.scalars)
             + [f"*{t}" for t in io_types[len(inputs):]])
    launch = entry.launch(LaunchQuery(sizes, dtype, dict(attributes), capability))
    if len(launch.scalars) != len(entry.scalars) or not 1 <= len(launch.grid) <= 3:
        raise AotError(f"{entry.kernel}: launch gave {len(launch.scalars)} scalars for "
                       f"{len(entry.scalars)} and a grid of {len(launch.grid)} axes")
    shapes = tuple(tuple(s) for s in entry.output_shapes(sizes))
    if len(shapes) != len(outputs):
        raise AotError(f"{entry.kernel}: {len(shapes)} output shapes for {len(outputs)} outputs")
    return AotPlan(entry, dict(zip(runtime, kinds)), launch, shapes, len(inputs), len(outputs))


def node_io_types(op: "CustomOp", float_type: str) -> list[str]:
    """Each position's Triton type in a graph whose type parameter is ``float_type``
    (``"fp32"`` or ``"fp16"``): pinned positions keep their schema type."""
    from seqdeploy.trt.plugins import io_positions

    inputs, outputs = io_positions(op)
    return [float_type if p.is_param else TRITON_TYPES[p.type_str] for p in [*inputs, *outputs]]


# -- PTX ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompiledEntry:
    """An entry kernel compiled for one node: its PTX ``.entry`` ``name``, the ``ptx`` with
    Triton's hidden parameters removed, ``params`` (its parameter count now, = inputs +
    scalars + outputs), ``hidden`` (how many Triton had appended), ``shared`` (bytes of
    dynamic shared memory) and ``num_warps``."""

    name: str
    ptx: str
    params: int
    hidden: int
    shared: int
    num_warps: int


def strip_hidden_params(ptx: str, keep: int) -> tuple[str, int]:
    """``(ptx, removed)``: the PTX with every ``.entry`` parameter after the first ``keep``
    removed. Refuses (:class:`AotError`) when there is not exactly one entry, when it has
    fewer than ``keep`` parameters, or when the body names a removed parameter (the kernel
    would read an argument TensorRT does not pass)."""
    from seqdeploy.ort_native.aot import entry_match

    try:
        m = entry_match(ptx)
    except ValueError as exc:
        raise AotError(str(exc)) from None
    params = [p.strip() for p in m.group(2).split(",") if p.strip()]
    if len(params) < keep:
        raise AotError(f"PTX entry {m.group(1)} has {len(params)} parameters, fewer than the "
                       f"{keep} arguments TensorRT passes (a specialised argument was dropped)")
    removed = params[keep:]
    body = ptx[:m.start()] + ptx[m.end():]
    for p in removed:
        name = p.split()[-1]
        if re.search(rf"\b{re.escape(name)}\b", body):
            raise AotError(f"PTX entry {m.group(1)} reads its hidden parameter {name}: the "
                           f"kernel needs Triton scratch memory, which TensorRT does not pass")
    kept = ",\n\t".join(params[:keep])
    text = ptx[:m.start(2)] + "\n\t" + kept + "\n" + ptx[m.end(2):]
    return text, len(removed)


@contextlib.contextmanager
def _ptx_stage_only() -> Iterator[None]:
    """Within this block Triton stops at PTX (its binary stage keeps the PTX instead of
    running ptxas: TensorRT JIT-compiles PTX itself, and ptxas takes minutes on large tiles
    on a 2-core machine)."""
    from triton import knobs

    from seqdeploy.ort_native.aot import ptx_only

    before = knobs.runtime.add_stages_inspection_hook
    knobs.runtime.add_stages_inspection_hook = ptx_only
    try:
        yield
    finally:
        knobs.runtime.add_stages_inspection_hook = before


def compile_entry(aot: AotPlan, arch: int) -> CompiledEntry:
    """Compile ``aot``'s entry to PTX for ``sm_<arch>`` (no GPU needed; not under
    ``TRITON_INTERPRET=1``, which replaces the kernels). No specialisation hints, so every
    argument stays a parameter; the PTX ISA version is the ORT library's (8.0), which older
    drivers load. Refuses a kernel that needs Triton scratch memory, a cluster or a
    cooperative launch."""
    from seqdeploy.ort_native.aot import compile_ptx, entry_params

    with _ptx_stage_only():
        try:
            compiled = compile_ptx(aot.entry.entry(), aot.signature, dict(aot.launch.constexprs),
                                   arch, aot.launch.num_warps)
        except ValueError as exc:
            raise AotError(f"{aot.entry.kernel}: {exc}, which TensorRT's AOT launch does not "
                           f"provide") from None
    md = compiled.metadata
    ptx, hidden = strip_hidden_params(compiled.asm["ptx"], aot.n_args)
    name = entry_params(ptx)[0]
    return CompiledEntry(name, ptx, aot.n_args, hidden, int(md.shared), int(md.num_warps))


# -- TensorRT ----------------------------------------------------------------------------------
def aot_unavailable(rt: "TensorRT") -> str | None:
    """Why this TensorRT takes no AOT plugins (None where it does)."""
    if rt.has_aot_plugins:
        return None
    if rt.is_rtx:
        return (f"{rt.describe()} has no tensorrt.plugin AOT API (AOT plugins need full "
                f"TensorRT >= 10.9)")
    return f"{rt.describe()} has no tensorrt.plugin module (AOT plugins need TensorRT >= 10.9)"


def plugin_forms(rt: "TensorRT", ops: Sequence["CustomOp"]) -> dict[str, str]:
    """``{onnx_name: "aot" | "python"}``: the form each op's nodes take in engines built with
    ``rt``. AOT where this TensorRT offers it and the op has an entry; else the Python
    ``IPluginV3`` (TensorRT-RTX; and ops whose computation needs a workspace or several
    launches)."""
    aot = aot_unavailable(rt) is None
    return {op.onnx_name: FORM_AOT if aot and op.trt_aot is not None else FORM_PYTHON
            for op in ops}


#: (TensorRT module, onnx name) -> True once registered with tensorrt.plugin in this process
_REGISTERED: dict[tuple[str, str], bool] = {}


def register_aot_plugins(rt: "TensorRT", ops: Sequence["CustomOp"]) -> dict[str, str]:
    """Register the AOT plugin of every op in ``ops`` that has an entry, through
    ``tensorrt.plugin`` (imported only here); returns ``{onnx_name: "registered" |
    "skipped: <why>" | "error: <why>"}``. Where this TensorRT has no AOT API (TensorRT-RTX)
    every such op is ``skipped`` with the reason, and nothing is imported. Never run: no
    machine here has full TensorRT."""
    why = aot_unavailable(rt)
    state = {}
    for op in ops:
        if op.trt_aot is None:
            continue
        if why is not None:
            state[op.onnx_name] = f"skipped: {why}"
            continue
        key = (rt.trt.__name__, op.onnx_name)
        if key in _REGISTERED:
            state[op.onnx_name] = "registered"
            continue
        try:
            _register_one(rt, op)
        except Exception as exc:   # one op's failure must not hide the others
            state[op.onnx_name] = f"error: {type(exc).__name__}: {exc}"
            continue
        _REGISTERED[key] = True
        state[op.onnx_name] = "registered"
    return state


def registered_creators(rt: "TensorRT") -> list:
    """TensorRT's creators of the AOT plugins registered in this process (for
    :class:`seqdeploy.trt.plugins.suspended`)."""
    from seqdeploy.ops import PLUGIN_NAMESPACE, PLUGIN_VERSION

    registry = rt.trt.get_plugin_registry()
    found = []
    for module, name in _REGISTERED:
        if module == rt.trt.__name__:
            creator = registry.get_creator(name, PLUGIN_VERSION, PLUGIN_NAMESPACE)
            if creator is not None:
                found.append(creator)
    return found


class _Sym:
    """A TensorRT ``ShapeExpr`` with int arithmetic on both sides (TensorRT's own takes an
    int only on the right), so an op's launch code reads the same for ints and expressions."""

    def __init__(self, expr, shape_expr_cls):
        self.expr, self._cls = expr, shape_expr_cls

    def _wrap(self, v):
        return v.expr if isinstance(v, _Sym) else self._cls(int(v))

    def _binary(self, other, fn):
        return _Sym(fn(self.expr, self._wrap(other)), self._cls)

    def _reflected(self, other, fn):
        return _Sym(fn(self._wrap(other), self.expr), self._cls)

    def __add__(self, o):
        return self._binary(o, lambda a, b: a + b)

    def __radd__(self, o):
        return self._reflected(o, lambda a, b: a + b)

    def __sub__(self, o):
        return self._binary(o, lambda a, b: a - b)

    def __rsub__(self, o):
        return self._reflected(o, lambda a, b: a - b)

    def __mul__(self, o):
        return self._binary(o, lambda a, b: a * b)

    def __rmul__(self, o):
        return self._reflected(o, lambda a, b: a * b)

    def __floordiv__(self, o):
        return self._binary(o, lambda a, b: a // b)

    def __rfloordiv__(self, o):
        return self._reflected(o, lambda a, b: a // b)


@dataclass
class _TrtSizes:
    """:class:`Sizes` of a TensorRT plugin's input ``TensorDesc``\\ s."""

    names: Sequence[str]
    descs: Sequence[Any]
    shape_expr_cls: Any
    _index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self._index = {n: i for i, n in enumerate(self.names)}

    def __call__(self, tensor: str, axis: int) -> _Sym:
        return _Sym(self.descs[self._index[tensor]].shape_expr[axis], self.shape_expr_cls)

    def constant(self, tensor: str, axis: int) -> int:
        expr = self.descs[self._index[tensor]].shape_expr[axis]
        if getattr(expr, "is_fake", False) or not expr.is_constant:
            raise AotError(f"{tensor} axis {axis} must be a build-time constant for the AOT "
                           f"plugin (its kernel is compiled for that size)")
        return int(expr.constant_value())


def _unwrap(v):
    return v.expr if isinstance(v, _Sym) else v


_ATTR_TYPES = {"FLOAT": float, "INT": int, "STRING": str}


def _register_one(rt: "TensorRT", op: "CustomOp") -> None:
    """``@register`` and ``@aot_impl`` for ``op`` (functions given the typed signatures
    ``tensorrt.plugin`` inspects). Never run here (no full TensorRT)."""
    import torch

    from seqdeploy.ops import PLUGIN_NAMESPACE
    from seqdeploy.trt.plugins import io_positions, node_attributes, trt_dtype

    trt = rt.trt
    trtp = importlib.import_module(f"{trt.__name__}.plugin")
    inputs, outputs = io_positions(op)
    in_names = [p.name for p in inputs]
    attr_names = node_attributes(op)
    attr_types = {a: _ATTR_TYPES[str(op.schema.attributes[a].type).rsplit(".", 1)[-1]]
                  for a in attr_names}
    to_triton = {trt.DataType.FLOAT: "fp32", trt.DataType.HALF: "fp16",
                 trt.DataType.BF16: "bf16", trt.DataType.INT64: "i64",
                 trt.DataType.INT32: "i32"}
    fixed = {i: trt_dtype(trt, p.type_str) for i, p in enumerate(outputs) if not p.is_param}
    like = {i: next(j for j, q in enumerate(inputs) if q.type_str == p.type_str)
            for i, p in enumerate(outputs) if p.is_param}
    plugin_id = f"{PLUGIN_NAMESPACE}::{op.onnx_name}"
    P = inspect.Parameter
    tensor_params = [P(n, P.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc) for n in in_names]
    attr_params = [P(a, P.POSITIONAL_OR_KEYWORD, annotation=attr_types[a]) for a in attr_names]
    out_tuple = typing.Tuple[tuple([trtp.TensorDesc] * len(outputs))]

    def describe(*descs, **attrs):
        sizes = _TrtSizes(in_names, descs, trtp.ShapeExpr)
        shapes = op.trt_aot.output_shapes(sizes)
        result = []
        for i, shape in enumerate(shapes):
            dtype = fixed[i] if i in fixed else descs[like[i]].dtype
            result.append(trtp.from_shape_expr(tuple(_unwrap(s) for s in shape), dtype=dtype))
        return tuple(result)

    describe.__signature__ = inspect.Signature(tensor_params + attr_params,
                                               return_annotation=out_tuple)
    describe.__name__ = f"{op.onnx_name}_describe"

    def aot_impl(*args):
        # TensorRT passes the attributes positionally, in the order of the plugin's fields
        # (the register signature's); seqdeploy's ops have at most one
        descs = args[:len(in_names)]
        attrs = dict(zip(attr_names, args[len(in_names):len(in_names) + len(attr_names)]))
        out_descs = args[len(in_names) + len(attr_names)]
        io_types = [to_triton[d.dtype] for d in (*descs, *out_descs)]
        major, minor = torch.cuda.get_device_capability()
        sizes = _TrtSizes(in_names, descs, trtp.ShapeExpr)
        node = plan(op, sizes, io_types, attrs, (major, minor))
        compiled = compile_entry(node, 10 * major + minor)
        params = trtp.KernelLaunchParams()
        grid = [_unwrap(g) for g in node.launch.grid] + [1] * (3 - len(node.launch.grid))
        params.grid_x, params.grid_y, params.grid_z = grid
        params.block_x = compiled.num_warps * 32
        params.shared_mem = compiled.shared
        extra = trtp.SymIntExprs(len(node.launch.scalars))
        for i, value in enumerate(node.launch.scalars):
            extra[i] = trtp.SymInt32(_unwrap(value))
        return compiled.name, compiled.ptx, params, extra

    aot_impl.__signature__ = inspect.Signature(
        tensor_params + attr_params
        + [P("outputs", P.POSITIONAL_OR_KEYWORD, annotation=out_tuple),
           P("tactic", P.POSITIONAL_OR_KEYWORD, annotation=int)],
        return_annotation=typing.Tuple[typing.Union[str, bytes], typing.Union[str, bytes],
                                       trtp.KernelLaunchParams, trtp.SymIntExprs])
    aot_impl.__name__ = f"{op.onnx_name}_aot_impl"
    trtp.register(plugin_id)(describe)
    trtp.aot_impl(plugin_id)(aot_impl)
