"""Exceptions shared by every layer (the bottom of the import graph: it imports nothing)."""
from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run in this environment."""


class KernelUnavailable(BackendUnavailableError):
    """A compiled backend's kernel cannot be compiled or loaded here.

    Raised only for failures to compile or load (never for a bad argument). Under
    ``backend="auto"`` it triggers the fallback to the reference; with an explicit backend it
    reaches the caller (it is a :class:`BackendUnavailableError`).
    """
