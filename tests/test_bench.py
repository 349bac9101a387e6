"""Smoke tests of `python -m kimi_mlx.bench ...` at tiny sizes: the CLIs run end to end and write
the JSON the docs are built from (so the benchmark code can't silently rot). Seconds, not minutes:
no timing is checked, only structure and the same-weights property."""
from __future__ import annotations

import json

import mlx.core as mx
import pytest

from kimi_mlx.bench.__main__ import main as bench_main

pytest.importorskip("mlx_lm")


@pytest.fixture(scope="module")
def model_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "model.json"
    args = ["--tiny", "--lengths", "32,64", "--dtypes", "q4", "--impls", "ours,mlx-lm,mlx-lm+fast",
            "--decode-tokens", "1", "--max-prefill", "mlx-lm=32,mlx-lm+fast=32", "--short-tokens", "8",
            "--probe-tokens", "16", "--step", "32", "--warmup-seconds", "0",
            "--json", str(path), "--no-plot"]
    assert bench_main(["model", *args]) == 0
    return path


def test_dispatcher(capsys):
    assert bench_main([]) == 0
    assert "roofline" in capsys.readouterr().out
    assert bench_main(["nope"]) == 2


def test_model_bench_json(model_json):
    d = json.loads(model_json.read_text())
    assert {"machine", "config", "args", "runs", "checks", "results"} <= set(d)
    assert d["machine"]["cores"] and "blas" in d["machine"]
    # both implementations hold the same weights: fp32 logits agree to rounding (CPU: fp32 check)
    sw = d["checks"]["same_weights"]
    assert sw["dtype"] == "fp32" and sw["experts"] == 16 and sw["layers"] == 5  # CPU: all the slice's experts
    assert sw["ok"] and sw["rel_diff"] < 1e-4 and sw["argmax_agree"] == 1.0
    assert d["config"]["linear_attn_config"]["full_attn_layers"] == [4]  # MLA at index 3, a KDA layer after it
    assert set(d["checks"]["q4"]) == {"ours", "mlx-lm", "mlx-lm+fast"}
    rows = {(r["impl"], r["length"]): r for r in d["results"]}
    assert set(rows) == {(i, n) for i in ("ours", "mlx-lm", "mlx-lm+fast") for n in (32, 64)}
    for r in rows.values():
        assert "error" not in r, r
        assert r["dtype"] == "q4" and r["decode_tok_s"] > 0
        assert r["decode_bytes_per_token"] > 0 and r["prefill_flops_per_token"] > 0
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    for n in (32, 64):
        ours = rows[("ours", n)]
        assert ours["prefill_tok_s"] > 0 and ours["peak_mem_bytes"] > 0 and ours["decode_depth"] == "prefilled"
        if on_cpu:  # ours runs on the CPU fast path; plain mlx-lm doesn't
            assert ours["fast_path"].get("CPUQuantizedLinear", 0) > 0
            assert ours["fast_path"].get("CPUSwitchGLU", 0) > 0
        assert rows[("mlx-lm", n)]["fast_path"] == {}
    assert rows[("mlx-lm", 32)]["prefill_tok_s"] > 0
    for impl in ("mlx-lm", "mlx-lm+fast"):  # over --max-prefill: synthetic-depth decode, estimated prefill
        skipped = rows[(impl, 64)]
        assert skipped["decode_depth"] == "synthetic" and "prefill_tok_s" not in skipped
        assert skipped["prefill_tok_s_est"] > 0 and skipped["prefill_est_method"]
    probe = rows[("mlx-lm+fast", 64)]["probe"]  # a real chunk at depth on the synthetic cache
    assert probe["tokens"] == 16 and probe["depth"] == 48 and probe["s"] > 0
    assert "probe" not in rows[("mlx-lm", 64)]  # plain kernels: estimated from the short prefill


def test_model_bench_append_and_plot(model_json, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "model.json"
    path.write_text(model_json.read_text())
    args = ["--tiny", "--lengths", "48", "--dtypes", "q4", "--impls", "ours", "--decode-tokens", "1",
            "--step", "32", "--no-check", "--append", "--warmup-seconds", "0", "--json", str(path), "--plot-dir", str(tmp_path)]
    assert bench_main(["model", *args]) == 0
    d = json.loads(path.read_text())
    assert len(d["runs"]) == 2
    assert sorted({r["length"] for r in d["results"] if r["impl"] == "ours"}) == [32, 48, 64]
    assert (tmp_path / "bench_model_q4.png").stat().st_size > 1000


def test_model_bench_decode_rounds(tmp_path):
    import statistics

    path = tmp_path / "model.json"
    args = ["--tiny", "--lengths", "32", "--dtypes", "q4", "--impls", "ours", "--decode-tokens", "2",
            "--decode-rounds", "2", "--step", "32", "--no-check", "--warmup-seconds", "0",
            "--json", str(path), "--no-plot"]
    assert bench_main(["model", *args]) == 0
    (r,) = json.loads(path.read_text())["results"]
    assert "error" not in r, r
    assert len(r["decode_tok_s_rounds"]) == 2 and len(r["decode_pipelined_tok_s_rounds"]) == 2
    assert len(r["decode_ms_all"]) == 4  # 2 rounds x 2 steps, the warm-up step not kept
    # the rounds are rounded to 2 decimals; the reported rate is their median, unrounded
    assert r["decode_tok_s"] == pytest.approx(statistics.median(r["decode_tok_s_rounds"]), rel=1e-2)
    assert r["decode_pipelined_tok_s"] == pytest.approx(statistics.median(r["decode_pipelined_tok_s_rounds"]), rel=1e-2)


@pytest.mark.parametrize("rounds", ["0", "-1"])
def test_model_bench_decode_rounds_rejects_below_one(rounds, capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["model", "--decode-rounds", rounds])
    assert e.value.code == 2
    assert "--decode-rounds" in capsys.readouterr().err


def test_roofline_json(model_json, tmp_path):
    out = tmp_path / "roof.json"
    assert bench_main(["roofline", "--model-json", str(model_json), "--mib", "8", "--matmul-n", "128",
                       "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    lim = d["limits"]
    assert lim["bandwidth_GBps"] > 0 and lim["matmul_fp32_GFLOPs"] > 0 and lim["qmm_q4_GFLOPs"] > 0
    ours = [r for r in d["rows"] if r["impl"] == "ours"]
    assert len(ours) == 2
    for r in ours:
        assert 0 < r["decode_fraction"] and 0 < r["prefill_fraction"]
        assert r["decode_bound_tok_s"] > 0 and r["prefill_bound_tok_s"] > 0
    synthetic = [r for r in d["rows"] if r["decode_depth"] == "synthetic"]
    assert synthetic and all(r["prefill_fraction"] is None for r in synthetic)


def test_kda_bench_json(tmp_path):
    out = tmp_path / "kda.json"
    assert bench_main(["kda", "--T", "64", "--H", "2", "--K", "16", "--V", "16", "--repeat", "1",
                       "--decode-steps", "2", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert {"meta", "rows", "check", "ratios"} <= set(d)
    modes = {(r["mode"], r["impl"]) for r in d["rows"]}
    assert ("prefill", "ours-chunked") in modes and any(m == "decode" for m, _ in modes)
    assert all(r["tokens_per_s"] > 0 for r in d["rows"])
    for name, c in d["check"].items():  # every implementation computes the same operator
        assert c["max_abs_o"] < 1e-3, name


def test_plots_and_markdown(model_json, tmp_path, capsys):
    from kimi_mlx.bench import plots

    kda = tmp_path / "kda.json"
    assert bench_main(["kda", "--T", "64", "--H", "2", "--K", "16", "--V", "16", "--repeat", "1",
                       "--decode-steps", "1", "--no-check", "--json", str(kda)]) == 0
    capsys.readouterr()
    assert plots.main(["--kda", str(kda), "--model", str(model_json), "--markdown"]) == 0
    md = capsys.readouterr().out
    assert "### KDA operator" in md and "### Slice model" in md and "| q4 | ours |" in md
    pytest.importorskip("matplotlib")
    assert plots.main(["--kda", str(kda), "--model", str(model_json), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench_kda.png").exists() and (tmp_path / "bench_model_q4.png").exists()


def test_check_plan_on_cuda(monkeypatch):
    """MLX-CUDA: the fp32 same-weights check runs with 16 experts (fp32 gather_mm with 256 faults there)."""
    from kimi_mlx.bench.model import check_plan

    cuda = mx.cuda.is_available() and mx.default_device().type == mx.DeviceType.gpu
    assert check_plan(256)["experts"] == (16 if cuda else 256)
    gpu = type("Dev", (), {"type": mx.DeviceType.gpu})()
    monkeypatch.setattr(mx, "default_device", lambda: gpu)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    plan = check_plan(256)
    assert plan["dtype"] == "fp32" and plan["experts"] == 16 and plan["rel_tol"] == 2e-3 and "CUDA" in plan["why"]
    monkeypatch.setenv("MLX_ENABLE_TF32", "0")
    assert check_plan(256)["rel_tol"] == 1e-4
    assert check_plan(8)["experts"] == 8
    assert check_plan(256, "bf16") == {"dtype": "bf16", "experts": 256, "why": "requested", "rel_tol": 5e-2}
    monkeypatch.undo()
    if mx.default_device().type == mx.DeviceType.cpu:
        assert check_plan(16)["rel_tol"] == 1e-4


def test_same_weights_check_with_fewer_experts():
    """The check's own slice (fewer experts, its own weights): fp32 logits agree to rounding."""
    from kimi_mlx.bench import model as mb

    c = mb.slice_config(experts=8, tiny=True)
    plan = {"dtype": "fp32", "experts": 4, "why": "test", "rel_tol": 1e-4}
    res = mb.same_weights_check(c, mb.random_weights(c), c["vocab_size"], plan)
    assert res["ok"] and res["experts"] == 4 and res["argmax_agree"] == 1.0 and "error" not in res


@pytest.fixture(scope="module")
def tiny_ours():
    from kimi_mlx.bench import model as mb

    c = mb.slice_config(tiny=True)
    return c, mb.build("ours", c, mb.random_weights(c), "fp32")


def test_prefill_chunks_run_every_layer(tiny_ours, monkeypatch):
    """Each chunk's last-position logits are evaluated: the chunked prefill's output is the full
    forward's (so the MLA layer, not the last, and the layers after it run in prefill)."""
    from kimi_mlx.bench import run as mb  # the run step of bench model

    c, model = tiny_ours
    seen = []
    real = mb.prefill_chunk
    monkeypatch.setattr(mb, "prefill_chunk", lambda impl, m, ids, cache: seen.append(
        (cache.offset, ids.shape[1])) or real(impl, m, ids, cache))
    stats, cache, tok = mb.prefill_one("ours", model, 80, 32, c["vocab_size"], seed=3)
    assert seen == [(0, 32), (32, 32), (64, 16)] and cache.offset == 80
    ids = mx.random.randint(0, c["vocab_size"], (1, 80), key=mx.random.key(3))
    full = model(ids)[:, -1]
    assert tok.item() == mx.argmax(full).item() and stats["finite"]


def test_warm_up_runs_every_variant(tiny_ours, monkeypatch):
    """Two prefill chunks (the second from a state) and two decode steps before any timing."""
    from kimi_mlx.bench import run as mb  # the run step of bench model

    c, model = tiny_ours
    chunks, steps = [], []
    real_chunk, real_step = mb.prefill_chunk, mb.greedy_step
    monkeypatch.setattr(mb, "prefill_chunk", lambda impl, m, ids, cache: chunks.append(
        (cache.offset, ids.shape[1])) or real_chunk(impl, m, ids, cache))
    monkeypatch.setattr(mb, "greedy_step", lambda impl, m, cache, tok: steps.append(cache.offset) or
                        real_step(impl, m, cache, tok))
    mb.warm_up("ours", model, 24, c["vocab_size"])
    assert chunks == [(0, 24), (24, 24)] and steps == [48, 49]
    steps.clear()
    mb.warm_up("ours", model, 24, c["vocab_size"], seconds=0.2)  # then decode steps for a while
    assert len(steps) > 2 and steps[:3] == [48, 49, 50]
    assert mb.warmup_chunk(2048) == (256 if mx.default_device().type == mx.DeviceType.cpu else 2048)


def test_time_runs():
    from kimi_mlx.bench import Timing, best_seconds, time_runs

    calls = []
    t = time_runs(lambda: calls.append(1) or mx.ones(4) * len(calls), reps=4, warmup=2)
    assert len(calls) == 6 and len(t.times) == 4 and t.out.tolist() == [6.0] * 4
    assert t.min <= t.median <= t.max and t.ms()["repeats"] == 4
    assert Timing([3.0, 1.0, 2.0]).median == 2.0
    prepared = []
    time_runs(lambda: None, reps=3, warmup=1, prepare=lambda: prepared.append(1))
    assert len(prepared) == 4
    assert best_seconds(lambda: mx.ones(2), reps=2) > 0


def test_step_bench_json(tmp_path):
    out = tmp_path / "step.json"
    assert bench_main(["step", "--tiny", "--depth", "100,300", "--dtypes", "q4", "--experts", "16",
                       "--repeats", "2", "--warmup", "1", "--warmup-seconds", "0.1", "--short-tokens", "16", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [r["depth"] for r in d["results"]] == [100, 300]
    for r in d["results"]:
        assert "errors" not in r, r
        parts = {p["part"]: p for p in r["parts"]}
        assert all("error" not in p and 0 < p["ms_min"] <= p["ms_median"] <= p["ms_max"] for p in parts.values())
        kinds = [p["kind"] for p in r["parts"]]
        # 5 layers: dense MLP first, MLA at index 3, the rest KDA; one MoE per sparse layer
        assert kinds.count("kda") == 4 and kinds.count("mla") == 1 and kinds.count("moe") == 4
        assert {"embedding", "final norm + lm_head", "sampling", "L3 MLA cache append",
                "L3 attention (MLA)"} <= set(parts)
        assert set(r["whole_step"]) == {"ours", "mlx-lm"} and r["ours_over_mlx_lm_time"] > 0
        assert r["sum_of_parts_ms"] > 0 and r["graph"]["ours"]["primitives"] > 50
        assert r["graph"]["mlx-lm"]["build_ms_median"] > 0


def test_mla_bench_missing_functions(tmp_path, capsys, monkeypatch):
    """Without the MLA functions the bench says so (and exits cleanly); --fallback uses the adapters."""
    from kimi_mlx.bench import mla
    from kimi_mlx.ops import attention

    monkeypatch.delattr(attention, "mla_decode_attention", raising=False)
    monkeypatch.delattr(attention, "mla_prefill_attention", raising=False)
    assert mla.lookup("mla_decode_attention", False)[0] is None
    assert mla.lookup("mla_prefill_attention", True)[0] is mla.prefill_adapter
    out = tmp_path / "mla.json"
    assert bench_main(["mla", "--tiny", "--depths", "64", "--prefill", "64", "--copy-mib", "1",
                       "--json", str(out)]) == 0
    assert capsys.readouterr().out.count("not available") >= 2
    d = json.loads(out.read_text())
    assert "not available" in d["decode"][0]["error"] and "not available" in d["prefill"][0]["error"]


@pytest.mark.parametrize("fallback", [False, True])
def test_mla_bench_json(tmp_path, monkeypatch, fallback):
    """Decode and prefill through the lead's functions (fallback=False: fails while they are missing)
    and through the adapters over the reference ops (fallback=True)."""
    from kimi_mlx.ops import attention

    if fallback:
        monkeypatch.delattr(attention, "mla_decode_attention", raising=False)
        monkeypatch.delattr(attention, "mla_prefill_attention", raising=False)
    else:
        assert hasattr(attention, "mla_decode_attention") and hasattr(attention, "mla_prefill_attention"), \
            "the MLA dispatch functions haven't landed in kimi_mlx.ops.attention (the fallback case covers the harness)"
    out = tmp_path / "mla.json"
    args = ["mla", "--tiny", "--depths", "300,5000", "--prefill", "600", "--chunk", "256", "--copy-mib", "4",
            "--decode-repeats", "2", "--repeats", "1", "--warmup", "1", "--json", str(out)]
    assert bench_main(args + (["--fallback"] if fallback else [])) == 0
    d = json.loads(out.read_text())
    assert d["copy"]["GBps_median"] > 0 and d["copy"]["bytes"] == 2 * 4 * 2**20
    dec = {(r["impl"], r["depth"]): r for r in d["decode"]}
    assert set(dec) == {(i, n) for i in ("kernel", "reference") for n in (300, 5000)}
    for (impl, n), r in dec.items():
        assert "error" not in r, r
        assert r["bytes_read"] == n * (64 + 16) * 2 and r["GBps"] > 0 and r["fraction_of_copy"] > 0
        assert r["max_abs_diff_vs_reference"] < 2e-2  # bf16 outputs of two paths
    assert all(("adapter" in r["function"]) == fallback for r in d["decode"])
    pre = [r for r in d["prefill"] if r["mode"] == "prefill"]
    check = next(r for r in d["prefill"] if r["mode"] == "prefill-check")
    assert all(isinstance(x, float) and x < 5e-2 for x in check["max_abs_diff"].values()), check
    assert {r["impl"] for r in pre} == {"kernel", "reference"}
    for r in pre:
        assert "error" not in r, r
        assert [c["q_offset"] for c in r["chunks"]] == [0, 256, 512] and r["TFLOPs"] > 0
        # causal pairs of 600 queries from depth 0, 2 * H * (nope + rope + v) FLOPs each
        assert r["flops"] == 2 * 4 * (32 + 16 + 32) * (600 * 601 // 2)
        assert r["TFLOPs_with_expand"] > r["TFLOPs"]
        assert r["torch"].get("skipped") or r["torch"]["default"]["TFLOPs"] > 0


def test_step_bench_refuses_a_slice_that_does_not_fit(monkeypatch, capsys):
    """The default step slice (256 experts at the real widths) needs ~30 GB of fp32 weights: on a
    smaller machine the bench says so in one line instead of being killed by the OOM killer."""
    from kimi_mlx import planner

    monkeypatch.setattr(planner, "machine_memory_bytes", lambda usable=True: 8 << 30)
    assert bench_main(["step", "--depth", "1K"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the slice's random fp32 weights alone need about") and "--experts 16" in err
