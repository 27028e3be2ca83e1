"""The ops ``ptx-numba bench --op`` times: each op's public call, its PyTorch twin and its floor.

An op is one entry of :data:`OPS`. For every op the bench times

* each ptx_numba backend through the public function (validation included),
* the ``stream-read`` floor: a streaming read of every logit array the op reads, plus a stream copy
  of the logits for an op that writes a gradient (:func:`._bench_floor.stream_copy` into a
  preallocated array, on the kernels' threads: the one write a fused backward cannot avoid),
* PyTorch (CPU): the expression a user would write for the same numbers, in the logits' dtype
  (its forward plus ``backward()`` for a gradient op).

The bytes behind the GB/s column are the bytes the floor moves: ``reads`` logit arrays read, plus a
read and a write of the logits for a gradient op. The error column compares each contender's
values with the ``reference`` backend's (float64).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import api


@dataclass
class Inputs:
    """One case's arrays: the logits, a second logit set (KL), labels and a gradient buffer."""

    logits: np.ndarray
    labels: np.ndarray
    second: np.ndarray | None = None
    grad: np.ndarray | None = None  #: preallocated ``out=`` of a gradient op (like torch's .grad)


@dataclass(frozen=True)
class BenchOp:
    """How one op is timed (see the module docstring)."""

    name: str
    call: Callable[[Inputs, str], Any]  #: (inputs, backend) -> result
    values: Callable[[Any], np.ndarray]  #: result -> the numbers checked against the reference
    torch: Callable[[Inputs], Callable[[], Any]]  #: inputs -> the timed zero-argument torch call
    reads: int = 1  #: logit arrays read
    grad: bool = False  #: writes a gradient the size of the logits

    @property
    def traffic(self) -> int:
        """Logit-sized arrays moved by the floor (a gradient op: one more read and a write)."""
        return self.reads + (2 if self.grad else 0)


def _tensor(a: np.ndarray):
    """A zero-copy torch tensor on a NumPy array (bfloat16 through its bits)."""
    import torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _torch_ce(x: Inputs):
    import torch
    import torch.nn.functional as F

    t, y = _tensor(x.logits), torch.from_numpy(x.labels)

    def call():
        with torch.no_grad():
            return F.cross_entropy(t, y, reduction="none")

    return call


def _torch_ce_grad(x: Inputs):
    import torch
    import torch.nn.functional as F

    t, y = _tensor(x.logits), torch.from_numpy(x.labels)

    def call():
        leaf = t.detach().requires_grad_(True)
        loss = F.cross_entropy(leaf, y)
        loss.backward()
        return loss, leaf.grad

    return call


def _torch_logprobs(x: Inputs):
    import torch

    t, y = _tensor(x.logits), torch.from_numpy(x.labels)

    def call():
        with torch.no_grad():
            lp = torch.log_softmax(t, -1)
            return lp.gather(-1, y[:, None])[:, 0], -(lp.exp() * lp).sum(-1)

    return call


def _torch_entropy(x: Inputs):
    import torch

    t = _tensor(x.logits)

    def call():
        with torch.no_grad():
            lp = torch.log_softmax(t, -1)
            return -(lp.exp() * lp).sum(-1)

    return call


def _torch_kl(x: Inputs):
    import torch

    t, r = _tensor(x.logits), _tensor(x.second)

    def call():
        with torch.no_grad():
            lp, lq = torch.log_softmax(t, -1), torch.log_softmax(r, -1)
            return (lp.exp() * (lp - lq)).sum(-1)

    return call


def _torch_kl_k3(x: Inputs):
    import torch

    t, r, y = _tensor(x.logits), _tensor(x.second), torch.from_numpy(x.labels)

    def call():
        with torch.no_grad():
            lp, lq = torch.log_softmax(t, -1), torch.log_softmax(r, -1)
            d = (lq - lp).gather(-1, y[:, None])[:, 0]
            return torch.expm1(d) - d

    return call


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(-1)


OPS: dict[str, BenchOp] = {op.name: op for op in (
    BenchOp("cross_entropy",
            lambda x, b: api.cross_entropy(x.logits, x.labels, reduction="none", backend=b),
            _f64, _torch_ce),
    BenchOp("cross_entropy_and_grad",
            lambda x, b: api.cross_entropy_and_grad(x.logits, x.labels, out=x.grad, backend=b),
            lambda r: _f64(r[1]), _torch_ce_grad, grad=True),
    BenchOp("token_logprobs",
            lambda x, b: api.token_logprobs(x.logits, x.labels, return_entropy=True, backend=b),
            lambda r: np.concatenate([_f64(r[0]), _f64(r[1])]), _torch_logprobs),
    BenchOp("entropy", lambda x, b: api.entropy(x.logits, backend=b), _f64, _torch_entropy),
    BenchOp("kl_divergence", lambda x, b: api.kl_divergence(x.logits, x.second, backend=b),
            _f64, _torch_kl, reads=2),
    BenchOp("kl_penalty_k3",
            lambda x, b: api.kl_penalty(x.logits, x.second, x.labels, estimator="k3", backend=b),
            _f64, _torch_kl_k3, reads=2),
)}

#: The op of ``ptx-numba bench`` without ``--op``.
DEFAULT_OP = "cross_entropy"


def second_logits(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    """A reference policy's logits near ``logits`` (std 0.5 apart), in the same dtype."""
    noise = rng.standard_normal(logits.shape, dtype=np.float32)
    noise *= 0.5
    noise += logits.astype(np.float32)
    return noise.astype(logits.dtype)


def floor_call(op: BenchOp, x: Inputs, encoded: list[np.ndarray]) -> Callable[[], Any]:
    """The floor of ``op``: stream reads of ``encoded`` (every logit array read), and a copy."""
    from ._bench_floor import stream_copy, stream_read

    def call():
        for a in encoded:
            stream_read(a)
        if op.grad:
            stream_copy(encoded[0], x.grad.view(encoded[0].dtype))

    return call
