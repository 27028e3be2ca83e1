"""One ``.npy`` file, opened once: its header parsed safely and its rows read block by block.

The file is opened once (one file descriptor for the whole run), so replacing or rewriting the
path while a run is under way cannot mix two files: every block is read through the same
descriptor, i.e. from the file that was opened. Each block is memory-mapped from that descriptor and
unmapped once it is scored, so resident memory stays about one block however large the file is (a
single file-wide mapping keeps every page read counted in the process's RSS until the kernel
reclaims it: measured in docs/cli.md).

Nothing is ever unpickled: the header is parsed with NumPy's header reader and object, structured
and other non-numeric dtypes are refused before any data is read.
"""
from __future__ import annotations

import math
import mmap
import os
import stat

import numpy as np
import numpy.lib.format as npy_format

from ._errors import CLIError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK"  # .npz archives are zip files

#: ``--dtype`` values: how 2-byte files are read.
HALF_DTYPES = ("bfloat16", "float16")


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        raise CLIError("reading bfloat16 needs the ml_dtypes package (pip install ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)


def _read_header(f, path: str, what: str):
    """``(shape, fortran_order, dtype, data_offset)`` of an open ``.npy`` file."""
    magic = f.read(len(NPY_MAGIC))
    if magic.startswith(ZIP_MAGIC):
        raise CLIError(f"{what} file {path} is an .npz archive; expected a single-array .npy file")
    if magic != NPY_MAGIC:  # np.load would guess "pickle" and say something confusing
        raise CLIError(f"{what} file {path} is not a .npy file (no NumPy header)")
    f.seek(0)
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(f)
        else:  # 3.0 (utf-8 field names) is only written for structured dtypes, which are refused
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except Exception as exc:  # a corrupt header raises ValueError, SyntaxError, TokenError, ...
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CLIError(f"{what} file {path} has a corrupt .npy header ({detail[:200]})") from None
    if not isinstance(shape, tuple) or any(not isinstance(n, int) or n < 0 for n in shape):
        raise CLIError(f"{what} file {path} has an invalid shape {shape!r} in its header")
    return shape, bool(fortran), dtype, f.tell()


def _check_dtype(dtype: np.dtype, path: str, what: str) -> None:
    if dtype.hasobject:
        raise CLIError(f"{what} file {path} holds Python objects (dtype {dtype}); "
                       "they are never unpickled, save a numeric array instead")
    if dtype.names is not None or dtype.subdtype is not None:
        raise CLIError(f"{what} file {path} has a structured dtype {dtype.descr}; expected plain numbers")


def logits_dtype(dtype: np.dtype, path: str, reinterpret: str | None) -> np.dtype:
    """The dtype the logits are scored as, given the file's dtype and ``--dtype``.

    Rules: ``--dtype bfloat16|float16`` reinterprets a 2-byte file (``int16``/``uint16`` bits, or
    raw ``V2`` as ml_dtypes saves bfloat16); raw ``V2`` and 2-byte integers are refused without it,
    since integer logits and bfloat16 bits cannot be told apart from the file; structured dtypes are
    always refused.
    """
    _check_dtype(dtype, path, "logits")
    two_byte_bits = (dtype.kind == "V" or dtype.kind in "iu") and dtype.itemsize == 2
    if reinterpret is not None:
        if reinterpret not in HALF_DTYPES:
            raise CLIError(f"--dtype must be one of {', '.join(HALF_DTYPES)}, got {reinterpret!r}")
        target = _bfloat16() if reinterpret == "bfloat16" else np.dtype(np.float16)
        if dtype == target or (two_byte_bits and dtype.byteorder != ">"):
            return target
        raise CLIError(f"--dtype {reinterpret} reinterprets 2-byte files, but logits file {path} "
                       f"holds {dtype} values")
    if dtype.kind == "V":
        if dtype.itemsize == 2:
            raise CLIError(f"logits file {path} holds raw 2-byte values ({dtype.str!r}), which is how "
                           "ml_dtypes saves bfloat16: pass --dtype bfloat16 to read them as bfloat16")
        raise CLIError(f"logits in {path} must be real numbers, got dtype {dtype.str!r}")
    if two_byte_bits:
        raise CLIError(f"logits file {path} holds 2-byte integers ({dtype}); if they are bfloat16 or "
                       "float16 bits, pass --dtype bfloat16 or --dtype float16")
    if dtype.name == "bfloat16":
        return dtype
    if dtype.kind not in "fiu":
        raise CLIError(f"logits in {path} must be real numbers, got dtype {dtype}")
    return dtype


class NpyFile:
    """A ``.npy`` file opened once; use as a context manager (closes the descriptor).

    Parameters
    ----------
    path : str
    what : str
        "logits" or "labels", for messages.
    """

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        try:
            # O_NONBLOCK: opening a fifo for reading would otherwise wait for a writer forever.
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise CLIError(f"{what} file not found: {path}") from None
        except IsADirectoryError:
            raise CLIError(f"{what} path is a directory, expected a .npy file: {path}") from None
        except OSError as exc:
            raise CLIError(f"cannot open {what} file {path}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISDIR(st.st_mode):
                raise CLIError(f"{what} path is a directory, expected a .npy file: {path}")
            if not stat.S_ISREG(st.st_mode):
                raise CLIError(f"{what} path {path} is not a regular file (a pipe, socket or device); "
                               "save the array to a .npy file first")
            self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
            with os.fdopen(os.dup(self.fd), "rb") as f:
                self.shape, self.fortran, self.dtype, self.offset = _read_header(f, path, what)
            _check_dtype(self.dtype, path, what)
            need = self.offset + math.prod(self.shape) * self.dtype.itemsize
            if self.size < need:
                raise CLIError(f"cannot read {what} file {path}: it is truncated (the header promises "
                               f"{need} bytes, the file has {self.size})")
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Close the file descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ----------------------------------------------------------------------------------------
    def _map(self, start: int, stop: int) -> tuple[mmap.mmap, int]:
        """A read-only mapping of bytes ``[start, stop)`` (page-aligned); returns it and the skew."""
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        return mmap.mmap(self.fd, stop - aligned, access=mmap.ACCESS_READ, offset=aligned), start - aligned

    def read_all(self) -> np.ndarray:
        """The whole array, read into memory (for labels: O(N))."""
        out = np.empty(math.prod(self.shape), self.dtype)
        view = memoryview(out.view(np.uint8))
        done = 0
        while done < out.nbytes:
            chunk = os.pread(self.fd, min(out.nbytes - done, 1 << 26), self.offset + done)
            if not chunk:
                raise CLIError(f"cannot read {self.what} file {self.path}: it is truncated")
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
        return out.reshape(self.shape, order="F" if self.fortran else "C")

    def rows(self, vocab_dtype: np.dtype):
        """A reader of ``[rows, V]`` blocks: ``reader(first, last, fn)`` returns ``fn(block)``.

        The block is only valid inside ``fn``: its mapping is closed afterwards, which is what keeps
        RSS bounded. Rows follow C order of ``shape[:-1]`` for C files and Fortran order for Fortran
        files (see :meth:`row_order`).
        """
        vocab = self.shape[-1]
        n_rows = math.prod(self.shape[:-1])
        item = vocab_dtype.itemsize

        def read(first: int, last: int, fn):
            if last <= first:
                return fn(np.empty((0, vocab), vocab_dtype))
            if self.fortran:  # element (r, v) at r + v * n_rows: every block spans the whole file
                start = self.offset + first * item
                stop = self.offset + ((vocab - 1) * n_rows + last) * item
                strides = (item, n_rows * item)
            else:
                start = self.offset + first * vocab * item
                stop = self.offset + last * vocab * item
                strides = (vocab * item, item)
            mm, skew = self._map(start, stop)
            try:
                block = np.ndarray((last - first, vocab), vocab_dtype, buffer=mm, offset=skew,
                                   strides=strides)
                try:
                    return fn(block)
                finally:
                    del block
            finally:
                mm.close()

        return read

    @property
    def row_order(self) -> str:
        """"C" or "F": the order in which :meth:`rows` walks ``shape[:-1]``."""
        return "F" if self.fortran else "C"
