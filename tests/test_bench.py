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
            "--probe-tokens", "16", "--step", "32",
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
    # both implementations hold the same weights: fp32 logits agree to rounding
    fp32 = d["checks"]["fp32"]["mlx-lm"]
    assert fp32["rel_diff"] < 1e-4 and fp32["argmax_agree"] == 1.0
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
            "--step", "32", "--no-check", "--append", "--json", str(path), "--plot-dir", str(tmp_path)]
    assert bench_main(["model", *args]) == 0
    d = json.loads(path.read_text())
    assert len(d["runs"]) == 2
    assert sorted({r["length"] for r in d["results"] if r["impl"] == "ours"}) == [32, 48, 64]
    assert (tmp_path / "bench_model_q4.png").stat().st_size > 1000


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
