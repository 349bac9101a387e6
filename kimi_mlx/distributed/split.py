"""Which layers each rank holds: given by the user (`--split 14,13`) or chosen from each rank's memory.

Rank 0 holds the embedding, the final norm and the head besides its layers; every rank holds
a contiguous run of decoder layers, in order (rank 0 the first ones). The chosen split maximises
the context the pipeline holds, i.e. the smallest over the ranks of what fits beside the rank's
weights: each rank keeps only its own layers' caches, and only MLA layers' grow with the context.

    python -m kimi_mlx.distributed.split --model DIR --ranks 2 --memory 24,24
    python -m kimi_mlx.distributed.split --table      # the docs' table, 2 x 16/24/32 GB at 4 and 3 bits
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .. import planner
from ..config import ModelConfig
from .link import PipelineError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def parse_split(text: str, num_layers: int, ranks: int) -> list[int]:
    """'14,13' -> [14, 13]: layers per rank, in rank order, summing to the model's layers."""
    try:
        counts = [int(x) for x in str(text).replace(" ", "").split(",")]
    except ValueError:
        raise PipelineError(f"--split {text!r}: give the number of layers of each rank, e.g. --split "
                            f"{','.join(str(c) for c in even_split(num_layers, ranks))}") from None
    if len(counts) != ranks:
        raise PipelineError(f"--split {text}: {len(counts)} numbers for {ranks} ranks")
    if any(c < 1 for c in counts):
        raise PipelineError(f"--split {text}: every rank needs at least one layer")
    if sum(counts) != num_layers:
        raise PipelineError(f"--split {text}: {sum(counts)} layers, the model has {num_layers}")
    return counts


def even_split(num_layers: int, ranks: int) -> list[int]:
    return [num_layers // ranks + (r < num_layers % ranks) for r in range(ranks)]


def ranges(counts: Sequence[int]) -> list[range]:
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def describe(counts: Optional[Sequence[int]]) -> str:
    """'layers 0-13 | 14-26' (or 'one process')."""
    if not counts:
        return "one process"
    return "layers " + " | ".join(f"{r.start}-{r.stop - 1}" for r in ranges(counts))


def checkpoint_bytes(headers: dict[str, dict], num_layers: int) -> tuple[int, list[int]]:
    """(bytes of everything but the decoder layers, [bytes of layer i]) from safetensors headers
    ({tensor name: header entry}): the exact sizes a split weighs."""
    edge, layers = 0, [0] * num_layers
    for name, info in headers.items():
        n = info["data_offsets"][1] - info["data_offsets"][0]
        m = _LAYER.match(name)
        if m and int(m.group(1)) < num_layers:
            layers[int(m.group(1))] += n
        elif not name.startswith("model.mtp"):
            edge += n
    return edge, layers


@dataclass
class RankPlan:
    layers: range
    weights_bytes: int
    fixed_bytes: int  # weights + its KDA states + prefill temporaries + runtime
    budget_bytes: Optional[int]
    context_tokens: int  # the most its MLA caches hold (sys.maxsize: no MLA layer; -1: not even the weights fit)


def rank_plan(cfg: ModelConfig, layers: range, first: bool, edge_bytes: int, layer_bytes: Sequence[int],
              budget: Optional[int], mla_bits: int = 16) -> RankPlan:
    """planner.plan for one rank: its layers (and, on rank 0, the embedding and head) in its memory."""
    weights = sum(layer_bytes[i] for i in layers) + (edge_bytes if first else 0)
    p = planner.plan(cfg, 0, layers=layers, edges=first, weights_bytes=weights, machine_bytes=budget or 0,
                     mla_bits=mla_bits)
    fixed = p.total_bytes
    if budget is None:
        ctx = sys.maxsize
    elif budget < fixed:
        ctx = -1
    else:
        ctx = sys.maxsize if p.max_context_tokens is None else p.max_context_tokens
    return RankPlan(layers, weights, fixed, budget, ctx)


def choose_split(cfg: ModelConfig, edge_bytes: int, layer_bytes: Sequence[int], budgets: Sequence[Optional[int]],
                 mla_bits: int = 16) -> list[int]:
    """Layers per rank, contiguous and in order, that hold the longest context (the smallest over the
    ranks, up to the model's trained length); among those the one whose fullest rank is least full.
    PipelineError when no split fits."""
    L, N = len(layer_bytes), len(budgets)
    cap = int(cfg.model_max_length) if cfg.model_max_length else sys.maxsize  # more is worth nothing
    if N > L:
        raise PipelineError(f"{N} ranks for a model of {L} layers: at most one rank per layer")
    memo: dict[tuple[int, int], tuple] = {}

    def best(r: int, start: int):
        """(score, counts) for ranks r.. holding layers start..L-1; score compares as a tuple."""
        key = (r, start)
        if key in memo:
            return memo[key]
        if r == N - 1:
            choices = [L - start]
        else:
            choices = range(1, L - start - (N - 1 - r) + 1)
        top = None
        for c in choices:
            p = rank_plan(cfg, range(start, start + c), r == 0, edge_bytes, layer_bytes, budgets[r], mla_bits)
            fill = p.fixed_bytes / p.budget_bytes if p.budget_bytes else p.fixed_bytes
            here = (min(p.context_tokens, cap), -fill)
            if r < N - 1:
                rest, counts = best(r + 1, start + c)
                here = (min(here[0], rest[0]), min(here[1], rest[1]))
                counts = [c] + counts
            else:
                counts = [c]
            if top is None or here > top[0]:
                top = (here, counts)
        memo[key] = top
        return top

    (ctx, _), counts = best(0, 0)
    if ctx < 0:
        need = [rank_plan(cfg, r, i == 0, edge_bytes, layer_bytes, budgets[i], mla_bits)
                for i, r in enumerate(ranges(counts))]
        worst = max(range(N), key=lambda i: need[i].fixed_bytes / (need[i].budget_bytes or 1))
        raise PipelineError(
            f"the model does not fit these {N} ranks: even the best split ({describe(counts)}) leaves rank {worst} "
            f"needing {planner.format_bytes(need[worst].fixed_bytes)} of its "
            f"{planner.format_bytes(need[worst].budget_bytes)}; add a rank or use fewer bits")
    return counts


def split_budget() -> Optional[int]:
    """This machine's memory for the split decision: the same every run (physical memory times the
    usable share), so that an automatic split, and the sessions saved with it, stay the same."""
    total = planner.machine_memory_bytes(usable=False)
    if total is None:
        return None
    if sys.platform == "darwin":
        return planner.machine_memory_bytes()  # the GPU's share (or the raised wired limit)
    return int(total * planner.MACOS_USABLE_FRACTION)


# ---------------------------------------------------------------------------
# the docs' table
# ---------------------------------------------------------------------------
def table_rows(cfg: ModelConfig, ranks: int, memories_gb: Sequence[float], bits_list: Sequence[int],
               mla_bits: int = 16) -> list[dict]:
    """For each machine size and weight bits: the split chosen for `ranks` Macs of that size (75% of
    their memory usable, as on macOS) and the context it holds."""
    rows = []
    for bits in bits_list:
        edge, layers = planner.weight_bytes_by_layer(cfg, bits)
        for gb in memories_gb:
            budget = int(gb * 1e9 * planner.MACOS_USABLE_FRACTION)
            row = {"ranks": ranks, "memory_gb": gb, "bits": bits, "weights_bytes": edge + sum(layers),
                   "limit": cfg.model_max_length}
            try:
                counts = choose_split(cfg, edge, layers, [budget] * ranks, mla_bits)
            except PipelineError:
                row.update(split=None, context_tokens=0)
                rows.append(row)
                continue
            plans = [rank_plan(cfg, r, i == 0, edge, layers, budget, mla_bits) for i, r in enumerate(ranges(counts))]
            row.update(split=counts, context_tokens=min(p.context_tokens for p in plans),
                       rank_weights_bytes=[p.weights_bytes for p in plans])
            one = planner.plan(cfg, 0, bits=bits, machine_bytes=budget, mla_bits=mla_bits)
            row["single_context_tokens"] = one.max_context_tokens or 0
            rows.append(row)
    return rows


def _fmt_tokens(n: int, limit: Optional[int] = None) -> str:
    if n <= 0:
        return "does not fit"
    if limit and n >= limit:
        return f"the model's {_fmt_tokens(limit)} (memory for {_fmt_tokens(n)})"
    if n >= 1 << 40:
        return "unbounded"
    return f"{n / 1000:,.0f}K" if n < 10**6 else f"{n / 1e6:,.2f}M"


def format_table(rows: list[dict]) -> str:
    lines = ["| Macs | bits | weights | split (layers per rank) | weights per rank | context (pipeline) | one Mac alone |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        per = " + ".join(planner.format_bytes(b) for b in r.get("rank_weights_bytes", [])) or "-"
        split = ",".join(map(str, r["split"])) if r["split"] else "-"
        lines.append(f"| {r['ranks']} x {r['memory_gb']:g} GB | {r['bits']} | {planner.format_bytes(r['weights_bytes'])} "
                     f"| {split} | {per} | {_fmt_tokens(r['context_tokens'], r.get('limit'))} "
                     f"| {_fmt_tokens(r.get('single_context_tokens', 0), r.get('limit'))} |")
    return "\n".join(lines)


def published_config() -> ModelConfig:
    """The published Kimi-Linear-48B-A3B config (the facts in shared/KIMI_LINEAR_FACTS.md)."""
    full = [4, 8, 12, 16, 20, 24, 27]
    return ModelConfig.from_dict({
        "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "hidden_size": 2304,
        "intermediate_size": 9216, "num_hidden_layers": 27, "num_attention_heads": 32, "num_key_value_heads": 32,
        "head_dim": 72, "vocab_size": 163840, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "mla_use_nope": True, "num_experts": 256, "num_experts_per_token": 8,
        "num_shared_experts": 1, "moe_intermediate_size": 1024, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "moe_renormalize": True, "moe_router_activation_func": "sigmoid", "routed_scaling_factor": 2.446,
        "num_expert_group": 1, "topk_group": 1, "use_grouped_topk": True, "num_nextn_predict_layers": 0,
        "model_max_length": 1048576, "bos_token_id": 163584, "eos_token_id": 163586, "pad_token_id": 163839,
        "linear_attn_config": {"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4,
                               "full_attn_layers": full,
                               "kda_layers": [i for i in range(1, 28) if i not in full]},
    })


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kimi_mlx.distributed.split", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (its config; its safetensors headers when present)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--memory", help="GB of each rank's machine, e.g. 24,16 (75%% is taken as usable)")
    p.add_argument("--bits", type=int, default=None, help="weight bits when the model directory has no weights")
    p.add_argument("--mla-cache-bits", type=int, choices=[8, 16], default=16)
    p.add_argument("--table", action="store_true", help="the docs' table for the published model")
    args = p.parse_args(argv)
    if args.table:
        cfg = published_config()
        print(format_table(table_rows(cfg, 2, [16, 24, 32], [4, 3], args.mla_cache_bits)))
        return 0
    if not args.model:
        p.error("--model is needed (or --table)")
    cfg = ModelConfig.from_file(Path(args.model))
    try:
        edge, layers = model_bytes(Path(args.model), cfg)
    except (OSError, ValueError):
        edge, layers = planner.weight_bytes_by_layer(cfg, args.bits or 16)
    mems = [float(x) for x in args.memory.split(",")] if args.memory else [None] * args.ranks
    if len(mems) == 1:
        mems *= args.ranks
    budgets = [int(m * 1e9 * planner.MACOS_USABLE_FRACTION) if m else split_budget() for m in mems]
    try:
        counts = choose_split(cfg, edge, layers, budgets, args.mla_cache_bits)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"--split {','.join(map(str, counts))}  ({describe(counts)})")
    for i, r in enumerate(ranges(counts)):
        pl = rank_plan(cfg, r, i == 0, edge, layers, budgets[i], args.mla_cache_bits)
        print(f"rank {i}: layers {r.start}-{r.stop - 1}, weights {planner.format_bytes(pl.weights_bytes)}, "
              f"context {_fmt_tokens(pl.context_tokens)}")
    return 0


def model_bytes(model_dir: Path, cfg: ModelConfig) -> tuple[int, list[int]]:
    """checkpoint_bytes of a model directory's shards (headers only)."""
    from ..weights import find_shards, read_safetensors_header

    headers = {}
    for shard in find_shards(model_dir):
        headers.update({k: v for k, v in read_safetensors_header(shard).items() if k != "__metadata__"})
    return checkpoint_bytes(headers, cfg.num_hidden_layers)


if __name__ == "__main__":
    sys.exit(main())
