"""Kept conversation states: the cache after a token sequence, found again by prefix.

A KDA state can't be rewound, so a turn can only continue from a state whose tokens are an
exact prefix of its prompt; the store answers "the longest kept prefix of these ids". Copies
share their arrays (cache updates are functional), so keeping a state costs only what later
turns don't share with it; memory is bounded by bytes, least recently used first out.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..cache import KimiCache


@dataclass(eq=False)
class Checkpoint:
    ids: np.ndarray  # int32 token ids the cache holds, in order
    cache: KimiCache  # never modified: continue from cache.copy()
    logits: Optional[mx.array] = None  # next-token logits [1, V] after ids; None: a new token is needed
    key: Optional[str] = None  # the conversation that made it (dropped with it)

    @property
    def num_tokens(self) -> int:
        return int(self.ids.size)

    def arrays(self) -> Iterator[mx.array]:
        yield from _cache_arrays(self.cache)
        if self.logits is not None:
            yield self.logits

    def is_prefix_of(self, ids: np.ndarray) -> bool:
        n = self.ids.size
        return n <= ids.size and bool(np.array_equal(ids[:n], self.ids))


def _cache_arrays(cache: KimiCache) -> Iterator[mx.array]:
    for c in cache:
        yield from c.eval_arrays()
        # a pipeline's layers on other ranks: stand-ins with their nbytes, shared as the arrays are
        yield from getattr(c, "elsewhere", tuple)()


def as_ids(ids: Sequence[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int32).reshape(-1)


class CheckpointStore:
    """Checkpoints of one model, bounded to `max_bytes` (arrays shared between checkpoints count once).

    max_bytes=0 keeps nothing."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(int(max_bytes), 0)
        self._items: "OrderedDict[int, Checkpoint]" = OrderedDict()  # least recently used first
        self._held: dict = {}  # key -> {id: array} held elsewhere (documents): not counted
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(list(self._items.values()))

    @property
    def nbytes(self) -> int:
        held = {i for arrays in self._held.values() for i in arrays}
        return _unique_bytes(self._items.values(), held)

    def held_elsewhere(self, key: str, cache: Optional[KimiCache]) -> None:
        """The arrays of `cache` (conversation `key`'s documents, kept anyway) don't count against the bound."""
        if cache is None:
            self._held.pop(key, None)
        else:
            self._held[key] = {id(a): a for a in _cache_arrays(cache)}  # refs keep the ids unique

    def add(self, ckpt: Checkpoint) -> Checkpoint:
        """Keep `ckpt` (most recently used), then evict the least recently used beyond the bound."""
        for k, old in list(self._items.items()):  # the same state twice: keep the newer
            if old.key == ckpt.key and old.ids.size == ckpt.ids.size and np.array_equal(old.ids, ckpt.ids):
                if old.logits is not None and ckpt.logits is None:
                    ckpt.logits = old.logits
                del self._items[k]
        self._items[id(ckpt)] = ckpt
        refresh = getattr(ckpt.cache, "refresh_sizes", None)
        if refresh is not None:  # a pipeline's cache: the other ranks' shares count too
            refresh()
        self._evict(keep=ckpt)
        return ckpt

    def _evict(self, keep: Checkpoint) -> None:
        while self.nbytes > self.max_bytes:
            victim = next((c for c in self._items.values() if c is not keep), None)
            if victim is None:
                if self.max_bytes == 0:
                    del self._items[id(keep)]
                return
            del self._items[id(victim)]
            self.evicted += 1

    def best(self, ids: Sequence[int] | np.ndarray) -> Optional[Checkpoint]:
        """The checkpoint holding the longest prefix of `ids` from which `ids` can be continued: a strict
        prefix, or all of `ids` when it kept the next-token logits. Marked as used."""
        ids = ids if isinstance(ids, np.ndarray) else as_ids(ids)
        found = None
        for c in self._items.values():
            usable = c.ids.size < ids.size or (c.ids.size == ids.size and c.logits is not None)
            if usable and (found is None or c.ids.size > found.ids.size) and c.is_prefix_of(ids):
                found = c
        if found is not None:
            self._items.move_to_end(id(found))
        return found

    def latest(self, key: str) -> Optional[Checkpoint]:
        """The most recently added or used checkpoint of conversation `key`."""
        return next((c for c in reversed(self._items.values()) if c.key == key), None)

    def forget(self, key: str) -> None:
        """Conversation `key` is gone: its checkpoints, and its hold on its documents' arrays."""
        self.drop(key)
        self._held.pop(key, None)

    def drop(self, key: Optional[str] = None, keep: Sequence[int] | np.ndarray | None = None) -> int:
        """Forget the checkpoints of conversation `key` (all when key is None), except those
        that are a prefix of `keep`. Returns how many went."""
        keep = None if keep is None else (keep if isinstance(keep, np.ndarray) else as_ids(keep))
        gone = [k for k, c in self._items.items()
                if (key is None or c.key == key) and not (keep is not None and c.is_prefix_of(keep))]
        for k in gone:
            del self._items[k]
        return len(gone)


def _unique_bytes(ckpts, skip=()) -> int:
    seen, total = set(skip), 0
    for c in ckpts:
        for a in c.arrays():
            if id(a) not in seen:
                seen.add(id(a))
                total += a.nbytes
    return total
