"""``--checkpoint FILE``: per-shard partial sums, recorded atomically as shards finish.

The file is JSON: the dataset it belongs to (source, shard names, V) and the settings that shape the
partial sums (backend, block rows, ignore index, ...), and per finished shard its exact float64 sum
(as ``float.hex``, so NaN/inf and every bit survive), valid-row count and the size/mtime of its files.
Each update is written to a temporary file in the same directory and moved over the old one with
``os.replace``, so a run killed at any moment leaves either the old or the new checkpoint, never a
torn one. A resumed run skips shards whose size and mtime are unchanged and combines the stored sums
in shard order, so it gives bit-for-bit the result of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import tempfile

from ._errors import CLIError

VERSION = 1


class Checkpoint:
    """The checkpoint of one dataset with one set of settings.

    Parameters
    ----------
    path : str
    dataset : dict
        JSON-ready identity of the dataset (refused if the file names another one).
    settings : dict
        JSON-ready settings (refused if the file was written with others).
    """

    def __init__(self, path: str, dataset: dict, settings: dict):
        self.path, self.dataset, self.settings = path, dataset, settings
        self.shards: dict[str, dict] = {}
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise CLIError(f"--checkpoint: directory {directory} does not exist")
        if os.path.exists(path):
            self._load()

    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise CLIError(f"cannot read checkpoint {self.path}: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != VERSION or "shards" not in data:
            raise CLIError(f"{self.path} is not a ptx-numba checkpoint (version {VERSION})")
        if data.get("dataset") != self.dataset:
            raise CLIError(f"checkpoint {self.path} belongs to another dataset "
                           f"({_describe(data.get('dataset'))}, this run: {_describe(self.dataset)}); "
                           "use another checkpoint file or delete it")
        if data.get("settings") != self.settings:
            old = data.get("settings") or {}
            diff = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            raise CLIError(f"checkpoint {self.path} was written with other settings ({', '.join(diff)}); "
                           "resuming would mix results: use the same options or another checkpoint file")
        self.shards = data["shards"]

    def finished(self, name: str, size: list, mtime_ns: list) -> dict | None:
        """The stored partial of shard ``name`` if its files (``[logits, labels]``) are unchanged."""
        rec = self.shards.get(name)
        if rec is None or rec.get("size") != list(size) or rec.get("mtime_ns") != list(mtime_ns):
            return None
        return {"sum": float.fromhex(rec["sum"]), "count": rec["count"], "rows": rec["rows"],
                "blocks": rec["blocks"], "size": size, "mtime_ns": mtime_ns}

    def record(self, name: str, partial: dict) -> None:
        """Store a finished shard and write the file atomically."""
        self.shards[name] = {"sum": float(partial["sum"]).hex(), "count": int(partial["count"]),
                             "rows": int(partial["rows"]), "blocks": int(partial["blocks"]),
                             "size": [int(v) for v in partial["size"]],
                             "mtime_ns": [int(v) for v in partial["mtime_ns"]]}
        data = {"version": VERSION, "dataset": self.dataset, "settings": self.settings, "shards": self.shards}
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".ptx-numba-ckpt-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _describe(dataset) -> str:
    if not isinstance(dataset, dict):
        return "unknown"
    shards = dataset.get("shards") or []
    return f"{dataset.get('source')!s}, {len(shards)} shards, V={dataset.get('vocab')}"
