"""Every kernel configuration the public ops can launch, for the compile (``sass``) tests.

A configuration is a key (:class:`.stats.StatsKey`, :class:`.grad.GradKey`) and a key is exactly
one compiled kernel: the kernels are compiled for one signature of 3-D arrays of any layout, so
the rank, shapes, strides, labels, temperature and softcap values of a call are runtime arguments
and compile nothing. What is compiled in:

========================  =====================================================================
statistics kernel         encoding x second set's encoding x transform kind x moments
                          (entropy, dsum, pair) x block reduction (shuffle, tree) x threads
gradient kernel           encoding x second set's encoding x gradient encoding x transform kind
                          x coefficient set (B term, E term) x threads
========================  =====================================================================

The public ops use these moments and kinds (``ptx_numba.losses``, ``.logprobs``, ``.linear`` and
``ptx_numba.torch``; ``tests/test_gpu_variants.py`` runs every op on the simulator and checks that
each key it launches is listed here):

* ``logsumexp``, ``cross_entropy`` (+ ``z_loss``), ``token_logprobs``: no moment, any kind
  (``plain``; ``softcap`` from the CE's ``softcap``; ``temp`` from a temperature);
* label smoothing: ``dsum`` (plain, softcap); entropy / log-probs with entropy: ``entropy``
  (plain, temp); ``kl_divergence`` / ``kl_penalty``: ``pair`` (plain, temp), in any pair of
  encodings.
* Gradients: CE and log-probs (A, C, D: no B, no E; plain, temp, softcap), with entropy (A, B, C;
  plain, temp), exact KL (A, B, E; plain, temp). The gradient's encoding is the logits'.

The thread count is ``config.CUDA_THREADS_PER_BLOCK`` (256 unless the user changes it), the
block reduction the warp shuffle on a GPU (``config.CUDA_USE_SHUFFLE`` may ask for the tree).
"""
from __future__ import annotations

from . import ENCODINGS
from .grad import GradKey
from .stats import StatsKey

#: ``(entropy, dsum, pair) -> transform kinds`` of the statistics kernels the public ops launch.
STATS_MOMENTS = {
    (False, False, False): ("plain", "temp", "softcap"),
    (False, True, False): ("plain", "softcap"),
    (True, False, False): ("plain", "temp"),
    (False, False, True): ("plain", "temp"),
}

#: ``(has_b, has_e) -> transform kinds`` of the gradient kernels the public ops launch.
GRAD_TERMS = {
    (False, False): ("plain", "temp", "softcap"),
    (True, False): ("plain", "temp"),
    (True, True): ("plain", "temp"),
}


def _second_encodings(encoding: str, paired: bool, mixed: bool) -> tuple[str, ...]:
    if not paired:
        return ("",)
    return ENCODINGS if mixed else (encoding,)


def stats_keys(tpb: int = 256, reductions=(True, False), mixed: bool = True) -> list[StatsKey]:
    """The statistics kernels (``reductions``: the ``use_shuffle`` values; ``mixed``: pairs of
    different encodings too)."""
    keys = []
    for enc in ENCODINGS:
        for (ent, dsum, pair), kinds in STATS_MOMENTS.items():
            for w_enc in _second_encodings(enc, pair, mixed):
                for kind in kinds:
                    for shuffle in reductions:
                        keys.append(StatsKey(enc, w_enc, kind, ent, dsum, pair, tpb, shuffle, enc != "f64"))
    return keys


def grad_keys(tpb: int = 256, mixed: bool = True) -> list[GradKey]:
    """The gradient kernels (``mixed``: a second set of another encoding too)."""
    keys = []
    for enc in ENCODINGS:
        for (has_b, has_e), kinds in GRAD_TERMS.items():
            for w_enc in _second_encodings(enc, has_e, mixed):
                for kind in kinds:
                    keys.append(GradKey(enc, w_enc, enc, kind, has_b, has_e, tpb))
    return keys
