"""Shared test helpers: fixture paths, golden data, KDA operator inputs."""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = FIXTURES / "models"
MODEL_NAMES = ["tiny_grouped", "tiny_sharded", "tiny_quant"]


def golden(name: str) -> dict:
    return dict(np.load(MODELS / name / "golden.npz"))


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def make_inputs(B, T, H, K, V, *, seed=0, g_range=(-5.0, -0.001), state=False, dtype=mx.float32):
    """l2-normalised q/k, gates g = -exp(A) * softplus(x) spread log-uniformly over g_range."""
    rng = np.random.default_rng(seed)

    def l2(x):
        return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)

    q = l2(rng.standard_normal((B, T, H, K)))
    k = l2(rng.standard_normal((B, T, H, K)))
    v = rng.standard_normal((B, T, H, V))
    lo, hi = np.log(-g_range[1]), np.log(-g_range[0])
    A = rng.uniform(0.0, 1.0, (1, 1, H, 1))
    target = np.exp(rng.uniform(lo, hi, (B, T, H, K)))           # |g| wanted
    x = np.log(np.expm1(target / np.exp(A)))                      # softplus^-1
    g = -np.exp(A) * np.logaddexp(0.0, x)
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, H)) * 2.0))
    s0 = 0.5 * rng.standard_normal((B, H, K, V)) if state else None
    arrs = [mx.array(a.astype(np.float32)).astype(dtype) for a in (q, k, v, g, beta)]
    return arrs, (None if s0 is None else mx.array(s0.astype(np.float32)))

