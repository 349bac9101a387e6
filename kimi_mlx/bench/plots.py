"""Plots for docs/BENCHMARKS.md from the benchmarks' JSON (no re-run needed).

    python -m kimi_mlx.bench.plots --kda docs/bench_kda.json --model docs/bench_model.json --out docs
    python -m kimi_mlx.bench.plots --kda ... --model ... --roofline docs/bench_roofline.json --markdown

kda:   docs/bench_kda.png: prefill tokens/s vs T for each implementation (+ the decode step).
model: docs/bench_model_<dtype>.png (the same plots `python -m kimi_mlx.bench model` writes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def plot_kda(data: dict, out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return None
    rows = data["rows"]
    meta = data.get("meta", {})
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for impl in dict.fromkeys(r["impl"] for r in rows if r["mode"] == "prefill"):
        pts = sorted((r["T"], r["tokens_per_s"]) for r in rows if r["mode"] == "prefill" and r["impl"] == impl)
        ax.plot(*zip(*pts), "o-", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel("tokens/s (one layer)")
    ax.set_title("KDA prefill")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    dec = [(r["impl"], r["tokens_per_s"]) for r in rows if r["mode"] == "decode"]
    if dec:
        ax2.barh([d[0] for d in dec], [d[1] for d in dec], color="C0")
        ax2.set_xlabel("steps/s (one layer)")
        ax2.set_title("KDA decode step")
        ax2.grid(True, axis="x", alpha=0.3)
    else:
        ax2.axis("off")
    fig.suptitle(f"KDA operator, H={meta.get('H')} K={meta.get('K')} V={meta.get('V')}, fp32, "
                 f"{meta.get('device', '')}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out)


def _f(x, spec, pre=""):
    return "–" if x is None else pre + format(x, spec)


def markdown(kda: dict | None, model: dict | None, roof: dict | None) -> str:
    """The tables of docs/BENCHMARKS.md, from the JSON."""
    from .model import _fmt_mem, _fmt_prefill, _note, fmt_len, ratio_rows

    out = []
    if kda:
        out += ["### KDA operator", "", "| mode | T | impl | ms | tokens/s | ours ÷ this |", "|---|---:|---|---:|---:|---:|"]
        from .kda import ours_for

        ours = ours_for(kda["rows"])
        for r in kda["rows"]:
            b = ours.get((r["mode"], r["T"]))
            ratio = "" if b is None or b is r else f"{b['tokens_per_s'] / r['tokens_per_s']:.1f}×"
            out.append(f"| {r['mode']} | {r['T']} | {r['impl']} | {1e3 * r['seconds_best']:.2f} | "
                       f"{r['tokens_per_s']:,.0f} | {ratio} |")
        out.append("")
    if model:
        out += ["### Slice model", "", "| dtype | impl | context | prefill tok/s | decode tok/s | peak memory | note |",
                "|---|---|---:|---:|---:|---:|---|"]
        for r in model["results"]:
            dec = f"{r['decode_tok_s']:.2f}" if r.get("decode_tok_s") else "–"
            out.append(f"| {r['dtype']} | {r['impl']} | {fmt_len(r['length'])} | {_fmt_prefill(r)} | {dec} | "
                       f"{_fmt_mem(r)} | {_note(r)} |")
        out += ["", "| dtype | ours vs | context | prefill × | decode × | peak memory ratio |", "|---|---|---:|---:|---:|---:|"]
        for x in ratio_rows(model["results"]):
            out.append(f"| {x['dtype']} | {x['baseline']} | {fmt_len(x['length'])} | "
                       f"{_f(x['prefill_x'], '.1f', '~' if x['prefill_estimated'] else '')} | {_f(x['decode_x'], '.2f')} | "
                       f"{_f(x['mem_ratio'], '.2f', '~' if x['mem_estimated'] else '')} |")
        out.append("")
    if roof:
        out += ["### Roofline", "", "| measure | value |", "|---|---:|"]
        for k, v in roof["limits"].items():
            if isinstance(v, float):
                out.append(f"| {k} | {v:.1f} |")
        out += ["", "| dtype | impl | context | decode tok/s | bandwidth bound | fraction | kernel bound | fraction "
                    "| prefill tok/s | FLOP bound | fraction |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in roof["rows"]:
            out.append(f"| {r['dtype']} | {r['impl']} | {fmt_len(r['length'])} | {_f(r['decode_tok_s'], '.2f')} | "
                       f"{r['decode_bound_tok_s']:.1f} | {_f(r['decode_fraction'], '.1%')} | "
                       f"{_f(r.get('decode_kernel_bound_tok_s'), '.2f')} | {_f(r.get('decode_kernel_fraction'), '.0%')} | "
                       f"{_f(r['prefill_tok_s'], '.1f')} | "
                       f"{r['prefill_bound_tok_s']:.1f} | {_f(r['prefill_fraction'], '.0%')} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimi_mlx.bench.plots", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kda", help="JSON of `python -m kimi_mlx.bench kda`")
    ap.add_argument("--model", help="JSON of `python -m kimi_mlx.bench model`")
    ap.add_argument("--roofline", help="JSON of `python -m kimi_mlx.bench roofline` (for --markdown)")
    ap.add_argument("--out", default="docs", help="directory for the PNGs")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown, no plots")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.markdown:
        def load(p):
            return json.loads(Path(p).read_text()) if p else None

        print(markdown(load(a.kda), load(a.model), load(a.roofline)))
        return 0
    written = []
    if a.kda:
        written.append(plot_kda(json.loads(Path(a.kda).read_text()), out / "bench_kda.png"))
    if a.model:
        from .model import plot

        d = json.loads(Path(a.model).read_text())
        m = d.get("machine", {})
        for dt in sorted({r["dtype"] for r in d["results"]}):
            rs = [r for r in d["results"] if r["dtype"] == dt]
            written += plot(rs, out, f"Kimi-Linear slice model ({d['config']['num_hidden_layers']} layers, "
                                     f"{d['config']['num_experts']} experts), {dt}, {m.get('cpu', '')} "
                                     f"{m.get('cores', '')} cores (hollow/dashed: estimated)")
    for p in written:
        if p:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
