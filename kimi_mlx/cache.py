"""Per-sequence state of Kimi Linear.

KDA layers keep a fixed-size state (fp32 recurrent state + the short-conv tail).
MLA layers keep only the compressed latent (kv_lora_rank) and the shared 64-dim key
part per token, stored in fixed-size pages so that growing the cache never copies
what is already there, and so that attention can walk it page by page.

All updates are functional (new arrays replace old ones), so `copy()` is cheap and a
snapshot taken with it is never modified by later generation.
"""
from __future__ import annotations

import mlx.core as mx

PAGE_TOKENS = 4096


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

    def arrays(self) -> dict[str, mx.array]:
        if self.state is None:
            return {}
        return {"conv": self.conv, "state": self.state}

    def load_arrays(self, arrays: dict[str, mx.array], offset: int) -> None:
        self.conv, self.state, self.offset = arrays.get("conv"), arrays.get("state"), offset

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())


class MLACache:
    """Latent cache: pages of [B, page_tokens, kv_lora_rank + rope_dim].

    With `bits=8` each page is stored quantized per token (group = 64 channels), which
    halves memory at a small accuracy cost; pages are dequantized one at a time when read.
    """

    kind = "mla"

    def __init__(self, page_tokens: int = PAGE_TOKENS, bits: int | None = None, group_size: int = 64):
        if bits not in (None, 8):
            raise ValueError(f"MLA cache bits must be None or 8, got {bits}")
        self.page_tokens = page_tokens
        self.bits = bits
        self.group_size = group_size
        self.pages: list = []  # full-precision pages, or quantize_rows() dicts when bits=8
        self.offset = 0
        # tokens not yet written to a quantized page (kept in full precision until a page fills)
        self._tail: mx.array | None = None

    def copy(self) -> "MLACache":
        c = MLACache(self.page_tokens, self.bits, self.group_size)
        c.pages, c.offset, c._tail = list(self.pages), self.offset, self._tail
        return c

    # -- writing -----------------------------------------------------------
    def append(self, kv: mx.array) -> None:
        """kv: [B, T, D] new latent rows (normed latent | k_pe)."""
        if self.bits is not None:
            return self._append_quantized(kv)
        B, T, D = kv.shape
        pos = 0
        while pos < T:
            used = self.offset % self.page_tokens
            if used == 0:
                self.pages.append(mx.zeros((B, self.page_tokens, D), dtype=kv.dtype))
            n = min(self.page_tokens - used, T - pos)
            self.pages[-1] = mx.slice_update(
                self.pages[-1], kv[:, pos:pos + n], mx.array([0, used, 0]), axes=(0, 1, 2))
            pos += n
            self.offset += n

    def _append_quantized(self, kv: mx.array) -> None:
        tail = kv if self._tail is None else mx.concatenate([self._tail, kv], axis=1)
        while tail.shape[1] >= self.page_tokens:
            page, tail = tail[:, : self.page_tokens], tail[:, self.page_tokens:]
            self.pages.append(quantize_rows(page, self.group_size))
        self._tail = tail if tail.shape[1] else None
        self.offset += kv.shape[1]

    # -- reading -----------------------------------------------------------
    def blocks(self) -> list[mx.array]:
        """The cached rows as a list of [B, n, D] arrays in token order (views, no copy)."""
        out = []
        if self.bits is not None:
            out = [dequantize_rows(q) for q in self.pages]
            if self._tail is not None:
                out.append(self._tail)
            return out
        for i, p in enumerate(self.pages):
            n = min(self.page_tokens, self.offset - i * self.page_tokens)
            out.append(p if n == self.page_tokens else p[:, :n])
        return out

    # -- persistence -------------------------------------------------------
    def arrays(self) -> dict[str, mx.array]:
        """Contiguous full-precision rows [B, offset, D] (for saving)."""
        blocks = self.blocks()
        if not blocks:
            return {}
        return {"kv": mx.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]}

    def load_arrays(self, arrays: dict[str, mx.array], offset: int) -> None:
        self.pages, self._tail, self.offset = [], None, 0
        if "kv" in arrays:
            self.append(arrays["kv"])
        assert self.offset == offset, (self.offset, offset)

    @property
    def nbytes(self) -> int:
        total = 0
        for p in self.pages:
            total += sum(p[k].nbytes for k in ("wq", "scales", "biases")) if isinstance(p, dict) else p.nbytes
        if self._tail is not None:
            total += self._tail.nbytes
        return total


class KimiCache(list):
    """One cache per decoder layer, in layer order. `offset` is the number of tokens seen."""

    @property
    def offset(self) -> int:
        return self[0].offset if self else 0

    def copy(self) -> "KimiCache":
        return KimiCache(c.copy() for c in self)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self)

    def eval(self) -> None:
        arrs = []
        for c in self:
            if isinstance(c, MLACache):
                arrs += [p["wq"] if isinstance(p, dict) else p for p in c.pages[-1:]]
                if c._tail is not None:
                    arrs.append(c._tail)
            else:
                arrs += list(c.arrays().values())
        mx.eval(arrs)
