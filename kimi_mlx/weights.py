"""Checkpoint discovery, integrity checks, lazy loading and published-name -> module-name mapping.

Checkpoint-name plumbing lives here, never in the layers.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigError, ModelConfig

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class WeightsError(ValueError):
    pass


# ---------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------
def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header: catches truncated or corrupt shards before loading."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise WeightsError(f"{path}: corrupt safetensors header (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            nbytes = _DTYPE_BYTES.get(info["dtype"])
            count = 1
            for s in info["shape"]:
                count *= s
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt entry for tensor '{name}' in the header") from None
        if end > data_len:
            raise WeightsError(
                f"{path}: truncated: tensor '{name}' needs bytes up to {end} but the file holds {data_len} data bytes")
        if nbytes is not None and end - start != count * nbytes and info["dtype"] not in ("U32",):
            raise WeightsError(f"{path}: tensor '{name}' has {end - start} bytes for shape {info['shape']} {info['dtype']}")
    return header


def find_shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightsError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
        files = sorted(set(wm.values()))
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise WeightsError(f"{index}: shard(s) listed but missing: {', '.join(missing)}")
        return [model_dir / f for f in files]
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise WeightsError(f"{model_dir}: no *.safetensors files found")
    return shards


def load_raw(model_dir: Path) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """All tensors of all shards, lazily (mx.load maps tensors on demand), with their source file."""
    weights, source = {}, {}
    for shard in find_shards(model_dir):
        read_safetensors_header(shard)
        try:
            tensors = mx.load(str(shard))
        except Exception as e:  # mlx raises RuntimeError/ValueError with little context
            raise WeightsError(f"{shard}: cannot be read as safetensors ({e})") from None
        for k, v in tensors.items():
            if k in weights:
                raise WeightsError(f"{shard}: tensor '{k}' also appears in {source[k]}")
            weights[k] = v
            source[k] = shard
    return weights, source


# ---------------------------------------------------------------------------
# name mapping
# ---------------------------------------------------------------------------
_EXPERT = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.(weight|scales|biases)$")
_W_NAME = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def sanitize(weights: dict[str, mx.array], cfg: ModelConfig, source: dict[str, Path] | None = None):
    """Published (and transformers / mlx-lm) names -> our module names. Returns (weights, source)."""
    source = dict(source or {})
    out: dict[str, mx.array] = {}
    experts: dict[tuple, dict[int, mx.array]] = {}
    mlx_lm_mla: dict[str, dict[str, mx.array]] = {}  # mlx-lm's embed_q / unembed_out, per attention prefix

    def put(name, value, src_name):
        out[name] = value
        if src_name in source:
            source[name] = source[src_name]

    for k, v in weights.items():
        if k.startswith("model.mtp") or k.endswith("rotary_emb.inv_freq"):
            continue
        m = _EXPERT.match(k)
        if m:
            experts.setdefault((m.group(1), _W_NAME[m.group(3)], m.group(4)), {})[int(m.group(2))] = (v, k)
            continue
        m = _MLX_LM_MLA.match(k)
        if m:
            mlx_lm_mla.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = v
            if k in source:
                source.setdefault(f"{m.group(1)}.kv_b_proj.weight", source[k])
            continue
        n = k
        n = n.replace(".block_sparse_moe.gate.e_score_correction_bias", ".mlp.e_score_correction_bias")
        n = n.replace(".block_sparse_moe.", ".mlp.")
        if re.search(r"\.self_attn\.[qkv]_conv1d\.weight$", n) and v.ndim == 3:
            v = v.reshape(v.shape[0], -1)  # [C, 1, K] -> [C, K]
        elif re.search(r"\.self_attn\.[qkv]_conv\.conv\.weight$", n):  # mlx-lm: [C, K, 1]
            n = n.replace("_conv.conv.weight", "_conv1d.weight")
            v = v.reshape(v.shape[0], -1)
        elif n.endswith(".self_attn.A_log"):
            v = v.reshape(-1)
        elif n.endswith(".self_attn.dt_bias"):
            v = v.reshape(-1)
        put(n, v, k)

    for (prefix, proj, kind), per in experts.items():
        want = cfg.num_experts
        missing = [e for e in range(want) if e not in per]
        if missing:
            name = f"{prefix}.block_sparse_moe.experts.{missing[0]}.{ {v: k for k, v in _W_NAME.items()}[proj] }.{kind}"
            raise WeightsError(f"missing tensor '{name}' ({len(missing)} expert tensor(s) missing in {prefix})")
        first_src = per[0][1]
        put(f"{prefix}.mlp.switch_mlp.{proj}.{kind}", mx.stack([per[e][0] for e in range(want)]), first_src)

    for prefix, parts in mlx_lm_mla.items():
        out[f"{prefix}.kv_b_proj.weight"] = _kv_b_from_mlx_lm(prefix, parts, cfg)

    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out, source


_MLX_LM_MLA = re.compile(r"^(model\.layers\.\d+\.self_attn)\.(embed_q|unembed_out)\.(weight|scales|biases)$")
# modes whose scales are uint8 allow exactly one (bits, group size); affine keeps scales in a float dtype
_FP_MODES = {(4, 32): "mxfp4", (4, 16): "nvfp4", (8, 32): "mxfp8"}


def infer_quant_params(path: str, in_dims: int, weight: mx.array, scales: mx.array, qcfg: dict | None) -> dict:
    """group_size / bits / mode of a packed tensor: from the config's per-path entry, else from the shapes."""
    over = (qcfg or {}).get(path)
    bits = weight.shape[-1] * 32 // in_dims
    group_size = in_dims // scales.shape[-1]
    if isinstance(over, dict):
        return {"group_size": over.get("group_size", group_size), "bits": over.get("bits", bits),
                "mode": over.get("mode", "affine")}
    if scales.dtype != mx.uint8:
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    mode = _FP_MODES.get((bits, group_size))
    if mode is None:
        raise WeightsError(f"cannot tell how '{path}' was quantized ({bits} bits, group size {group_size})")
    return {"group_size": group_size, "bits": bits, "mode": mode}


def _kv_b_from_mlx_lm(prefix: str, parts: dict[str, mx.array], cfg: ModelConfig) -> mx.array:
    """Invert mlx-lm's kimi_linear sanitize: embed_q [H, rank, nope] and unembed_out [H, v, rank]
    (MultiLinear weights, possibly quantized along the last axis) -> kv_b_proj [H*(nope+v), rank].
    Dequantized: our absorbed MLA reads kv_b_proj densely anyway."""
    H, nope, vd, rank = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

    def dense(name: str, in_dims: int) -> mx.array:
        w = parts.get(f"{name}.weight")
        if w is None:
            raise WeightsError(f"missing tensor '{prefix}.{name}.weight' (mlx-lm layout needs embed_q and unembed_out)")
        if f"{name}.scales" not in parts:
            return w
        p = infer_quant_params(f"{prefix}.{name}", in_dims, w, parts[f"{name}.scales"], cfg.quantization)
        return mx.dequantize(w, parts[f"{name}.scales"], parts.get(f"{name}.biases"), **p)

    wk = dense("embed_q", nope)  # [H, rank, nope]
    wv = dense("unembed_out", rank)  # [H, v, rank]
    if tuple(wk.shape) != (H, rank, nope) or tuple(wv.shape) != (H, vd, rank):
        raise WeightsError(f"{prefix}: embed_q / unembed_out have shapes {tuple(wk.shape)} / {tuple(wv.shape)}, "
                           f"expected {(H, rank, nope)} / {(H, vd, rank)}")
    wv = wv.astype(wk.dtype)
    return mx.concatenate([wk.swapaxes(-1, -2), wv], axis=1).reshape(H * (nope + vd), rank)


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------
_KEEP_FP32 = ("e_score_correction_bias", "A_log", "dt_bias")


def apply_quantization(model: nn.Module, qcfg: dict, weights: dict[str, mx.array]) -> None:
    """Swap Linear/SwitchLinear modules for quantized ones where the checkpoint holds quantized tensors."""
    default = {"group_size": qcfg.get("group_size", 64), "bits": qcfg.get("bits", 4), "mode": qcfg.get("mode", "affine")}

    def predicate(path, module):
        # the tensors decide (a per-path `false` or a missing .scales means unquantized); the shapes
        # give bits / group size when the config has no per-path entry (mlx-lm configs often don't)
        if qcfg.get(path) is False or f"{path}.scales" not in weights or f"{path}.weight" not in weights:
            return False
        return infer_quant_params(path, module.weight.shape[-1], weights[f"{path}.weight"],
                                  weights[f"{path}.scales"], qcfg)

    nn.quantize(model, group_size=default["group_size"], bits=default["bits"], mode=default["mode"],
                class_predicate=predicate)


def build_model(cfg: ModelConfig):
    from .model.kimi_linear import Model

    return Model(cfg)


def load_weights_into(model: nn.Module, weights: dict[str, mx.array], source: dict[str, Path], where: Path) -> None:
    from mlx.utils import tree_flatten, tree_unflatten

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{where}: missing tensor '{missing[0]}'{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(f"{source.get(unexpected[0], where)}: unexpected tensor '{unexpected[0]}'{more}")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise WeightsError(
                f"{source.get(k, where)}: tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    fixed = []
    for k, v in weights.items():
        if k.endswith(_KEEP_FP32) and v.dtype != mx.float32:
            v = v.astype(mx.float32)
        fixed.append((k, v))
    model.update(tree_unflatten(fixed))


def load_model(path: str | os.PathLike, lazy: bool = False, dtype: mx.Dtype | None = None,
               context_tokens: int | None = None, cpu_fast_path: bool | None = None):
    """Load a Kimi-Linear model directory (published HF layout, or our / mlx-lm converted layout).

    context_tokens: if given, first check that the weights (their size on disk) plus the cache for
    that many tokens fit this machine; raises planner.PlanError (a ValueError) before reading any weights.
    cpu_fast_path: None (default) enables kimi_mlx.ops.cpu_fast on the CPU backend when it is faster
    (see cpu_fast_path_wanted; KIMI_MLX_CPU_FAST=off disables it); False never, True always.
    """
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise WeightsError(f"{model_dir}: not a directory (expected a model directory with config.json)")
    cfg = ModelConfig.from_file(model_dir)
    if context_tokens is not None:
        from .planner import check_fits

        check_fits(cfg, context_tokens, weights_bytes=sum(s.stat().st_size for s in find_shards(model_dir)))
    weights, source = load_raw(model_dir)
    weights, source = sanitize(weights, cfg, source)
    model = build_model(cfg)
    if cfg.quantization:
        apply_quantization(model, cfg.quantization, weights)
    if dtype is not None:
        weights = {k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith(_KEEP_FP32)
                       and not k.endswith((".scales", ".biases")) else v) for k, v in weights.items()}
    load_weights_into(model, weights, source, model_dir)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    model.model_dir = model_dir
    from .ops import cpu_fast

    if cpu_fast_path is None:
        cpu_fast.auto_enable_cpu_fast_path(model)
    elif cpu_fast_path:
        cpu_fast.enable_cpu_fast_path(model, force=True)
    return model


__all__ = ["load_model", "WeightsError", "ConfigError", "sanitize", "find_shards", "read_safetensors_header",
           "infer_quant_params"]
