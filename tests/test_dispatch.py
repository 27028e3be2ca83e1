"""Backend registry and selection: availability, env override, explicit errors, auto fallback.

A backend is a package ``ptx_numba.<module>`` exporting ``BACKEND`` (the row-pass protocol of
:mod:`ptx_numba._rowpass`). The fakes here are such objects, installed either as the module
``ptx_numba.cpu`` in ``sys.modules`` (so the registry's import finds them) or straight into the
registry's cache ``_dispatch._backends``.
"""
import importlib
import importlib.util
import sys
import types
import warnings

import numpy as np
import pytest

import ptx_numba as pn
from ptx_numba import _dispatch, config, reference
from ptx_numba._rowpass import Backend

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
    """A stand-in ``BACKEND``: its kernels raise ``fail_with`` (or answer like the reference).

    ``calls`` counts row passes, ``grad_calls`` gradient passes; ``seen_y`` keeps the labels
    each row pass received.
    """
    fake = types.SimpleNamespace(name=name, calls=0, grad_calls=0, seen_y=[])
    fake.is_available = lambda: available
    fake.prefers_host_input = lambda nbytes: False

    def row_stats(x, y, spec, w=None):
        fake.calls += 1
        fake.seen_y.append(np.array(y))
        if fail_with is not None:
            raise fail_with
        return reference.BACKEND.row_stats(x, y, spec, w)

    def row_grad(x, y, spec, stats, coef, out, w=None):
        fake.grad_calls += 1
        if fail_with is not None:
            raise fail_with
        return reference.BACKEND.row_grad(x, y, spec, stats, coef, out, w)

    fake.row_stats, fake.row_grad = row_stats, row_grad
    return fake


def as_package(backend, name="cpu"):
    """A module ``ptx_numba.<name>`` exporting ``backend`` as ``BACKEND``."""
    mod = types.ModuleType(f"ptx_numba.{name}")
    mod.BACKEND = backend
    return mod


def install(monkeypatch, backend, name="cpu"):
    monkeypatch.setitem(sys.modules, f"ptx_numba.{name}", as_package(backend, name))
    return backend


def hide_cuda():
    _dispatch._unavailable["cuda"] = "hidden by the test"


# ------------------------------------------------------------------------------------------
# the protocol
# ------------------------------------------------------------------------------------------
def test_fake_and_reference_satisfy_the_protocol():
    assert isinstance(reference.BACKEND, Backend)
    assert isinstance(fake_backend("cpu"), Backend)
    assert reference.BACKEND.name == "reference"
    assert reference.BACKEND.is_available() == (True, "")


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


def test_cpu_backend_listed_when_its_package_exports_a_backend():
    """If ptx_numba.cpu exports BACKEND and numba imports, 'cpu' must not silently drop out."""
    if importlib.util.find_spec("ptx_numba.cpu") is None:
        pytest.skip("ptx_numba.cpu not written yet")
    pytest.importorskip("numba")
    if not hasattr(importlib.import_module("ptx_numba.cpu"), "BACKEND"):
        pytest.skip("ptx_numba.cpu is not on the row-pass protocol yet")
    assert "cpu" in pn.available_backends(), _dispatch.unavailable_reason("cpu")
    assert _dispatch.unavailable_reason("cpu") == ""


def test_package_without_backend_object_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "ptx_numba.cpu", types.ModuleType("ptx_numba.cpu"))
    assert "cpu" not in pn.available_backends()
    assert "AttributeError" in _dispatch.unavailable_reason("cpu")
    assert "BACKEND" in _dispatch.unavailable_reason("cpu")


def test_unavailable_backend_is_not_listed_and_says_why(monkeypatch):
    install(monkeypatch, fake_backend("cpu", available=(False, "no numba on this box")))
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
    fake = fake_backend("cpu")

    def boom():
        raise ImportError("libfoo.so missing")

    fake.is_available = boom
    install(monkeypatch, fake)
    assert "cpu" not in pn.available_backends()
    with pytest.raises(pn.BackendUnavailableError, match="ImportError: libfoo.so missing"):
        pn.logsumexp(Z, backend="cpu")


def test_backend_unavailable_error_is_runtime_error():
    assert issubclass(pn.BackendUnavailableError, RuntimeError)
    assert issubclass(pn.KernelUnavailable, pn.BackendUnavailableError)


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
    want_loss, want_grad = pn.cross_entropy_and_grad(Z, Y, backend="reference")
    spy = fake_backend(name)
    _dispatch._backends[name] = spy
    monkeypatch.setenv(ENV, "reference" if name != "reference" else "cpu")  # must not override explicit
    assert_same(all_results(name), want)
    assert spy.calls == 3
    loss, grad = pn.cross_entropy_and_grad(Z, Y, backend=name)  # both passes on the chosen backend
    assert (spy.calls, spy.grad_calls) == (4, 1)
    assert loss == want_loss
    np.testing.assert_array_equal(grad, want_grad)


def test_fake_installed_as_package_is_imported_and_used(monkeypatch):
    spy = install(monkeypatch, fake_backend("cpu"))
    assert "cpu" in pn.available_backends()
    assert_same(all_results("cpu"), reference_results())
    assert spy.calls == 3
    assert _dispatch.resolve("cpu") is spy


# ------------------------------------------------------------------------------------------
# PTX_NUMBA_BACKEND
# ------------------------------------------------------------------------------------------
def test_env_var_overrides_auto(monkeypatch):
    spy = fake_backend("reference")
    _dispatch._backends["reference"] = spy
    monkeypatch.setenv(ENV, "reference")
    assert_same(all_results(), reference_results())
    assert spy.calls == 6  # 3 in all_results, 3 in reference_results (explicit name)
    monkeypatch.setenv(ENV, "  reference \n")  # surrounding whitespace is tolerated
    pn.ptx_loss(0.0, Z, Y, 1.0)
    assert spy.calls == 7
    assert _dispatch.requested_backend("auto") == "reference"


def test_env_var_does_not_override_explicit(monkeypatch):
    monkeypatch.setenv(ENV, "definitely-not-a-backend")
    assert_same(all_results("reference"), reference_results())
    assert _dispatch.requested_backend("reference") == "reference"


@pytest.mark.parametrize("value", ["   ", "auto"])
def test_empty_or_auto_env_var_means_auto(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    hide_cuda()
    spy = fake_backend("cpu")
    _dispatch._backends["cpu"] = spy
    all_results()
    assert spy.calls == 3


@pytest.mark.parametrize("value", ["gpu", "auto2", "REFERENCE"])
def test_invalid_env_value(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    for call in (
        lambda: pn.cross_entropy(Z, Y),
        lambda: pn.logsumexp(Z),
        lambda: pn.ptx_loss(0.0, Z, Y, 0.1),
        lambda: pn.token_logprobs(Z, Y),
        lambda: pn.cross_entropy_and_grad(Z, Y),
    ):
        with pytest.raises(ValueError, match=rf"{ENV}: unknown backend '{value}'; valid backends are"):
            call()


def test_env_var_naming_unavailable_backend_is_loud(monkeypatch):
    install(monkeypatch, fake_backend("cpu", available=(False, "switched off")))
    monkeypatch.setenv(ENV, "cpu")
    with pytest.raises(pn.BackendUnavailableError, match="switched off"):
        pn.cross_entropy(Z, Y)


# ------------------------------------------------------------------------------------------
# auto: preference and fallback
# ------------------------------------------------------------------------------------------
def test_auto_prefers_cpu_over_reference():
    hide_cuda()
    spy = fake_backend("cpu")
    _dispatch._backends["cpu"] = spy
    assert_same(all_results(), reference_results())
    assert spy.calls == 3
    assert _dispatch.resolve("auto") is spy


def test_auto_fallback_warns_once_and_matches_reference():
    hide_cuda()
    broken = fake_backend("cpu", fail_with=pn.KernelUnavailable("LLVM said no"))
    _dispatch._backends["cpu"] = broken
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


def test_auto_fallback_covers_the_gradient_ops():
    """A kernel that cannot load falls back for ops with a gradient pass too."""
    hide_cuda()
    _dispatch._backends["cpu"] = fake_backend("cpu", fail_with=pn.KernelUnavailable("no LLVM"))
    want_loss, want_grad = pn.cross_entropy_and_grad(Z, Y, backend="reference")
    with pytest.warns(RuntimeWarning, match="no LLVM"):
        loss, grad = pn.cross_entropy_and_grad(Z, Y)
    assert loss == want_loss
    np.testing.assert_array_equal(grad, want_grad)


def test_auto_fallback_on_real_cpu_backend(monkeypatch):
    """Patch the real cpu backend's row pass to fail: auto falls back with one warning."""
    if "cpu" not in pn.available_backends():
        pytest.skip("cpu backend not available")
    cpu = importlib.import_module("ptx_numba.cpu").BACKEND
    hide_cuda()

    def fail(*args, **kwargs):
        raise pn.KernelUnavailable("cannot compile for this CPU")

    monkeypatch.setattr(cpu, "row_stats", fail)
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
    _dispatch._backends["cpu"] = broken
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="LLVM said no"):
            pn.cross_entropy(Z, Y, backend="cpu")


def test_other_errors_are_not_swallowed_by_fallback():
    hide_cuda()
    buggy = fake_backend("cpu", fail_with=ZeroDivisionError("a real bug"))
    _dispatch._backends["cpu"] = buggy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ZeroDivisionError, match="a real bug"):
            pn.cross_entropy(Z, Y)
    assert _dispatch._backends.get("cpu") is buggy  # a bug is not a failure to load


@pytest.mark.parametrize("backend", ["auto", "cpu"])
@pytest.mark.parametrize("error", [ValueError("bad argument"), OverflowError("int too big to convert"),
                                   TypeError("wrong type")], ids=lambda e: type(e).__name__)
def test_argument_errors_never_mark_a_backend_broken(backend, error):
    """Only KernelUnavailable marks a backend broken; an error about the arguments reaches the
    caller and the backend stays usable for the next call (issue 14, item 2)."""
    hide_cuda()
    fake = fake_backend("cpu", fail_with=error)
    _dispatch._backends["cpu"] = fake
    before = pn.available_backends()
    assert "cpu" in before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no fallback warning
        with pytest.raises(type(error), match=str(error)):
            pn.cross_entropy(Z, Y, backend=backend)
        with pytest.raises(type(error), match=str(error)):
            pn.cross_entropy(Z, Y, backend=backend)
    assert fake.calls == 2  # tried again: not marked broken
    assert pn.available_backends() == before
    assert _dispatch.unavailable_reason("cpu") == ""
    assert _dispatch.resolve("auto") is fake


def test_huge_ignore_index_never_reaches_or_breaks_a_backend():
    """ignore_index = 2**63 (outside int64): no label can match it, the backend sees plain int64
    labels and stays available (issue 14, item 2: it used to raise OverflowError in the kernel
    and auto marked cpu broken for the rest of the process)."""
    hide_cuda()
    spy = fake_backend("cpu")
    _dispatch._backends["cpu"] = spy
    before = pn.available_backends()
    y = np.array([2, 0, 1])
    for ignore_index in (2**63, -(2**63) - 1, 10**30):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = pn.cross_entropy(Z, y, ignore_index=ignore_index, reduction="none")
        np.testing.assert_array_equal(got, pn.cross_entropy(Z, y, reduction="none", backend="reference"))
    assert spy.calls == 3
    for seen in spy.seen_y:
        assert seen.dtype == np.int64
        np.testing.assert_array_equal(seen, y)  # every row labelled: no -1
    assert pn.available_backends() == before


def test_reset_for_tests_restores_everything():
    hide_cuda()
    _dispatch._backends["cpu"] = fake_backend("cpu", fail_with=pn.KernelUnavailable("x"))
    with pytest.warns(RuntimeWarning):
        pn.logsumexp(Z)
    assert "cpu" in _dispatch._unavailable
    _dispatch._reset_for_tests()
    assert "cpu" not in _dispatch._unavailable and not _dispatch._backends
    hide_cuda()
    _dispatch._backends["cpu"] = fake_backend("cpu", fail_with=pn.KernelUnavailable("y"))
    with pytest.warns(RuntimeWarning, match="y"):  # warns again after a reset
        pn.logsumexp(Z)


def test_auto_on_a_small_host_batch_never_imports_numba_cuda():
    """Asking about a GPU costs seconds (importing numba.cuda); small host batches must not pay it."""
    import subprocess

    code = ("import sys, numpy as np, ptx_numba as pn\n"
            "pn.cross_entropy(np.zeros((4, 64), np.float32), np.zeros(4, int))\n"
            "print(sorted(m for m in sys.modules if m.startswith(('numba.cuda', 'numba_cuda'))))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PTX_NUMBA_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
