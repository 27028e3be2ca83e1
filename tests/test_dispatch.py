"""Backend registry and selection: availability, env override, explicit errors, auto fallback."""
import importlib.util
import sys
import types
import warnings

import numpy as np
import pytest

import ptx_numba as pn
from ptx_numba import _dispatch, config, reference

ENV = config.BACKEND_ENV_VAR
Z = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0], [2.0, 2.0, 2.0]])
Y = np.array([2, 0, -100])


@pytest.fixture(autouse=True)
def clean_dispatch(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    _dispatch._reset_for_tests()
    yield
    _dispatch._reset_for_tests()


def reference_results():
    return (
        pn.cross_entropy(Z, Y, reduction="none", backend="reference"),
        pn.cross_entropy(Z, Y, backend="reference"),
        pn.logsumexp(Z, backend="reference"),
    )


def all_results(backend="auto"):
    return (
        pn.cross_entropy(Z, Y, reduction="none", backend=backend),
        pn.cross_entropy(Z, Y, backend=backend),
        pn.logsumexp(Z, backend=backend),
    )


def assert_same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def fake_backend(name, *, available=(True, ""), fail_with=None):
    """A stand-in backend module; its row functions raise ``fail_with`` (or answer like the reference)."""
    mod = types.ModuleType(f"ptx_numba.{name}")
    mod.NAME = name
    mod.calls = 0
    mod.is_available = lambda: available

    def wrap(fn):
        def run(*args):
            mod.calls += 1
            if fail_with is not None:
                raise fail_with
            return fn(*args)

        return run

    mod.logsumexp_rows = wrap(reference.logsumexp_rows)
    mod.cross_entropy_rows = wrap(reference.cross_entropy_rows)
    mod.cross_entropy_sum = wrap(reference.cross_entropy_sum)
    mod.prefers_host_input = lambda nbytes: False
    return mod


def hide_cuda():
    _dispatch._unavailable["cuda"] = "hidden by the test"


# ------------------------------------------------------------------------------------------
# available_backends
# ------------------------------------------------------------------------------------------
def test_available_backends_contents_and_order():
    got = pn.available_backends()
    assert isinstance(got, tuple)
    assert got[-1] == "reference"
    assert len(set(got)) == len(got)
    assert set(got) <= {"cuda", "cpu", "reference"}
    order = ["cuda", "cpu", "reference"]
    assert list(got) == sorted(got, key=order.index)  # best first
    assert pn.available_backends() == got  # stable


def test_cpu_backend_listed_when_its_module_exists():
    """If ptx_numba/cpu.py exists and numba imports, 'cpu' must not silently drop out."""
    if importlib.util.find_spec("ptx_numba.cpu") is None:
        pytest.skip("ptx_numba.cpu not written yet")
    pytest.importorskip("numba")
    assert "cpu" in pn.available_backends(), _dispatch.unavailable_reason("cpu")
    assert _dispatch.unavailable_reason("cpu") == ""


def test_unavailable_backend_is_not_listed_and_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "ptx_numba.cpu", fake_backend("cpu", available=(False, "no numba on this box")))
    assert "cpu" not in pn.available_backends()
    assert pn.available_backends()[-1] == "reference"
    assert "no numba on this box" in _dispatch.unavailable_reason("cpu")
    with pytest.raises(pn.BackendUnavailableError, match=r"'cpu' is not available: no numba on this box"):
        pn.cross_entropy(Z, Y, backend="cpu")
    # auto quietly uses the next best, no warning
    hide_cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(all_results(), reference_results())


def test_backend_whose_probe_raises_is_unavailable(monkeypatch):
    mod = fake_backend("cpu")

    def boom():
        raise ImportError("libfoo.so missing")

    mod.is_available = boom
    monkeypatch.setitem(sys.modules, "ptx_numba.cpu", mod)
    assert "cpu" not in pn.available_backends()
    with pytest.raises(pn.BackendUnavailableError, match="ImportError: libfoo.so missing"):
        pn.logsumexp(Z, backend="cpu")


def test_backend_unavailable_error_is_runtime_error():
    assert issubclass(pn.BackendUnavailableError, RuntimeError)
    assert issubclass(pn.KernelUnavailable, RuntimeError)


def test_explicit_cuda_unavailable_or_listed():
    if "cuda" in pn.available_backends():
        pytest.skip("cuda is available here; covered by the cuda tests")
    with pytest.raises(pn.BackendUnavailableError, match=r"backend 'cuda' is not available: \S"):
        pn.ptx_loss(0.0, Z, Y, 0.1, backend="cuda")


# ------------------------------------------------------------------------------------------
# explicit names
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpu", "Reference", "numpy", "", " cpu", None, 1])
def test_explicit_unknown_backend(name):
    with pytest.raises(ValueError, match=r"unknown backend .*valid backends are \('auto', 'cuda', 'cpu', 'reference'\)"):
        pn.cross_entropy(Z, Y, backend=name)


@pytest.mark.parametrize("name", [b for b in pn.available_backends() if b != "cuda"])
def test_explicit_backend_is_used(monkeypatch, name):
    want = reference_results()
    spy = fake_backend(name)
    _dispatch._modules[name] = spy
    monkeypatch.setenv(ENV, "reference" if name != "reference" else "cpu")  # must not override explicit
    assert_same(all_results(name), want)
    assert spy.calls == 3


# ------------------------------------------------------------------------------------------
# PTX_NUMBA_BACKEND
# ------------------------------------------------------------------------------------------
def test_env_var_overrides_auto(monkeypatch):
    spy = fake_backend("reference")
    _dispatch._modules["reference"] = spy
    monkeypatch.setenv(ENV, "reference")
    assert_same(all_results(), reference_results())
    assert spy.calls == 6  # 3 in all_results, 3 in reference_results (explicit name)
    monkeypatch.setenv(ENV, "  reference \n")  # surrounding whitespace is tolerated
    pn.ptx_loss(0.0, Z, Y, 1.0)
    assert spy.calls == 7


def test_env_var_does_not_override_explicit(monkeypatch):
    monkeypatch.setenv(ENV, "definitely-not-a-backend")
    assert_same(all_results("reference"), reference_results())


@pytest.mark.parametrize("value", ["   ", "auto"])
def test_empty_or_auto_env_var_means_auto(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    hide_cuda()
    spy = fake_backend("cpu")
    _dispatch._modules["cpu"] = spy
    all_results()
    assert spy.calls == 3


@pytest.mark.parametrize("value", ["gpu", "auto2", "REFERENCE"])
def test_invalid_env_value(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    for call in (
        lambda: pn.cross_entropy(Z, Y),
        lambda: pn.logsumexp(Z),
        lambda: pn.ptx_loss(0.0, Z, Y, 0.1),
    ):
        with pytest.raises(ValueError, match=rf"{ENV}: unknown backend '{value}'; valid backends are"):
            call()


def test_env_var_naming_unavailable_backend_is_loud(monkeypatch):
    monkeypatch.setitem(sys.modules, "ptx_numba.cpu", fake_backend("cpu", available=(False, "switched off")))
    monkeypatch.setenv(ENV, "cpu")
    with pytest.raises(pn.BackendUnavailableError, match="switched off"):
        pn.cross_entropy(Z, Y)


# ------------------------------------------------------------------------------------------
# auto: preference and fallback
# ------------------------------------------------------------------------------------------
def test_auto_prefers_cpu_over_reference():
    hide_cuda()
    spy = fake_backend("cpu")
    _dispatch._modules["cpu"] = spy
    assert_same(all_results(), reference_results())
    assert spy.calls == 3


def test_auto_fallback_warns_once_and_matches_reference():
    hide_cuda()
    broken = fake_backend("cpu", fail_with=pn.KernelUnavailable("LLVM said no"))
    _dispatch._modules["cpu"] = broken
    want = reference_results()
    with pytest.warns(RuntimeWarning, match=r"'cpu' backend failed \(KernelUnavailable: LLVM said no\).*reference") as rec:
        got = all_results()
        r = pn.ptx_loss(0.5, Z, Y, 0.1)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert rec[0].filename == __file__  # attributed to the caller's line
    assert_same(got, want)
    assert r.ce == want[1] and r.total == 0.5 + 0.1 * want[1]
    assert broken.calls == 1  # marked broken after the first failure: not retried
    assert "cpu" not in pn.available_backends()
    # afterwards: no more warnings, explicit request is a loud error naming the cause
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(all_results(), want)
    with pytest.raises(pn.BackendUnavailableError, match="LLVM said no"):
        pn.cross_entropy(Z, Y, backend="cpu")


def test_auto_fallback_on_real_cpu_module(monkeypatch):
    """Patch the real cpu module's row functions to fail: auto falls back with one warning."""
    if "cpu" not in pn.available_backends():
        pytest.skip("cpu backend not available")
    cpu = importlib.import_module("ptx_numba.cpu")
    hide_cuda()

    def fail(*args, **kwargs):
        raise pn.KernelUnavailable("cannot compile for this CPU")

    for fn in ("logsumexp_rows", "cross_entropy_rows", "cross_entropy_sum"):
        monkeypatch.setattr(cpu, fn, fail)
    want = reference_results()
    with pytest.warns(RuntimeWarning, match="cannot compile for this CPU") as rec:
        got = all_results()
    assert len(rec) == 1
    assert_same(got, want)
    with pytest.raises(pn.BackendUnavailableError, match="cannot compile for this CPU"):
        pn.logsumexp(Z, backend="cpu")


def test_explicit_backend_failing_at_run_time_is_loud():
    """No silent fallback for an explicit name: the failure surfaces as a RuntimeError."""
    broken = fake_backend("cpu", fail_with=pn.KernelUnavailable("LLVM said no"))
    _dispatch._modules["cpu"] = broken
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="LLVM said no"):
            pn.cross_entropy(Z, Y, backend="cpu")


def test_other_errors_are_not_swallowed_by_fallback():
    hide_cuda()
    _dispatch._modules["cpu"] = fake_backend("cpu", fail_with=ZeroDivisionError("a real bug"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ZeroDivisionError, match="a real bug"):
            pn.cross_entropy(Z, Y)


def test_reset_for_tests_restores_everything():
    hide_cuda()
    _dispatch._modules["cpu"] = fake_backend("cpu", fail_with=pn.KernelUnavailable("x"))
    with pytest.warns(RuntimeWarning):
        pn.logsumexp(Z)
    _dispatch._reset_for_tests()
    assert "cpu" not in _dispatch._unavailable and not _dispatch._modules
    hide_cuda()
    _dispatch._modules["cpu"] = fake_backend("cpu", fail_with=pn.KernelUnavailable("y"))
    with pytest.warns(RuntimeWarning, match="y"):  # warns again after a reset
        pn.logsumexp(Z)
