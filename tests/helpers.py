"""Shared test helpers: fixture paths and golden data."""
from __future__ import annotations

from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = FIXTURES / "models"
MODEL_NAMES = ["tiny_grouped", "tiny_sharded", "tiny_quant"]


def golden(name: str) -> dict:
    return dict(np.load(MODELS / name / "golden.npz"))


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
