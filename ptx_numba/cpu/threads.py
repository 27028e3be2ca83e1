"""Numba's threading layer as the CPU kernels meet it: which layer runs, fork, concurrent calls.

The CPU kernels are ``parallel=True`` Numba functions, so every call goes through the threading
layer Numba picks once per process (``tbb``, ``omp`` or ``workqueue``; see docs/threads.md).
Each layer has one hazard this module answers, at the single point where the backend calls a
kernel (:func:`call`):

* **GNU OpenMP is not fork-safe.** Once a process has started Numba's ``omp`` layer, a
  ``fork()``-ed child that calls a parallel kernel is terminated by Numba with SIGTERM
  ("fork() called from a process already using GNU OpenMP"), even with one thread
  (``numba.set_num_threads(1)`` measured: still killed). ``multiprocessing.Pool`` then hangs and
  ``ProcessPoolExecutor`` raises BrokenProcessPool. Such a child is flagged at fork time
  (:func:`os.register_at_fork`) and the kernels refuse to start there with a
  :class:`~ptx_numba.errors.KernelUnavailable` naming the fixes, so ``backend="auto"`` falls back
  to the reference (one warning) and ``backend="cpu"`` raises instead of killing the process.
* **TBB is fork-safe and thread-safe, but a pip-installed TBB is invisible to Numba** in a
  virtual environment: the wheel puts ``libtbb.so.12`` in ``<prefix>/lib``, which is not on the
  loader path, so Numba silently picks ``omp``. :func:`prepare` loads that library by its full
  path before the first kernel starts the layer; Numba's own lookup by name then finds it and its
  default priority (``tbb`` first) chooses TBB. An explicit ``NUMBA_THREADING_LAYER`` or
  ``NUMBA_THREADING_LAYER_PRIORITY`` still decides: nothing here changes Numba's configuration.
* **workqueue is not thread-safe**: two Python threads inside parallel kernels at once abort the
  process (SIGABRT, "Concurrent access has been detected"). Under that layer (and before the
  layer is known) kernel calls are serialized by a process-wide lock.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
import threading

from ..errors import KernelUnavailable

#: Numba's minimum TBB: interface version 12060 ("2021 update 6"), i.e. ``libtbb.so.12.6``.
_TBB_MIN_MINOR = 6

#: Serializes kernel calls where the layer is not thread-safe (re-entrant: a kernel driver that
#: calls another kernel driver must not deadlock).
_LOCK = threading.RLock()

_prepared = False
_forked_after_gnu_omp = False

FORK_MESSAGE = (
    "the CPU kernels cannot run in this process: it was forked (os.fork, or multiprocessing's "
    "'fork' start method, e.g. a torch DataLoader worker) after its parent had started Numba's "
    "GNU OpenMP threading layer, which is not fork-safe (a kernel call here would terminate the "
    "process). Fixes: install the TBB threading layer (pip install 'ptx_numba[tbb]'), which "
    "ptx_numba then uses; or start the workers with the 'spawn' or 'forkserver' start method "
    "(multiprocessing.get_context('spawn'), DataLoader(multiprocessing_context='spawn')); or set "
    "NUMBA_THREADING_LAYER=workqueue in the parent (fork-safe, kernel calls serialized)"
)


def active_layer() -> str | None:
    """The threading layer Numba runs in this process, or None before it has started.

    Returns
    -------
    str or None
        ``"tbb"``, ``"omp"`` or ``"workqueue"``; None while no parallel kernel has run yet.
    """
    numba = sys.modules.get("numba")
    if numba is None:
        return None
    try:
        return numba.threading_layer()
    except ValueError:  # "Threading layer is not initialized."
        return None


def _gnu_openmp_active() -> bool:
    """Whether this process runs Numba's ``omp`` layer on GNU OpenMP (the fork-unsafe runtime)."""
    if active_layer() != "omp":
        return False
    omppool = sys.modules.get("numba.np.ufunc.omppool")
    # Intel / LLVM OpenMP (macOS, some conda builds) survive fork; only GNU's libgomp does not.
    return getattr(omppool, "openmp_vendor", "GNU") == "GNU"


def _after_fork_in_child() -> None:
    global _forked_after_gnu_omp
    try:
        if _gnu_openmp_active():
            _forked_after_gnu_omp = True
    except Exception:  # pragma: no cover - a fork hook must never raise
        pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def forked_after_gnu_openmp() -> bool:
    """Whether this process is a fork of one that had started GNU OpenMP (kernels refuse to run).

    Returns
    -------
    bool
    """
    return _forked_after_gnu_omp


def _tbb_candidates() -> list[str]:
    """Where pip puts ``libtbb.so.12``: ``<prefix>/lib`` of the environment (or the user base)."""
    import site

    roots = [sys.prefix, sys.exec_prefix, getattr(site, "USER_BASE", None) or ""]
    seen, paths = set(), []
    for root in roots:
        path = os.path.join(root, "lib", "libtbb.so.12")
        if root and path not in seen:
            seen.add(path)
            paths.append(path)
    return paths


def _tbb_recent_enough(path: str) -> bool:
    """Whether ``libtbb.so.12`` is TBB 2021.6+: its full name ``libtbb.so.12.N`` has N >= 6.

    The full name is that of the file a link points to, or of a sibling file (wheels install
    copies, not links). Loading an older library would make Numba's own version check warn, so
    a library whose version cannot be read is treated as too old and nothing is loaded.
    """
    pattern = re.compile(r"libtbb\.so\.12\.(\d+)(\.\d+)*")
    names = [os.path.basename(os.path.realpath(path))]
    try:
        names += os.listdir(os.path.dirname(path))
    except OSError:
        pass
    minors = [int(m.group(1)) for m in map(pattern.fullmatch, names) if m is not None]
    return bool(minors) and max(minors) >= _TBB_MIN_MINOR


def _tbb_loadable_by_name() -> bool:
    try:
        ctypes.CDLL("libtbb.so.12")
        return True
    except OSError:
        return False


def prepare() -> str:
    """Make a pip-installed TBB visible to Numba before its threading layer starts (Linux).

    Called before the first kernel; call it earlier if other code may start Numba's layer first
    (``numba.get_num_threads()`` starts it). Idempotent and cheap after the first call.

    Returns
    -------
    str
        What was done: ``"started"`` (the layer already ran: too late to change), ``"found"``
        (Numba finds TBB by itself), ``"loaded <path>"``, or ``"none"`` (no usable TBB here).
    """
    global _prepared
    _prepared = True
    if active_layer() is not None:
        return "started"
    if not sys.platform.startswith("linux"):
        return "none"
    if _tbb_loadable_by_name():
        return "found"
    for path in _tbb_candidates():
        if os.path.exists(path) and _tbb_recent_enough(path):
            try:
                # RTLD_GLOBAL under its soname: Numba's CDLL("libtbb.so.12") and the DT_NEEDED
                # entry of its tbbpool extension now resolve to this already-loaded library.
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return f"loaded {path}"
            except OSError:
                continue
    return "none"


def call(fn, *args):
    """Run one CPU kernel driver under the rules of the active threading layer.

    Parameters
    ----------
    fn : callable
        A kernel driver (``rowpass.row_stats``, ``backward.row_grad``).
    *args
        Its arguments.

    Returns
    -------
    object
        Whatever ``fn`` returns.

    Raises
    ------
    KernelUnavailable
        In a child forked after its parent had started GNU OpenMP (see :data:`FORK_MESSAGE`).
    """
    if not _prepared:
        prepare()
    if _forked_after_gnu_omp:
        raise KernelUnavailable(FORK_MESSAGE)
    layer = active_layer()
    if layer is None or layer == "workqueue":
        # Before the first kernel the layer is unknown (it may become workqueue); afterwards only
        # workqueue needs this: tbb and omp accept concurrent parallel regions.
        with _LOCK:
            return fn(*args)
    return fn(*args)
