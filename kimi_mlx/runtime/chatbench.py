"""Time to first token per turn of a conversation: kept turn states vs prefilling it again.

    python -m kimi_mlx.runtime.chatbench --model tests/fixtures/models/tiny_chat --turns 20 --doc-tokens 32768

Each turn sends the same kind of message; "kept" continues from the turn checkpoints, "re-prefill"
keeps none (the documents, if any, stay a prefilled snapshot in both). The target of issue 16:
turn N's time to first token at most 1.2 x (turn 1's + the new message's prefill alone).
"""
from __future__ import annotations

import argparse
import json
import time

MESSAGE = "Tell me one more thing about the text above, briefly, in a sentence or two please."


def _ttft(conv, text: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    gen = conv.send(text, max_tokens=max_tokens)
    next(gen)
    dt = time.perf_counter() - t0
    for _ in gen:
        pass
    return dt


def _message_alone(model, tok, max_tokens: int) -> float:
    """Prefill of one message's tokens from an empty cache, and its first token."""
    from ..generate import stream_generate

    ids = tok.encode(MESSAGE)
    t0 = time.perf_counter()
    next(stream_generate(model, tok, ids, max_tokens=max_tokens))
    return time.perf_counter() - t0


def run(model, tok, turns: int, doc_tokens: int = 0, max_tokens: int = 16) -> list[dict]:
    from ..session import DocumentSession
    from . import CheckpointStore, Conversation

    docs = None
    if doc_tokens:
        words = " ".join(f"w{i % 997}" for i in range(doc_tokens))
        pb = Conversation(model, tok).prompts
        ids = pb.document_prefix(words)
        docs = DocumentSession.create(model, tok, ids[:doc_tokens] if len(ids) > doc_tokens else ids)
    _message_alone(model, tok, max_tokens)  # warm-up (kernel builds, first-call costs)
    rows = []
    kept = Conversation(model, tok, documents=docs)
    again = Conversation(model, tok, documents=docs, store=CheckpointStore(0))
    for n in range(1, turns + 1):
        alone = _message_alone(model, tok, max_tokens)
        t_kept = _ttft(kept, MESSAGE, max_tokens)
        t_again = _ttft(again, MESSAGE, max_tokens)
        rows.append({"turn": n, "context_tokens": len(kept.prompt_ids()), "kept_s": t_kept, "reprefill_s": t_again,
                     "message_alone_s": alone, "prefilled_kept": kept.prefilled_tokens,
                     "prefilled_reprefill": again.prefilled_tokens})
    first = rows[0]["kept_s"]
    for r in rows:
        r["target_s"] = 1.2 * (first + r["message_alone_s"])
        r["meets_target"] = r["kept_s"] <= r["target_s"]
    return rows


def main(argv=None) -> int:
    from .model import load

    p = argparse.ArgumentParser(prog="python -m kimi_mlx.runtime.chatbench", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--doc-tokens", type=int, default=0, help="a document of about this many tokens first")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    model, tok = load(args.model)
    rows = run(model, tok, args.turns, args.doc_tokens, args.max_tokens)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'turn':>4} {'context':>8} {'kept ms':>9} {'re-prefill ms':>14} {'prefilled':>10} {'target ms':>10}")
    for r in rows:
        print(f"{r['turn']:>4} {r['context_tokens']:>8,} {r['kept_s'] * 1e3:9.1f} {r['reprefill_s'] * 1e3:14.1f} "
              f"{r['prefilled_kept']:>10,} {r['target_s'] * 1e3:10.1f}{'' if r['meets_target'] else '  MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
