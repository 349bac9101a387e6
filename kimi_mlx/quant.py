"""Quantization recipes: which module gets how many bits.

A recipe maps each quantizable module of Kimi Linear to a *class*, and each class
to a bit width (or to "leave unquantized"):

==========  ==================================================  =================
class       modules                                             why
==========  ==================================================  =================
experts     ``mlp.switch_mlp.{gate,up,down}_proj`` (routed)     ~97% of the bytes
attention   KDA and MLA projections (``self_attn.*``)           every token, every
            except ``kv_b_proj``                                layer: most
                                                                sensitive
shared      ``mlp.shared_experts.*``                            runs on every token
dense       ``mlp.{gate,up,down}_proj`` of the dense layer(s)   as above
embed       ``model.embed_tokens``
lm_head     ``lm_head``
router      ``mlp.gate``                                        selection flips on
                                                                small errors: 8-bit
kv_b        ``self_attn.kv_b_proj``                             the absorbed MLA form
                                                                dequantizes it on
                                                                every call: keep it
==========  ==================================================  =================

``A_log``, ``dt_bias``, ``e_score_correction_bias``, norms and conv filters are
not Linear modules, so nothing here can quantize them.

A module whose input width is not a multiple of the group size stays
unquantized (recorded as ``false`` in the config, as mlx-lm does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
MODES = ("affine", "mxfp4")
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


class QuantError(ValueError):
    pass


@dataclass(frozen=True)
class Recipe:
    name: str
    experts: int | None = None  # None: the requested bits
    attention: int | None = None
    shared: int | None = None
    dense: int | None = None
    embed: int | None = None
    lm_head: int | None = None
    router: int | None = 8  # 0: leave unquantized
    kv_b: int | None = 0
    description: str = ""

    def bits_for(self, cls: str, bits: int) -> int | None:
        """Bits for a module class, or None to leave it unquantized."""
        b = getattr(self, cls)
        if b is None:
            return bits
        return None if b == 0 else b

    @property
    def fixed_bits(self) -> bool:
        return self.experts is not None


def _mixed(lo: int, hi: int, head: int) -> Recipe:
    return Recipe(f"mixed_{lo}_{hi}", experts=lo, attention=hi, shared=hi, dense=hi, embed=hi, lm_head=head,
                  description=f"routed experts {lo}-bit; attention/KDA, shared expert, dense MLP, embeddings "
                              f"{hi}-bit; lm_head {head}-bit; router 8-bit; kv_b_proj unquantized")


RECIPES: dict[str, Recipe] = {
    "uniform": Recipe("uniform", description="everything at the requested bits; router 8-bit; kv_b_proj unquantized"),
    # 48B: ~27 GB; the quality choice for 48-64 GB Macs
    "mixed_4_6": _mixed(4, 6, 6),
    # 48B: ~22 GB; for 32 GB Macs (about 24 GB usable by the GPU)
    "mixed_3_4": _mixed(3, 4, 6),
    "mixed_3_6": _mixed(3, 6, 6),
    "mixed_2_4": _mixed(2, 4, 6),
}


def get_recipe(name: str | None) -> Recipe:
    if name is None:
        return RECIPES["uniform"]
    if name in RECIPES:
        return RECIPES[name]
    raise QuantError(f"unknown recipe '{name}'; choose one of: {', '.join(RECIPES)}")


def module_class(path: str) -> str:
    """The recipe class of a quantizable module path (our module names)."""
    if path == "model.embed_tokens":
        return "embed"
    if path == "lm_head":
        return "lm_head"
    if path.endswith(".mlp.gate"):
        return "router"
    if ".mlp.switch_mlp." in path:
        return "experts"
    if ".mlp.shared_experts." in path:
        return "shared"
    if path.endswith(".self_attn.kv_b_proj"):
        return "kv_b"
    if ".self_attn." in path:
        return "attention"
    if re.search(r"\.mlp\.(gate|up|down)_proj$", path):
        return "dense"
    raise QuantError(f"no quantization rule for module '{path}'")


def check_settings(bits: int, group_size: int, mode: str, recipe: Recipe | None = None) -> None:
    if mode not in MODES:
        raise QuantError(f"unsupported quantization mode '{mode}'; choose one of: {', '.join(MODES)}")
    if bits not in SUPPORTED_BITS:
        raise QuantError(f"unsupported bit width {bits}; choose one of: {', '.join(map(str, SUPPORTED_BITS))}")
    if group_size not in GROUP_SIZES:
        raise QuantError(f"unsupported group size {group_size}; choose one of: {', '.join(map(str, GROUP_SIZES))}")
    if mode == "mxfp4" and (bits, group_size) != (4, 32):
        raise QuantError(f"mode mxfp4 means 4 bits with group size 32 (got {bits} bits, group size {group_size})")
    if mode == "mxfp4" and recipe is not None and recipe.experts not in (None, 4):
        raise QuantError(f"recipe '{recipe.name}' puts the experts at {recipe.experts} bits; mode mxfp4 is 4-bit only")


def layer_params(path: str, in_dims: int, *, bits: int, group_size: int, mode: str = "affine",
                 recipe: Recipe | str | None = None) -> dict | None:
    """{'group_size', 'bits', 'mode'} for one module, or None to leave it unquantized."""
    recipe = recipe if isinstance(recipe, Recipe) else get_recipe(recipe)
    b = recipe.bits_for(module_class(path), bits)
    if b is None:
        return None
    if in_dims % group_size:
        return None  # a partial group cannot be packed
    # mxfp4 exists only at 4 bits: other widths of a mixed recipe fall back to affine
    m = mode if (mode == "mxfp4" and b == 4) else "affine"
    return {"group_size": group_size, "bits": b, "mode": m}


def quantizable_modules(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """path -> weight shape of every module that nn.quantize could swap (Linear, Embedding, SwitchLinear)."""
    out = {}
    for path, m in model.named_modules():
        if hasattr(m, "to_quantized") and "weight" in m and not hasattr(m, "scales"):
            out[path] = tuple(m.weight.shape)
    return out


def default_bits(bits: int, recipe: Recipe) -> int:
    """The top-level 'bits' recorded in the config: the experts' width (most of the bytes)."""
    return recipe.experts if recipe.experts is not None else bits


def config_block(params: dict[str, dict | None], *, bits: int, group_size: int, mode: str,
                 recipe: Recipe) -> dict:
    """mlx-lm style 'quantization' block: defaults, then per-path overrides (dict) or false (left unquantized)."""
    default = {"group_size": group_size, "bits": default_bits(bits, recipe), "mode": mode}
    block: dict = dict(default)
    if recipe.name != "uniform":
        block["recipe"] = recipe.name  # informational; not a module path
    for path in sorted(params):
        p = params[path]
        if p is None:
            block[path] = False
        elif p != default:
            block[path] = dict(p)
    return block


def quantize_model(model: nn.Module, *, bits: int, group_size: int, mode: str = "affine",
                   recipe: Recipe | str | None = None) -> dict:
    """Quantize a loaded model in place with the same rules convert uses; returns the config block."""
    recipe = recipe if isinstance(recipe, Recipe) else get_recipe(recipe)
    check_settings(bits, group_size, mode, recipe)
    shapes = quantizable_modules(model)
    params = {p: layer_params(p, s[-1], bits=bits, group_size=group_size, mode=mode, recipe=recipe)
              for p, s in shapes.items()}

    def predicate(path, module):
        return params.get(path) or False

    nn.quantize(model, group_size=group_size, bits=default_bits(bits, recipe), mode=mode,
                class_predicate=predicate)
    return config_block(params, bits=bits, group_size=group_size, mode=mode, recipe=recipe)
