"""The width-generic exp-sum loops (ptx_numba.cpu.simd.expsum) and the ISA choice, against float64.

Every loop flavour runs the same tests as the AVX2 loop (tests/test_avx2.py): each term through the
public intrinsic on a one-element chunk (the padding lanes decode to -inf and must add exactly 0),
every float16 and bfloat16 bit pattern, random float32 to 1.5 ulp, the adversarial rows, chunks of
every length up to two loop steps, reads that end at an unreadable page. The flavours that run are
in the test ids; flavours the target cannot run are skipped with the reason (``pytest -rs``).
"""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from numba import njit, types

from ptx_numba.cpu.simd import expsum
from ptx_numba.cpu.simd import features as isa

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_K8 = float(np.float32(8.0 / math.log(2.0)))
_AVAILABLE = isa.available()
#: flavour name -> (intrinsic, moment twin or None, plan, ISA it needs)
_FLAVOURS = {
    "avx2_8": (expsum.expsum_avx2, expsum.expsum_moment_avx2, expsum.LOOPS["avx2_8"], "avx2"),
    "avx2_8_f16fix": (expsum.expsum_avx2_f16fix, None, expsum.LOOPS["avx2_8_f16fix"], "avx2"),
    "avx2_16": (expsum.expsum_avx2_16, expsum.expsum_moment_avx2_16, expsum.LOOPS["avx2_16"], "avx2"),
    "avx512_16": (expsum.expsum_avx512, expsum.expsum_moment_avx512, expsum.LOOPS["avx512_16"], "avx512"),
}


def _param(name):
    need = _FLAVOURS[name][3]
    reason = f"the compile target lacks {need} (available: {', '.join(_AVAILABLE)})"
    return pytest.param(name, id=name, marks=pytest.mark.skipif(need not in _AVAILABLE, reason=reason))


FLAVOURS = [_param(name) for name in _FLAVOURS]
MOMENT_FLAVOURS = [_param(name) for name in _FLAVOURS if _FLAVOURS[name][1] is not None]
_CACHE = {}


def _kernels(name, moment=False):
    """``(terms, chunk_sum)`` jitted over flavour ``name`` (its moment twin with ``moment``)."""
    key = (name, moment)
    if key in _CACHE:
        return _CACHE[key]
    loop = _FLAVOURS[name][1 if moment else 0]
    constants = expsum.constants

    @njit(cache=False)
    def terms(chunk, shift):
        m, k, ms, lo, hi, corr = constants(shift)
        out = np.empty(chunk.size, dtype=np.float64)
        for i in range(chunk.size):
            out[i] = loop(chunk[i:i + 1], k, ms, lo, hi)
        return out, m, corr

    @njit(cache=False)
    def chunk_sum(chunk, shift):
        m, k, ms, lo, hi, corr = constants(shift)
        return loop(chunk, k, ms, lo, hi), m, corr, ms

    _CACHE[key] = (terms, chunk_sum)
    return _CACHE[key]


def _step(name, dtype):
    return _FLAVOURS[name][2].bytes_for(np.dtype(dtype)) // np.dtype(dtype).itemsize


def _exact_terms(values64, m):
    """The documented function, exactly: 2**((x*K8 - S)/8) with S = m*K8 (x*K8 is exact in f64)."""
    return np.exp2((values64 * _K8 - round(m * _K8)) / 8.0)


def _ulp_errors(got, exact):
    normal = exact >= 2.0**-126
    ulp = np.spacing(exact[normal].astype(np.float32)).astype(np.float64)
    return np.abs(got[normal].astype(np.float64) - exact[normal]) / ulp


def _bf16(values32):
    return (values32.view(np.uint32) >> 16).astype(np.uint16)


def _bf16_values(bits):
    with np.errstate(invalid="ignore"):  # signalling-NaN patterns stay NaN
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _encodings(x):
    """``name -> (stored, values as float64)`` for float32 values ``x`` in the three float32-lane encodings."""
    f16 = x.astype(np.float16)
    return {"float32": (x, x.astype(np.float64)), "bfloat16": (_bf16(x), _bf16_values(_bf16(x))),
            "float16": (f16.view(np.int16), f16.astype(np.float64))}


# --- terms -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FLAVOURS)
@pytest.mark.parametrize("shift", [0.0, 1.0, -17.25, 300.0, -3e4, 1.25e5])
def test_terms_within_one_and_a_half_ulp(rng, name, shift):
    x = (shift + rng.uniform(-88.0, 88.5, 20_000)).astype(np.float32)
    got, m, _ = _kernels(name)[0](x, np.float32(shift))
    errors = _ulp_errors(got, _exact_terms(x.astype(np.float64), m))
    assert errors.size > 15_000 and errors.max() <= 1.5


@pytest.mark.parametrize("name", FLAVOURS)
@pytest.mark.parametrize("encoding", ["float16", "bfloat16"])
def test_terms_for_every_16_bit_pattern(name, encoding):
    if encoding == "float16":
        bits = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16)
        values = bits.view(np.float16).astype(np.float64)
    else:
        bits = np.arange(65536, dtype=np.int64).astype(np.uint16)
        values = _bf16_values(bits)
    shift = 3.0
    got, m, _ = _kernels(name)[0](bits, np.float32(shift))
    below_clamp = np.isfinite(values) & (values < m + 88.5)
    assert _ulp_errors(got[below_clamp], _exact_terms(values[below_clamp], m)).max() <= 1.5
    above = np.isfinite(values) & (values > m + 88.7) | (values == np.inf)
    assert above.any() and np.all((got[above] > 3e38) & np.isfinite(got[above]))
    assert np.all(got[values == -np.inf] == 0.0)
    assert np.all(got[values < m - 88.1] == 0.0)
    assert np.isnan(values).sum() > 0 and np.all(np.isnan(got[np.isnan(values)]))


@pytest.mark.parametrize("name", FLAVOURS)
def test_special_values_and_clamps(name):
    x = np.array([-np.inf, -1e30, 10.0 - 88.1, 10.0 - 87.0, 10.0, 10.0 + 88.0, 10.0 + 1e3, 3e38, np.inf,
                  np.nan], dtype=np.float32)
    got, m, _ = _kernels(name)[0](x, np.float32(10.0))
    assert got[0] == got[1] == got[2] == 0.0
    assert 0.0 < got[3] < 2.0**-124
    assert got[4] == pytest.approx(math.exp(10.0 - m), rel=3e-7)
    assert got[5] == pytest.approx(_exact_terms(np.float64(98.0), m), rel=2e-7)
    assert np.all(np.isfinite(got[6:9])) and np.all(got[6:9] > 3.0e38)
    assert np.isnan(got[9])


@pytest.mark.parametrize("name", FLAVOURS)
def test_never_nan_from_finite_input(rng, name):
    x = (rng.standard_normal(10_000) * 10.0 ** rng.uniform(0, 38, 10_000)).astype(np.float32)
    got, _, _ = _kernels(name)[0](x, np.float32(rng.uniform(-100, 100)))
    assert not np.isnan(got).any()
    x64 = rng.standard_normal(10_000) * 10.0 ** rng.uniform(0, 300, 10_000)
    got, _, _ = _kernels(name)[0](x64, np.float64(rng.uniform(-1000, 1000)))
    assert not np.isnan(got).any()


@pytest.mark.parametrize("name", FLAVOURS)
@pytest.mark.parametrize("shift", [0.0, -17.25, 650.0, -3e4, 1e6, 1e13])
def test_f64_terms_match_exp_to_5e_14(rng, name, shift):
    x = shift + rng.uniform(-708.0, 708.0, 20_000)
    got, m, corr = _kernels(name)[0](x, np.float64(shift))
    d = x.astype(np.longdouble) - np.longdouble(m)
    exact = np.exp(d)
    normal = exact >= 2.0**-1020
    rel = np.abs(np.longdouble(corr) * got[normal] / exact[normal] - 1)
    assert normal.sum() > 15_000 and np.all(rel <= 5e-14 + 2.3e-16 * np.abs(d[normal]))


@pytest.mark.parametrize("name", FLAVOURS)
def test_f64_special_values_and_clamps(name):
    x = np.array([-np.inf, -1e300, 10.0 - 710.0, 10.0 - 700.0, 10.0, 10.0 + 709.0, 10.0 + 1e4, 1e308, np.inf,
                  np.nan])
    got, m, corr = _kernels(name)[0](x, np.float64(10.0))
    assert got[0] == got[1] == got[2] == 0.0
    assert corr * got[3] == pytest.approx(math.exp(-700.0 + 10.0 - m), rel=1e-13)
    assert corr * got[4] == pytest.approx(math.exp(10.0 - m), rel=1e-14)
    assert np.all(np.isfinite(got[5:9])) and np.all(got[6:9] >= got[5])
    assert np.isnan(got[9])


# --- chunk sums ------------------------------------------------------------------------------
def _check_sums(name, x, shift, rel=2e-6):
    """Every encoding of ``x`` through the chunk sum against float64 ``sum exp(v - m)``.

    float32 lanes: 1.5 ulp per term plus the rounding of the lane sums, up to ``n / 16`` additions
    per lane in the 8-lane loops (float16 rows at an offset of 3e4 sit on a grid of 16, so a few
    terms of e**16 carry the sum and its rounding shows: 2.0e-6 seen at n = 2125).
    """
    rel = rel + x.size / 16 * 2.0**-24
    chunk_sum = _kernels(name)[1]
    for encoding, (stored, values) in _encodings(x).items():
        got, m, _, _ = chunk_sum(stored, np.float32(shift))
        want = np.exp(values - m).sum()
        assert got == pytest.approx(want, rel=rel, abs=1e-30, nan_ok=True), (encoding, x.size)
    got, m, corr, _ = chunk_sum(x.astype(np.float64), np.float64(shift))
    want = np.exp(x.astype(np.float64) - m).sum()
    assert corr * got == pytest.approx(want, rel=1e-13, abs=1e-300, nan_ok=True), ("float64", x.size)


@pytest.mark.parametrize("name", FLAVOURS)
def test_chunk_sum_every_length_up_to_two_steps(rng, name):
    # every tail length 0..step-1 after 0, 1 and 2 full loop iterations, with -inf entries (the
    # masked tail load pads with -inf too)
    longest = max(_step(name, d) for d in (np.float32, np.float64, np.uint16, np.int16))
    for n in range(0, 2 * longest + 2):
        x = (rng.standard_normal(n) * 4.0).astype(np.float32)
        x[rng.random(n) < 0.1] = -np.inf
        _check_sums(name, x, rng.uniform(-3, 3))


@pytest.mark.parametrize("name", FLAVOURS)
@pytest.mark.parametrize("offset", [3e4, -3e4])
def test_chunk_sum_adversarial_rows(rng, name, offset):
    n = 2048 + 77
    base = (offset + rng.standard_normal(n) * 3.0).astype(np.float32)
    _check_sums(name, base, base[0])  # a common offset: the shift is the first entry
    dominant = (rng.standard_normal(n) * 3.0).astype(np.float32)
    dominant[rng.integers(n)] = 60.0  # one logit 60 above the rest, a term of e**60
    _check_sums(name, dominant, dominant[0])
    masked = base.copy()
    masked[rng.random(n) < 0.7] = -np.inf
    _check_sums(name, masked, offset)
    _check_sums(name, np.full(n, -np.inf, dtype=np.float32), offset)  # every term exactly 0
    assert _kernels(name)[1](np.full(n, -np.inf), np.float64(offset))[0] == 0.0


@pytest.mark.parametrize("name", FLAVOURS)
def test_nan_propagates_also_among_minus_inf(rng, name):
    chunk_sum = _kernels(name)[1]
    for n in (1, 5, 64, 2048 + 13):
        for where in {0, n // 2, n - 1}:
            for fill in (-np.inf, 0.5):
                x = np.full(n, fill, dtype=np.float32)
                x[where] = np.nan
                for encoding, (stored, _) in _encodings(x).items():
                    assert np.isnan(chunk_sum(stored, np.float32(0.0))[0]), (encoding, n, where, fill)
                assert np.isnan(chunk_sum(x.astype(np.float64), np.float64(0.0))[0]), ("float64", n, where)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses mprotect")
@pytest.mark.parametrize("name", FLAVOURS)
def test_does_not_read_past_the_end(name):
    # A chunk ending exactly where an unreadable page starts (a fault would kill the interpreter).
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 2 * page)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(address + page, page, 0) == 0  # PROT_NONE
    chunk_sum = _kernels(name)[1]
    try:
        for dtype, one in ((np.float32, 1.0), (np.float64, 1.0), (np.uint16, 0x3F80), (np.int16, 0x3C00)):
            arr = np.frombuffer(buf, dtype=dtype, count=page // np.dtype(dtype).itemsize)
            arr[:] = one  # 1.0 in each encoding
            shift = np.float64(1.0) if dtype == np.float64 else np.float32(1.0)
            for n in range(1, 2 * _step(name, dtype) + 2):
                got, m, _, _ = chunk_sum(arr[arr.size - n:], shift)
                assert got == pytest.approx(n * math.exp(1.0 - m), rel=1e-6), (dtype, n)
            del arr
    finally:
        libc.mprotect(address + page, page, 3)  # PROT_READ | PROT_WRITE, so munmap is clean


# --- the entropy moment ----------------------------------------------------------------------
def _entropy64(values):
    finite = values[np.isfinite(values)]
    z = finite - finite.max()
    p = np.exp(z) / np.exp(z).sum()
    return -(p[p > 0] * np.log(p[p > 0])).sum()


@pytest.mark.parametrize("name", MOMENT_FLAVOURS)
@pytest.mark.parametrize("offset", [0.0, 3e4, -3e4])
def test_moment_gives_the_entropy(rng, name, offset):
    n = 2048 - 5
    moment_sum = _kernels(name, moment=True)[1]
    plain_sum = _kernels(name)[1]
    for scale in (0.5, 3.0):
        x = (offset + rng.standard_normal(n) * scale).astype(np.float32)
        x[rng.random(n) < 0.1] = -np.inf
        x[1] = offset  # the shift: any finite entry
        for encoding, (stored, values) in [*_encodings(x).items(), ("float64", (x.astype(np.float64),) * 2)]:
            shift = np.float64(x[1]) if encoding == "float64" else np.float32(x[1])
            (s, t), m, corr, ms = moment_sum(stored, shift)
            k = 1.0 / math.log(2.0) if encoding == "float64" else _K8
            big_s = (expsum.MAGIC64 if encoding == "float64" else expsum.MAGIC) - float(ms)
            # the same sum as the plain loop (float32 lanes: the same operations, so bit for bit)
            plain = plain_sum(stored, shift)[0]
            if encoding == "float64":
                assert s == pytest.approx(plain, rel=1e-15)
            else:
                assert s == plain
            # t against float64: sum e_j * (x_j*K - S), relative to sum |e_j * (x_j*K - S)|
            # (in long double: x*K - S in float64 would itself be off by ulp(x*K) ~ 7e-12 at 3e4)
            keep = np.isfinite(values)
            d = values[keep].astype(np.longdouble) * np.longdouble(k) - np.longdouble(big_s)
            e = np.exp2(d / (1 if encoding == "float64" else 8))
            tol = (1e-13 if encoding == "float64" else 3e-6) * np.abs(e * d).sum()
            assert abs(t - (e * d).sum()) <= tol, encoding
            # H = log s - mean(x - m), with mean(x - m) = t / (K s) + (S/K - m) in natural units
            mean = t / (k * s) + (big_s / k - m)
            entropy = math.log(corr * s) - mean
            want = _entropy64(values)
            limit = (1e-10 if encoding == "float64" else 2e-5) * max(1.0, abs(want))
            assert abs(entropy - want) <= limit, (encoding, entropy, want)


@pytest.mark.parametrize("name", MOMENT_FLAVOURS)
def test_moment_special_values(name):
    moment_sum = _kernels(name, moment=True)[1]
    x = np.array([-np.inf, 1.0, -np.inf, 2.0], dtype=np.float32)
    for stored, _ in _encodings(x).values():
        (s, t), m, corr, ms = moment_sum(stored, np.float32(1.0))
        assert np.isfinite(s) and np.isfinite(t)  # -inf entries add exactly 0 to both
    nan = np.array([-np.inf, np.nan, -np.inf], dtype=np.float32)
    for stored, _ in _encodings(nan).values():
        (s, t), _, _, _ = moment_sum(stored, np.float32(0.0))
        assert np.isnan(s) and np.isnan(t)
    (s, t), _, _, _ = moment_sum(np.full(40, -np.inf), np.float64(0.0))
    assert s == 0.0 and t == 0.0


# --- the 16-lane loop compiled for an AVX2-only target ---------------------------------------
_HASWELL = "+avx,+avx2,+bmi,+bmi2,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt,+sse,+sse2,+sse3,+sse4.1," \
           "+sse4.2,+ssse3,+xsave"
_LEGALIZED = """
import sys
import numpy as np
from numba import njit
from ptx_numba.cpu.simd import expsum
from ptx_numba.cpu.simd import features as isa
assert isa.available() == ("avx2", "portable"), isa.available()
@njit(cache=False)
def chunk_sum(chunk, shift):
    m, k, ms, lo, hi, corr = expsum.constants(shift)
    return expsum.expsum_avx2_16(chunk, k, ms, lo, hi), m, corr
rng = np.random.default_rng(int(sys.argv[1]))
x = (rng.standard_normal(2048 + 77) * 4).astype(np.float32)
x[rng.random(x.size) < 0.1] = -np.inf
f16 = x.astype(np.float16)
bf = (x.view(np.uint32) >> 16).astype(np.uint16)
cases = [(x, x.astype(np.float64)), (bf, (bf.astype(np.uint32) << 16).view(np.float32).astype(np.float64)),
         (f16.view(np.int16), f16.astype(np.float64))]
for stored, values in cases:
    got, m, _ = chunk_sum(stored, np.float32(0.5))
    want = np.exp(values - m).sum()
    assert abs(got / want - 1) < 2e-6, (stored.dtype, got, want)
got, m, corr = chunk_sum(x.astype(np.float64), 0.5)
assert abs(corr * got / np.exp(x.astype(np.float64) - m).sum() - 1) < 1e-13
asm = "".join(chunk_sum.inspect_asm(sig) for sig in chunk_sum.signatures)
assert "ymm" in asm and "zmm" not in asm, "expected the 512-bit vectors legalized into ymm halves"
print("ok", len(chunk_sum.signatures))
"""


@pytest.mark.skipif("avx2" not in _AVAILABLE, reason="the host cannot run AVX2 code")
def test_sixteen_lanes_compile_and_agree_for_an_avx2_only_target(rng, tmp_path):
    # A Haswell target (AVX2 + FMA + F16C, no AVX-512) in a fresh process: LLVM splits every
    # 512-bit vector into ymm halves, and the sums still agree with float64.
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=_HASWELL, NUMBA_CACHE_DIR=str(tmp_path),
               PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    seed = str(int(rng.integers(2**31)))
    done = subprocess.run([sys.executable, "-c", _LEGALIZED, seed], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok 4"


# --- the ISA choice --------------------------------------------------------------------------
_SPR = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512fp16"})


def test_isa_best_first_from_the_features():
    assert isa.available(_SPR, x86_64=True) == ("avx512", "avx2", "portable")
    assert isa.available(frozenset({"avx2", "fma", "f16c"}), x86_64=True) == ("avx2", "portable")
    assert isa.available(_SPR - {"avx512bw"}, x86_64=True) == ("avx2", "portable")  # no 16-bit masked loads
    assert isa.available(frozenset({"avx2"}), x86_64=True) == ("portable",)  # AVX2 without FMA
    assert isa.available(_SPR, x86_64=False) == ("portable",)


def test_isa_override(monkeypatch):
    monkeypatch.setattr(isa.config, "CPU_ISA", None, raising=False)
    assert isa.choose(None, _SPR, True) == "avx512"
    assert isa.choose("avx2", _SPR, True) == "avx2"
    assert isa.choose("portable", frozenset(), True) == "portable"
    monkeypatch.setattr(isa.config, "CPU_ISA", "avx2", raising=False)
    assert isa.choose(None, _SPR, True) == "avx2"
    with pytest.raises(ValueError, match="avx512f"):
        isa.choose("avx512", frozenset({"avx2", "fma"}), True)
    with pytest.raises(ValueError, match="CPU_ISA must be"):
        isa.choose("sse2", _SPR, True)


def test_isa_follows_numbas_target_choice(monkeypatch):
    import numba

    monkeypatch.setattr(numba.config, "CPU_FEATURES", None)
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")  # a portable cache: assume nothing
    assert isa.available() == ("portable",) or not isa.is_x86_64()
    monkeypatch.setattr(numba.config, "CPU_FEATURES", _HASWELL)
    if isa.is_x86_64():
        assert isa.available() == ("avx2", "portable")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", _HASWELL + ",+avx512f,+avx512bw,+avx512dq,+avx512vl")
    if isa.is_x86_64():
        assert isa.available()[0] == "avx512"


def test_isa_supports():
    assert all(isa.supports("avx512", d) for d in (np.float32, np.float64, np.uint16, np.int16))
    assert not isa.supports("avx512", np.int32) and not isa.supports("avx2", np.float16)


def _loop_bodies(asm):
    """The instructions of every backward-jumping block range of ``asm`` (the loops)."""
    lines = asm.splitlines()
    labels = {line.split(":")[0]: i for i, line in enumerate(lines) if re.match(r"^\.LBB\d+_\d+:", line)}
    bodies = []
    for i, line in enumerate(lines):
        jump = re.match(r"^\s+j\w+\s+(\.LBB\d+_\d+)", line)
        if jump and labels.get(jump.group(1), i) < i:
            bodies.append("\n".join(lines[labels[jump.group(1)]:i + 1]))
    return bodies


@pytest.mark.skipif("avx512" not in _AVAILABLE, reason="needs an AVX-512 target (where LLVM could emit zmm)")
@pytest.mark.parametrize("name", ["avx2_8", "avx2_8_f16fix"])
def test_eight_lane_loops_stay_in_ymm_on_an_avx512_target(name):
    # A 512-bit instruction in an 8-lane loop (once: the 16-element float16 fpext, a vcvtph2ps
    # zmm) slows every ymm operation of the loop on Intel cores; the 8-lane loops must have none
    # (the tail, run once per chunk, may use a 512-bit masked load).
    chunk_sum = _kernels(name)[1]
    for dtype in (np.float32, np.float64, np.uint16, np.int16):
        shift = np.float64(0.0) if dtype == np.float64 else np.float32(0.0)
        chunk_sum(np.zeros(37, dtype), shift)
    for sig in chunk_sum.signatures:
        hot = [body for body in _loop_bodies(chunk_sum.inspect_asm(sig)) if "vfmadd" in body]
        assert hot and all("ymm" in body and "zmm" not in body for body in hot), sig


@pytest.mark.skipif("avx512" not in _AVAILABLE, reason="needs an AVX-512 target")
def test_sixteen_lane_loop_runs_in_zmm_on_an_avx512_target():
    chunk_sum = _kernels("avx512_16")[1]
    for dtype in (np.float32, np.float64, np.uint16, np.int16):
        shift = np.float64(0.0) if dtype == np.float64 else np.float32(0.0)
        chunk_sum(np.zeros(37, dtype), shift)
    for sig in chunk_sum.signatures:
        hot = [body for body in _loop_bodies(chunk_sum.inspect_asm(sig)) if "vfmadd" in body]
        assert hot and all("zmm" in body for body in hot), sig
        if sig[0].dtype != types.float64:  # the table lookup: one vpermps zmm
            assert any(re.search(r"vpermps\s.*zmm", body) for body in hot), sig
