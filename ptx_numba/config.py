"""Tunables and shared constants, kept in one place so tests can patch them.

Nothing here is computed at import time beyond reading environment variables.
"""
import os


class EnvInt:
    """An integer tunable read from an environment variable, checked when it is used.

    A bad value must not break ``import ptx_numba`` (or ``ptx-numba --version``): ``int()`` of it
    raises a ``ValueError`` that names the variable, at the first use of the setting.
    """

    def __init__(self, name: str, default: int):
        self.name, self.raw, self.default = name, os.environ.get(name), default

    def __int__(self) -> int:
        if self.raw is None or not self.raw.strip():
            return self.default
        try:
            return int(self.raw)
        except ValueError:
            raise ValueError(f"environment variable {self.name}={self.raw!r} is not an integer") from None

    def __repr__(self) -> str:
        return f"EnvInt({self.name}={self.raw!r}, default={self.default})"

#: Environment variable that overrides ``backend="auto"`` (e.g. ``PTX_NUMBA_BACKEND=reference``).
BACKEND_ENV_VAR = "PTX_NUMBA_BACKEND"

#: Default label value that marks a row as ignored (PyTorch's convention).
DEFAULT_IGNORE_INDEX = -100

# --- CPU kernel -------------------------------------------------------------------------------
#: Fast-math flags for the CPU kernels. Deliberately *not* ``fastmath=True``: that includes
#: ``nnan``/``ninf``, under which comparisons with ``-inf`` (masked vocabulary entries) are undefined.
#: ``reassoc`` lets LLVM vectorize the float32 sum; ``contract`` lets it fuse multiply-adds.
CPU_FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

#: Elements per chunk in the CPU kernel. A chunk is summed in float32 lanes and then added to a
#: float64 row accumulator, so this bounds float32 rounding (each lane sums CHUNK/lanes terms) while
#: keeping the chunk in L1 for the rare second pass (a re-scan when the running max is stale).
CPU_CHUNK = 2048

#: A chunk whose float32 exp-sum exceeds this (or overflows) is re-scanned with an exact max.
#: e**20 ~ 4.9e8: terms up to e**20 keep float32 lanes far from overflow and lose < 2e-6 to rounding.
CPU_RESCAN_TRIGGER = 4.0e8

#: The same for the walks that also sum moments (entropy ``t``, KL ``u``): e**12 ~ 1.6e5. Their
#: finishers subtract (``H = log s - t/s``), so a shift far below the row max amplifies the float32
#: rounding of ``t`` by about (gap / H): with gaps of 16 (float16 rows at 3e4 offsets) the entropy
#: missed the 2e-5 contract by up to 5x. A gap of at most 12 keeps it under 1e-5; the cost is about
#: one extra L1 pass of the first chunk of a row (its shift moves to that chunk's max).
CPU_MOMENT_RESCAN_TRIGGER = 1.6e5

#: Which exp-sum loop the CPU kernels run (:mod:`ptx_numba.cpu.simd.features`): None = the best
#: the compile target has ("avx512" where it has AVX-512 F/BW/DQ/VL, else "avx2" with AVX2 + FMA,
#: else "portable"), or one of those names to lower the choice. It exists so one machine can run
#: and compare every loop (tests, benchmarks), and so a deployment can pin one loop. Naming an
#: ISA the target lacks raises ValueError (its instructions would kill the process). Read at call
#: time; when None, the environment variable :data:`CPU_ISA_ENV_VAR` is read instead.
CPU_ISA = None

#: Environment variable read (at call time) while ``CPU_ISA`` is None, e.g.
#: ``PTX_NUMBA_CPU_ISA=avx2 ptx-numba bench ...``; empty means automatic.
CPU_ISA_ENV_VAR = "PTX_NUMBA_CPU_ISA"

#: False forces the portable loop whatever ``CPU_ISA`` says (the older switch, kept for scripts
#: and tests that set it); None defers to ``CPU_ISA``. Read at call time.
CPU_AVX2 = None

#: Minimum elements per thread-piece when one row is split across threads (small-N case).
CPU_MIN_SEGMENT = 16384

# --- CUDA kernel ------------------------------------------------------------------------------
#: Threads per block for the row-per-block kernel (a multiple of 32). Tests shrink it.
CUDA_THREADS_PER_BLOCK = EnvInt("PTX_NUMBA_CUDA_TPB", 256)

#: Cap on the grid size (blocks). Rows beyond it are taken by a grid-stride loop, and each block
#: makes one atomic add for all its rows, so the cap also bounds atomic traffic. Tests shrink it.
CUDA_MAX_BLOCKS = EnvInt("PTX_NUMBA_CUDA_MAX_BLOCKS", 4096)

#: Block reduction: None (auto) = warp shuffles on a real GPU; False = shared-memory tree. The
#: simulator always uses the tree (it has no warp shuffles). Read at call time.
CUDA_USE_SHUFFLE = None

#: Host (NumPy) inputs go to the GPU under ``auto`` only when they are at least this large (bytes):
#: below it the host->device copy costs more than the CPU kernel. See docs/performance.md.
CUDA_AUTO_MIN_HOST_BYTES = 64 * 1024 * 1024

# --- reference backend ------------------------------------------------------------------
#: The float64 reference converts at most this many logits at a time (8 bytes each, plus a few
#: temporaries of the same size), so its memory stays bounded on large batches (it is the
#: fallback, so it runs on user data).
REFERENCE_BLOCK_ELEMENTS = 1 << 22

# --- front door ---------------------------------------------------------------------------
#: Inputs whose values must be converted (another byte order, a non-unit stride along V, integer
#: or 8-bit float logits) are converted in row blocks of at most this many bytes, so no input ever
#: costs a second N x V array.
COPY_BLOCK_BYTES = 32 * 1024 * 1024

# --- fused linear cross entropy -------------------------------------------------------------
#: Logit bytes per chunk when ``chunk_size=None``: one buffer of this size is the only N x V-like
#: memory the fused linear ops hold. 112 MB stays under 1/8 of the logits at [2048 tokens,
#: V = 128256] (1 GB of float32 logits) and gives the backward's matmuls 229 rows per chunk:
#: forward + backward took 10.8-12.6 s there against 13.1 s with 64 MB chunks (130 rows),
#: two calls each in one process (2 threads, Xeon, D = 1024).
LINEAR_CHUNK_BYTES = 112 * 1024 * 1024
#: Without SciPy (whose BLAS gemm accumulates into ``d_weight`` in place), bytes of the reused
#: slab through which the backward adds ``G.T @ hidden`` into ``d_weight`` a slab of vocabulary
#: rows at a time (``+=`` of the whole product would allocate a temporary the size of
#: ``d_weight`` per chunk: 525 MB at V = 128256, D = 1024).
LINEAR_SLAB_BYTES = 16 * 1024 * 1024

# --- CLI --------------------------------------------------------------------------------------
#: Target bytes of logits per block when ``ptx-numba score`` streams a memory-mapped file.
SCORE_BLOCK_BYTES = 64 * 1024 * 1024
