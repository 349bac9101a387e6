"""Exactness against the transformers oracle (golden fixtures made by fixtures/make_reference.py)."""
import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx import load_model
from helpers import MODEL_NAMES, MODELS, golden, max_abs

TOL = 1e-4


@pytest.fixture(scope="module", params=MODEL_NAMES)
def fixture(request):
    return load_model(MODELS / request.param), golden(request.param)


@pytest.mark.parametrize("T", [1, 63, 65, 200])
def test_full_forward_matches_reference(fixture, T):
    model, g = fixture
    out = model(mx.array(g["ids"][:1, :T]))
    assert out.shape == (1, T, model.config.vocab_size)
    assert max_abs(out[0], g[f"logits_{T}"]) < TOL


@pytest.mark.parametrize("steps", [[64, 64, 1, 1, 1, 69], [1, 1, 1, 62, 135], [17, 100, 1, 82]])
def test_chunked_prefill_then_decode_matches_reference(fixture, steps):
    model, g = fixture
    ids = mx.array(g["ids"][:1, :200])
    cache = model.make_cache()
    outs, pos = [], 0
    for n in steps:
        outs.append(model(ids[:, pos:pos + n], cache=cache))
        pos += n
    assert cache.offset == 200
    assert max_abs(mx.concatenate(outs, axis=1)[0], g["logits_200"]) < TOL


def test_greedy_continuation_identical(fixture):
    model, g = fixture
    prompt = mx.array(g["greedy_prompt"])[None]
    cache = model.make_cache()
    logits = model(prompt, cache=cache)
    toks = []
    for _ in range(len(g["greedy_tokens"])):
        nxt = mx.argmax(logits[:, -1], axis=-1)
        toks.append(int(nxt.item()))
        logits = model(nxt[:, None], cache=cache)
    assert toks == g["greedy_tokens"].tolist()


def test_batch_of_two_equals_each_alone(fixture):
    model, g = fixture
    ids = mx.array(g["ids"][:, :65])
    cache = model.make_cache()
    both = mx.concatenate([model(ids[:, :30], cache=cache), model(ids[:, 30:], cache=cache)], axis=1)
    assert max_abs(both, g["logits_batch2_65"]) < TOL
    for b in range(2):
        alone = model(ids[b:b + 1])
        assert max_abs(both[b], alone[0]) < 1e-5


def test_cache_copy_is_a_snapshot(fixture):
    model, g = fixture
    ids = mx.array(g["ids"][:1, :70])
    cache = model.make_cache()
    model(ids[:, :50], cache=cache)
    snap = cache.copy()
    a = model(ids[:, 50:70], cache=cache)
    b = model(ids[:, 50:70], cache=snap)  # continues from the snapshot, unaffected by the first branch
    assert max_abs(a, b) < 1e-6
    assert cache.offset == snap.offset == 70


@pytest.mark.parametrize("threshold", [1, 64])
def test_expanded_mla_prefill_matches_reference(fixture, threshold, monkeypatch):
    """Long prefill chunks take MLA's non-absorbed form; force it on short ones too (chunks of
    64 and 65 tokens over a growing cache, and the whole 200 at once) against the oracle."""
    from kimi_mlx.model import mla

    monkeypatch.setattr(mla, "EXPAND_MIN_T", threshold)
    model, g = fixture
    ids = mx.array(g["ids"][:1, :200])
    assert max_abs(model(ids)[0], g["logits_200"]) < TOL
    cache = model.make_cache()
    parts = [model(ids[:, a:b], cache=cache)[0] for a, b in ((0, 64), (64, 129), (129, 200))]
    assert max_abs(mx.concatenate(parts, axis=0), g["logits_200"]) < TOL
