"""Backend registry: which backends exist, which can run here, and which one a call gets.

Every backend is a package ``ptx_numba.<module>`` exporting ``BACKEND``, an object with the
row-pass protocol of :mod:`ptx_numba._rowpass` (:class:`~ptx_numba._rowpass.Backend`).

Rules:

* ``backend="auto"`` (or the ``PTX_NUMBA_BACKEND`` environment variable, which overrides auto) picks
  the best available backend: ``cuda`` for GPU-resident input, and for host input when a real GPU
  is present and the batch is large enough to pay for the copy; else ``cpu``; else ``reference``.
  If a compiled kernel cannot compile or load (:class:`~ptx_numba.errors.KernelUnavailable`), auto
  marks that backend broken, warns once and runs the reference. Nothing else marks a backend
  broken: an error caused by the arguments reaches the caller and leaves the backend usable.
* An explicit backend name fails loudly: unknown names raise ``ValueError`` listing the valid ones;
  an unavailable backend raises :class:`~ptx_numba.errors.BackendUnavailableError` saying why.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any, Callable

from . import config
from ._rowpass import Backend
from .errors import BackendUnavailableError, KernelUnavailable

#: Every backend, best first.
BACKENDS = ("cuda", "cpu", "reference")

#: Backend name -> package. The CUDA backend lives in ``gpu/``: numba-cuda's import redirector
#: claims every module name containing "numba.cuda", which "ptx_numba.cuda" would.
_MODULES = {"cuda": "gpu", "cpu": "cpu", "reference": "reference"}

_backends: dict[str, Backend] = {}
_unavailable: dict[str, str] = {}
_warned_fallback = False


def _load(name: str) -> Backend | None:
    """Import a backend and ask it whether it can run; cache the answer."""
    if name in _backends:
        return _backends[name]
    if name in _unavailable:
        return None
    try:
        backend = importlib.import_module(f"ptx_numba.{_MODULES[name]}").BACKEND
        ok, reason = backend.is_available()
    except Exception as exc:  # a broken optional dependency must not break the package
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    if ok:
        _backends[name] = backend
        return backend
    _unavailable[name] = reason
    return None


def unavailable_reason(name: str) -> str:
    """Why ``name`` cannot run here ('' if it can)."""
    _load(name)
    return _unavailable.get(name, "")


def mark_broken(name: str, reason: str) -> None:
    """Record that a backend's kernels failed to compile or load."""
    _backends.pop(name, None)
    _unavailable[name] = reason


def available_backends() -> tuple[str, ...]:
    """Names of the backends usable now, best first. Always ends with ``"reference"``."""
    return tuple(name for name in BACKENDS if _load(name) is not None)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {name!r}; valid backends are {('auto',) + BACKENDS}")
    return name


def requested_backend(backend: object) -> str:
    """Resolve the environment override: it replaces ``"auto"`` only, never an explicit name."""
    name = _check_name(backend)
    if name == "auto":
        env = os.environ.get(config.BACKEND_ENV_VAR, "").strip()
        if env:
            try:
                name = _check_name(env)
            except ValueError as exc:
                raise ValueError(f"{config.BACKEND_ENV_VAR}: {exc}") from None
    return name


def explicit(name: str) -> Backend:
    """The backend for an explicitly requested name, or a loud error."""
    backend = _load(name)
    if backend is None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {_unavailable[name]}")
    return backend


def choose_auto(*, on_device: bool, nbytes: int) -> Backend:
    """The backend ``auto`` uses for this input (see module docstring)."""
    if on_device:
        cuda = _load("cuda")
        if cuda is None:
            raise BackendUnavailableError(
                f"input is on the GPU but the cuda backend is not available: {_unavailable['cuda']}"
            )
        return cuda
    # Only a batch big enough to pay for the copy asks about a GPU: importing numba.cuda costs
    # seconds (measured: ~4 s in a fresh Dask worker), which small host batches should never pay.
    if nbytes >= config.CUDA_AUTO_MIN_HOST_BYTES:
        cuda = _load("cuda")
        if cuda is not None and cuda.prefers_host_input(nbytes):
            return cuda
    cpu = _load("cpu")
    return cpu if cpu is not None else _load("reference")


def resolve(backend: object = "auto", *, on_device: bool = False, nbytes: int = 0) -> Backend:
    """The backend a call with these inputs runs on (before any fallback)."""
    name = requested_backend(backend)
    if on_device:
        if name not in ("auto", "cuda"):
            raise TypeError(
                f"backend {name!r} needs host (NumPy/CPU) arrays but the input is on the GPU; "
                "use backend='cuda' or 'auto', or copy the input to the host first"
            )
        return explicit("cuda") if name == "cuda" else choose_auto(on_device=True, nbytes=0)
    if name != "auto":
        return explicit(name)
    return choose_auto(on_device=False, nbytes=nbytes)


def run(backend: object, *, on_device: bool, nbytes: int, call: Callable[[Backend], Any]) -> tuple[Any, str]:
    """``(call(backend), name)`` with auto's quiet fallback to the reference.

    Only :class:`KernelUnavailable` (a kernel that cannot compile or load) falls back; the
    backend is then marked broken for the rest of the process.
    """
    chosen = resolve(backend, on_device=on_device, nbytes=nbytes)
    if requested_backend(backend) != "auto" or chosen.name == "reference" or on_device:
        return call(chosen), chosen.name
    try:
        return call(chosen), chosen.name
    except KernelUnavailable as exc:
        reference = fall_back(chosen.name, exc)
        return call(reference), reference.name


def fall_back(failed: str, exc: BaseException) -> Backend:
    """Under auto, warn once and return the reference after a backend failed to compile/load."""
    global _warned_fallback
    mark_broken(failed, f"{type(exc).__name__}: {exc}")
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"ptx_numba: the {failed!r} backend failed ({type(exc).__name__}: {exc}); "
            "falling back to the NumPy reference",
            RuntimeWarning,
            stacklevel=_caller_level(),
        )
    return _load("reference")


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside this package, as seen from :func:`fall_back`
    (the depth from a public function to here differs from op to op)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(2), 2  # level 1 is fall_back itself, 2 its caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _reset_for_tests() -> None:
    """Forget cached availability (tests patch backends)."""
    global _warned_fallback
    _backends.clear()
    _unavailable.clear()
    _warned_fallback = False
