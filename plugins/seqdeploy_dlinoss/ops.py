"""``seqdeploy::linoss_scan``: the damped oscillator recurrence of D-LinOSS (IMEX form).

Layout: ``b_re, b_im [B, T, P]`` (``B u_t``, dtype fp32/fp16/bf16), ``A, G, dt [P]`` (fp32,
already in the stable band: the model clamps ``A``), ``state0 [B, P, 4]`` fp32 holding
``(z_re, z_im, x_re, x_im)``. Returns ``x_re, x_im [B, T, P]`` in the dtype of ``b_re`` and
``stateT [B, P, 4]`` fp32 (the state after step T-1, same layout as ``state0``).

    S = 1 + dt G,   z_t = (z_{t-1} - dt A x_{t-1} + dt b_t) / S,   x_t = x_{t-1} + dt z_t

applied alike to the real and the imaginary part. Equivalently ``w_t = M w_{t-1} + c b_t``
with ``w = (z, x)``, ``M = [[1/S, -dt A/S], [dt/S, 1 - dt^2 A/S]]``, ``c = (dt/S, dt^2/S)``.

Forms, side by side: ``naive_linoss_scan`` (float64 loop in the (z, x) update form, tests
only), ``reference_linoss_scan`` (fp32 step loop, the ``torch-ref`` engine),
``vectorised_linoss_scan`` (chunked closed form, the CPU kernel), the Triton kernel
(``kernels.py``, the CUDA kernel) and the ONNX Runtime kernels (``ort_linoss_scan.cc``: a C++
step loop, and the same Triton kernels compiled ahead of time).

Accuracy near the unit circle. ``det M = 1/S``, so inside the band the eigenvalues of M have
modulus ``1/sqrt(S)``, which tends to 1 as ``dt G -> 0``; at the band's edges they coincide
(a Jordan block near +1 or -1). No form here ever forms a negative power of M. An error made
at step s reaches step t through ``M^(t-s)``, so the error at T is about
``u * sum_{k<T} ||M^k||`` times the size of the state (u: fp32 unit roundoff):

- eigenvalues well separated: ``||M^k||`` stays bounded, the error grows linearly in T
  (checked: about 4x from T = 4096 to 16384);
- eigenvalues nearly repeated (A within ~1e-3 of the band's width from A_lo or A_hi):
  ``||M^k||`` grows like k until the damping time ``1/(1 - |lambda|)``, and the rounding of
  M's entries themselves moves the double root, so the error grows faster than linearly (up
  to T^2) until then. This is the conditioning of the fp32 problem, shared by every fp32
  form: measured as ``kappa = rel-L2 / (u T)`` against the float64 loop at T = 16384 with
  ``dt G = 1e-6``: 4.3 for the chunked CPU form, 7-11 for the fp32 step loop, about 32 for
  the kernel's per-step form (float64-computed M rounded once to fp32).

The chunked CPU form computes ``M^d`` (d <= chunk) in float64 and rounds each once; the
Triton kernels (three designs, ``kernels.py``) walk every tile step by step from the state
entering it (the scan designs fold that state into the tile's first step, the loop design
runs the IMEX step ``z' = m00 z + m01 x + c0 b``, ``x' = x + dt z'`` in order), so no power
of M ever multiplies a state except in the chunk designs' look-back across unfinished
chunks, which applies ``Q = M^BLOCK_T = a I + b M`` once per chunk it crosses (``a, b``
float64, rounded once).
``tests/test_dlinoss_scan.py`` checks all of this.
"""
from __future__ import annotations

import torch

from seqdeploy.ops import CustomOp, define_op

CHUNK = 64  # vectorised CPU form: relative powers M^d, 0 <= d <= CHUNK, within one chunk


def transition(A: torch.Tensor, G: torch.Tensor, dt: torch.Tensor, dtype=torch.float32):
    """``(m00, m01, m10, m11, c0, c1)``, each ``[P]`` in ``dtype``: the time-invariant 2x2
    transition M and the input column c (see the module docstring)."""
    A, G, dt = A.to(dtype), G.to(dtype), dt.to(dtype)
    inv = 1.0 / (1.0 + dt * G)
    return inv, -dt * A * inv, dt * inv, 1.0 - dt * dt * A * inv, dt * inv, dt * dt * inv


def stable_band(G: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_lo, A_hi)``: ``A`` in this band keeps the eigenvalues of M complex, modulus
    ``1/sqrt(1 + dt G)``."""
    s = dt * G
    root = 2.0 * torch.sqrt(1.0 + s)
    return (2.0 + s - root) / (dt * dt), (2.0 + s + root) / (dt * dt)


def naive_linoss_scan(b_re, b_im, A, G, dt, state0):
    """Float64 loop in the (z, x) update form, written independently of the kernels.
    Returns ``(x_re, x_im, stateT)`` in float64."""
    A, G, dt = A.double(), G.double(), dt.double()
    S = 1.0 + dt * G
    z = [state0[..., 0].double(), state0[..., 1].double()]
    x = [state0[..., 2].double(), state0[..., 3].double()]
    b = [b_re.double(), b_im.double()]
    xs = [[], []]
    for t in range(b_re.shape[1]):
        for part in (0, 1):
            z[part] = (z[part] - dt * A * x[part] + dt * b[part][:, t]) / S
            x[part] = x[part] + dt * z[part]
            xs[part].append(x[part])
    state = torch.stack([z[0], z[1], x[0], x[1]], dim=-1)
    if not xs[0]:
        empty = torch.empty(b_re.shape, dtype=torch.float64)
        return empty, empty.clone(), state
    return torch.stack(xs[0], 1), torch.stack(xs[1], 1), state


def reference_linoss_scan(b_re, b_im, A, G, dt, state0):
    """The step loop a user would write: fp32 state, one step per time index."""
    A, G, dt = A.float(), G.float(), dt.float()
    S = 1.0 + dt * G
    zr, zi, xr, xi = (state0[..., k].float() for k in range(4))
    br, bi = b_re.float(), b_im.float()
    out_re, out_im = [], []
    for t in range(b_re.shape[1]):
        zr = (zr - dt * A * xr + dt * br[:, t]) / S
        zi = (zi - dt * A * xi + dt * bi[:, t]) / S
        xr = xr + dt * zr
        xi = xi + dt * zi
        out_re.append(xr)
        out_im.append(xi)
    state = torch.stack([zr, zi, xr, xi], dim=-1)
    if not out_re:
        return torch.empty_like(b_re), torch.empty_like(b_im), state
    return (torch.stack(out_re, 1).to(b_re.dtype), torch.stack(out_im, 1).to(b_re.dtype), state)


def _powers(A, G, dt, n: int) -> torch.Tensor:
    """``M^d`` for d = 0..n as ``[n + 1, P, 2, 2]`` fp32, by repeated multiplication in
    float64 (relative powers only; never a negative power)."""
    m00, m01, m10, m11, _, _ = transition(A, G, dt, torch.float64)
    M = torch.stack([torch.stack([m00, m01], -1), torch.stack([m10, m11], -1)], -2)  # [P,2,2]
    out = [torch.eye(2, dtype=torch.float64).expand_as(M)]
    for _ in range(n):
        out.append(M @ out[-1])
    return torch.stack(out).float()


def vectorised_linoss_scan(b_re, b_im, A, G, dt, state0, chunk: int = CHUNK):
    """Chunked closed form. Within a chunk starting at t0, for t0 <= t < t0 + C:

        w_t = sum_{t0 <= s <= t} M^(t-s) c b_s + M^(t-t0+1) w_{t0-1}

    Only relative powers ``M^d``, ``0 <= d <= C``, are formed, as one Toeplitz matrix
    ``[P, C, C]`` per row of M c; each chunk is then a batched matmul over P with the real
    and imaginary parts side by side. The state carried between chunks is fp32.
    """
    B, T, P = b_re.shape
    state = state0.float().clone()
    x_re = torch.empty(B, T, P, dtype=torch.float32)
    x_im = torch.empty(B, T, P, dtype=torch.float32)
    if T == 0:
        return x_re.to(b_re.dtype), x_im.to(b_re.dtype), state
    C = min(chunk, T)
    pw = _powers(A, G, dt, C)                             # [C+1, P, 2, 2]
    *_, c0, c1 = transition(A, G, dt)
    kern = pw[:C] @ torch.stack([c0, c1], -1)[None, :, :, None]   # M^d c: [C, P, 2, 1]
    idx = torch.arange(C)
    diff = idx[:, None] - idx[None, :]                    # t - s
    causal = (diff >= 0).float()
    toeplitz = kern[diff.clamp(min=0), :, :, 0] * causal[..., None, None]   # [C, C, P, 2]
    L_z = toeplitz[..., 0].permute(2, 0, 1)               # [P, C, C]
    L_x = toeplitz[..., 1].permute(2, 0, 1)
    br, bi = b_re.float(), b_im.float()
    for t0 in range(0, T, C):
        n = min(C, T - t0)
        u = torch.cat([br[:, t0:t0 + n], bi[:, t0:t0 + n]], 0).permute(2, 1, 0)   # [P, n, 2B]
        x_loc = torch.bmm(L_x[:, :n, :n], u)              # [P, n, 2B]
        z_end = torch.bmm(L_z[:, n - 1:n, :n], u)[:, 0]   # [P, 2B]
        # the carried state: (z, x) per part, as [P, 2B] with re rows then im rows
        z0 = torch.cat([state[..., 0], state[..., 1]], 0).T
        x0 = torch.cat([state[..., 2], state[..., 3]], 0).T
        p = pw[1:n + 1]                                   # M^(t-t0+1): [n, P, 2, 2]
        x_all = x_loc + p[:, :, 1, 0].T[:, :, None] * z0[:, None] + p[:, :, 1, 1].T[:, :, None] * x0[:, None]
        z_last = z_end + p[-1, :, 0, 0][:, None] * z0 + p[-1, :, 0, 1][:, None] * x0
        x_all = x_all.permute(2, 1, 0)                    # [2B, n, P]
        x_re[:, t0:t0 + n], x_im[:, t0:t0 + n] = x_all[:B], x_all[B:]
        z_last = z_last.T
        state = torch.stack([z_last[:B], z_last[B:], x_all[:B, -1], x_all[B:, -1]], -1)
    return x_re.to(b_re.dtype), x_im.to(b_re.dtype), state


def check_args(b_re, b_im, A, G, dt, state0) -> None:
    """One-line errors for shapes and dtypes the op does not take."""
    if b_re.dim() != 3 or b_re.shape != b_im.shape:
        raise ValueError(f"linoss_scan: b_re and b_im must be [B, T, P] alike, got "
                         f"{list(b_re.shape)} and {list(b_im.shape)}")
    B, T, P = b_re.shape
    if b_re.dtype != b_im.dtype or b_re.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"linoss_scan: b_re/b_im must share a float dtype (fp32/fp16/bf16), got "
                         f"{b_re.dtype} and {b_im.dtype}")
    for name, v in (("A", A), ("G", G), ("dt", dt)):
        if tuple(v.shape) != (P,) or v.dtype != torch.float32:
            raise ValueError(f"linoss_scan: {name} must be [P] = [{P}] float32, got "
                             f"{list(v.shape)} {v.dtype}")
    if tuple(state0.shape) != (B, P, 4) or state0.dtype != torch.float32:
        raise ValueError(f"linoss_scan: state0 must be [B, P, 4] = [{B}, {P}, 4] float32, got "
                         f"{list(state0.shape)} {state0.dtype}")


def cpu_linoss_scan(b_re: torch.Tensor, b_im: torch.Tensor, A: torch.Tensor, G: torch.Tensor,
                    dt: torch.Tensor, state0: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU (and any non-CUDA device): the vectorised chunked form."""
    check_args(b_re, b_im, A, G, dt, state0)
    device = b_re.device
    args = [a.cpu() for a in (b_re, b_im, A, G, dt, state0)]
    x_re, x_im, state = vectorised_linoss_scan(*args)
    return x_re.to(device), x_im.to(device), state.to(device)


def fake_linoss_scan(b_re, b_im, A, G, dt, state0):
    B, _, P = b_re.shape
    return (torch.empty_like(b_re, memory_format=torch.contiguous_format),
            torch.empty_like(b_re, memory_format=torch.contiguous_format),
            b_re.new_empty((B, P, 4), dtype=torch.float32))


INPUTS = ("b_re", "b_im", "A", "G", "dt", "state0")
OUTPUTS = ("x_re", "x_im", "stateT")
#: positions that are always fp32 (the rest are type T: fp32, fp16 or bf16)
FLOAT32_INPUTS = ("A", "G", "dt", "state0")
FLOAT32_OUTPUTS = ("stateT",)


def _ort_variants(kernel: str):
    """The AOT variants of one of the two scan-based Triton kernels: ``kernels.ORT_TILE``
    (the CUDA form masks partial tiles, so one tile serves every shape)."""
    def variants(dtype: str) -> dict:
        from seqdeploy_dlinoss.kernels import ORT_TILE

        block_t, block_p, num_warps = ORT_TILE
        constexprs = {"BLOCK_T": block_t, "BLOCK_P": block_p}
        if kernel == "chunk":
            constexprs["LOG2_T"] = block_t.bit_length() - 1
        return {f"t{block_t}p{block_p}": (constexprs, num_warps)}
    return variants


def ort_kernel():
    """The ONNX Runtime kernels (``ort_linoss_scan.cc``): a CPU step loop, and on CUDA this
    plugin's rows and chunk Triton kernels compiled ahead of time (no scratch, no clusters),
    chosen per shape by the rule of ``kernels.ROWS_PER_SM``."""
    from seqdeploy.ort_native import OrtKernel, TritonAOT

    p, f, i = "*T", "*fp32", "i32"
    tensors = dict(br_ptr=p, bi_ptr=p, a_ptr=f, g_ptr=f, dt_ptr=f, s0_ptr=f, xr_ptr=p, xi_ptr=p,
                   sT_ptr=f)
    sizes = dict(B=i, T=i, P=i, sb_b=i, sb_t=i, sx_b=i, sx_t=i)
    rows = TritonAOT("linoss_rows", "seqdeploy_dlinoss.kernels:_linoss_rows_kernel",
                     {**tensors, **sizes}, _ort_variants("rows"))
    chunk = TritonAOT("linoss_chunk", "seqdeploy_dlinoss.kernels:_linoss_chunk_kernel",
                      {**tensors, "carry_ptr": f, "flag_ptr": "*i32", **sizes},
                      _ort_variants("chunk"))
    return OrtKernel("seqdeploy_dlinoss", ("ort_linoss_scan.cc",), "LinossScanKernel",
                     (rows, chunk))


def trt_aot():
    """TensorRT's AOT form (full TensorRT only): ``kernels._linoss_scan_aot_kernel``, the
    rows design in ``kernels.ORT_TILE``'s tile (the tile the ORT library launches; partial
    tiles are masked, so one tile serves every shape)."""
    from seqdeploy.trt.aot import EntryLaunch, TrtAot, cdiv

    def launch(q):
        from seqdeploy_dlinoss.kernels import ORT_TILE

        block_t, block_p, num_warps = ORT_TILE
        B, T, P = (q.sizes("b_re", a) for a in range(3))
        return EntryLaunch(grid=(B * cdiv(P, block_p),), scalars=(B, T, P),
                           constexprs={"BLOCK_T": block_t, "BLOCK_P": block_p},
                           num_warps=num_warps)

    def output_shapes(sizes):
        x = tuple(sizes("b_re", a) for a in range(3))
        return x, x, tuple(sizes("state0", a) for a in range(3))

    return TrtAot("seqdeploy_dlinoss.kernels:_linoss_scan_aot_kernel", ("B", "T", "P"), launch,
                  output_shapes)


def linoss_scan_op() -> CustomOp:
    from seqdeploy_dlinoss.onnx import linoss_scan_function, linoss_scan_translation

    op = define_op("linoss_scan", "LinossScan", cpu_linoss_scan, fake_linoss_scan,
                     reference_linoss_scan, linoss_scan_translation, linoss_scan_function,
                     INPUTS, OUTPUTS,
                     doc="damped oscillators w_t = M w_{t-1} + c b_t (D-LinOSS, IMEX)",
                     schema_doc=__doc__.split("\n\n")[0],
                     cuda=("seqdeploy_dlinoss.kernels", "triton_linoss_scan"),
                     float_inputs=FLOAT32_INPUTS, float_outputs=FLOAT32_OUTPUTS,
                     trt_aot=trt_aot())
    op.extra["ort"] = ort_kernel()
    return op


LINOSS_SCAN = linoss_scan_op()
#: the registered torch op ``torch.ops.seqdeploy.linoss_scan`` (CPU: vectorised, CUDA: Triton)
linoss_scan = LINOSS_SCAN.torch_op
