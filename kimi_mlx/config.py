"""ModelConfig: the published config.json of Kimi-Linear, parsed and validated.

Errors name the offending field so a user can fix their config.json.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


_MISSING = object()
# Upper bounds far above any real checkpoint: they stop absurd values (a typo, 1e12) before they
# reach shape arithmetic or the C++ side as overflows, huge allocations or bad casts.
_MAX_DIM = 1 << 20
_MAX_VOCAB = 1 << 24
_MAX_LAYERS = 4096
_MAX_EXPERTS = 1 << 16
_MAX_CONV = 64
_MAX_CONTEXT = 1 << 31


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(d: dict, key: str, where: str, lo: int = 1, hi: int = _MAX_DIM, default=_MISSING, null_ok: bool = False):
    """An integer field in lo..hi; `default` when absent (and when null, with null_ok)."""
    if key not in d or (null_ok and d[key] is None):
        if default is _MISSING:
            raise ConfigError(f"{where}: missing field '{key}'")
        return default
    val = d[key]
    if not _is_int(val):
        raise ConfigError(f"{where}: field '{key}' must be an integer, got {val!r}")
    if not lo <= val <= hi:
        raise ConfigError(f"{where}: field '{key}' is {val}; it must be in {lo}..{hi}")
    return val


def _num(d: dict, key: str, where: str, default: float, lo: float, hi: float) -> float:
    """A finite number in the open interval (lo, hi); `default` when absent or null."""
    val = d.get(key)
    if val is None:
        return default
    if not isinstance(val, (int, float)) or isinstance(val, bool) or not math.isfinite(val):
        raise ConfigError(f"{where}: field '{key}' must be a finite number, got {val!r}")
    if not lo < val < hi:
        raise ConfigError(f"{where}: field '{key}' is {val}; it must be greater than {lo} and less than {hi}")
    return float(val)


def _bool(d: dict, key: str, where: str, default: bool) -> bool:
    val = d.get(key)
    if val is None:
        return default
    if not isinstance(val, bool):
        raise ConfigError(f"{where}: field '{key}' must be true or false, got {val!r}")
    return val


def _first(d: dict, *keys: str) -> str:
    """The first of `keys` present and not null (an alias such as num_local_experts), else the first."""
    return next((k for k in keys if d.get(k) is not None), keys[0])


def _token_ids(d: dict, key: str, where: str, vocab: int):
    val = d.get(key)
    if val is None:
        return None
    vals = val if isinstance(val, list) and key == "eos_token_id" else [val]
    if not vals or not all(_is_int(v) and 0 <= v < vocab for v in vals):
        raise ConfigError(f"{where}: field '{key}' must be a token id in 0..{vocab - 1}"
                          f"{' or a list of them' if key == 'eos_token_id' else ''}, got {val!r}")
    return val


def _quantization(d: dict, where: str) -> dict | None:
    key = _first(d, "quantization", "quantization_config")
    q = d.get(key)
    if q is None or q == {}:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"{where}: field '{key}' must be an object, got {q!r}")
    for name, entry in q.items():
        if isinstance(entry, bool) or name in ("bits", "group_size", "mode", "quant_method"):
            continue
        if not isinstance(entry, dict):
            continue  # other tools' fields (e.g. quant_method settings) are not ours to judge
        _quant_fields(entry, f"{where}: {key}.{name}")
    _quant_fields(q, f"{where}: {key}")
    return q


def _quant_fields(q: dict, where: str) -> None:
    _int(q, "bits", where, 1, 8, default=None)
    _int(q, "group_size", where, 1, 1 << 16, default=None)
    if "mode" in q and not isinstance(q["mode"], str):
        raise ConfigError(f"{where}: field 'mode' must be a string, got {q['mode']!r}")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    num_experts: int
    num_experts_per_token: int
    num_shared_experts: int
    num_expert_group: int
    topk_group: int
    first_k_dense_replace: int
    moe_layer_freq: int
    routed_scaling_factor: float
    moe_renormalize: bool
    rms_norm_eps: float
    tie_word_embeddings: bool
    kda_layers: list[int]  # 0-indexed
    mla_layers: list[int]  # 0-indexed
    linear_num_heads: int
    linear_head_dim: int
    short_conv_kernel_size: int
    kv_a_norm_eps: float = 1e-6  # transformers builds kv_a_layernorm with its default eps
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_max_length: int = 1048576
    quantization: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    # ---- derived -------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_mla(self, i: int) -> bool:
        return i in self._mla_set

    def is_moe(self, i: int) -> bool:
        # DeepSeek/Kimi convention: dense for the first k layers, then every moe_layer_freq-th layer is MoE
        return self.num_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def __post_init__(self):
        self._mla_set = frozenset(self.mla_layers)

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return list(e) if isinstance(e, (list, tuple)) else [e]

    # ---- parsing -------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config.json") -> "ModelConfig":
        """Parse and validate every field (type and range); ConfigError names the file and field.

        Long on purpose: one flat pass over the fields in config.json's order, easier to check
        against the published config than pieces would be."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        mt = d.get("model_type")
        if mt not in (None, "kimi_linear"):
            raise ConfigError(f"{where}: field 'model_type' is {mt!r}; this package runs 'kimi_linear' only")
        n_layers = _int(d, "num_hidden_layers", where, 1, _MAX_LAYERS)

        q_lora = d.get("q_lora_rank")
        if q_lora is not None:
            raise ConfigError(f"{where}: field 'q_lora_rank' is {q_lora!r}; Kimi Linear uses a full q_proj (q_lora_rank = null)")
        if d.get("mla_use_nope", True) is not True:
            raise ConfigError(f"{where}: field 'mla_use_nope' must be true (MLA layers are NoPE; RoPE MLA is not supported)")
        act = d.get("moe_router_activation_func", "sigmoid")
        if act != "sigmoid":
            raise ConfigError(f"{where}: field 'moe_router_activation_func' is {act!r}; only 'sigmoid' is supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: field 'hidden_act' must be 'silu'")
        if d.get("num_nextn_predict_layers", 0) not in (0, None):
            raise ConfigError(f"{where}: field 'num_nextn_predict_layers' must be 0")

        lac = d.get("linear_attn_config")
        if not isinstance(lac, dict):
            raise ConfigError(f"{where}: missing field 'linear_attn_config' (an object with kda_layers / full_attn_layers)")
        w = f"{where}: linear_attn_config"
        layer_lists = {}
        for name in ("kda_layers", "full_attn_layers"):
            lst = lac.get(name)
            if not isinstance(lst, list):
                raise ConfigError(f"{w}: field '{name}' must be a list of layer numbers, got {lst!r}"
                                  if name in lac else f"{w}: missing field '{name}'")
            for x in lst:
                if not _is_int(x) or not 1 <= x <= n_layers:
                    raise ConfigError(
                        f"{w}.{name}: entry {x!r} is out of range; layer numbers are 1-indexed in 1..{n_layers}")
            layer_lists[name] = lst
        kda1, full1 = layer_lists["kda_layers"], layer_lists["full_attn_layers"]
        overlap = set(kda1) & set(full1)
        if overlap:
            raise ConfigError(f"{w}: layers {sorted(overlap)} are in both kda_layers and full_attn_layers")
        missing = set(range(1, n_layers + 1)) - set(kda1) - set(full1)
        if missing:
            raise ConfigError(f"{w}: kda_layers and full_attn_layers do not cover layers {sorted(missing)} (1-indexed)")
        # the short conv keeps K-1 past positions as its state: K = 1 would leave an empty state
        conv = _int(lac, "short_conv_kernel_size", w, 2, _MAX_CONV, default=4, null_ok=True)

        k_exp = _first(d, "num_experts", "num_local_experts")
        n_exp = _int(d, k_exp, where, 1, _MAX_EXPERTS)
        k_top = _first(d, "num_experts_per_token", "num_experts_per_tok")
        top_k = _int(d, k_top, where, 1, _MAX_EXPERTS)
        n_group = _int(d, _first(d, "num_expert_group", "n_group"), where, 1, _MAX_EXPERTS, default=1, null_ok=True)
        topk_group = _int(d, "topk_group", where, 1, _MAX_EXPERTS, default=1, null_ok=True)
        if n_exp % n_group:
            raise ConfigError(f"{where}: field 'num_expert_group' ({n_group}) must divide num_experts ({n_exp})")
        if not 1 <= topk_group <= n_group:
            raise ConfigError(f"{where}: field 'topk_group' ({topk_group}) must be in 1..num_expert_group ({n_group})")
        if top_k > n_exp:
            raise ConfigError(f"{where}: field 'num_experts_per_token' ({top_k}) exceeds num_experts ({n_exp})")
        if n_group > 1 and n_exp // n_group < 2:
            raise ConfigError(f"{where}: field 'num_expert_group' leaves fewer than 2 experts per group")

        vocab = _int(d, "vocab_size", where, 1, _MAX_VOCAB)
        cfg = cls(
            vocab_size=vocab,
            hidden_size=_int(d, "hidden_size", where),
            intermediate_size=_int(d, "intermediate_size", where),
            moe_intermediate_size=_int(d, "moe_intermediate_size", where),
            num_hidden_layers=n_layers,
            num_attention_heads=_int(d, "num_attention_heads", where, 1, 4096),
            kv_lora_rank=_int(d, "kv_lora_rank", where),
            qk_nope_head_dim=_int(d, "qk_nope_head_dim", where),
            qk_rope_head_dim=_int(d, "qk_rope_head_dim", where),
            v_head_dim=_int(d, "v_head_dim", where),
            num_experts=n_exp,
            num_experts_per_token=top_k,
            num_shared_experts=_int(d, _first(d, "num_shared_experts", "n_shared_experts"), where, 0, _MAX_EXPERTS,
                                    default=1, null_ok=True),
            num_expert_group=n_group,
            topk_group=topk_group,
            first_k_dense_replace=_int(d, "first_k_dense_replace", where, 0, _MAX_LAYERS, default=1, null_ok=True),
            moe_layer_freq=_int(d, "moe_layer_freq", where, 1, _MAX_LAYERS, default=1, null_ok=True),
            routed_scaling_factor=_num(d, "routed_scaling_factor", where, 1.0, 0.0, 1e6),
            moe_renormalize=_bool(d, _first(d, "moe_renormalize", "norm_topk_prob"), where, True),
            rms_norm_eps=_num(d, "rms_norm_eps", where, 1e-5, 0.0, 1.0),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", where, False),
            kda_layers=sorted(x - 1 for x in kda1),
            mla_layers=sorted(x - 1 for x in full1),
            linear_num_heads=_int(lac, "num_heads", w, 1, 4096),
            linear_head_dim=_int(lac, "head_dim", w),
            short_conv_kernel_size=conv,
            bos_token_id=_token_ids(d, "bos_token_id", where, vocab),
            eos_token_id=_token_ids(d, "eos_token_id", where, vocab),
            pad_token_id=_token_ids(d, "pad_token_id", where, vocab),
            model_max_length=_int(d, _first(d, "model_max_length", "max_position_embeddings"), where, 1, _MAX_CONTEXT,
                                  default=1048576, null_ok=True),
            quantization=_quantization(d, where),
            raw=d,
        )
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: not found (a Kimi-Linear model directory needs config.json)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, where=str(path))
