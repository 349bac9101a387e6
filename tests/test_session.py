"""Document sessions: prefill, snapshot, save/load, integrity, 8-bit latent cache, long prefill."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

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
    with pytest.raises(SessionError, match="cannot write the session"):
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


# ---------------------------------------------------------------------------
# model identity, metadata checks, writing
# ---------------------------------------------------------------------------
def test_session_refused_by_a_model_with_different_weights(model, ids, tmp_path):
    # layer 0's q_proj scaled by 1.5: same shapes, same config, same embeddings/norm/lm_head
    d = tmp_path / "m"
    shutil.copytree(MODELS / "tiny_grouped", d)
    t = mx.load(str(d / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"] * 1.5
    mx.save_safetensors(str(d / "model.safetensors"), t)
    p = DocumentSession.create(model, Tok(), ids[:40], step=64).save(tmp_path / "a.kimisession")
    with pytest.raises(SessionError, match="different model"):
        DocumentSession.load(p, load_model(d), Tok())
    same = tmp_path / "same"  # the same bytes elsewhere: the same model
    shutil.copytree(MODELS / "tiny_grouped", same)
    assert DocumentSession.load(p, load_model(same), Tok()).num_tokens == 40


def test_identity_of_a_model_built_in_code_covers_every_parameter(model):
    from mlx.utils import tree_flatten

    from kimi_mlx.session import model_identity

    m = Model(model.config)
    m.update(model.parameters())
    before = model_identity(m)
    w = dict(tree_flatten(m.parameters()))["model.layers.0.self_attn.q_proj.weight"]
    m.model.layers[0].self_attn.q_proj.weight = w * 1.5
    assert model_identity(m) != before


def _rewrite_meta(src, dst, edit):
    arrays, metadata = mx.load(str(src), format="safetensors", return_metadata=True)
    meta = json.loads(metadata["kimi_mlx_session"])
    edit(meta, arrays)
    mx.save_safetensors(str(dst) + ".safetensors", arrays, metadata={"kimi_mlx_session": json.dumps(meta)})
    Path(str(dst) + ".safetensors").rename(dst)
    return dst


def _offset_plus_100(m, a):
    m["layers"][2]["offset"] += 100


@pytest.mark.parametrize("edit,msg", [
    (lambda m, a: m.pop("model_id"), "'model_id' is missing"),
    (lambda m, a: m.update(layers=None), "'layers' is missing or not a list"),
    (lambda m, a: m.pop("sha256"), "'sha256' is missing"),
    (lambda m, a: m.update(sha256={}), "the checksums don't match the file's tensors"),
    (lambda m, a: m["sha256"].pop("L2.kv"), "the checksums don't match the file's tensors \\(e.g. 'L2.kv'\\)"),
    (_offset_plus_100, "layer 2 holds 140 tokens, the session lists 40"),
    (lambda m, a: m.update(num_tokens="40"), "'num_tokens' is '40'"),
    (lambda m, a: m.update(version=1), "older kimi_mlx \\(session format 1\\)"),
    (lambda m, a: m.update(version=99), "format version 99 is not supported"),
    (lambda m, a: m["layers"][0].update(kind="rnn"), "layer 0 has no kind"),
    (lambda m, a: m.update(base={"num_tokens": 41, "tokens_sha256": "0" * 64}), "'base' is not a token count"),
    (lambda m, a: m.update(base=[40]), "'base' is not a token count"),
])
def test_edited_metadata_refused_in_one_line(model, ids, tmp_path, edit, msg):
    p = DocumentSession.create(model, Tok(), ids[:40], step=64).save(tmp_path / "a.kimisession")
    bad = _rewrite_meta(p, tmp_path / "bad.kimisession", edit)
    with pytest.raises(SessionError, match=rf"^{bad}: .*{msg}"):
        DocumentSession.load(bad, model, Tok())
    r = subprocess.run([sys.executable, "-m", "kimi_mlx.session", "info", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and str(bad) in r.stderr, r.stderr


def test_layer_tensors_must_fit_their_kind(model, ids, tmp_path):
    from kimi_mlx.session import _array_hash

    def drop(m, a):  # consistent checksums, but layer 0 lost its state
        a.pop("L0.state")
        m["sha256"].pop("L0.state")
    p = DocumentSession.create(model, Tok(), ids[:40], step=64).save(tmp_path / "a.kimisession")
    bad = _rewrite_meta(p, tmp_path / "bad.kimisession", drop)
    with pytest.raises(SessionError, match=r"layer 0 holds tensors \['conv'\], expected \['conv', 'state'\]"):
        DocumentSession.load(bad, model, Tok())

    def short(m, a):  # an MLA cache with fewer rows than tokens
        a["L2.kv"] = a["L2.kv"][:, :30]
        m["sha256"]["L2.kv"] = _array_hash(a["L2.kv"])
    bad = _rewrite_meta(p, tmp_path / "short.kimisession", short)
    with pytest.raises(SessionError, match=r"layer 2 caches \(1, 30, \d+\) rows for 40 tokens"):
        DocumentSession.load(bad, model, Tok())


def test_info_on_a_directory_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kimi_mlx.session", "info", str(tmp_path)], capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stderr == f"error: {tmp_path}: is a directory, not a session file\n"


def test_disk_full_on_save_is_one_line_and_leaves_nothing(model, ids, tmp_path, monkeypatch):
    s = DocumentSession.create(model, Tok(), ids[:20], step=64)

    def full(path, *a, **k):
        Path(path).write_bytes(b"\0" * 100)  # mlx has written part of it
        raise RuntimeError("[write] Unable to write 1048576 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    with pytest.raises(SessionError, match=r"s\.kimisession: cannot write the session \(\[write\] Unable to write "
                                           r"1048576 bytes to file\.; [\d,.]+ MB free in .*\); nothing was written$"):
        s.save(tmp_path / "s.kimisession")
    assert list(tmp_path.iterdir()) == []


def test_save_path_checked_before_anything_is_computed(tmp_path):
    from kimi_mlx.session import check_save_path

    (tmp_path / "file").write_text("x")
    with pytest.raises(SessionError, match="file/s.kimisession: cannot create its directory"):
        check_save_path(tmp_path / "file" / "s.kimisession")
    with pytest.raises(SessionError, match="is a directory; give a file name"):
        check_save_path(tmp_path)
    with pytest.raises(SessionError, match=r"not enough disk space for the session \(needs about"):
        check_save_path(tmp_path / "s.kimisession", nbytes=10**18)
    assert check_save_path(tmp_path / "new" / "s.kimisession", nbytes=1000) == tmp_path / "new" / "s.kimisession"


def test_temporaries_of_killed_saves_are_removed(model, ids, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".other.kimisession.tmp-{dead.pid}-x1y2.safetensors"  # any session's, in that directory
    stale.write_bytes(b"\0" * 1000)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".s.kimisession.tmp-{live.pid}-a1b2.safetensors"
        busy.write_bytes(b"\0")
        mine = tmp_path / "notes.tmp-1-x.safetensors"  # not a hidden session temporary: never touched
        mine.write_bytes(b"\0")
        DocumentSession.create(model, Tok(), ids[:20], step=64).save(tmp_path / "s.kimisession")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, mine.name, "s.kimisession"])
    finally:
        live.kill()
        live.wait()


def test_eta_follows_the_cost_growth_with_depth():
    from kimi_mlx.session import PrefillEta

    a, b = 1e-4, 2e-9  # seconds per token at depth x: a + b*x (4x slower at 159K)
    total, step = 159_000, 2048
    true_total = a * total + b * total * total / 2
    est, done, errs = PrefillEta(), 0, {}
    for i, start in enumerate(range(0, total, step)):
        n = min(step, total - start)
        secs = a * n + b * ((start + n) ** 2 - start ** 2) / 2
        secs *= 1.0 + 0.03 * ((-1) ** i)  # jitter
        if i == 0:
            secs += 0.5  # warm-up
        est.add(start, n, secs)
        done += n
        remaining = a * (total - done) + b * (total * total - done * done) / 2
        for frac in (0.05, 0.25, 0.5, 0.9):
            if frac not in errs and done >= frac * total:
                errs[frac] = est.eta(done, total) / remaining
    assert all(0.85 < r < 1.15 for r in errs.values()), errs
    assert est.eta(total, total) == 0.0
    assert PrefillEta().eta(0, 100) == float("inf")
    one = PrefillEta()
    one.add(0, 100, 1.0)
    assert one.eta(100, 300) == pytest.approx(2.0)  # one chunk: its rate
    assert true_total > 0


def test_prefill_reports_a_depth_aware_eta(monkeypatch):
    """prefill() with a fake model whose chunks cost a + b*depth per token on a fake clock."""
    from kimi_mlx import session as S

    a, b, total, step = 1e-4, 2e-9, 64 * 2048, 2048
    clock = [0.0]
    monkeypatch.setattr(S.time, "perf_counter", lambda: clock[0])

    class Cache:
        offset = 0

        def eval(self):
            pass

    class Inner:
        def __call__(self, chunk, cache):
            n = chunk.shape[1]
            clock[0] += a * n + b * ((cache.offset + n) ** 2 - cache.offset ** 2) / 2
            cache.offset += n

    class Fake:
        model = Inner()
        _kimi_identity = "fake"

    seen = []
    S.prefill(Fake(), [1] * total, Cache(), step=step, progress=lambda *r: seen.append(r))
    for done, tot, tps, eta in seen[3:-1]:
        remaining = a * (tot - done) + b * (tot * tot - done * done) / 2
        assert eta == pytest.approx(remaining, rel=0.02), (done, eta, remaining)
