"""Internal C helpers that no public function exposes directly, built alone
from their source and called through ctypes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def test_exp_nonpositive_f32_is_accurate_to_two_ulp(runtime_lib):
    """Distance-weighted's relative weights e^(log w - max): x in [-87, 0]."""
    x = np.concatenate([np.linspace(-87.0, 0.0, 400_001), -np.logspace(-12, 0, 2001),
                        [0.0, -0.0, -1e-30]]).astype(np.float32)
    got = x.copy()
    runtime_lib.tm_exp_nonpositive_array_f32(got.ctypes.data, got.size)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert (np.abs(got - exact) / ulp).max() <= 2.0
    assert got[-3] == 1.0 and got[-2] == 1.0  # e^0 is exactly the largest weight
    # Below float's normal range the weight is 0, never garbage; NaN gives 0 too.
    far = np.array([-87.5, -100.0, -1e4, -np.inf, np.nan], dtype=np.float32)
    runtime_lib.tm_exp_nonpositive_array_f32(far.ctypes.data, far.size)
    assert (far == 0).all()


def test_log_array_f32_is_accurate_to_a_few_ulp(runtime_lib):
    # Every 499th float from the smallest normal to the largest finite one.
    bits = np.arange(0x00800000, 0x7F800000, 499, dtype=np.uint32)
    x = bits.view(np.float32).copy()
    got = x.copy()
    runtime_lib.tm_log_array_f32(got.ctypes.data, got.size)
    exact = np.log(x.astype(np.float64))
    err = np.abs(got.astype(np.float64) - exact)
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    away = np.abs(exact) > 1e-3
    assert (err[away] / ulp[away]).max() < 4.0
    assert err[~away].max() < 1e-9  # near x = 1 the error is absolute and tiny
    # Exact where it must be: ln 1 = 0, and powers of two are e ln 2 to float precision.
    one = np.array([1.0, 2.0, 0.5, 1024.0], dtype=np.float32)
    runtime_lib.tm_log_array_f32(one.ctypes.data, one.size)
    assert one[0] == 0.0
    np.testing.assert_allclose(one[1:], np.log([2.0, 0.5, 1024.0]), rtol=1e-7)
