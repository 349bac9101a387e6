"""Building the slice model (bench model's "build" step): a published-style config at the real
widths with few layers and experts, random weights under the published names, and ours or
mlx-lm built from the identical tensors in fp32 / bf16 / q4; the same-weights check."""
from __future__ import annotations

import math
import os
from pathlib import Path

import kimi_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# ours-plain: ours without the CPU fast path; mlx-lm+fast: mlx-lm with our CPU fast path swapped in
# (isolates what the model code does, e.g. attention memory, from the CPU matmul kernels)
IMPLS = ("ours", "ours-plain", "mlx-lm", "mlx-lm+fast")
DTYPES = ("fp32", "bf16", "q4")


def slice_config(layers: int = 5, experts: int = 16, vocab: int = 8192, tiny: bool = False) -> dict:
    """Published-style config.json of the slice: MLA every 4th layer (as in the real model: 5 layers
    put it at index 3, with a KDA layer after it), the rest KDA, layer 0 dense. tiny: small widths
    (hidden 128, 2 heads of 64) for smoke tests."""
    c = _slice_config(layers, experts, vocab)
    if tiny:
        c.update(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2,
                 kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, head_dim=48,
                 moe_intermediate_size=64, num_experts_per_token=min(2, experts))
        c["linear_attn_config"].update(head_dim=64, num_heads=2)
    return c


def _slice_config(layers: int, experts: int, vocab: int) -> dict:
    mla = [i for i in range(1, layers + 1) if i % 4 == 0] or [layers]
    return {
        "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "dtype": "bfloat16",
        "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 72, "vocab_size": vocab,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "mla_use_nope": True,
        "rope_theta": 10000.0, "rope_scaling": None, "num_experts": experts, "num_experts_per_token": 8,
        "num_shared_experts": 1, "moe_intermediate_size": 1024, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "moe_renormalize": True, "moe_router_activation_func": "sigmoid",
        "routed_scaling_factor": 2.446, "num_expert_group": 1, "topk_group": 1, "use_grouped_topk": True,
        "num_nextn_predict_layers": 0, "model_max_length": 1048576, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
        "linear_attn_config": {"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4,
                               "full_attn_layers": mla,
                               "kda_layers": [i for i in range(1, layers + 1) if i not in mla]},
    }


def random_weights(c: dict, seed: int = 0) -> dict[str, mx.array]:
    """fp32 tensors under the published names. Linear weights uniform with variance 1/in (output
    projections halved) so the residual stream stays O(1) through the layers. numpy generates them
    on the CPU (several times faster than mx.random there), mx.random on a GPU (256 experts are
    ~7e9 weights: a minute of numpy, a second on the GPU)."""
    import numpy as np

    from .. import planner

    need, have = 4 * planner.param_count(c), planner.machine_memory_bytes()
    if have is not None and need > have:  # refuse here rather than be killed by the OOM killer later
        raise MemoryError(f"the slice's random fp32 weights alone need about {planner.format_bytes(need)}, but "
                          f"{planner.format_bytes(have)} is usable here: use fewer experts (--experts 16), "
                          "fewer layers or --tiny")
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)
    on_gpu = mx.default_device().type == mx.DeviceType.gpu

    def uniform(shape, std):
        if on_gpu:
            half = std * math.sqrt(3.0)
            return mx.random.uniform(-half, half, shape)
        x = rng.random(shape, dtype=np.float32)
        x -= 0.5
        x *= np.float32(std * 2 * math.sqrt(3.0))
        return mx.array(x)

    d, P = c["hidden_size"], c["linear_attn_config"]["num_heads"] * c["linear_attn_config"]["head_dim"]
    H, K = c["linear_attn_config"]["num_heads"], c["linear_attn_config"]["head_dim"]
    Hm, nope, rope, vd, rank = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                                c["v_head_dim"], c["kv_lora_rank"])
    F, Fd, E = c["moe_intermediate_size"], c["intermediate_size"], c["num_experts"]
    mla = {i - 1 for i in c["linear_attn_config"]["full_attn_layers"]}
    w: dict[str, mx.array] = {}

    def lin(name, out, inp, gain=1.0):
        w[name] = uniform((out, inp), gain / math.sqrt(inp))

    w["model.embed_tokens.weight"] = uniform((c["vocab_size"], d), 1.0)
    w["model.norm.weight"] = mx.ones((d,))
    lin("lm_head.weight", c["vocab_size"], d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = mx.ones((d,))
        w[p + "post_attention_layernorm.weight"] = mx.ones((d,))
        a = p + "self_attn."
        if i in mla:
            lin(a + "q_proj.weight", Hm * (nope + rope), d)
            lin(a + "kv_a_proj_with_mqa.weight", rank + rope, d)
            w[a + "kv_a_layernorm.weight"] = mx.ones((rank,))
            lin(a + "kv_b_proj.weight", Hm * (nope + vd), rank)
            lin(a + "o_proj.weight", d, Hm * vd, 0.5)
        else:
            for n in "qkv":
                lin(a + f"{n}_proj.weight", P, d)
                w[a + f"{n}_conv1d.weight"] = mx.random.normal((P, 1, 4)) * 0.5
            lin(a + "f_a_proj.weight", K, d)
            lin(a + "f_b_proj.weight", P, K, 0.5)
            w[a + "dt_bias"] = mx.random.normal((P,)) * 0.5 - 2.0  # mild decays, like trained models
            w[a + "A_log"] = mx.log(mx.random.uniform(1.0, 16.0, (1, 1, H, 1)))
            lin(a + "b_proj.weight", H, d)
            lin(a + "g_a_proj.weight", K, d)
            lin(a + "g_b_proj.weight", P, K)
            w[a + "o_norm.weight"] = mx.ones((K,))
            lin(a + "o_proj.weight", d, P, 0.5)
        if i < c["first_k_dense_replace"]:
            m = p + "mlp."
            lin(m + "gate_proj.weight", Fd, d)
            lin(m + "up_proj.weight", Fd, d)
            lin(m + "down_proj.weight", d, Fd, 0.5)
        else:
            m = p + "block_sparse_moe."
            lin(m + "gate.weight", E, d)
            w[m + "gate.e_score_correction_bias"] = mx.zeros((E,))
            for e in range(E):
                lin(m + f"experts.{e}.w1.weight", F, d)
                lin(m + f"experts.{e}.w3.weight", F, d)
                lin(m + f"experts.{e}.w2.weight", d, F, 0.5)
            lin(m + "shared_experts.gate_proj.weight", F, d)
            lin(m + "shared_experts.up_proj.weight", F, d)
            lin(m + "shared_experts.down_proj.weight", d, F, 0.5)
        mx.eval(w)
    return w


_FP32_NAMES = ("e_score_correction_bias", "A_log", "dt_bias")


def _cast(weights: dict, dtype) -> dict:
    return {k: (v if k.endswith(_FP32_NAMES) else v.astype(dtype)) for k, v in weights.items()}


# MLA's up-projection: ours keeps it as one kv_b_proj [H*(nope+v), rank] (quantized along rank),
# mlx-lm splits it into embed_q [H, rank, nope] (quantized along nope) and unembed_out. Quantizing
# them would give the two models different weights, so both keep it in bf16 (4M weights a layer).
_DENSE_MLA = ("kv_b_proj", "embed_q", "unembed_out")


def _quant_predicate(path: str, m: nn.Module):
    """Same rule for both implementations: 4-bit / group 64 where the input width divides, the
    router 8-bit (mlx-lm's own choice), embeddings and MLA's kv_b left dense (see _DENSE_MLA)."""
    if not hasattr(m, "to_quantized") or isinstance(m, nn.Embedding):
        return False
    if path.endswith(_DENSE_MLA):
        return False
    if m.weight.shape[-1] % 64:
        return False
    if path.endswith("mlp.gate"):
        return {"group_size": 64, "bits": 8}
    return True


def _quantize(model: nn.Module) -> None:
    nn.quantize(model, group_size=64, bits=4, class_predicate=_quant_predicate)


def build(impl: str, c: dict, weights: dict, dtype: str) -> nn.Module:
    # q4 starts from bf16 like a conversion of the published bf16 checkpoint (bf16 scales)
    wdt = mx.float32 if dtype == "fp32" else mx.bfloat16
    weights = _cast(weights, wdt) if wdt != mx.float32 else dict(weights)
    if impl.startswith("ours"):
        from ..config import ModelConfig
        from ..weights import build_model, load_weights_into, sanitize

        cfg = ModelConfig.from_dict(c)
        w, src = sanitize(weights, cfg)
        model = build_model(cfg)
        load_weights_into(model, w, src, Path("<slice>"))
    else:
        from mlx_lm.models.kimi_linear import Model, ModelArgs

        model = Model(ModelArgs.from_dict(c))
        model.load_weights(list(model.sanitize(weights).items()))
    if dtype == "q4":
        _quantize(model)
    mx.eval(model.parameters())
    model.eval()
    counts = {}
    if impl in ("ours", "mlx-lm+fast"):
        from ..ops.cpu_fast import enable_cpu_fast_path

        counts = enable_cpu_fast_path(model)  # no-op off the CPU
    object.__setattr__(model, "bench_fast_path", counts)  # recorded in the results
    return model


def agreement(models: dict, vocab: int, tokens: int = 24, seed: int = 5) -> dict:
    """Logits of every implementation on the same tokens (no cache) against the first one: shows
    that the models hold the same weights (fp32: ~1e-5; bf16/q4: rounding of different op orders)."""
    import numpy as np

    ids = mx.random.randint(0, vocab, (1, tokens), key=mx.random.key(seed))
    outs = {}
    for impl, m in models.items():
        outs[impl] = np.asarray(m(ids).astype(mx.float32))[0]
    ref_impl = next(iter(outs))
    ref = outs[ref_impl]
    scale = float(np.abs(ref).max()) or 1.0
    res = {}
    for impl, o in outs.items():
        res[impl] = {"vs": ref_impl, "max_abs_diff": float(np.abs(o - ref).max()),
                     "rel_diff": float(np.abs(o - ref).max()) / scale,
                     "argmax_agree": float((o.argmax(-1) == ref.argmax(-1)).mean()),
                     "finite": bool(np.isfinite(o).all())}
    return res


def check_plan(experts: int, dtype: str = "auto") -> dict:
    """How the same-weights check runs: fp32 (the same weights agree to rounding, ~1e-6 relative),
    with the slice's experts, except on MLX-CUDA (0.32.4), where an fp32 model with 256 experts dies
    in gather_mm ("illegal memory access", ours and mlx-lm alike): there with 16 experts. Not bf16:
    with many experts a rounding difference flips the router's top-k and moves logits by O(1)
    (H200, 256 experts: 23% of the logit range, argmax agreeing on 88% of tokens)."""
    gpu = mx.default_device().type == mx.DeviceType.gpu
    cuda = gpu and mx.cuda.is_available()
    plan = {"dtype": "fp32" if dtype == "auto" else dtype, "experts": experts, "why": "requested"}
    if dtype == "auto":
        plan["why"] = "fp32: the same weights agree to rounding"
        if cuda and experts > 16:
            plan.update(experts=16, why="MLX-CUDA: fp32 gather_mm with many experts faults; 16 experts work")
    # GPU fp32 matmuls run as TF32 unless MLX_ENABLE_TF32=0 (H200, 16 experts: 5e-4 relative)
    tf32 = gpu and os.environ.get("MLX_ENABLE_TF32", "1") != "0"
    plan["rel_tol"] = (2e-3 if tf32 else 1e-4) if plan["dtype"] == "fp32" else 5e-2
    return plan


def same_weights_check(c: dict, base: dict, vocab: int, plan: dict, seed: int = 0) -> dict:
    """Logits of ours and mlx-lm built from the same tensors as plan says (its own slice and random
    weights where it asks for fewer experts); `ok` when mlx-lm's max |diff| relative to the logit
    range is within plan's tolerance."""
    res = {**plan, "layers": c["num_hidden_layers"]}
    try:
        if plan["experts"] != c["num_experts"]:
            c = {**c, "num_experts": plan["experts"]}
            base = random_weights(c, seed)
        ms = {i: build(i, c, base, plan["dtype"]) for i in ("ours", "mlx-lm")}
        res.update(agreement(ms, vocab)["mlx-lm"])
        res["ok"] = res["finite"] and res["rel_diff"] <= plan["rel_tol"]
        del ms
        print(f"same-weights check ({plan['dtype']}, {plan['experts']} experts, 24 tokens): mlx-lm logits vs "
              f"ours: max |diff| {res['max_abs_diff']:.2e} (rel {res['rel_diff']:.1e}, tolerance {plan['rel_tol']:.0e}: "
              f"{'ok' if res['ok'] else 'FAILED'}), argmax agree {res['argmax_agree']:.0%}", flush=True)
    except Exception as e:
        res.update(ok=False, error=f"{type(e).__name__}: {e}"[:200])
        print(f"same-weights check ({plan['dtype']}, {plan['experts']} experts): {res['error']}", flush=True)
    return res
