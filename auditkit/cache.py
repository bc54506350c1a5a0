"""Results of clean forward passes, kept once per Subject so that checks do not recompute them.

Several checks need the same forward of the same audit images: the logits (occlusion's and deletion's
p(true class), invariance's unmoved probabilities), the named layers' features (invariance, dead units,
feature neighbours), the penultimate features (class separation, neighbours, invariance's top). The
Subject keeps them here, keyed by what was computed and the pixels' content (a BLAKE2b digest of their
bytes, so a freshly stacked copy of the same audit set hits), in host memory, within a byte budget:
the least recently used results are dropped beyond it, and a result larger than the whole budget is
not kept. A dropped result is recomputed when asked for again, never lost.

The budget is `--audit-memory` (or `memory = ...` in the config): a size such as "2GB", "512MB" or
"0" (keep nothing), or a fraction of the machine's physical memory such as "0.05". The default is
config.DEFAULT_MEMORY_FRACTION (5 %) of physical memory (config.parse_memory).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch


def content_digest(pixels: torch.Tensor) -> str | None:
    """BLAKE2b of a CPU tensor's dtype, shape and bytes; None for a tensor elsewhere (not worth a copy)."""
    if pixels.device.type != "cpu":
        return None
    data = pixels.detach().contiguous()
    digest = hashlib.blake2b(f"{data.dtype}{tuple(data.shape)}".encode(), digest_size=16)
    digest.update(data.view(torch.uint8).numpy().data if data.numel() else b"")
    return digest.hexdigest()


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    dropped: int = 0  # results dropped (or never kept) for the budget
    kept_bytes: int = 0
    budget: int = 0


class ResultCache:
    """Key -> result (CPU tensors, or dicts / tuples of them), least recently used dropped beyond `budget`
    bytes. Callers must not change a result in place: they get the kept object itself."""

    def __init__(self, budget: int):
        self.budget = max(0, int(budget))
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self.stats = CacheStats(budget=self.budget)

    def get(self, key: Hashable) -> object | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: object) -> bool:
        """Keep `value` under `key`, dropping the oldest results to fit; False when it alone exceeds the budget."""
        size = _nbytes(value)
        if key in self._entries:
            self.stats.kept_bytes -= self._entries.pop(key)[1]
        if size > self.budget:
            self.stats.dropped += 1
            return False
        while self._entries and self.stats.kept_bytes + size > self.budget:
            _, (_, old) = self._entries.popitem(last=False)
            self.stats.kept_bytes -= old
            self.stats.dropped += 1
        self._entries[key] = (value, size)
        self.stats.kept_bytes += size
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.stats.kept_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
