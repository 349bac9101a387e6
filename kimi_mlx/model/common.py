"""Small pieces shared by the layers."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..ops.cpu_fast import is_plain_linear, plain_linear


def compile_decode() -> bool:
    """KIMI_MLX_COMPILE: auto compiles decode steps on a GPU; on the CPU it stays off by default
    (MLX builds each fused CPU kernel with the C++ compiler first)."""
    from ..settings import kernel_switch

    v = kernel_switch("KIMI_MLX_COMPILE", "auto")
    return v == "on" or (v != "off" and mx.default_device().type == mx.DeviceType.gpu)


def kernels_traceable() -> bool:
    """A layer's decode step may take its kernels inside one compiled piece (KIMI_MLX_COMPILE_KDA;
    MLA layers too, where their kernels take the cache): the kernels run on this device's GPU
    (Metal or CUDA), where a launch is a primitive that mx.compile traces; on the CPU they are
    MLX ops or the tests' emulator, which reads its inputs on the host."""
    from ..ops.kda import kernel_backend
    from ..settings import kernel_switch

    v = kernel_switch("KIMI_MLX_COMPILE_KDA", "auto")
    return v != "off" and mx.default_device().type == mx.DeviceType.gpu and kernel_backend() is not None


def one_token(x: mx.array) -> bool:
    """x [B, T, d] is a decode step's single token: the decode-only forms (fewer launches) key on
    this, so prefill keeps its own code."""
    return x.ndim == 3 and x.shape[1] == 1


def _entries(module: nn.Module) -> list:
    """(container, key, value) for every array, list and submodule under module."""
    out = []

    def walk(m):
        for k, v in m.items():
            if isinstance(v, (mx.array, nn.Module, list)):
                out.append((m, k, v))
            for sub in (v if isinstance(v, list) else [v]):
                if isinstance(sub, nn.Module):
                    walk(sub)

    walk(module)
    return out


class Compiled:
    """The mx.compile'd functions of one module. They captured its weights as constants when
    traced, so they are dropped as soon as any array or submodule under it is replaced (4 us a
    check for a decoder layer, against ~85 us for flattening its parameters)."""

    def __init__(self, module: nn.Module):
        self.entries = _entries(module)
        # a submodule that reads values on the host (CPU fast path) can't run inside mx.compile
        self.safe = all(getattr(m, "compile_safe", True) for m in module.modules())
        self.fns = {}

    def valid(self) -> bool:
        return all(c[k] is v for c, k, v in self.entries)

    def __call__(self, name, fn, limit: int | None = None):
        """mx.compile(fn), made once: fn may read the module's weights, never host values of its inputs.
        A tuple name is one of a family (name[0]) of which at most `limit` are kept, the oldest dropped."""
        f = self.fns.get(name)
        if f is None:
            if limit is not None:
                family = [k for k in self.fns if isinstance(k, tuple) and k[0] == name[0]]
                for k in family[: max(0, len(family) - limit + 1)]:
                    del self.fns[k]
            f = self.fns[name] = mx.compile(fn)
        return f


def compiled_for(module: nn.Module) -> Compiled:
    """module's Compiled, made again when its weights or submodules were replaced."""
    c = module.__dict__.get("_compiled")
    if c is None or not c.valid():
        c = module.__dict__["_compiled"] = Compiled(module)
    return c


class MLP(nn.Module):
    """SwiGLU MLP (dense layers and the shared expert)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        # a decode step's token: gate|up as one matmul (one launch less); prefill as before
        gate_up = joined_linear(self, ("gate_proj", "up_proj")) if one_token(x) else None
        g, u = gate_up(x) if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(nn.silu(g) * u)


def derived(module: nn.Module, name: str, sources: tuple, make, *extra):
    """make(), computed from some of module's arrays (`sources`) once, and again only when one of
    them is replaced (load_weights) or `extra` changes. Kept in the instance __dict__, so nn.Module
    doesn't take it for a parameter (name must not be a method or attribute of the module: it would
    shadow it); the sources are held so that no new array reuses their ids."""
    key = (*map(id, sources), *extra)
    hit = module.__dict__.get(name)
    if hit is None or hit[0] != key:
        value = make()
        mx.eval(value)  # a constant even when first made inside a compiled trace
        hit = (key, value, sources)
        module.__dict__[name] = hit
    return hit[1]


def forget_derived(*modules: nn.Module) -> None:
    """Drop what was derived from modules' replaced arrays (Linear's transposed views, joined_linear's
    joined copies): kept, it would hold the old arrays in memory until the module's next call (the
    KDA, MLA and MLP weights twice over during a reply, before)."""
    for m in modules:
        for name in [n for n in m.__dict__ if n == "_weight_t" or n.startswith("_joined_")]:
            del m.__dict__[name]


def transposed(w: mx.array) -> tuple:
    """(w.T, w.T[None]) as evaluated views of w (no copy) for matmul_t. `x @ w.T` puts a transpose
    node into a step's graph at every call; a view made once is a constant instead (the 5-layer
    slice's GPU step: 382 -> 257 primitives with matmul_t; its time did not measurably change)."""
    views = (w.T, w.T[None])
    mx.eval(views)
    return views


def matmul_t(x: mx.array, views: tuple) -> mx.array:
    """x @ w.T with the views of transposed(w). One token of batch 1 ([1, 1, in]) goes against
    the 3-D view, a batched matmul of batch 1 with no reshape at all: a 2-D weight would make MLX
    flatten x first and unflatten the product (two more graph nodes)."""
    return x @ views[1 if x.shape[:-1] == (1, 1) else 0]


@plain_linear
class Linear(nn.Linear):
    """nn.Linear (the same parameters; quantizes the same way) that multiplies by its weight's
    transposed views made once (transposed), not by a transpose built every call."""

    def __call__(self, x: mx.array) -> mx.array:
        w = self["weight"]
        views = derived(self, "_weight_t", (w,), lambda: transposed(w))
        if "bias" in self:
            return mx.addmm(self["bias"], x, views[0])
        return matmul_t(x, views)


LINEAR_KEYS = ("weight", "scales", "biases")


def linear_form(m: nn.Module) -> tuple:
    """What layers joined into one array must share: the weight's dtype and the quantization (group
    size, bits, mode, biases or not; None for a plain layer)."""
    quant = (m.group_size, m.bits, getattr(m, "mode", "affine"), "biases" in m) if "scales" in m else None
    return quant, m.weight.dtype


def held_arrays(layers) -> tuple:
    """(key, arrays): the layers' weight / scales / biases and their ids. A cache of something made
    from them keeps both, so that it is made again when one is replaced and no new array reuses
    one of the ids."""
    arrays = [m.get(k) for m in layers for k in LINEAR_KEYS]
    return tuple(map(id, arrays)), arrays


def _joinable(layers) -> bool:
    if any("bias" in m for m in layers) or len({linear_form(m) for m in layers}) != 1:
        return False
    if all(is_plain_linear(m) for m in layers):
        return True
    # the same quantization, affine or not
    return all(type(m) is nn.QuantizedLinear for m in layers) and layers[0].weight.ndim == 2


def joined_linear(module: nn.Module, names: tuple, split: bool = True):
    """fn(x) -> [module[name](x) for name in names] as one matmul, or None when the layers can't
    be joined (other classes, biases, mixed settings); with split=False fn(x) is their outputs
    concatenated (the matmul's own output, no copy). Their weights are concatenated once along
    the output and each layer's arrays become views of the joined ones: nothing is stored twice,
    and the layers still work (and save) alone. Made again if a layer's arrays are replaced."""
    layers = [module[n] for n in names]
    key = held_arrays(layers)[0]
    slot = "_joined_" + "_".join(names)
    hit = module.__dict__.get(slot)
    if hit is None or hit[0] != key:
        hit = module.__dict__[slot] = _join(layers)
    fn, splits = hit[1], hit[3]
    if fn is None or not split:
        return fn
    return lambda x: mx.split(fn(x), splits, axis=-1)


def _join(layers: list):
    """(key, fn(x) -> the joined output, the joined layers' arrays, split points) for joined_linear."""
    fn = splits = None
    if _joinable(layers):
        keys = [k for k in LINEAR_KEYS if k in layers[0]]
        joined = {k: mx.concatenate([m[k] for m in layers], axis=0) for k in keys}
        mx.eval(joined)
        sizes = [m["weight"].shape[0] for m in layers]
        splits = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
        start = 0
        for m, n in zip(layers, sizes):
            for k in keys:
                m[k] = joined[k][start:start + n]  # a view of the joined rows
            start += n
        # evaluated here: an unevaluated slice belongs to this thread's stream, and MLX streams are
        # thread-local (a chat app decodes on a worker thread)
        mx.eval([m[k] for m in layers for k in keys])
        forget_derived(*layers)
        q = layers[0]
        if is_plain_linear(q):
            wt = transposed(joined["weight"])
            fn = lambda x: matmul_t(x, wt)  # noqa: E731
        else:
            fn = lambda x: mx.quantized_matmul(  # noqa: E731
                x, joined["weight"], joined["scales"], joined.get("biases"), transpose=True,
                group_size=q.group_size, bits=q.bits, mode=getattr(q, "mode", "affine"))
    key, arrays = held_arrays(layers)
    return key, fn, arrays, splits


def linear_weight(layer: nn.Module) -> mx.array:
    """The dense weight of a Linear or QuantizedLinear (dequantized)."""
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                             bits=layer.bits, mode=getattr(layer, "mode", "affine"))
    return layer.weight
