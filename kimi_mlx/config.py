"""ModelConfig: the published config.json of Kimi-Linear, parsed and validated.

Errors name the offending field so a user can fix their config.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


def _req(d: dict, key: str, typ, where: str):
    if key not in d:
        raise ConfigError(f"{where}: missing field '{key}'")
    val = d[key]
    if typ is int and (not isinstance(val, int) or isinstance(val, bool)):
        raise ConfigError(f"{where}: field '{key}' must be an integer, got {val!r}")
    if typ is float and not isinstance(val, (int, float)):
        raise ConfigError(f"{where}: field '{key}' must be a number, got {val!r}")
    return val


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
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        mt = d.get("model_type")
        if mt not in (None, "kimi_linear"):
            raise ConfigError(f"{where}: field 'model_type' is {mt!r}; this package runs 'kimi_linear' only")
        n_layers = _req(d, "num_hidden_layers", int, where)

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
        kda1 = _req(lac, "kda_layers", list, w)
        full1 = _req(lac, "full_attn_layers", list, w)
        for name, lst in (("kda_layers", kda1), ("full_attn_layers", full1)):
            for x in lst:
                if not isinstance(x, int) or not 1 <= x <= n_layers:
                    raise ConfigError(
                        f"{w}.{name}: entry {x!r} is out of range; layer numbers are 1-indexed in 1..{n_layers}")
        overlap = set(kda1) & set(full1)
        if overlap:
            raise ConfigError(f"{w}: layers {sorted(overlap)} are in both kda_layers and full_attn_layers")
        missing = set(range(1, n_layers + 1)) - set(kda1) - set(full1)
        if missing:
            raise ConfigError(f"{w}: kda_layers and full_attn_layers do not cover layers {sorted(missing)} (1-indexed)")
        conv = lac.get("short_conv_kernel_size", 4)

        n_group = d.get("num_expert_group", d.get("n_group", 1)) or 1
        topk_group = d.get("topk_group", 1) or 1
        n_exp = d.get("num_experts", d.get("num_local_experts"))
        if n_exp is None:
            raise ConfigError(f"{where}: missing field 'num_experts'")
        top_k = d.get("num_experts_per_token", d.get("num_experts_per_tok"))
        if top_k is None:
            raise ConfigError(f"{where}: missing field 'num_experts_per_token'")
        if n_exp % n_group:
            raise ConfigError(f"{where}: field 'num_expert_group' ({n_group}) must divide num_experts ({n_exp})")
        if not 1 <= topk_group <= n_group:
            raise ConfigError(f"{where}: field 'topk_group' ({topk_group}) must be in 1..num_expert_group ({n_group})")
        if top_k > n_exp:
            raise ConfigError(f"{where}: field 'num_experts_per_token' ({top_k}) exceeds num_experts ({n_exp})")
        if n_group > 1 and n_exp // n_group < 2:
            raise ConfigError(f"{where}: field 'num_expert_group' leaves fewer than 2 experts per group")
        freq = d.get("moe_layer_freq", 1) or 1

        cfg = cls(
            vocab_size=_req(d, "vocab_size", int, where),
            hidden_size=_req(d, "hidden_size", int, where),
            intermediate_size=_req(d, "intermediate_size", int, where),
            moe_intermediate_size=_req(d, "moe_intermediate_size", int, where),
            num_hidden_layers=n_layers,
            num_attention_heads=_req(d, "num_attention_heads", int, where),
            kv_lora_rank=_req(d, "kv_lora_rank", int, where),
            qk_nope_head_dim=_req(d, "qk_nope_head_dim", int, where),
            qk_rope_head_dim=_req(d, "qk_rope_head_dim", int, where),
            v_head_dim=_req(d, "v_head_dim", int, where),
            num_experts=n_exp,
            num_experts_per_token=top_k,
            num_shared_experts=d.get("num_shared_experts", d.get("n_shared_experts", 1)) or 0,
            num_expert_group=n_group,
            topk_group=topk_group,
            first_k_dense_replace=d.get("first_k_dense_replace", 1),
            moe_layer_freq=freq,
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            moe_renormalize=bool(d.get("moe_renormalize", d.get("norm_topk_prob", True))),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            kda_layers=sorted(x - 1 for x in kda1),
            mla_layers=sorted(x - 1 for x in full1),
            linear_num_heads=_req(lac, "num_heads", int, w),
            linear_head_dim=_req(lac, "head_dim", int, w),
            short_conv_kernel_size=conv,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            model_max_length=d.get("model_max_length", d.get("max_position_embeddings", 1048576)) or 1048576,
            quantization=d.get("quantization") or d.get("quantization_config"),
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
