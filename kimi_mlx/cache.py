"""Per-sequence state of Kimi Linear.

KDA layers keep a fixed-size state (fp32 recurrent state + the short-conv tail).
MLA layers keep only the compressed latent (kv_lora_rank) and the shared 64-dim key
part per token, in a few large segments that appends write into and that are never
copied to grow, so the attention kernels read the whole cache in one call per segment.

All updates are functional (new arrays replace old ones), so `copy()` is cheap and a
snapshot taken with it is never modified by later generation.
"""
from __future__ import annotations

import mlx.core as mx

PAGE_TOKENS = 4096
TAIL_ROWS = 256  # appends shorter than this (decode steps) go to a tail segment of this many rows


def quantize_rows(x: mx.array, group_size: int = 64, bits: int = 8):
    """Affine-quantize [B, T, D] per token in groups along D (zero-padded to a whole group)."""
    B, T, D = x.shape
    pad = -D % group_size
    flat = x.reshape(B * T, D)
    if pad:
        flat = mx.concatenate([flat, mx.zeros((B * T, pad), dtype=x.dtype)], axis=1)
    wq, scales, biases = mx.quantize(flat, group_size=group_size, bits=bits)
    return {"wq": wq, "scales": scales, "biases": biases, "shape": (B, T, D), "dtype": x.dtype,
            "group_size": group_size, "bits": bits}


def segment_rows(data, s: int, e: int, D: int) -> mx.array:
    """Full-precision rows s..e of an MLACache segment's data: a [B, cap, D] array, or the 8-bit
    {"wq", "scales", "biases"} (groups along D, mx.quantize layout), dequantized."""
    if not isinstance(data, dict):
        return data[:, s:e]
    B = data["wq"].shape[0]
    q = {k: v[:, s:e].reshape(B * (e - s), -1) for k, v in data.items()}
    gs = (data["wq"].shape[2] * 4) // data["scales"].shape[2]
    return dequantize_rows({**q, "shape": (B, e - s, D), "dtype": data["scales"].dtype,
                            "group_size": gs, "bits": 8})


def write_rows(data, rows: mx.array, at: mx.array, group_size: int):
    """data (a segment's [B, cap, D] array, or its 8-bit dict) with rows [B, T, D] written at row
    `at` (a one-element int array, so a compiled step takes the position as an input)."""
    if not isinstance(data, dict):
        return mx.slice_update(data, rows.astype(data.dtype), at, axes=(1,))
    B, T, _ = rows.shape
    q = quantize_rows(rows, group_size)
    return {k: mx.slice_update(data[k], q[k].reshape(B, T, -1), at, axes=(1,)) for k in ("wq", "scales", "biases")}


def dequantize_rows(q: dict) -> mx.array:
    B, T, D = q["shape"]
    x = mx.dequantize(q["wq"], q["scales"], q["biases"], group_size=q["group_size"], bits=q["bits"])
    return x[:, :D].astype(q["dtype"]).reshape(B, T, D)


class KDACache:
    """conv: [B, K-1, 3P] tail of the q|k|v projections; state: [B, H, K, V] fp32."""

    kind = "kda"

    def __init__(self):
        self.conv: mx.array | None = None
        self.state: mx.array | None = None
        self.offset = 0

    def copy(self) -> "KDACache":
        c = KDACache()
        c.conv, c.state, c.offset = self.conv, self.state, self.offset
        return c

    def advance(self, conv: mx.array, state: mx.array, tokens: int) -> None:
        """After `tokens` more tokens: their short-conv tail and recurrent state."""
        self.conv, self.state = conv, state
        self.offset += tokens

    def arrays(self) -> dict[str, mx.array]:
        if self.state is None:
            return {}
        return {"conv": self.conv, "state": self.state}

    def load_arrays(self, arrays: dict[str, mx.array], offset: int) -> None:
        self.conv, self.state, self.offset = arrays.get("conv"), arrays.get("state"), offset

    def eval_arrays(self) -> list[mx.array]:
        """The arrays the state lives in (what generation evaluates; copies share them)."""
        return list(self.arrays().values())

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())


class MLACache:
    """Latent cache: segments of [B, capacity, kv_lora_rank + rope_dim] rows, in token order.

    A segment is one buffer that appends write into (in place when nothing else holds it), so
    the attention kernels read a whole segment in one call; a full segment is never copied or
    grown, the next one is allocated. `reserve(tokens)` sizes the next segment exactly for a known
    total (a prefill, a prompt plus its reply, a loaded session), so one segment usually holds
    everything; without it a new segment takes max(page_tokens, 1/8 of what is cached), so
    capacity overshoots by at most about an eighth. A snapshot (`copy()`) shares every segment; the first append after it copies
    the last one only if that one still has room.

    Short appends (decode steps) go to a small tail segment instead: a pipelined decode step
    still reads the segment that the next step appends to, and MLX copies a buffer that something
    in flight holds rather than write it in place, so appending into the big segment would copy
    the whole context every token. A full tail becomes a closed segment; closed decode segments
    are concatenated pairwise while the older is no larger than the newer (a binary counter), so
    there are O(log) of them and each row is copied O(log) times, never the prefilled context.

    With `bits=8` rows are stored quantized per token (groups of `group_size` channels, affine,
    as mx.quantize), which halves memory at a small accuracy cost; the kernels dequantize as they
    read, the reference path one segment at a time.
    """

    kind = "mla"

    def __init__(self, page_tokens: int = PAGE_TOKENS, bits: int | None = None, group_size: int = 64):
        if bits not in (None, 8):
            raise ValueError(f"MLA cache bits must be None or 8, got {bits}")
        self.page_tokens = page_tokens
        self.bits = bits
        self.group_size = group_size
        # {"data": array [B, cap, D] (or {"wq", "scales", "biases"} when bits=8), "cap", "n",
        #  "start": absolute position of its first row, "D": the row width}
        self.segs: list[dict] = []
        self.offset = 0
        self._reserve = 0

    def copy(self) -> "MLACache":
        c = MLACache(self.page_tokens, self.bits, self.group_size)
        c.segs, c.offset, c._reserve = [dict(s) for s in self.segs], self.offset, self._reserve
        return c

    def reserve(self, total_tokens: int) -> None:
        """The cache will hold about `total_tokens` tokens: the next segment is sized for that."""
        self._reserve = max(self._reserve, int(total_tokens))

    # -- writing -----------------------------------------------------------
    def _capacity(self, need: int) -> int:
        if self._reserve - self.offset >= need:
            return self._reserve - self.offset  # a known total: exactly that (a loaded session stays full)
        growth = -(-(self.offset // 8) // self.page_tokens) * self.page_tokens
        return max(need, self.page_tokens, growth)

    def _new_segment(self, B: int, D: int, dtype, cap: int) -> dict:
        if self.bits is None:
            data = mx.zeros((B, cap, D), dtype=dtype)
        else:
            dq = -(-D // self.group_size) * self.group_size
            data = {"wq": mx.zeros((B, cap, dq // 4), dtype=mx.uint32),
                    "scales": mx.zeros((B, cap, dq // self.group_size), dtype=dtype),
                    "biases": mx.zeros((B, cap, dq // self.group_size), dtype=dtype)}
        return {"data": data, "cap": cap, "n": 0, "start": self.offset, "D": D}

    def _write(self, seg: dict, rows: mx.array) -> None:
        self.commit(seg, write_rows(seg["data"], rows, mx.array([seg["n"]]), self.group_size), rows.shape[1])

    def commit(self, seg: dict, data, rows: int) -> None:
        """seg's data now holds `rows` more rows (written with write_rows)."""
        seg["data"] = data
        seg["n"] += rows
        self.offset += rows

    @property
    def tail_rows(self) -> int:
        """Appends shorter than this go to the tail (at most a page)."""
        return min(TAIL_ROWS, self.page_tokens)

    def append(self, kv: mx.array) -> None:
        """kv: [B, T, D] new latent rows (normed latent | k_pe)."""
        B, T, D = kv.shape
        if T < self.tail_rows:
            return self._append_tail(kv)
        self._close_tail()
        pos = 0
        while pos < T:
            if not self.segs or self.segs[-1]["n"] == self.segs[-1]["cap"] or self.segs[-1].get("small"):
                self.segs.append(self._new_segment(B, D, kv.dtype, self._capacity(T - pos)))
            seg = self.segs[-1]
            take = min(seg["cap"] - seg["n"], T - pos)
            self._write(seg, kv[:, pos:pos + take])
            pos += take

    def _append_tail(self, kv: mx.array) -> None:
        B, T, D = kv.shape
        self._write(self.tail(B, T, D, kv.dtype), kv)

    def tail_step(self, B: int, T: int, D: int, dtype):
        """What a compiled decode step that appends T rows to the tail takes: ([(data, rows after
        the step, first position, capacity)] of each segment that will hold rows, the tail last;
        the tail's first free row). commit_tail(new data, T) records the write."""
        tail = self.tail(B, T, D, dtype)
        segs = [s for s in self.segs if s["n"] or s is tail]
        views = [(s["data"], s["n"] + (T if s is tail else 0), s["start"], s["cap"]) for s in segs]
        return views, tail["n"]

    def commit_tail(self, data, rows: int) -> None:
        self.commit(self.segs[-1], data, rows)

    def tail(self, B: int, T: int, D: int, dtype) -> dict:
        """The tail segment (always the last), with room for T more rows (a new one when there is
        none or it is full)."""
        tail = self.segs[-1] if self.segs and self.segs[-1].get("tail") else None
        if tail is not None and tail["n"] + T > tail["cap"]:
            self._close_tail()
            tail = None
        if tail is None:
            tail = {**self._new_segment(B, D, dtype, self.tail_rows), "tail": True, "small": True}
            self.segs.append(tail)
        return tail

    @staticmethod
    def _sliced(data, s: int, e: int):
        return {k: v[:, s:e] for k, v in data.items()} if isinstance(data, dict) else data[:, s:e]

    def _close_tail(self) -> None:
        """The tail becomes a closed small segment (its used rows only); then closed small segments
        merge pairwise while the older is no larger than the newer."""
        if not self.segs or not self.segs[-1].get("tail"):
            return
        tail = self.segs.pop()
        if tail["n"] == 0:
            return
        self.segs.append({**tail, "data": self._sliced(tail["data"], 0, tail["n"]), "cap": tail["n"], "tail": False})
        while len(self.segs) >= 2 and self.segs[-2].get("small") and self.segs[-2]["n"] <= self.segs[-1]["n"]:
            b = self.segs.pop()
            a = self.segs.pop()
            if isinstance(a["data"], dict):
                data = {k: mx.concatenate([a["data"][k], b["data"][k]], axis=1) for k in a["data"]}
            else:
                data = mx.concatenate([a["data"], b["data"]], axis=1)
            n = a["n"] + b["n"]
            self.segs.append({**a, "data": data, "n": n, "cap": n})

    # -- reading -----------------------------------------------------------
    def segments(self) -> list[dict]:
        """The segments as the kernels take them: dicts with "data", "n" (rows in use), "start"."""
        return [s for s in self.segs if s["n"]]

    def blocks(self) -> list[mx.array]:
        """The cached rows as a list of [B, n, D] arrays in token order (full precision)."""
        return [s["data"] if self.bits is None and s["n"] == s["cap"] else segment_rows(s["data"], 0, s["n"], s["D"])
                for s in self.segments()]

    # -- persistence -------------------------------------------------------
    def arrays(self) -> dict[str, mx.array]:
        """Contiguous full-precision rows [B, offset, D] (for saving)."""
        blocks = self.blocks()
        if not blocks:
            return {}
        return {"kv": mx.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]}

    def load_arrays(self, arrays: dict[str, mx.array], offset: int) -> None:
        self.segs, self.offset = [], 0
        if "kv" in arrays:
            self.reserve(arrays["kv"].shape[1])
            self.append(arrays["kv"])
        assert self.offset == offset, (self.offset, offset)

    def eval_arrays(self) -> list[mx.array]:
        """What generation evaluates to keep the graph short: the segments (evaluated ones cost nothing)."""
        out = []
        for seg in self.segs:
            d = seg["data"]
            out += list(d.values()) if isinstance(d, dict) else [d]
        return out

    @property
    def nbytes(self) -> int:
        total = 0
        for s in self.segs:
            d = s["data"]
            total += sum(v.nbytes for v in d.values()) if isinstance(d, dict) else d.nbytes
        return total


class KimiCache(list):
    """One cache per decoder layer, in layer order. `offset` is the number of tokens seen."""

    @property
    def offset(self) -> int:
        return self[0].offset if self else 0

    def copy(self) -> "KimiCache":
        return KimiCache(c.copy() for c in self)

    def reserve(self, total_tokens: int) -> None:
        """Size the MLA caches' next segment for `total_tokens` tokens in all (see MLACache)."""
        for c in self:
            if isinstance(c, MLACache):
                c.reserve(total_tokens)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self)

    def eval(self) -> None:
        arrs = []
        for c in self:
            arrs += c.eval_arrays()
        mx.eval(arrs)
