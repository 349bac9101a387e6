"""What the benchmarks share below model/roofline/mla/step (so that none of them imports another
for it): the machine description, context-length parsing and printing, and the analytic per-token
cost model of a config."""
from __future__ import annotations

import os
import platform

import mlx.core as mx


def machine_info() -> dict:
    from .. import _blas

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import importlib.metadata as md

        versions = {p: md.version(p) for p in ("mlx", "mlx-lm")}
    except Exception:
        versions = {}
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version(), "device": str(mx.default_device()), "blas": _blas.blas_info(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, **versions}


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_lengths(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        if part:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)



# bytes per weight: 4-bit with a bf16 scale and bias per 64 values; the router at 8 bits; MLA's
# kv_b stays bf16 in q4 (bench/model.py keeps it dense so both implementations hold the same weights)
_BYTES = {"fp32": 4.0, "bf16": 2.0, "q4": 0.5 + 4 / 64}
_BYTES_ROUTER = {"fp32": 4.0, "bf16": 2.0, "q4": 1.0 + 4 / 64}
_BYTES_KVB = {"fp32": 4.0, "bf16": 2.0, "q4": 2.0}


def model_costs(c: dict, dtype: str, n: int) -> dict:
    """Analytic per-token costs of a (published-style) config at context depth n."""
    d, V = c["hidden_size"], c["vocab_size"]
    lac = c["linear_attn_config"]
    H, K = lac["num_heads"], lac["head_dim"]
    P = H * K
    Hm, nope, rope, vd, rank = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                                c["v_head_dim"], c["kv_lora_rank"])
    F, Fd, E, k = c["moe_intermediate_size"], c["intermediate_size"], c["num_experts"], c["num_experts_per_token"]
    shared = c.get("num_shared_experts", 1) or 0
    mla = {i - 1 for i in lac["full_attn_layers"]}
    L = c["num_hidden_layers"]
    params = 0.0  # matmul weights read per token, excluding the router, MLA's kv_b and lm_head
    router = 0.0
    kvb = 0.0
    attn_flops = 0.0  # beyond the projections, per token averaged over a prefill of n tokens
    cache_bytes = 0.0  # read per decode token at depth n
    act = 2 if dtype == "bf16" else 4
    for i in range(L):
        if i in mla:
            params += d * Hm * (nope + rope) + d * (rank + rope) + Hm * vd * d
            kvb += Hm * (nope + vd) * rank
            attn_flops += Hm * n * (2 * rank + rope)  # scores + values over n/2 keys on average
            cache_bytes += n * (rank + rope) * act
        else:
            params += 4 * d * P + 2 * (d * K + K * P) + d * H
            attn_flops += H * 8 * K * K  # decay, k^T S, rank-1 update, readout
            cache_bytes += 2 * H * K * K * 4  # fp32 state, read and written
        if i < c["first_k_dense_replace"]:
            params += 3 * d * Fd
        else:
            params += (k + shared) * 3 * d * F
            router += d * E
    w_bytes = (params * _BYTES[dtype] + router * _BYTES_ROUTER[dtype] + kvb * _BYTES_KVB[dtype]
               + d * V * _BYTES[dtype] + d * 4)
    return {"active_params": int(params + router + kvb),
            "decode_bytes_per_token": int(w_bytes + cache_bytes),
            "prefill_flops_per_token": int(2 * (params + router + kvb + d * V / n) + attn_flops)}
