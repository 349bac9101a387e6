"""Compiled decode steps (KIMI_MLX_COMPILE): the same logits as the plain layers, the traces are
reused from token to token, and replaced weights are never served from an old trace."""
import mlx.core as mx
import mlx.nn as nn
import pytest

from helpers import MODELS, max_abs
from kimi_mlx import load_model


def _steps(model, cache, n):
    tok, out = mx.array([[7]]), []
    for _ in range(n):
        logits = model(tok, cache=cache)[:, -1]
        mx.eval(logits)
        out.append(logits)
        tok = mx.argmax(logits, axis=-1)[None]
    return out


@pytest.fixture
def model():
    return load_model(MODELS / "tiny_grouped", cpu_fast_path=False)


def _prefilled(model, mla_bits=None):
    cache = model.make_cache(mla_bits=mla_bits)
    mx.eval(model(mx.array([list(range(1, 40))]), cache=cache))
    return cache


@pytest.mark.parametrize("mla_bits", [None, 8])
def test_compiled_decode_matches_plain(model, monkeypatch, mla_bits):
    base = _prefilled(model, mla_bits)
    monkeypatch.setenv("KIMI_MLX_COMPILE", "off")
    ref = _steps(model, base.copy(), 5)
    assert not any("_compiled" in layer.__dict__ for layer in model.layers)
    monkeypatch.setenv("KIMI_MLX_COMPILE", "on")
    got = _steps(model, base.copy(), 5)
    assert all(set(layer.__dict__["_compiled"].fns) == {"pre", "post"} for layer in model.layers)
    assert max(max_abs(r, g) for r, g in zip(ref, got)) < 1e-5
    traces = [layer.__dict__["_compiled"].fns["post"] for layer in model.layers]
    _steps(model, base.copy(), 2)
    assert [layer.__dict__["_compiled"].fns["post"] for layer in model.layers] == traces  # reused, not retraced


def test_new_weights_are_never_served_from_an_old_trace(model, monkeypatch):
    monkeypatch.setenv("KIMI_MLX_COMPILE", "on")
    base = _prefilled(model)
    _steps(model, base.copy(), 2)
    # doubled o_proj weights through load_weights, as a user (or a LoRA merge) would
    layer = model.layers[0]
    w = layer.self_attn.o_proj.weight * 2
    model.load_weights([("model.layers.0.self_attn.o_proj.weight", w)], strict=False)
    got = _steps(model, base.copy(), 2)
    monkeypatch.setenv("KIMI_MLX_COMPILE", "off")
    want = _steps(model, base.copy(), 2)
    assert max(max_abs(r, g) for r, g in zip(want, got)) < 1e-5
    # an array set by assignment, and a submodule replaced
    for change in (lambda: setattr(layer.self_attn.o_proj, "weight", w * 0),
                   lambda: setattr(layer, "post_attention_layernorm", nn.RMSNorm(w.shape[0]))):
        monkeypatch.setenv("KIMI_MLX_COMPILE", "on")
        _steps(model, base.copy(), 1)
        change()
        got = _steps(model, base.copy(), 1)
        monkeypatch.setenv("KIMI_MLX_COMPILE", "off")
        assert max_abs(_steps(model, base.copy(), 1)[0], got[0]) < 1e-5


def test_cpu_fast_modules_never_run_compiled(monkeypatch):
    """The CPU fast path's experts read the routing on the host: those layers stay uncompiled."""
    monkeypatch.setenv("KIMI_MLX_COMPILE", "on")
    m = load_model(MODELS / "tiny_grouped", cpu_fast_path=True)
    cache = _prefilled(m)
    _steps(m, cache, 2)
    moe = [layer for layer in m.layers if "switch_mlp" in layer.mlp]
    assert moe and all(not layer.__dict__["_compiled"].safe for layer in moe)
    assert all(not layer.__dict__["_compiled"].fns for layer in moe)
