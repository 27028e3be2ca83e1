"""Finding the shards of a dataset: a directory or glob of ``logits-*.npy`` files with their labels.

Matching rule: the labels of ``<dir>/logits-<key>.npy`` are ``<dir>/labels-<key>.npy`` (same
directory, same ``<key>``). Shards are scored in natural order of ``<key>`` (``logits-2`` before
``logits-10``), which is also the order of ``--per-row`` output. In a directory, a ``labels-<key>.npy``
without its ``logits-<key>.npy`` is an error too (a shard lost on the way is never skipped silently).
"""
from __future__ import annotations

import glob
import os
import re

from ._errors import CLIError
from .shard import Shard

LOGITS_PREFIX, LABELS_PREFIX, SUFFIX = "logits-", "labels-", ".npy"
GLOB_CHARS = frozenset("*?[")


def is_dataset(source: str) -> bool:
    """True when ``source`` names shards (a directory, or a glob that is not an existing file)."""
    return os.path.isdir(source) or (not os.path.exists(source) and bool(GLOB_CHARS & set(source)))


def _natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _key_of(path: str) -> str | None:
    base = os.path.basename(path)
    if base.startswith(LOGITS_PREFIX) and base.endswith(SUFFIX) and len(base) > len(LOGITS_PREFIX + SUFFIX):
        return base[len(LOGITS_PREFIX):-len(SUFFIX)]
    return None


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def discover(source: str) -> list[Shard]:
    """The shards named by a directory or a glob, in scoring order.

    Parameters
    ----------
    source : str
        A directory holding ``logits-<key>.npy`` / ``labels-<key>.npy`` pairs, or a glob matching
        ``logits-<key>.npy`` files (e.g. ``"data/*/logits-*.npy"``).

    Returns
    -------
    list of Shard
        Named by their path relative to the directory (or to the glob's common directory).
    """
    if os.path.isdir(source):
        root = source
        matches = glob.glob(os.path.join(glob.escape(source), LOGITS_PREFIX + "*" + SUFFIX))
        orphans = [p for p in glob.glob(os.path.join(glob.escape(source), LABELS_PREFIX + "*" + SUFFIX))
                   if not os.path.exists(os.path.join(source, LOGITS_PREFIX
                                                      + os.path.basename(p)[len(LABELS_PREFIX):]))]
        if orphans:
            raise CLIError(f"label files without logits in {source}: "
                           f"{_listing(sorted(os.path.basename(p) for p in orphans))}")
    else:
        matches = glob.glob(source)
        not_logits = sorted(p for p in matches if _key_of(p) is None)
        if not_logits:
            raise CLIError(f"{source} matches files not named {LOGITS_PREFIX}<key>{SUFFIX}: "
                           f"{_listing(not_logits)}")
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in matches]) if matches else ""
    matches = [p for p in matches if _key_of(p) is not None and not os.path.isdir(p)]
    if not matches:
        raise CLIError(f"no {LOGITS_PREFIX}*{SUFFIX} shards found in {source}")
    matches.sort(key=lambda p: (_natural_key(os.path.dirname(os.path.abspath(p))), _natural_key(_key_of(p))))
    shards, missing = [], []
    for path in matches:
        labels = os.path.join(os.path.dirname(path), LABELS_PREFIX + _key_of(path) + SUFFIX)
        name = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        if not os.path.exists(labels):
            missing.append(os.path.relpath(os.path.abspath(labels), os.path.abspath(root)))
        shards.append(Shard(name=name, logits=path, labels=labels))
    if missing:
        raise CLIError(f"shards without label files in {source}: missing {_listing(missing)}")
    return shards
