"""Compiled decode steps (KIMI_MLX_COMPILE): the same logits as the plain layers, the traces are
reused from token to token, and replaced weights are never served from an old trace."""
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from helpers import MODELS, max_abs
from kimi_mlx import load_model
from mlx.utils import tree_flatten


def _steps(model, cache, n, batch=1):
    tok, out = mx.full((batch, 1), 7), []
    for _ in range(n):
        logits = model(tok, cache=cache)[:, -1]
        mx.eval(logits)
        out.append(logits)
        tok = mx.argmax(logits, axis=-1)[:, None]
    return out


@pytest.fixture(params=["tiny_grouped", "tiny_quant"])
def model_name(request):
    return request.param


@pytest.fixture
def model(model_name):
    return load_model(MODELS / model_name, cpu_fast_path=False)


def _prefilled(model, mla_bits=None):
    cache = model.make_cache(mla_bits=mla_bits)
    mx.eval(model(mx.array([list(range(1, 40))]), cache=cache))
    return cache


@pytest.mark.parametrize("mla_bits", [None, 8])
@pytest.mark.parametrize("whole_kda", [False, True])
def test_compiled_decode_matches_plain(model, model_name, monkeypatch, mla_bits, whole_kda):
    """whole_kda: as on a GPU, each KDA layer's token is one compiled piece with its kernel inside
    (here the kernel's place is taken by the MLX-ops step, which mx.compile traces too)."""
    monkeypatch.setattr("kimi_mlx.model.kimi_linear.kernels_traceable", lambda: whole_kda)
    base = _prefilled(model, mla_bits)
    monkeypatch.setenv("KIMI_MLX_COMPILE", "off")
    ref = _steps(model, base.copy(), 5)
    assert not any("_compiled" in layer.__dict__ for layer in model.layers)
    monkeypatch.setenv("KIMI_MLX_COMPILE", "on")
    got = _steps(model, base.copy(), 5)
    for layer in model.layers:
        whole = whole_kda and not layer.is_mla
        assert set(layer.__dict__["_compiled"].fns) == ({"token"} if whole else {"pre", "post"})
    # the KDA layers' six input projections ran as one joined matmul, their weights views of the joined one
    kda = [layer.self_attn for layer in model.layers if not layer.is_mla]
    slot = "_joined_q_proj_k_proj_v_proj_f_a_proj_g_a_proj_b_proj"
    assert kda and all(a.__dict__[slot][1] is not None for a in kda)
    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    assert shapes == {k: v.shape for k, v in tree_flatten(load_model(MODELS / model_name, cpu_fast_path=False).parameters())}
    assert max(max_abs(r, g) for r, g in zip(ref, got)) < 1e-5
    traces = [layer.__dict__["_compiled"].fns.copy() for layer in model.layers]
    after = _steps(model, base.copy(), 7)
    assert [layer.__dict__["_compiled"].fns for layer in model.layers] == traces  # reused, not retraced
    assert max(max_abs(r, g) for r, g in zip(ref, after)) < 1e-5  # the cache advanced as the plain steps do


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


def test_cpu_fast_experts_that_read_the_routing_never_run_compiled(monkeypatch):
    """The CPU fast path's bf16 experts go by expert blocks, which reads the routing on the host:
    those layers stay uncompiled (and still decode); fp32 experts take the traceable gather path."""
    monkeypatch.setenv("KIMI_MLX_COMPILE", "on")
    m = load_model(MODELS / "tiny_grouped", cpu_fast_path=True)
    moe = [layer for layer in m.layers if "switch_mlp" in layer.mlp]
    assert moe and all(layer.mlp.switch_mlp.compile_safe for layer in moe)
    for layer in moe:
        glu = layer.mlp.switch_mlp
        for proj in (glu.gate_proj, glu.up_proj, glu.down_proj):
            proj.weight = proj.weight.astype(mx.bfloat16)
    cache = _prefilled(m)
    got = _steps(m, cache.copy(), 2)
    assert all(not layer.__dict__["_compiled"].safe and not layer.__dict__["_compiled"].fns for layer in moe)
    monkeypatch.setenv("KIMI_MLX_COMPILE", "off")
    assert max(max_abs(r, g) for r, g in zip(_steps(m, cache.copy(), 2), got)) < 1e-5


def test_compiled_decode_then_another_thread(tmp_path):
    """Decode compiled on the main thread, then prefill + decode on a worker thread with its own
    stream (as the chat app and the server run): the joined projection weights must not be lazy
    arrays of the main thread's stream (MLX streams are thread-local). In a subprocess: MLX can
    abort at exit once another thread used it, so the script leaves with os._exit."""
    script = tmp_path / "t.py"
    script.write_text(f"""
import os, sys, threading
os.environ["KIMI_MLX_COMPILE"] = "on"
import kimi_mlx
import mlx.core as mx
m = kimi_mlx.load_model({str(MODELS / "tiny_grouped")!r}, cpu_fast_path=False)
def run():
    c = m.make_cache()
    mx.eval(m(mx.array([[1, 2, 3, 4]]), cache=c))
    for _ in range(3):
        y = m(mx.array([[5]]), cache=c)
        mx.eval(y)
    return float(y.sum())
out = [run()]
def worker():
    try:
        with mx.stream(mx.new_thread_local_stream(mx.default_device())):
            out.append(run())
    except Exception as e:
        out.append(repr(e))
t = threading.Thread(target=worker)
t.start()
t.join()
print(out, flush=True)
os._exit(0)
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    main, worker = eval(r.stdout.strip().splitlines()[-1])
    assert worker == main, (main, worker)


class _TracedMLA:
    """The MLA decode and combine kernels' contract in MLX ops: unlike the emulator, mx.compile
    traces it, so an MLA layer's one-piece decode step runs on the CPU. The depth comes from the
    info array only (n, key_start, q_offset, heads, keys per split), as in the kernel."""

    def __init__(self, kind):
        self.kind = kind

    def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None, **kw):
        t = dict(template)
        if self.kind == "mla_combine":
            o, lse, o2, lse2 = inputs
            if t["TWO"]:
                o, lse = mx.concatenate([o, o2], axis=1), mx.concatenate([lse, lse2], axis=1)
            w = mx.exp(lse - lse.max(axis=1, keepdims=True))
            return [((w[..., None] * o).sum(axis=1) / w.sum(axis=1)[..., None]).astype(t["T"])]
        assert self.kind == "mla_decode", self.kind
        q, rows, wq, sc, bi, info, info_f = inputs
        B, M, D = q.shape
        if t["Q8"]:
            cap = wq.shape[1]
            rows = mx.dequantize(wq.reshape(B * cap, -1), sc.reshape(B * cap, -1), bi.reshape(B * cap, -1),
                                 group_size=t["QG"], bits=8)[:, :D].reshape(B, cap, D)
        rows = rows.astype(mx.float32)
        cap, ns = rows.shape[1], output_shapes[0][1]
        n, key_start, q_offset, heads, kps = (info[i] for i in range(5))
        j, r = mx.arange(cap), mx.arange(M)
        seen = (j[None] < n) & (key_start + j[None] <= q_offset + r[:, None] // heads)  # [M, cap]
        mask = seen[None] & (j // kps == mx.arange(ns)[:, None])[:, None, :]  # [ns, M, cap]
        s = (q.astype(mx.float32) @ rows.swapaxes(1, 2)) * info_f[0]
        s = mx.where(mask[None], s[:, None], -mx.inf)  # [B, ns, M, cap]
        top = s.max(axis=-1)
        safe = mx.where(mx.isinf(top), 0.0, top)
        p = mx.exp(s - safe[..., None])
        total = p.sum(axis=-1)
        lse = mx.where(total > 0, mx.log(mx.maximum(total, 1e-30)) + safe, -mx.inf)
        o = (p @ rows[:, None, :, : t["DV"]]) / mx.maximum(total, 1e-30)[..., None]
        return [o, lse]


@pytest.mark.parametrize("mla_bits,batch", [(None, 1), (8, 1), (None, 2)])
def test_mla_decode_token_as_one_compiled_piece(model, monkeypatch, mla_bits, batch):
    """As on a GPU: an MLA layer's decode step is one compiled piece, the cache write and the
    kernels inside. The same logits as the plain layers, token after token across tails that
    fill, close and merge (4-row pages); a trace is reused while the segments stay as they are,
    and only a few are kept."""
    import metal_kernels
    from metal_kernels import mla as K
    from kimi_mlx.cache import KDACache, KimiCache, MLACache

    cache = KimiCache(MLACache(page_tokens=4, bits=mla_bits) if layer.is_mla else KDACache() for layer in model.layers)
    mx.eval(model(mx.array([list(range(1 + 40 * b, 40 + 40 * b)) for b in range(batch)]), cache=cache))
    monkeypatch.setenv("KIMI_MLX_COMPILE", "off")
    ref = _steps(model, cache.copy(), 14, batch)
    monkeypatch.setattr(K, "backend", lambda: "cuda")
    monkeypatch.setattr(metal_kernels, "_kernel", lambda be, kind, *a: _TracedMLA(kind))
    plain_kernels = _steps(model, cache.copy(), 14, batch)  # the stand-in kernels outside mx.compile
    assert max(max_abs(r, g) for r, g in zip(ref, plain_kernels)) < 1e-5
    monkeypatch.setattr("kimi_mlx.model.kimi_linear.kernels_traceable", lambda: True)
    monkeypatch.setenv("KIMI_MLX_COMPILE", "on")
    made = []
    mla = [layer for layer in model.layers if layer.is_mla]
    c = cache.copy()
    got = []
    for i in range(14):
        got += _steps_from(model, c, ref[i - 1] if i else None, batch)
        fns = mla[0].__dict__["_compiled"].fns
        made.append(next(reversed([k for k in fns if isinstance(k, tuple)])))
    assert max(max_abs(r, g) for r, g in zip(ref, got)) < 1e-5
    assert all("pre" not in layer.__dict__["_compiled"].fns for layer in mla)  # never the plain pieces
    assert len(set(made)) < len(made) // 2  # traces reused within a tail
    assert len([k for k in mla[0].__dict__["_compiled"].fns if isinstance(k, tuple)]) <= 8
    assert c.offset == cache.offset + 14 and all(x.offset == c.offset for x in c)


def _steps_from(model, cache, prev_logits, batch=1):
    """One greedy step from the previous step's logits (token 7 first), as _steps takes them."""
    tok = mx.full((batch, 1), 7) if prev_logits is None else mx.argmax(prev_logits, axis=-1)[:, None]
    logits = model(tok, cache=cache)[:, -1]
    mx.eval(logits)
    return [logits]


_ALL_SIX = ("q_proj", "k_proj", "v_proj", "f_a_proj", "g_a_proj", "b_proj")


@pytest.mark.parametrize("quantized", [(), _ALL_SIX[:5], _ALL_SIX])
def test_kda_input_projections_joined_or_not(quantized):
    """A KDA token's six input projections: one joined matmul where they share one form, two
    (q|k|v and f_a|g_a|b) or six where they don't (b_proj left unquantized), always the same
    values as the layers alone, batch 2."""
    import json

    from kimi_mlx.config import ModelConfig
    from kimi_mlx.model.kda import KimiDeltaAttention
    from mlx.utils import tree_map

    raw = json.loads((MODELS / "tiny_quant" / "config.json").read_text())
    raw["linear_attn_config"]["head_dim"] = 32
    attn = KimiDeltaAttention(ModelConfig.from_dict(raw))
    mx.random.seed(1)
    attn.update(tree_map(lambda a: 0.3 * mx.random.normal(a.shape), attn.parameters()))
    if quantized:
        nn.quantize(attn, group_size=32, bits=8, class_predicate=lambda p, m: p in quantized)
    x = mx.random.normal((2, 1, raw["hidden_size"]))
    want = attn._input_projections(x, join=False)
    got = attn._input_projections(x, join=True)
    six = attn.__dict__["_joined_" + "_".join(_ALL_SIX)][1]
    assert (six is None) == (0 < len(quantized) < 6)
    assert [a.shape for a in got] == [a.shape for a in want]
    for a, b in zip(got, want):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-5).item()
    assert mx.allclose(attn.q_proj(x), want[0][..., : attn.q_proj.weight.shape[0]]).item()  # the layers still work alone


def test_joined_weights_are_not_held_twice():
    """A join (a decode token's gate|up) replaces the layers' arrays by views of the joined ones;
    what prefill derived from the old arrays (Linear's transposed views) must not keep them alive."""
    import gc

    from kimi_mlx.model.common import MLP

    mlp = MLP(256, 2048)
    mx.eval(mlp.parameters())
    mx.eval(mlp(mx.random.normal((1, 4, 256))))  # prefill: each layer's transposed views
    x = mx.random.normal((1, 1, 256))
    mx.eval(x)
    gc.collect()
    before = mx.get_active_memory()
    joined = mlp.gate_proj.weight.nbytes + mlp.up_proj.weight.nbytes
    mx.eval(mlp(x))  # joins gate|up
    assert mlp.__dict__["_joined_gate_proj_up_proj"][1] is not None
    gc.collect()
    assert mx.get_active_memory() - before < 0.1 * joined
