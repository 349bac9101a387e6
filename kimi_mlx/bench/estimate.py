"""Estimates for what bench model did not measure (bench model's "estimate" step): the prefill of a
length that was skipped as too slow, from a probe chunk at depth, a fit through measured lengths, or a
sibling implementation's per-token excess; and mlx-lm's attention memory."""
from __future__ import annotations

from .common import fmt_len


def _mlx_lm_attention_bytes(n: int, step: int, heads: int = 32, itemsize: int = 4) -> int:
    # mlx-lm's prefill materialises [heads, chunk, context] rope scores, their masked copy and the
    # attention scores (in the activations' dtype: bf16 for plain mlx-lm, fp32 behind our fast path)
    return 3 * heads * min(step, n) * n * itemsize


# same model code, other matmul kernels
_SIBLING = {"mlx-lm": "mlx-lm+fast", "ours-plain": "ours"}


def estimate(results: list[dict]) -> None:
    """Fill prefill_tok_s_est (and peak_mem_bytes_est for mlx-lm) where a prefill was skipped.

    Prefill time of one implementation is fitted as t(n) = a*n + b*n^2 (projections + KDA linear in
    n, MLA attention quadratic) through its measured lengths; with a single measured length, an
    implementation that differs from a measured sibling only by its matmul kernels (mlx-lm vs
    mlx-lm+fast: the same model code) is sibling(n) + n * (its per-token excess at the measured length)."""
    import numpy as np

    by = {(r["dtype"], r["impl"], r["length"]): r for r in results}
    for r in results + results:  # twice: a sibling's own estimate may come later in the list
        if r.get("prefill_tok_s") or not r.get("prefill_skipped"):
            continue
        dt, impl, n = r["dtype"], r["impl"], r["length"]
        meas = sorted((x["length"], x["prefill_s"]) for x in results
                      if x["dtype"] == dt and x["impl"] == impl and x.get("prefill_tok_s"))
        t_est = method = None
        probe = r.get("probe") or {}
        if probe.get("s") and meas:
            # chunk time grows linearly with depth (attention), so the mean chunk costs the average of a
            # chunk at depth 0 (the shortest measured prefill's rate) and the probed chunk at depth n - N
            m0, tm0 = meas[0]
            N = probe["tokens"]
            t_est = n / N * (N * tm0 / m0 + probe["s"]) / 2
            method = (f"measured {N}-token chunk at depth {fmt_len(probe['depth'])} (synthetic cache) averaged "
                      f"with a depth-0 chunk at the {fmt_len(m0)} prefill rate; attention linear in depth")
        elif len(meas) >= 2:
            A = np.array([[m, m * m] for m, _ in meas], float)
            y = np.array([t for _, t in meas], float)
            (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
            b = max(b, 0.0)
            a = a if a > 0 else float(np.mean([t / m for m, t in meas]))
            t_est = a * n + b * n * n
            method = f"fit t(n)=a*n+b*n^2 through {impl}'s measured lengths {[fmt_len(m) for m, _ in meas]}"
        sib = _SIBLING.get(impl)
        short = r.get("short_prefill") or {}
        if not meas and short.get("sibling_s"):  # only the short prefill: its per-token excess
            meas = [(short["tokens"], short["s"])]
            by[(dt, sib, short["tokens"])] = {"prefill_s": short["sibling_s"]}
        if sib and meas and t_est is None:
            s_n = by.get((dt, sib, n))
            s_rate = (s_n.get("prefill_tok_s_est") or s_n.get("prefill_tok_s_est_if_it_fit")) if s_n else None
            s_t = s_n.get("prefill_s") or (s_rate and n / s_rate) if s_n else None
            m0, t0 = meas[-1]
            s_m = by.get((dt, sib, m0))
            if s_t and s_m and s_m.get("prefill_s"):
                t_est = s_t + n * (t0 - s_m["prefill_s"]) / m0
                method = (f"{sib} at {fmt_len(n)}{' (est)' if not s_n.get('prefill_s') else ''} + {impl}'s "
                          f"per-token matmul excess over {sib} measured at {fmt_len(m0)}")
        if t_est and "GiB" in r["prefill_skipped"]:
            # it can't run here: kept only as the compute-time input of a sibling's estimate
            r["prefill_tok_s_est_if_it_fit"] = n / t_est
            r["prefill_est_method"] = method
        elif t_est:
            r["prefill_tok_s_est"] = n / t_est
            r["prefill_est_method"] = method
        if probe.get("peak_extra_bytes") and r.get("weights_bytes") and probe["tokens"] >= r.get("step", 0):
            # the deepest chunk is where the prefill peaks (cache at its largest): measured in the probe
            r["peak_mem_bytes_est"] = r["weights_bytes"] + probe["peak_extra_bytes"] + probe.get("cache_bytes", 0)
            r["peak_mem_est_method"] = "weights + the probe chunk's measured extra memory + the cache"
        elif impl.startswith("mlx-lm") and r.get("weights_bytes"):
            # the sibling's measured peak with its attention buffers swapped for ours (bf16 vs fp32
            # scores), else weights + attention buffers alone (an underestimate: no activations)
            s_n = by.get((dt, sib, n)) if sib else None
            if s_n and s_n.get("peak_mem_bytes") and s_n.get("attention_bytes_est"):
                r["peak_mem_bytes_est"] = (s_n["peak_mem_bytes"] - s_n["weights_bytes"] - s_n["attention_bytes_est"]
                                           + r["weights_bytes"] + r.get("attention_bytes_est", 0))
                r["peak_mem_est_method"] = f"{sib}'s measured peak, its fp32 attention buffers replaced by bf16 ones"
            else:
                r["peak_mem_bytes_est"] = r["weights_bytes"] + r.get("attention_bytes_est", 0)
                r["peak_mem_est_method"] = "weights + mlx-lm's attention buffers (analytic; without activations)"
