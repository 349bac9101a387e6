import copy
import json

import pytest

from kimi_mlx.config import ConfigError, ModelConfig
from helpers import MODELS

BASE = json.loads((MODELS / "tiny_grouped" / "config.json").read_text())


def test_parses_published_fields():
    c = ModelConfig.from_dict(BASE)
    assert c.kda_layers == [0, 1, 3] and c.mla_layers == [2, 4]  # 1-indexed in the file
    assert c.is_mla(2) and not c.is_mla(0)
    assert not c.is_moe(0) and c.is_moe(1)
    assert c.num_expert_group == 4 and c.topk_group == 2
    assert c.routed_scaling_factor == pytest.approx(2.446)
    assert c.qk_head_dim == 24


def test_published_48b_config_layers():
    d = copy.deepcopy(BASE)
    d.update(num_hidden_layers=27, linear_attn_config={
        "head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4,
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26]})
    c = ModelConfig.from_dict(d)
    assert c.mla_layers == [3, 7, 11, 15, 19, 23, 26]


@pytest.mark.parametrize("change,field", [
    ({"q_lora_rank": 64}, "q_lora_rank"),
    ({"mla_use_nope": False}, "mla_use_nope"),
    ({"moe_router_activation_func": "softmax"}, "moe_router_activation_func"),
    ({"model_type": "llama"}, "model_type"),
    ({"num_expert_group": 3}, "num_expert_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_token": 99}, "num_experts_per_token"),
    ({"hidden_size": "big"}, "hidden_size"),
])
def test_refuses_unsupported(change, field):
    d = {**BASE, **change}
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("lac,msg", [
    ({"kda_layers": [1, 2], "full_attn_layers": [3, 5]}, "do not cover layers \\[4\\]"),
    ({"kda_layers": [0, 1, 2, 4], "full_attn_layers": [3, 5]}, "1-indexed"),
    ({"kda_layers": [1, 2, 3, 4], "full_attn_layers": [3, 5]}, "both"),
])
def test_refuses_bad_layer_lists(lac, msg):
    d = copy.deepcopy(BASE)
    d["linear_attn_config"].update(lac)
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_dict(d)


def test_missing_field_and_bad_json(tmp_path):
    d = dict(BASE)
    del d["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig.from_dict(d)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json.*not valid JSON"):
        ModelConfig.from_file(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path / "nope")


# every field the config loader reads; "lac." marks linear_attn_config
_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
           "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
           "num_experts", "num_experts_per_token", "num_shared_experts", "num_expert_group", "topk_group",
           "first_k_dense_replace", "moe_layer_freq", "routed_scaling_factor", "moe_renormalize", "rms_norm_eps",
           "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "model_max_length",
           "quantization", "q_lora_rank", "mla_use_nope", "model_type", "linear_attn_config",
           "lac.num_heads", "lac.head_dim", "lac.short_conv_kernel_size", "lac.kda_layers", "lac.full_attn_layers"]
_BAD = ["x", "", None, 0, -1, -(10**12), 10**12, 2**63, 10**100, 1.5, float("nan"), float("inf"), True, False,
        [], [1], {}, {"a": 1}, "4"]


@pytest.mark.parametrize("field", _FIELDS)
def test_fuzzed_fields_give_config_error_or_a_working_model(field):
    """Each field set to wrong types, 0, negatives, huge values, strings, null: ConfigError naming the file,
    or (a value that is valid, e.g. null for an optional field) a model that builds and runs."""
    import mlx.core as mx

    from kimi_mlx.model.kimi_linear import Model

    for bad in _BAD:
        d = copy.deepcopy(BASE)
        target, key = (d["linear_attn_config"], field[4:]) if field.startswith("lac.") else (d, field)
        target[key] = bad
        try:
            cfg = ModelConfig.from_dict(d, where="/m/config.json")
        except ConfigError as e:
            assert str(e).startswith("/m/config.json") and "\n" not in str(e), (field, bad, str(e))
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{field}={bad!r}: {type(e).__name__}: {e}")
        try:
            model = Model(cfg)
            mx.eval(model(mx.array([[1, 2, 3]])))
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{field}={bad!r} was accepted but the model fails: {type(e).__name__}: {e}")


def test_config_file_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "hidden_size": 0}))
    with pytest.raises(ConfigError, match=rf"{tmp_path}/config.json: field 'hidden_size' is 0"):
        ModelConfig.from_file(tmp_path)
