"""Backend registry: which backends exist, which can run here, and which one a call gets.

Rules (see ``docs/api.md``):

* ``backend="auto"`` (or the ``PTX_NUMBA_BACKEND`` environment variable, which overrides auto) picks
  the best available backend: ``cuda`` for GPU-resident input, and for host input when a real GPU
  is present and the batch is large enough to pay for the copy; else ``cpu``; else ``reference``.
  If the CPU kernel cannot compile or load, auto falls back to ``reference`` with one warning.
* An explicit backend name fails loudly: unknown names raise ``ValueError`` listing the valid ones;
  an unavailable backend raises ``RuntimeError`` saying why.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

from . import config
from .errors import BackendUnavailableError

#: Every backend, best first.
BACKENDS = ("cuda", "cpu", "reference")

#: Backend name -> module. The CUDA backend lives in ``gpu.py``: numba-cuda's import redirector
#: claims every module name containing "numba.cuda", which "ptx_numba.cuda" would.
_MODULES = {"cuda": "gpu"}

_modules: dict[str, ModuleType] = {}
_unavailable: dict[str, str] = {}
_warned_fallback = False


def _load(name: str) -> ModuleType | None:
    """Import a backend module and ask it whether it can run; cache the answer."""
    if name in _modules:
        return _modules[name]
    if name in _unavailable:
        return None
    try:
        module = importlib.import_module(f"ptx_numba.{_MODULES.get(name, name)}")
        ok, reason = module.is_available()
    except Exception as exc:  # a broken optional dependency must not break the package
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    if ok:
        _modules[name] = module
        return module
    _unavailable[name] = reason
    return None


def unavailable_reason(name: str) -> str:
    """Why ``name`` cannot run here ('' if it can)."""
    _load(name)
    return _unavailable.get(name, "")


def mark_broken(name: str, reason: str) -> None:
    """Record that a backend failed at run time (e.g. the CPU kernel did not compile)."""
    _modules.pop(name, None)
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


def explicit(name: str) -> ModuleType:
    """The module for an explicitly requested backend, or a loud error."""
    module = _load(name)
    if module is None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {_unavailable[name]}")
    return module


def choose_auto(*, on_device: bool, nbytes: int) -> ModuleType:
    """The backend ``auto`` uses for this input (see module docstring)."""
    cuda = _load("cuda")
    if on_device:
        if cuda is None:
            raise BackendUnavailableError(
                f"input is on the GPU but the cuda backend is not available: {_unavailable['cuda']}"
            )
        return cuda
    if cuda is not None and cuda.prefers_host_input(nbytes):
        return cuda
    cpu = _load("cpu")
    return cpu if cpu is not None else _load("reference")


def fall_back(failed: str, exc: BaseException) -> ModuleType:
    """Under auto, warn once and return the reference after a backend failed at run time."""
    global _warned_fallback
    mark_broken(failed, f"{type(exc).__name__}: {exc}")
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"ptx_numba: the {failed!r} backend failed ({type(exc).__name__}: {exc}); "
            "falling back to the NumPy reference",
            RuntimeWarning,
            stacklevel=4,
        )
    return _load("reference")


def _reset_for_tests() -> None:
    """Forget cached availability (tests patch backends)."""
    global _warned_fallback
    _modules.clear()
    _unavailable.clear()
    _warned_fallback = False
