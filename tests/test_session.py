"""Document sessions: prefill, snapshot, save/load, integrity, 8-bit latent cache, long prefill."""
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx import load_model
from kimi_mlx.config import ModelConfig
from kimi_mlx.model.kimi_linear import Model
from kimi_mlx.session import DocumentSession, PrefillCancelled, SessionError, prefill
from helpers import MODELS, golden, max_abs


class Tok:  # the session only needs the tokenizer's identity here
    def __init__(self, sha="tok-a"):
        self.sha256 = sha


@pytest.fixture(scope="module")
def model():
    return load_model(MODELS / "tiny_grouped")


@pytest.fixture(scope="module")
def ids():
    return golden("tiny_grouped")["ids"][0].tolist()  # 200 ids


def _continue(model, cache, cont):
    return model(mx.array(cont)[None], cache=cache)


@pytest.mark.parametrize("doc_len,step", [(128, 64), (100, 64), (37, 16)])
def test_save_load_continue_equals_uninterrupted(model, ids, tmp_path, doc_len, step):
    doc, cont = ids[:doc_len], ids[doc_len:doc_len + 40]
    full = model(mx.array(doc + cont)[None])[:, doc_len:]
    s = DocumentSession.create(model, Tok(), doc, step=step)
    p = s.save(tmp_path / "doc.kimisession")
    loaded = DocumentSession.load(p, model, Tok())
    assert loaded.tokens == doc and loaded.cache.offset == doc_len
    assert max_abs(_continue(model, loaded.fork(), cont), full) < 1e-5
    # the snapshot is reusable: a second question from the same state gives the same answer
    assert max_abs(_continue(model, loaded.fork(), cont), full) < 1e-5


def test_prefill_cancel_leaves_consistent_state(model, ids):
    calls = []
    cache = model.make_cache()
    with pytest.raises(PrefillCancelled) as e:
        prefill(model, ids[:150], cache, step=32, progress=lambda *a: calls.append(a), should_stop=lambda: len(calls) >= 2)
    assert e.value.done == 64 and cache.offset == 64
    assert [c[0] for c in calls] == [32, 64] and all(c[1] == 150 for c in calls)
    rest = model(mx.array(ids[64:150])[None], cache=cache)
    assert max_abs(rest, model(mx.array(ids[:150])[None])[:, 64:]) < 1e-5


def test_prefill_returns_last_logits(model, ids):
    cache, logits = prefill(model, ids[:70], step=16, return_logits=True)
    assert max_abs(logits, model(mx.array(ids[:70])[None])[:, -1]) < 1e-5


def test_refuses_corrupt_truncated_and_mismatched(model, ids, tmp_path):
    p = DocumentSession.create(model, Tok(), ids[:50], step=64).save(tmp_path / "a.kimisession")
    data = p.read_bytes()
    bad = tmp_path / "corrupt.kimisession"
    b = bytearray(data)
    b[-50] ^= 0xFF
    bad.write_bytes(bytes(b))
    with pytest.raises(SessionError, match="checksum"):
        DocumentSession.load(bad, model, Tok())
    short = tmp_path / "short.kimisession"
    short.write_bytes(data[: len(data) // 2])
    with pytest.raises(SessionError, match="truncated"):
        DocumentSession.load(short, model, Tok())
    with pytest.raises(SessionError, match="different tokenizer"):
        DocumentSession.load(p, model, Tok("other"))
    with pytest.raises(SessionError, match="different model"):
        DocumentSession.load(p, load_model(MODELS / "tiny_sharded"), Tok())
    with pytest.raises(SessionError, match="not a kimi_mlx session"):
        DocumentSession.load(MODELS / "tiny_grouped" / "model.safetensors", model, Tok())
    with pytest.raises(SessionError, match="not found"):
        DocumentSession.load(tmp_path / "missing", model, Tok())


def test_atomic_save_leaves_no_partial_file(model, ids, tmp_path, monkeypatch):
    s = DocumentSession.create(model, Tok(), ids[:20], step=64)
    target = tmp_path / "s.kimisession"
    s.save(target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(OSError):
        s.save(target)
    assert target.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.kimisession"]


def test_8bit_latent_cache_accuracy(model, ids, tmp_path):
    """Measured loss of the 8-bit MLA latent cache, in memory and in a saved session."""
    doc, cont = ids[:150], ids[150:190]
    full = model(mx.array(doc + cont)[None])[:, 150:]
    ref = np.array(full).ravel()

    def cos(x):
        x = np.array(x).ravel()
        return float(x @ ref / np.linalg.norm(x) / np.linalg.norm(ref))

    mem8 = DocumentSession.create(model, Tok(), doc, step=64, mla_bits=8)
    out8 = _continue(model, mem8.fork(), cont)
    err_mem = max_abs(out8, full)
    plain = DocumentSession.create(model, Tok(), doc, step=64)
    p8 = plain.save(tmp_path / "q.kimisession", mla_bits=8)
    p16 = plain.save(tmp_path / "f.kimisession")
    out_file = _continue(model, DocumentSession.load(p8, model, Tok()).fork(), cont)
    err_file = max_abs(out_file, full)
    print(f"8-bit MLA cache: in-memory max|dlogit|={err_mem:.2e} cos={cos(out8):.6f}; "
          f"saved max|dlogit|={err_file:.2e} cos={cos(out_file):.6f}")
    assert cos(out8) > 0.999 and cos(out_file) > 0.999
    assert err_mem < 0.05 and err_file < 0.05
    assert p8.stat().st_size < p16.stat().st_size


def test_session_info_cli(model, ids, tmp_path):
    p = DocumentSession.create(model, Tok(), ids[:33], step=64).save(tmp_path / "x.kimisession")
    r = subprocess.run([sys.executable, "-m", "kimi_mlx.session", "info", str(p)], capture_output=True, text=True)
    assert r.returncode == 0 and "tokens:         33" in r.stdout and "2 MLA, 3 KDA" in r.stdout
    r = subprocess.run([sys.executable, "-m", "kimi_mlx.session", "info", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_prefill_131k_tokens_memory_linear():
    """131,072 tokens through a tiny random model: peak memory is bounded by the cache, not T^2."""
    cfg = ModelConfig.from_dict({
        "model_type": "kimi_linear", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
        "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 1, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "num_experts": 4,
        "num_experts_per_token": 2, "num_shared_experts": 1, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.446, "q_lora_rank": None, "mla_use_nope": True,
        "linear_attn_config": {"head_dim": 16, "num_heads": 2, "short_conv_kernel_size": 4,
                               "kda_layers": [1], "full_attn_layers": [2]}})
    mx.random.seed(0)
    model = Model(cfg)
    mx.eval(model.parameters())
    T = 131072
    ids = np.random.default_rng(0).integers(0, 256, T).tolist()
    seen = []
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    cache = prefill(model, ids, step=4096, progress=lambda d, t, tps, eta: seen.append(d))
    peak = mx.get_peak_memory() - base
    assert cache.offset == T and seen[-1] == T
    mla_bytes = T * (16 + 8) * 4
    quadratic = T * T * 4
    print(f"131k prefill: peak {peak / 2**20:.1f} MiB, MLA cache {mla_bytes / 2**20:.1f} MiB")
    assert peak < mla_bytes + 512 * 2**20 and peak < quadratic / 100


def test_document_and_question_prompts_are_a_true_prefix(tmp_path):
    from fixtures.tiny_tokenizer import write_tiny_tokenizer
    from kimi_mlx.session import document_prompt, question_prompt
    from kimi_mlx.tokenizer import load_tokenizer

    write_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    doc, q = "第一章 The story <|im_end|> begins.\n", "Who is 👩‍💻?"
    for system in (None, "Be brief <|im_end|>"):
        pre, post = document_prompt(tok, doc, system), question_prompt(tok, q, system)
        whole = tok.apply_chat_template(
            ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": doc + "\n\n" + q}],
            add_generation_prompt=True, tokenize=False)
        assert tok.decode(pre + post) == whole
        assert pre == document_prompt(tok, doc, system)  # deterministic
        # special-looking text from the user stays plain: only the template's own <|im_end|> tokens are special
        im_end = tok.special_tokens["<|im_end|>"]
        assert (pre + post).count(im_end) == whole.count("<|im_end|>") - doc.count("<|im_end|>") - (
            system or "").count("<|im_end|>")
