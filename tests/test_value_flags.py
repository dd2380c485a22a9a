"""flag_bad_values: the device-side verdicts of check_inputs' value checks, written by the
kernel into pinned host memory on a GPU (through Triton's interpreter on CPU)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

from seqdeploy.architecture import TensorSpec, check_inputs
from seqdeploy.errors import InputError
from seqdeploy.value_flags import flag_bad_values


def _rejected(spec, tensor):
    """The reference verdict: does check_inputs reject these values?"""
    try:
        check_inputs([spec], {spec.name: tensor.cpu()}, "fp32", values=True)
    except InputError:
        return True
    return False


def _naive(tensor, bounds=None):
    """An independent verdict, element by element in Python."""
    for v in tensor.reshape(-1).tolist():
        if v != v or v in (float("inf"), float("-inf")):
            return True
        if bounds is not None and not bounds[0] <= v < bounds[1]:
            return True
    return False


def _flags(specs, inputs):
    host = torch.zeros(len(specs), dtype=torch.bool, pin_memory=DEVICE == "cuda")
    any_bad = torch.ones((), dtype=torch.bool, device=DEVICE)       # poisoned
    flag_bad_values(specs, {k: v.to(DEVICE) for k, v in inputs.items()}, any_bad, host)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return bool(any_bad), host.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1, 5, 1024, 2500])
@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf"])
def test_float_flags_match_check_inputs(dtype, n, bad):
    """NaN / ±Inf anywhere (first element, a later block, the masked tail of the last
    block) are flagged; finite values, including the largest ones, are not."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(1, n, generator=g) * 100).to(dtype)
    x[0, 0] = torch.finfo(dtype).max                      # finite, must pass
    for pos in ({0, n // 2, n - 1} if bad else {None}):
        value = x.clone()
        if bad:
            value[0, pos] = float(bad)
        spec = TensorSpec("x", "float32", ("batch", n))
        any_bad, host = _flags([spec], {"x": value})
        expected = _naive(value.double())
        assert expected == bool(bad)
        assert host == [expected] and any_bad == expected
        if dtype == torch.float32:
            assert _rejected(spec, value) == expected


@pytest.mark.parametrize("n", [3, 1500])
def test_bounded_integers_and_several_inputs(n):
    """Integers outside [lo, hi) on either side are flagged; an unbounded integer input is
    never flagged (and launches nothing); ``any_bad`` is the OR over all inputs."""
    specs = [TensorSpec("tokens", "int64", ("batch", n), bounds=(0, 50)),
             TensorSpec("free", "int64", ("batch", n)),
             TensorSpec("x", "float32", ("batch", n))]
    good = {"tokens": torch.arange(n).remainder(50).reshape(1, n),
            "free": torch.full((1, n), -7, dtype=torch.int64),
            "x": torch.zeros(1, n)}
    assert _flags(specs, good) == (False, [False, False, False])
    for value in (-1, 50, 2 ** 40):
        tokens = good["tokens"].clone()
        tokens[0, n - 1] = value
        inputs = {**good, "tokens": tokens}
        assert _rejected(specs[0], tokens) and _naive(tokens, (0, 50))
        assert _flags(specs, inputs) == (True, [True, False, False])
        x = good["x"].clone()
        x[0, 0] = float("nan")
        assert _flags(specs, {**inputs, "x": x}) == (True, [True, False, True])
        assert _flags(specs, {**good, "x": x}) == (True, [False, False, True])


def test_bounded_float_and_empty_inputs():
    spec = TensorSpec("p", "float32", ("batch", 3), bounds=(0, 1))
    assert _flags([spec], {"p": torch.tensor([[0.0, 0.5, 0.99]])}) == (False, [False])
    for bad in (1.0, -0.5, float("nan")):
        value = torch.tensor([[0.0, bad, 0.5]])
        assert _rejected(spec, value) and _naive(value, (0, 1))
        assert _flags([spec], {"p": value}) == (True, [True])
    empty = {"p": torch.empty(0, 3)}          # (check_inputs passes empty values)
    assert _flags([spec], empty) == (False, [False])


def test_bad_arguments_are_refused():
    spec = TensorSpec("x", "float32", ("batch", 3))
    x = torch.zeros(2, 3, device=DEVICE)
    host = torch.zeros(1, dtype=torch.bool)
    with pytest.raises(ValueError, match="0-d bool"):
        flag_bad_values([spec], {"x": x}, torch.zeros(1, dtype=torch.bool, device=DEVICE), host)
    with pytest.raises(ValueError, match="bool vector of 1"):
        flag_bad_values([spec], {"x": x}, torch.zeros((), dtype=torch.bool, device=DEVICE),
                        torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="contiguous"):
        flag_bad_values([spec], {"x": torch.zeros(3, 2, device=DEVICE).t()}, torch.zeros((), dtype=torch.bool, device=DEVICE),
                        host)


@pytest.mark.parametrize("n", [7, 1500])
def test_lower_bound_above_zero_and_an_unchecked_input_first(n):
    """Bounds that exclude 0 (the masked lanes of the last block load 0: they must not
    count), and an unchecked input ahead of the checked one (the first kernel launched, not
    the first spec, starts ``any_bad``)."""
    specs = [TensorSpec("free", "int64", ("batch", n)),
             TensorSpec("ids", "int64", ("batch", n), bounds=(5, 9))]
    ids = 5 + torch.arange(n).remainder(4).reshape(1, n)
    good = {"free": torch.zeros(1, n, dtype=torch.int64), "ids": ids}
    assert _flags(specs, good) == (False, [False, False])
    for value in (4, 9):
        bad = ids.clone()
        bad[0, n // 2] = value
        assert _rejected(specs[1], bad) and _naive(bad, (5, 9))
        assert _flags(specs, {**good, "ids": bad}) == (True, [False, True])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_bounds_are_exact(dtype):
    """Float bounds that fp32 cannot hold (±0.7, 2**24 + 1) are compared exactly: at each
    bound, the dtype's values just below and at-or-above it are judged as the exact
    comparison (and check_inputs, on fp32) judges them."""
    for lo, hi in ((-0.7, 0.7), (0.5, 2 ** 24 + 1)):
        spec = TensorSpec("p", "float32", ("batch", 2), bounds=(lo, hi))
        for v in (lo, hi):
            below = torch.tensor(float(v), dtype=dtype)
            above = below if below >= v else torch.nextafter(below, torch.tensor(math.inf,
                                                                                  dtype=dtype))
            below = below if below < v else torch.nextafter(below, torch.tensor(-math.inf,
                                                                                 dtype=dtype))
            for value in (below, above):
                x = torch.stack([value, torch.tensor(float(lo), dtype=dtype).clamp(min=value)])
                x = x.reshape(1, 2)
                expected = _naive(x.double(), (lo, hi))
                assert _flags([spec], {"p": x}) == (expected, [expected]), (lo, hi, x)
                if dtype == torch.float32:
                    assert _rejected(spec, x) == expected


def test_sources_copy_every_input_in_before_checking():
    """With ``sources``, each input (checked or not: an unbounded bool too) is first copied
    into its buffer from the address in its slot, then checked there; the flags are those
    of the copied values."""
    specs = [TensorSpec("x", "float16", ("batch", 700)), TensorSpec("m", "bool", ("batch", 3)),
             TensorSpec("t", "int64", ("batch", 4), bounds=(0, 10))]
    g = torch.Generator().manual_seed(4)
    feeds = {"x": torch.randn(2, 700, generator=g).half(), "m": torch.rand(2, 3, generator=g) > 0.5,
             "t": torch.randint(0, 10, (2, 4), generator=g)}
    for bad in (None, "x", "t"):
        given = {k: v.clone().to(DEVICE) for k, v in feeds.items()}
        if bad == "x":
            given["x"][1, 650] = float("nan")       # in the second block of the kernel
        if bad == "t":
            given["t"][0, 3] = 10
        buffers = {k: torch.full_like(v, 3) for k, v in given.items()}
        sources = torch.tensor([given[s.name].data_ptr() for s in specs], dtype=torch.int64)
        host = torch.zeros(len(specs), dtype=torch.bool)
        any_bad = torch.ones((), dtype=torch.bool, device=DEVICE)      # poisoned
        if DEVICE == "cuda":
            sources, host = sources.pin_memory(), host.pin_memory()
        flag_bad_values(specs, buffers, any_bad, host, sources)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        for k in given:   # (NaN where it was given)
            torch.testing.assert_close(buffers[k], given[k], rtol=0, atol=0, equal_nan=True)
        assert host.tolist() == [bad == "x", False, bad == "t"]
        assert bool(any_bad) == (bad is not None)
    with pytest.raises(ValueError, match="sources"):
        flag_bad_values(specs, buffers, any_bad, host, sources[:2])
