"""Pipeline parallel (kimi_mlx.distributed) on this host: `mlx.launch --backend ring` on localhost.

The same probe (logits with and without a cache, chunked prefill, greedy decode from a cache and from
its copy, an 8-bit MLA cache, a saved and reloaded session) runs in this process on the plain model
and under mlx.launch with 2 and 3 ranks; the results must agree within 1e-5 (they are in fact equal:
the hidden states cross the ranks uncast). The CLI runs unchanged under mlx.launch, sessions saved
by a pipeline resume in one and are refused under another split, and a killed rank ends the others
with a one-line error. Run as a script, this file is the ranks' side of the probe.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "tests" / "fixtures" / "models"
PROBED = ["tiny_grouped", "tiny_sharded", "tiny_quant"]
SESSION_MODEL = "tiny_sharded"
CHAT = MODELS / "tiny_chat"
LAUNCH = str(Path(sys.executable).with_name("mlx.launch"))
FAKE_TOKENIZER = SimpleNamespace(sha256="0" * 64)


# ---------------------------------------------------------------------------
# the probe: run on a plain model here and on rank 0 of a pipeline
# ---------------------------------------------------------------------------
def probe(model, name: str, out: Path) -> dict:
    import mlx.core as mx

    from kimi_mlx.generate import _token_steps
    from kimi_mlx.sampling import make_sampler
    from kimi_mlx.session import DocumentSession, prefill

    def greedy(cache, logits, n):
        steps = _token_steps(model, cache, logits, mx.array([], dtype=mx.int32), make_sampler(0.0), [], n)
        got = list(steps)
        return np.array([t for t, _ in got]), np.stack([np.array(lp) for _, lp in got])

    vocab = model.config.vocab_size
    ids = mx.array(np.random.default_rng(len(name)).integers(0, vocab, (1, 16)), dtype=mx.int32)
    r = {"full": model(ids)}
    cache = model.make_cache()
    cache.reserve(40)
    r["chunked"] = mx.concatenate([model(ids[:, :9], cache=cache), model(ids[:, 9:], cache=cache)], axis=1)
    fork = cache.copy()
    r["tokens"], r["logprobs"] = greedy(cache, r["chunked"][:, -1], 6)
    r["tokens_fork"], r["logprobs_fork"] = greedy(fork, r["chunked"][:, -1], 6)
    _, r["prefill_last"] = prefill(model, ids[0].tolist(), model.make_cache(), step=5, return_logits=True)
    q8 = model.make_cache(mla_bits=8)
    r["q8"] = model(ids, cache=q8)[:, -4:]
    r["q8_next"] = model(ids[:, :2], cache=q8)
    if name == SESSION_MODEL:
        sess = DocumentSession.create(model, FAKE_TOKENIZER, ids[0].tolist(), step=7, mla_bits=8)
        path = sess.save(out / f"{name}.session")
        back = DocumentSession.load(path, model, FAKE_TOKENIZER)
        r["session_next"] = model(ids[:, :3], cache=back.fork())
        r["session_direct"] = model(ids[:, :3], cache=sess.fork())
        meta = DocumentSession.read_meta(path)
        r["session_meta"] = np.frombuffer(json.dumps({k: meta[k] for k in ("model_id", "sha256")},
                                                     sort_keys=True).encode(), dtype=np.uint8)
    return {k: np.array(v.astype(mx.float32) if isinstance(v, mx.array) else v) for k, v in r.items()}


def worker(out: Path, split: str | None) -> int:
    """Under mlx.launch: every rank loads each probed model; rank 0 probes and writes the results."""
    import kimi_mlx  # noqa: F401
    from kimi_mlx import distributed

    pipe = distributed.start(split or None)
    for name in PROBED:
        model, _ = pipe.load(MODELS / name, tokenizer=False)
        if not pipe.leader:
            pipe.follow()
            continue
        try:
            res = probe(model, name, out)
            res["split"] = np.array(model.split)
            res["weights_bytes"] = np.array(sum(v.nbytes for v in _flat(model.parameters())))
            np.savez(out / f"{name}.npz", **res)
        finally:
            pipe.close()
    return 0


def _flat(tree):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]


# ---------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------
def _launch(n: int, args: list[str], timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    from kimi_mlx.distributed.bench import free_port

    cmd = [LAUNCH, "-n", str(n), "--backend", "ring", "--starting-port", str(free_port(n)), "--",
           sys.executable, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def _cli(args: list, n: int = 0, timeout: float = 120) -> subprocess.CompletedProcess:
    args = ["-m", "kimi_mlx.generate", *map(str, args)]
    if n:
        return _launch(n, args, timeout)
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert len(rows) == 1, r.stdout  # only rank 0 prints
    return rows[0]


def _one_error(r: subprocess.CompletedProcess) -> str:
    # mlx.launch itself exits 0 whatever its ranks do; it says which failed
    assert r.returncode != 0 or "rank 0 exited with code 1" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errs = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errs) == 1, r.stderr[-3000:]  # rank 0's; the others stop quietly
    return errs[0]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from kimi_mlx import load_model

    out = tmp_path_factory.mktemp("single")
    return {name: probe(load_model(MODELS / name), name, out) for name in PROBED}


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def launched(request, tmp_path_factory):
    n = request.param
    out = tmp_path_factory.mktemp(f"ranks{n}")
    r = _launch(n, [Path(__file__), "worker", out])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return n, {name: dict(np.load(out / f"{name}.npz")) for name in PROBED}


# ---------------------------------------------------------------------------
# the pipeline gives the single-process results
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROBED)
def test_logits_and_greedy_tokens_equal_one_process(launched, single, name):
    n, runs = launched
    got, want = runs[name], single[name]
    assert len(got["split"]) == n and got["split"].sum() > 0 and (got["split"] >= 1).all()
    for key in ("full", "chunked", "prefill_last", "q8", "q8_next", "logprobs", "logprobs_fork"):
        assert got[key].shape == want[key].shape, key
        assert np.abs(got[key] - want[key]).max() <= 1e-5, (key, np.abs(got[key] - want[key]).max())
    assert got["tokens"].tolist() == want["tokens"].tolist()
    assert got["tokens_fork"].tolist() == want["tokens"].tolist()  # a copied cache continues the same way
    # rank 0 holds only its part of the weights
    from kimi_mlx import load_model

    total = sum(v.nbytes for v in _flat(load_model(MODELS / name).parameters()))
    assert got["weights_bytes"] < total


def test_session_saved_by_a_pipeline_holds_the_single_process_state(launched, single):
    """Gathered from every rank, a pipeline's session file (8-bit MLA rows) holds the same tensors
    (checksums) and model id as one process's; loaded back (sent to the ranks again) it continues as
    one process's does."""
    _, runs = launched
    got, want = runs[SESSION_MODEL], single[SESSION_MODEL]
    assert json.loads(got["session_meta"].tobytes()) == json.loads(want["session_meta"].tobytes())
    assert np.abs(got["session_next"] - want["session_next"]).max() <= 1e-5
    assert np.abs(got["session_direct"] - want["session_direct"]).max() <= 1e-5


# ---------------------------------------------------------------------------
# the CLI under mlx.launch
# ---------------------------------------------------------------------------
def test_cli_generation_and_sessions_under_mlx_launch(tmp_path):
    doc, sess = tmp_path / "notes.txt", tmp_path / "notes.kimisession"
    doc.write_text("The cat sat on the mat. " * 20)
    q = ["--prompt", "What sat where?", "--max-tokens", "10", "--json"]
    alone = _json(_cli(["--model", CHAT, "--document", doc, *q]))
    saved = _json(_cli(["--model", CHAT, "--document", doc, "--save-session", sess, *q], n=2))
    assert saved["tokens"] == alone["tokens"] and saved["document_tokens"] == alone["document_tokens"]
    resumed = _json(_cli(["--model", CHAT, "--session", sess, *q], n=2))
    assert resumed["tokens"] == alone["tokens"]
    plain = _json(_cli(["--model", CHAT, "--prompt", "hi", "--max-tokens", "8", "--json"]))
    assert _json(_cli(["--model", CHAT, "--prompt", "hi", "--max-tokens", "8", "--json"], n=3))["tokens"] == plain["tokens"]
    info = subprocess.run([sys.executable, "-m", "kimi_mlx.session", "info", sess], capture_output=True, text=True)
    assert "a pipeline of 2 ranks" in info.stdout

    # another split: refused with one line, by one process and by a pipeline split otherwise
    err = _one_error(_cli(["--model", CHAT, "--session", sess, *q]))
    assert "saved by a pipeline of 2 ranks" in err and "this run is one process" in err and "--split" in err
    split = json.loads(subprocess.run([sys.executable, "-c", "import json,sys; from kimi_mlx.session import "
                                       "DocumentSession as D; print(json.dumps(D.read_meta(sys.argv[1])['split']))",
                                       sess], capture_output=True, text=True, cwd=REPO).stdout)
    other = ",".join(map(str, reversed(split))) if split != split[::-1] else "1,4"
    err = _one_error(_cli(["--model", CHAT, "--session", sess, "--split", other, *q], n=2))
    assert f"--split {','.join(map(str, split))}" in err and f"(--split {other})" in err


def test_split_needs_mlx_launch_and_must_fit():
    r = _cli(["--model", CHAT, "--prompt", "hi", "--split", "2,3"])
    assert r.returncode == 2 and "mlx.launch" in r.stderr
    err = _one_error(_cli(["--model", CHAT, "--prompt", "hi", "--split", "2,2", "--max-tokens", "2"], n=2))
    assert "4 layers, the model has 5" in err


def test_a_prompt_on_stdin_is_refused_under_mlx_launch():
    # mlx.launch never closes a rank's stdin: reading the prompt there would wait forever
    err = _one_error(_cli(["--model", CHAT, "--prompt", "-", "--max-tokens", "2"], n=2, timeout=60))
    assert "--prompt -" in err and "mlx.launch" in err


def test_the_launchers_relay_is_quieted_by_a_full_stdin_pipe():
    # mlx.launch select()s on the write end of each rank's stdin pipe: an empty pipe is always
    # writable, and its relay threads spin; a full one is not
    code = ("import sys; from kimi_mlx.distributed.link import quiet_launcher_relay as q; "
            "print(q(), flush=True); sys.stdin.close(); import time; time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert p.stdout.readline().strip() == b"True"
        _, writable, _ = select.select([], [p.stdin], [], 0)
        assert writable == []  # the relay would sleep in select()
    finally:
        p.kill()
        p.wait()
    r = subprocess.run([sys.executable, "-c", code.replace("import time; time.sleep(30)", "pass")],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.stdout.strip() == "False"  # not a pipe: left alone


def _chat(url: str, text: str) -> str:
    import urllib.request

    body = json.dumps({"model": "tiny_chat", "messages": [{"role": "user", "content": text}], "max_tokens": 12,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def _health(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/health", timeout=60) as r:
        return json.loads(r.read())


def test_the_server_under_a_pipeline_answers_as_one_process(tmp_path):
    """`python -m kimi_mlx.server` started as 2 ranks: rank 0 serves, rank 1 holds its layers; the
    replies are one process's, the prefix cache's size counts both ranks' shares (as one process
    counts them), and stopping rank 0 stops rank 1."""
    from kimi_mlx.distributed.bench import start_local_ranks
    from kimi_mlx.server.bench import start_server, stop_server

    proc, url = start_server(["--model", str(CHAT)])
    try:
        alone = [_chat(url, q) for q in ("hi", "what is a cat?", "hi")]
        kept = _health(url)["prefix_cache"]
    finally:
        stop_server(proc)
    procs = start_local_ranks(2, ["-m", "kimi_mlx.server", "--port", "0", "--model", CHAT], tmp_path, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = procs[0].stdout.readline()
        assert "/v1" in line, procs[0].stderr.read()[-2000:] if procs[0].poll() is not None else line
        url = line.split(" on ")[1].split("/v1")[0]
        assert [_chat(url, q) for q in ("hi", "what is a cat?", "hi")] == alone  # the third: from the prefix cache
        shared = _health(url)["prefix_cache"]
        assert shared["states"] == kept["states"] > 0 and shared["bytes"] == kept["bytes"] > 0
        procs[0].terminate()
        assert procs[0].wait(timeout=30) == 0 and procs[1].wait(timeout=30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# ---------------------------------------------------------------------------
# a rank that dies
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("victim", [1, 0], ids=["follower-killed", "leader-killed"])
def test_a_killed_rank_ends_the_others_with_an_error(tmp_path, victim):
    from kimi_mlx.distributed.bench import start_local_ranks

    # started as mlx.launch starts them, but without its supervision, which would kill the others
    # itself: here only the ranks' own detection ends them
    procs = start_local_ranks(2, ["-m", "kimi_mlx.generate", "--model", CHAT, "--prompt", "hello", "--max-tokens",
                                  "100000", "--ignore-chat-template"], tmp_path, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        out, got, deadline = procs[0].stdout.fileno(), b"", time.monotonic() + 60
        while len(got) < 20 and time.monotonic() < deadline:  # generating: both ranks are at work
            if select.select([out], [], [], 0.5)[0]:
                got += os.read(out, 4096)
        assert len(got) >= 20, procs[0].stderr.read() if procs[0].poll() is not None else "no output"
        procs[victim].send_signal(signal.SIGKILL)
        survivor = procs[1 - victim]
        t0 = time.monotonic()
        rc = survivor.wait(timeout=15)  # a hang would end in TimeoutExpired
        took = time.monotonic() - t0
        err = survivor.stderr.read().decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert rc == 1 and took < 10 and "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and f"rank {victim} is gone" in lines[0], err


# ---------------------------------------------------------------------------
# pieces, in this process
# ---------------------------------------------------------------------------
def test_waiting_sees_data_a_closed_peer_and_a_deadline():
    from kimi_mlx.distributed.link import PeerLost, PeerTimeout, wait_readable

    a, b = socket.socketpair()
    with a, b:
        t0 = time.monotonic()
        with pytest.raises(PeerTimeout, match="rank 3 sent nothing for 0 s"):
            wait_readable([a], 0.3, "a test", 3)
        assert 0.25 < time.monotonic() - t0 < 2
        b.send(b"x")
        wait_readable([a], 1.0, "a test", 3)
        assert a.recv(1) == b"x"  # waiting took nothing
        b.close()
        with pytest.raises(PeerLost, match="rank 3 is gone"):
            wait_readable([a], None, "a test", 3)


def test_blobs_round_trip():
    import mlx.core as mx

    from kimi_mlx.distributed.link import pack, unpack

    arrays = {"a": mx.arange(6, dtype=mx.float32).reshape(2, 3), "b": mx.array([1.5, -2.25], dtype=mx.bfloat16),
              "c": mx.array([7, 8], dtype=mx.int64), "empty": mx.zeros((0, 4))}
    meta, back = unpack(pack({"x": [1, "y"]}, arrays))
    assert meta == {"x": [1, "y"]} and set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and mx.array_equal(back[k], v)


def test_split_parsing_and_planning():
    from kimi_mlx import planner
    from kimi_mlx.distributed import PipelineError, choose_split, parse_split
    from kimi_mlx.distributed.split import published_config, rank_plan, ranges

    assert parse_split("14, 13", 27, 2) == [14, 13]
    for bad, msg in [("14", "1 numbers for 2 ranks"), ("27,0", "at least one layer"), ("10,10", "20 layers"),
                     ("a,b", "e.g. --split 14,13")]:
        with pytest.raises(PipelineError, match=msg):
            parse_split(bad, 27, 2)
    cfg = published_config()
    edge, layers = planner.weight_bytes_by_layer(cfg, 4)
    assert abs(edge + sum(layers) - planner.weight_bytes(cfg, 4)) < 1e-4 * planner.weight_bytes(cfg, 4)
    gb = 10**9
    even = choose_split(cfg, edge, layers, [18 * gb, 18 * gb])
    assert sum(even) == 27 and abs(even[0] - even[1]) <= 2
    lopsided = choose_split(cfg, edge, layers, [40 * gb, 12 * gb])  # the bigger machine takes more layers
    assert lopsided[0] > lopsided[1]
    plans = [rank_plan(cfg, r, i == 0, edge, layers, b) for i, (r, b) in
             enumerate(zip(ranges(lopsided), [40 * gb, 12 * gb]))]
    assert all(p.fixed_bytes < p.budget_bytes for p in plans)
    with pytest.raises(PipelineError, match="does not fit these 2 ranks"):
        choose_split(cfg, edge, layers, [12 * gb, 12 * gb])
    with pytest.raises(PipelineError, match="at most one rank per layer"):
        choose_split(cfg, edge, layers[:2], [gb] * 3)


def test_each_rank_is_planned_with_its_own_layers():
    """The pipeline's check before a long prefill: each rank's layers and caches in its memory, so a
    context the pipeline holds is not refused because one rank couldn't hold the whole cache."""
    from kimi_mlx import planner
    from kimi_mlx.distributed import PipelineModel
    from kimi_mlx.distributed.split import published_config, ranges

    cfg = published_config()
    parts = [planner.plan(cfg, 300_000, bits=4, layers=r, edges=i == 0, machine_bytes=0)
             for i, r in enumerate(ranges([14, 13]))]
    whole = planner.plan(cfg, 300_000, bits=4, machine_bytes=0)
    assert sum(p.mla_cache_bytes for p in parts) == whole.mla_cache_bytes
    assert sum(p.kda_state_bytes for p in parts) == whole.kda_state_bytes
    assert abs(sum(p.weights_bytes for p in parts) - whole.weights_bytes) < 1e-4 * whole.weights_bytes
    pm = object.__new__(PipelineModel)  # what check_fits reads of a loaded pipeline
    edge, layers = planner.weight_bytes_by_layer(cfg, 4)
    gb = 10**9
    pm.config, pm.split, pm._sizes = cfg, [14, 13], (edge, layers, [18 * gb, 18 * gb])
    p = pm.check_fits(500_000, machine_bytes=18 * gb)  # 2 x 24 GB: holds 618K (the docs' table)
    assert p.fits and p.total_bytes < 18 * gb
    with pytest.raises(planner.PlanError, match=r"rank 1 \(layers 14-26\): 500,000 tokens"):
        pm._sizes = (edge, layers, [18 * gb, 15 * gb])
        pm.check_fits(500_000, machine_bytes=18 * gb)
    with pytest.raises(planner.PlanError):  # one process, the whole model in 18 GB: refused
        planner.check_fits(cfg, 500_000, bits=4, machine_bytes=18 * gb)


def test_the_docs_table_is_the_planners():
    from kimi_mlx.distributed.split import format_table, published_config, table_rows

    table = format_table(table_rows(published_config(), 2, [16, 24, 32], [4, 3]))
    assert table in (REPO / "docs" / "DISTRIBUTED.md").read_text()


def test_a_session_from_another_split_is_refused(tmp_path):
    from kimi_mlx import load_model
    from kimi_mlx.session import DocumentSession, SessionError

    model = load_model(MODELS / "tiny_grouped")
    path = DocumentSession.create(model, FAKE_TOKENIZER, [1, 2, 3, 4]).save(tmp_path / "s")
    object.__setattr__(model, "split", [2, 3])  # what a pipeline's rank-0 model says
    with pytest.raises(SessionError, match=r"saved by one process, but this run is a pipeline of 2 ranks "
                                           r"\(--split 2,3\); resume it without mlx.launch"):
        DocumentSession.load(path, model, FAKE_TOKENIZER)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.path.insert(0, str(REPO))
        sys.exit(worker(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None))
    sys.exit(f"usage: {sys.argv[0]} worker OUT_DIR [SPLIT]")
