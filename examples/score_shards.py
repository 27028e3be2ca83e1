"""Score a directory of logits shards: the mean cross entropy over all of them, shard by shard.

Each shard is a pair ``logits-<name>.npy`` ([..., V], any float dtype) and ``labels-<name>.npy``
(``logits.shape[:-1]``, integers, -100 for ignored positions). Shards are memory-mapped and scored
in blocks of rows, so a directory larger than memory needs only one block at a time.

    python examples/score_shards.py DIR          # score the shards in DIR
    python examples/score_shards.py              # make a few small shards in a temporary folder first
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

import numpy as np

import ptx_numba as pn

IGNORE = -100


def make_shards(folder: str, n_shards: int = 3, rows: int = 300, vocab: int = 5000) -> None:
    """Write ``n_shards`` random shards (float32 logits, some ignored labels) into ``folder``."""
    rng = np.random.default_rng(0)
    for k in range(n_shards):
        logits = rng.standard_normal((rows + 17 * k, vocab), dtype=np.float32)
        labels = rng.integers(0, vocab, size=len(logits))
        labels[rng.random(len(labels)) < 0.1] = IGNORE
        np.save(os.path.join(folder, f"logits-{k:03d}.npy"), logits)
        np.save(os.path.join(folder, f"labels-{k:03d}.npy"), labels)


def shard_pairs(folder: str) -> list[tuple[str, str]]:
    """The ``(logits, labels)`` file pairs in ``folder``; a missing labels file is an error."""
    pairs = []
    for logits_path in sorted(glob.glob(os.path.join(folder, "logits-*.npy"))):
        name = os.path.basename(logits_path)[len("logits-"):]
        labels_path = os.path.join(folder, "labels-" + name)
        if not os.path.exists(labels_path):
            raise FileNotFoundError(f"{logits_path} has no labels file {labels_path}")
        pairs.append((logits_path, labels_path))
    if not pairs:
        raise FileNotFoundError(f"no logits-*.npy shards in {folder}")
    return pairs


def score_shard(logits_path: str, labels_path: str, block_rows: int = 4096) -> tuple[float, int]:
    """``(sum of CE, number of valid labels)`` of one shard, in blocks of ``block_rows`` rows."""
    logits = np.load(logits_path, mmap_mode="r")
    labels = np.load(labels_path)
    vocab = logits.shape[-1]
    logits = logits.reshape(-1, vocab)
    labels = labels.reshape(-1)
    total, count = 0.0, 0
    for start in range(0, len(labels), block_rows):
        rows = slice(start, start + block_rows)
        total += pn.cross_entropy(logits[rows], labels[rows], ignore_index=IGNORE, reduction="sum")
        count += int(np.count_nonzero(labels[rows] != IGNORE))
    return total, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="folder of logits-*.npy / labels-*.npy shards")
    parser.add_argument("--block-rows", type=int, default=4096, help="rows scored per call")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            make_shards(tmp)
            folder = tmp
            print(f"no folder given: scoring 3 random shards in {tmp}")
        grand_total, grand_count = 0.0, 0
        for logits_path, labels_path in shard_pairs(folder):
            total, count = score_shard(logits_path, labels_path, args.block_rows)
            grand_total += total
            grand_count += count
            mean = total / count if count else 0.0
            print(f"{os.path.basename(logits_path)}: {count} tokens, mean CE {mean:.6f}")
        mean = grand_total / grand_count if grand_count else 0.0  # no valid token: 0, as pn does
        print(f"all shards: {grand_count} tokens, mean CE {mean:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
