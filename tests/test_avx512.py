"""The AVX-512 micro-kernels, run even where the CPU has no AVX-512.

``csrc/kernels_avx512.c`` is compiled twice: for real (by the extension, and
by ``test_build.py`` with ``-Werror``), and here against SIMDe's portable
AVX-512 intrinsics (``-DTM_AVX512_EMULATE``), which executes the same kernel
source on any x86-64.  The emulated build of the whole C core is loaded with
ctypes and every operation that runs on the micro-kernels is compared between
the ``avx512`` and ``generic`` kernel sets and against float64 NumPy.

On a CPU with AVX-512 the regular suite (``conftest.isa``) also runs every
test on the native kernels.  Needs a C compiler and the SIMDe headers
(``apt install libsimde-dev``, or ``SIMDE_INCLUDE=<dir containing simde/>``);
skipped with that reason otherwise.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

I64 = ctypes.c_int64
PTR = ctypes.c_void_p


def _simde_include() -> Path | None:
    candidates = [os.environ.get("SIMDE_INCLUDE"), "/usr/include", "/usr/local/include"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "simde" / "x86" / "avx512.h").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if shutil.which(cc[0]) is None:
        pytest.skip(f"no C compiler ({cc[0]}) to build the emulated AVX-512 core")
    include = _simde_include()
    if include is None:
        pytest.skip("SIMDe headers not found (apt install libsimde-dev, or set SIMDE_INCLUDE): "
                    "the AVX-512 kernels cannot be emulated on this machine")
    out = tmp_path_factory.mktemp("avx512") / "libtripmine_avx512_emulated.so"
    cmd = cc + ["-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-psabi",
                "-ffp-contract=off", "-fPIC", "-shared", "-DTM_AVX512_EMULATE",
                f"-I{CSRC}", "-isystem", str(include), *map(str, sorted(CSRC.glob("*.c"))),
                "-o", str(out), "-lm"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(out))
    lib.tm_get_isa.restype = ctypes.c_char_p
    lib.tm_isa_name.restype = ctypes.c_char_p
    return lib


def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(PTR)


def _set_isa(lib, name: str) -> None:
    assert lib.tm_set_isa(name.encode()) == 0, name
    assert lib.tm_get_isa().decode() == name


def _suffix(dtype) -> str:
    return "f32" if dtype == np.float32 else "f64"


def _distances(lib, x, ref, metric):
    n = x.shape[0]
    m = n if ref is None else ref.shape[0]
    out = np.empty((n, m), dtype=x.dtype)
    fn = getattr(lib, f"tm_pairwise_distances_{_suffix(x.dtype)}")
    status = fn(_ptr(x), I64(n), _ptr(ref), I64(m), I64(x.shape[1]), ctypes.c_int(metric),
                _ptr(out))
    assert status == 0
    return out


def _dense_loss(lib, name, x, labels, extra):
    n, d = x.shape
    loss = ctypes.c_double()
    counts = np.zeros(4, dtype=np.int64)
    grad = np.zeros_like(x)
    suffix = _suffix(x.dtype)
    fn = getattr(lib, f"tm_lifted_structured_loss_{suffix}" if name.startswith("lifted") else
                 f"tm_{name}_{suffix}")
    if name == "batch_all_loss":  # margin, soft, reduction(mean), n_triplets, n_active
        args = [ctypes.c_double(extra), ctypes.c_int(0), ctypes.c_int(0), ctypes.byref(loss),
                _ptr(counts[:1]), _ptr(counts[1:2])]
    elif name.startswith("lifted"):  # neg_margin extra, pos_margin 0, form, mean, counts
        args = [ctypes.c_double(extra), ctypes.c_double(0.0),
                ctypes.c_int(name.endswith("generalized")), ctypes.c_int(0), ctypes.byref(loss),
                _ptr(counts[:2])]
    else:  # contrastive: pos_margin 0, neg_margin extra, power 2, mean
        args = [ctypes.c_double(0.0), ctypes.c_double(extra), ctypes.c_int(2), ctypes.c_int(0),
                ctypes.byref(loss), _ptr(counts)]
    # metric euclidean, row_exponent 0
    status = fn(_ptr(x), I64(n), None, I64(n), I64(d), ctypes.c_int(0), ctypes.c_int(0),
                _ptr(labels), None, I64(-1), *args, None, _ptr(grad), None)
    assert status == 0
    return loss.value, counts, grad


def test_emulated_build_lists_avx512(emulated):
    names = [emulated.tm_isa_name(i).decode() for i in range(emulated.tm_isa_count())]
    assert names[-1] == "avx512"
    assert emulated.tm_isa_usable(len(names) - 1) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (13, 29, 3), (130, 70, 64), (300, 300, 129)])
@pytest.mark.parametrize("self_mode", [True, False], ids=["self", "ref"])
def test_distances_match_generic_and_float64(emulated, dtype, shape, self_mode):
    n, m, d = shape
    rng = np.random.default_rng(n * 7 + d)
    x = rng.standard_normal((n, d)).astype(dtype)
    ref = None if self_mode else rng.standard_normal((m, d)).astype(dtype)
    r64 = x.astype(np.float64) if ref is None else ref.astype(np.float64)
    expected = np.sqrt(((x.astype(np.float64)[:, None, :] - r64[None]) ** 2).sum(-1))
    rtol = 1e-4 if dtype == np.float32 else 1e-11
    for metric in (0, 1, 2):  # euclidean, sqeuclidean, cosine
        _set_isa(emulated, "generic")
        generic = _distances(emulated, x, ref, metric)
        _set_isa(emulated, "avx512")
        fast = _distances(emulated, x, ref, metric)
        np.testing.assert_allclose(fast, generic, rtol=rtol, atol=rtol * 4)
        if metric == 0:
            np.testing.assert_allclose(fast, expected, rtol=rtol, atol=rtol)
        if self_mode:
            assert np.all(np.diag(fast) == 0)
    _set_isa(emulated, "generic")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,extra", [("batch_all_loss", 0.2), ("contrastive_loss", 1.0),
                                        ("lifted_song", 1.0), ("lifted_generalized", 1.0)])
def test_dense_losses_and_gradients_match_generic(emulated, dtype, name, extra):
    # The dense losses multiply coefficient rows on the micro-kernel (tm_gemm_acc); the
    # lifted structured loss also runs its row kernels (lifted_weights, pair_beta).
    rng = np.random.default_rng(5)
    n, d = 203, 37
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(dtype)
    labels = np.repeat(np.arange(n // 4 + 1), 4)[:n].astype(np.int64)
    _set_isa(emulated, "generic")
    loss_g, counts_g, grad_g = _dense_loss(emulated, name, x, labels, extra)
    _set_isa(emulated, "avx512")
    loss_a, counts_a, grad_a = _dense_loss(emulated, name, x, labels, extra)
    _set_isa(emulated, "generic")
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    assert loss_g > 0
    assert loss_a == pytest.approx(loss_g, rel=rtol)
    assert np.abs(grad_g).max() > 0
    np.testing.assert_allclose(grad_a, grad_g, rtol=rtol, atol=rtol * np.abs(grad_g).max())
    if dtype == np.float64:  # counts can flip on float32 rounding at a hinge
        np.testing.assert_array_equal(counts_a, counts_g)


def test_batch_hard_matches_generic(emulated):
    rng = np.random.default_rng(9)
    n, d = 257, 128
    x = rng.standard_normal((n, d)).astype(np.float32)
    labels = np.repeat(np.arange(65), 4)[:n].astype(np.int64)
    found = {}
    for isa in ("generic", "avx512"):
        _set_isa(emulated, isa)
        pos = np.empty(n, dtype=np.int64)
        neg = np.empty(n, dtype=np.int64)
        status = emulated.tm_batch_hard_f32(_ptr(x), I64(n), None, I64(n), I64(d),
                                            ctypes.c_int(0), _ptr(labels), None, I64(-1),
                                            _ptr(pos), _ptr(neg))
        assert status == 0
        found[isa] = (pos, neg)
    _set_isa(emulated, "generic")
    np.testing.assert_array_equal(found["avx512"][0], found["generic"][0])
    np.testing.assert_array_equal(found["avx512"][1], found["generic"][1])
