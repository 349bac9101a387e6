"""Faster CPU paths for quantized and bf16 weights (MLX's CPU backend).

On the CPU, MLX's quantized_matmul / gather_qmm run at about 1.5 GFLOP/s whatever the row count
(and 8× slower still when both the input and the scales are bf16, 40× for fp16, so inputs go in fp32),
gather_mm runs one matrix-vector product per row (and only in fp32), and bf16 matmuls don't use
BLAS (about 3 GFLOP/s). An fp32 matmul through an optimized BLAS runs at 50+ GFLOP/s here, so for
many rows (prefill) it pays to expand the weight to fp32 first — one layer's weight, or one
expert's, at a time, as a transient array that MLX frees right after the matmul. For few rows
(decode) the quantized kernels read 4-8× fewer bytes and stay.

`enable_cpu_fast_path(model)` swaps the classes of the modules in place (no weights move):
  nn.QuantizedLinear -> CPUQuantizedLinear   (dequantize + BLAS at >= LINEAR_MIN_ROWS rows; outputs fp32)
  nn.Linear (bf16/fp16 weight) -> CPULinear  (fp32 BLAS at >= LINEAR_MIN_ROWS rows; outputs fp32)
  (except the layers in KEEP_DTYPE, whose output is cached: they keep the model's dtype)
  SwitchGLU -> CPUSwitchGLU                  (tokens sorted by expert, one matmul per active expert;
                                              ours (model.switch registers it), and mlx-lm's when
                                              mlx_lm is already imported)
It does nothing unless the default device is the CPU (load_model calls auto_enable_cpu_fast_path:
on with an optimized BLAS; KIMI_MLX_CPU_FAST=off|on|auto). The plain versions stay next to them
(`super().__call__`, `switch_glu_reference`) and the tests compare the two.
"""
from __future__ import annotations


import mlx.core as mx
import mlx.nn as nn

# Row counts from `python -m kimi_mlx.ops.cpu_fast` on a 2-core EPYC with OpenBLAS (see
# docs/BENCHMARKS.md): dequantize + fp32 BLAS ties quantized_matmul at 4 rows and is ~2× faster
# at 8 (qmm time grows linearly with rows; the dequantization is a fixed cost per call).
LINEAR_MIN_ROWS = 8
# Below this many (token, expert) pairs keep gather_qmm: it needs no host sync mid-graph.
SWITCH_MIN_PAIRS = 64


def _is_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


# ---------------------------------------------------------------------------
# dequantization
# ---------------------------------------------------------------------------
@mx.compile
def _dequant_u8(w, scales, biases, per_byte: int, group_size: int):
    """Affine 2/4/8-bit weights [.., O, I*bits/32] uint32 -> fp32 [.., O, I], fused by mx.compile.
    Reading the packed words as bytes lets one shift per value unpack them (bits are little-endian)."""
    u8 = w.view(mx.uint8)
    *lead, O, nb = u8.shape
    bits = 8 // per_byte
    if per_byte == 1:
        q = u8
    else:
        mask = (1 << bits) - 1
        q = mx.stack([(u8 >> (bits * j)) & mask for j in range(per_byte)], axis=-1)
    I = nb * per_byte
    q = q.reshape(*lead, O, I // group_size, group_size).astype(mx.float32)
    out = q * scales[..., None].astype(mx.float32) + biases[..., None].astype(mx.float32)
    return out.reshape(*lead, O, I)


def dequantize_fp32(weight: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
                    mode: str = "affine") -> mx.array:
    """fp32 copy of a quantized weight (same values as mx.dequantize, about 2× faster on the CPU)."""
    if mode == "affine" and biases is not None and bits in (2, 4, 8):
        return _dequant_u8(weight, scales, biases, 8 // bits, group_size)
    if mx.issubdtype(scales.dtype, mx.floating):  # affine: expand in fp32, not in the scales' bf16
        scales = scales.astype(mx.float32)
        biases = biases.astype(mx.float32) if biases is not None else None
    return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits, mode=mode).astype(mx.float32)


def _rows(x: mx.array) -> int:
    return x.size // max(1, x.shape[-1])


# ---------------------------------------------------------------------------
# linear layers
# ---------------------------------------------------------------------------
class CPUQuantizedLinear(nn.QuantizedLinear):
    """QuantizedLinear that expands its weight to fp32 for BLAS when there are many rows."""

    min_rows = LINEAR_MIN_ROWS
    keep_dtype = False  # set per instance: see KEEP_DTYPE

    def __call__(self, x: mx.array) -> mx.array:
        if _rows(x) < self.min_rows:
            # fp32 input: with bf16 input and bf16 scales the CPU kernel is ~8x slower (fp16: ~40x)
            y = super().__call__(x.astype(mx.float32))
        else:
            w = dequantize_fp32(self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits,
                                getattr(self, "mode", "affine"))
            y = x.astype(mx.float32) @ w.T
            if "bias" in self:
                y = y + self["bias"].astype(mx.float32)
        return y.astype(_model_dtype(self, x)) if self.keep_dtype else y


_PLAIN_LINEAR: list[type] = [nn.Linear]


def plain_linear(cls: type) -> type:
    """Register cls, a subclass of nn.Linear with nn.Linear's maths (the model's own, which keeps
    its weight's transposed view), as one the fast path replaces like nn.Linear."""
    if cls not in _PLAIN_LINEAR:
        _PLAIN_LINEAR.append(cls)
    return cls


def is_plain_linear(m: nn.Module) -> bool:
    """m is nn.Linear or a registered class with its maths (not CPULinear, not a quantized one)."""
    return type(m) in _PLAIN_LINEAR


class CPULinear(nn.Linear):
    """Linear with a bf16/fp16 weight: fp32 output; fp32 BLAS on an fp32 copy of the weight for many
    rows, the low-precision matmul (no weight copy) for few."""

    min_rows = LINEAR_MIN_ROWS
    keep_dtype = False  # set per instance: see KEEP_DTYPE

    def __call__(self, x: mx.array) -> mx.array:
        w = self["weight"]
        if _rows(x) < self.min_rows:
            y = (x.astype(w.dtype) @ w.T).astype(mx.float32)
        else:
            y = x.astype(mx.float32) @ w.astype(mx.float32).T
        if "bias" in self:
            y = y + self["bias"].astype(mx.float32)
        return y.astype(_model_dtype(self, x)) if self.keep_dtype else y


# ---------------------------------------------------------------------------
# experts
# ---------------------------------------------------------------------------
def _expert_linear(layer, e: int, x: mx.array, min_rows: int) -> mx.array:
    """x [n, in] through expert e of a (Quantized)SwitchLinear -> fp32 [n, out]."""
    n = x.shape[0]
    if "scales" in layer:  # QuantizedSwitchLinear (ours or mlx-lm's)
        w, s, b = layer["weight"][e], layer["scales"][e], layer.get("biases")
        b = b[e] if b is not None else None
        gs = layer.get("global_scale") if isinstance(layer.get("global_scale"), mx.array) else None
        if n < min_rows or gs is not None:
            extra = {"global_scale": gs[e]} if gs is not None else {}
            y = mx.quantized_matmul(x.astype(mx.float32), w, s, b, transpose=True, group_size=layer.group_size,
                                    bits=layer.bits, mode=layer.mode, **extra).astype(mx.float32)
        else:
            y = x.astype(mx.float32) @ dequantize_fp32(w, s, b, layer.group_size, layer.bits, layer.mode).T
    else:
        w = layer["weight"][e]  # a view: no copy
        if w.dtype == mx.float32 or n >= min_rows:
            y = x.astype(mx.float32) @ w.astype(mx.float32).T
        else:
            y = (x.astype(w.dtype) @ w.T).astype(mx.float32)
    if "bias" in layer:
        y = y + layer["bias"][e].astype(mx.float32)
    return y


def _glu_act(glu, up: mx.array, gate: mx.array) -> mx.array:
    act = getattr(glu, "activation", None)  # mlx-lm's SwitchGLU carries one; ours is SwiGLU
    return act(up, gate) if act is not None else nn.silu(gate) * up


def switch_glu_blocks(glu, x: mx.array, indices: mx.array, min_rows: int = LINEAR_MIN_ROWS):
    """SwitchGLU by expert blocks: sort the (token, expert) pairs by expert, then one gate/up/down
    matmul per active expert over its contiguous rows. x [..., D], indices [..., k] -> fp32 [..., k, D].

    Needs the expert counts on the host, so it evaluates the routing (a sync point)."""
    import numpy as np

    k = indices.shape[-1]
    D = x.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    sorted_e = flat[order]
    xs = x.reshape(-1, D)[order // k]
    counts = np.bincount(np.array(sorted_e), minlength=glu.gate_proj["weight"].shape[0])
    outs, start = [], 0
    for e in np.nonzero(counts)[0].tolist():
        n = int(counts[e])
        xe = xs[start:start + n]
        h = _glu_act(glu, _expert_linear(glu.up_proj, e, xe, min_rows), _expert_linear(glu.gate_proj, e, xe, min_rows))
        outs.append(_expert_linear(glu.down_proj, e, h, min_rows))
        start += n
    y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
    inv = mx.argsort(order)
    return y[inv].reshape(*indices.shape, -1)


def _plain_class(m) -> type:
    return getattr(type(m), "_plain", type(m))


def switch_glu_reference(glu, x: mx.array, indices: mx.array) -> mx.array:
    """The plain SwitchGLU call (gather_mm / gather_qmm), whatever class glu has now."""
    return _plain_class(glu).__call__(glu, x, indices)


class _CPUSwitchGLUMixin:
    min_pairs = SWITCH_MIN_PAIRS
    min_rows = LINEAR_MIN_ROWS

    @property
    def compile_safe(self) -> bool:
        """Decode steps (fewer than min_pairs pairs) take the plain gather path, which mx.compile
        can trace, unless the experts are low-precision and unquantized: switch_glu_blocks reads
        the routing on the host."""
        return "scales" in self.gate_proj or self.gate_proj["weight"].dtype == mx.float32

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # gather_mm only takes fp32 on the CPU: low-precision unquantized experts always go by blocks
        w = self.gate_proj["weight"]
        low_precision = "scales" not in self.gate_proj and w.dtype != mx.float32
        if indices.size < self.min_pairs and not low_precision:
            return self._plain.__call__(self, x.astype(mx.float32), indices)  # fp32: see CPUQuantizedLinear
        return switch_glu_blocks(self, x, indices, self.min_rows)


_CPU_SUBCLASS: dict[type, type] = {}


def cpu_switch_glu(cls: type) -> type:
    """The CPU-fast subclass of a SwitchGLU class. The model layer registers its own class here
    (ops don't import the model); mlx-lm's is added when mlx_lm is loaded already."""
    if cls not in _CPU_SUBCLASS:
        _CPU_SUBCLASS[cls] = type("CPUSwitchGLU", (_CPUSwitchGLUMixin, cls), {"_plain": cls})
    return _CPU_SUBCLASS[cls]


def _switch_glu_classes() -> list[type]:
    """The registered SwitchGLU classes, plus mlx-lm's if mlx_lm is loaded already (never imported
    here: it is slow)."""
    import sys

    mod = sys.modules.get("mlx_lm.models.switch_layers")
    if mod is not None:
        cpu_switch_glu(mod.SwitchGLU)
    return list(_CPU_SUBCLASS)


# ---------------------------------------------------------------------------
# model-level switch
# ---------------------------------------------------------------------------
# Layers whose output is cached: they return the model's dtype (bf16 for a bf16 model or a bf16-scaled
# conversion), so the MLA latent cache stays bf16 (half the bytes of fp32) as without the fast path.
KEEP_DTYPE = ("kv_a_proj_with_mqa",)


def _model_dtype(m, x: mx.array) -> mx.Dtype:
    """The layer's own float dtype (affine scales' or the weight's: bf16 for a bf16 model or a
    conversion of one); x's dtype where there is none (uint8 scales of mxfp4/nvfp4)."""
    wd = m["scales"].dtype if "scales" in m else m["weight"].dtype
    return wd if mx.issubdtype(wd, mx.floating) else x.dtype


def enable_cpu_fast_path(model: nn.Module, force: bool = False, min_rows: int | None = None) -> dict:
    """Replace the modules by their CPU-fast subclasses (sharing their arrays). No-op (returns {})
    unless the default device is the CPU (or force). Returns how many modules of each kind."""
    if not (force or _is_cpu()):
        return {}
    swap = {nn.QuantizedLinear: CPUQuantizedLinear}
    swap.update({c: _CPU_SUBCLASS[c] for c in _switch_glu_classes()})
    counts: dict[str, int] = {}
    replaced = []
    for path, m in model.named_modules():
        cls = swap.get(type(m))
        if is_plain_linear(m) and m["weight"].dtype in (mx.bfloat16, mx.float16):
            cls = CPULinear
        if cls is not None:
            new = _rebuilt(cls, m)
            if min_rows is not None:
                new.min_rows = min_rows
            if path.endswith(KEEP_DTYPE) and cls in (CPULinear, CPUQuantizedLinear):
                new.keep_dtype = True
            replaced.append((path, new))
            counts[cls.__name__] = counts.get(cls.__name__, 0) + 1
    _replace(model, replaced)
    return counts


def _rebuilt(cls: type, m: nn.Module) -> nn.Module:
    """A module of class cls holding m's arrays and settings (nothing is copied): the fast path
    replaces modules the way nn.quantize does, instead of changing the class of a live one."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in m.__dict__.items() if k not in ("min_rows", "keep_dtype")})
    dict.update(new, m)  # the dict entries themselves (nn.Module.update sets parameters)
    return new


def _replace(model: nn.Module, replaced: list) -> None:
    if replaced:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(replaced))


ENV_VAR = "KIMI_MLX_CPU_FAST"


def _has_low_precision_experts(model: nn.Module) -> bool:
    """Unquantized bf16/fp16 experts: the plain SwitchGLU can't run them on the CPU (gather_mm is fp32 only)."""
    for _, m in model.named_modules():
        if any(issubclass(type(m), c) for c in _switch_glu_classes()):
            g = m.gate_proj
            if "scales" not in g and g["weight"].dtype != mx.float32:
                return True
    return False


def cpu_fast_path_wanted(model: nn.Module | None = None) -> tuple[bool, str]:
    """Whether load_model should enable the fast path, and why. KIMI_MLX_CPU_FAST: `off`/`0` never,
    `on`/`1` always on the CPU, `auto` (default) on the CPU when an optimized BLAS was loaded (the
    dequantize-then-matmul path is ~20x faster with it; with MLX's reference BLAS it is not faster)
    or when the model has bf16/fp16 experts (which the plain path can't run on the CPU)."""
    from ..settings import settings

    mode = settings().cpu_fast
    if mode == "off":
        return False, f"disabled by {ENV_VAR}"
    if not _is_cpu():
        return False, "default device is not the CPU"
    if mode == "on":
        return True, f"forced by {ENV_VAR}"
    from .. import _blas

    if _blas.blas_info().get("loaded"):
        return True, "CPU with an optimized BLAS"
    if model is not None and _has_low_precision_experts(model):
        return True, "CPU, bf16/fp16 experts"
    return False, "CPU with MLX's reference BLAS: the plain path is as fast"


def auto_enable_cpu_fast_path(model: nn.Module) -> dict:
    """What load_model calls: enable_cpu_fast_path when cpu_fast_path_wanted says so. Returns the
    swap counts ({} when left off); the decision is kept on the model as `cpu_fast_path`."""
    want, why = cpu_fast_path_wanted(model)
    counts = enable_cpu_fast_path(model) if want else {}
    from types import SimpleNamespace

    # a plain attribute (not a dict: nn.Module would file a dict among the parameters)
    object.__setattr__(model, "cpu_fast_path", SimpleNamespace(enabled=bool(counts), reason=why, swapped=counts))
    return counts


def disable_cpu_fast_path(model: nn.Module) -> None:
    """Undo enable_cpu_fast_path (benchmarks compare both in one process)."""
    _replace(model, [(path, _rebuilt(m._plain if isinstance(m, _CPUSwitchGLUMixin) else type(m).__mro__[1], m))
                     for path, m in model.named_modules()
                     if type(m) in (CPUQuantizedLinear, CPULinear) or isinstance(m, _CPUSwitchGLUMixin)])
