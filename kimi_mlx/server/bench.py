"""The server's targets (issue 17), measured against a real server over HTTP.

    python -m kimi_mlx.server.bench --model tests/fixtures/models/tiny_chat --prefix-tokens 32768 --clients 20

1. Shared prefix: two chat requests with the same ~32K-token system message and different questions.
   Target: the second's time to first token <= 10 % of the first's, and its cached_tokens >= 99 % of
   the prefix they share.
2. Concurrency: N streaming clients at once. Target: all finish without error, served first come
   first served, none waiting longer than the requests ahead of it took (its fair turn).

The server runs as a subprocess (`python -m kimi_mlx.server --port 0`), as a user would run it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from typing import Optional

NO_EOS_BIAS = -100  # on the end-of-turn tokens: replies run to max_tokens, so every client does the same work


def start_server(argv: list, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Start `python -m kimi_mlx.server --port 0 ARGV`; (process, base URL) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "kimi_mlx.server", "--port", "0", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    line = proc.stdout.readline()  # the server prints its address once it listens
    m = re.search(r"on (http://\S+)/v1", line)
    if m is None:
        proc.kill()
        raise RuntimeError(f"the server did not start ({time.monotonic() - t0:.0f} s): {line!r} "
                           f"{proc.stderr.read()[-2000:]}")
    return proc, m.group(1)


def stop_server(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def _stream(client, body: dict) -> dict:
    """One streaming chat request: time to first content, text, the usage chunk (with timings)."""
    t0 = time.perf_counter()
    out = {"ttft_s": None, "text": "", "usage": None, "timings": None, "error": None}
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                                   "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            out["error"] = f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}"
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                out["error"] = obj["error"]["message"]
            for c in obj.get("choices", []):
                if c["delta"].get("content"):
                    if out["ttft_s"] is None:
                        out["ttft_s"] = time.perf_counter() - t0
                    out["text"] += c["delta"]["content"]
            if obj.get("usage"):
                out["usage"], out["timings"] = obj["usage"], obj.get("timings")
    out["total_s"] = time.perf_counter() - t0
    return out


def _document(tok, n_tokens: int) -> str:
    """Text of exactly about n_tokens tokens (varied, so nothing repeats in a way caches could cheat on)."""
    words = ["harbour", "ledger", "tide", "north", "cargo", "lantern", "pilot", "dawn", "anchor", "gull"]
    pieces, i = [], 0
    while True:
        line = f"Entry {i}: the {words[i % 10]} {words[(i * 7) % 10]} was logged at {i % 24:02d}:{i % 60:02d}.\n"
        pieces.append(line)
        i += 1
        if i % 200 == 0 and len(tok.encode("".join(pieces))) >= n_tokens:
            break
    ids = tok.encode("".join(pieces))[:n_tokens]
    return tok.decode(ids)


async def shared_prefix(url: str, tok, model_id: str, prefix_tokens: int, max_tokens: int) -> dict:
    import httpx

    from ..runtime import Message, PromptBuilder

    doc = _document(tok, prefix_tokens)
    system = "Answer questions about this log.\n\n" + doc
    questions = ["Which entry mentions the pilot first?", "How many lanterns were logged at dawn?"]
    prompts = [PromptBuilder(tok).chat([Message("system", system), Message("user", q)]) for q in questions]
    shared = next((i for i, (a, b) in enumerate(zip(*prompts)) if a != b), min(map(len, prompts)))
    runs = []
    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        for q in questions:
            body = {"model": model_id, "messages": [{"role": "system", "content": system},
                                                    {"role": "user", "content": q}],
                    "max_tokens": max_tokens, "temperature": 0}
            runs.append(await _stream(c, body))
    for r in runs:
        if r["error"]:
            raise RuntimeError(r["error"])
    first, second = runs
    ratio = second["ttft_s"] / first["ttft_s"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    return {"prompt_tokens": [r["usage"]["prompt_tokens"] for r in runs], "shared_prefix_tokens": shared,
            "ttft_first_s": first["ttft_s"], "ttft_second_s": second["ttft_s"], "ttft_ratio": ratio,
            "cached_tokens_second": cached, "cached_fraction": cached / shared,
            "meets_ttft": ratio <= 0.10, "meets_cached": cached >= 0.99 * shared}


async def concurrent(url: str, model_id: str, clients: int, max_tokens: int, eos_ids) -> dict:
    import httpx

    bias = {str(t): NO_EOS_BIAS for t in eos_ids}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as c:
        bodies = [{"model": model_id, "messages": [{"role": "user", "content": f"Client {i}: tell me about tides."}],
                   "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "logit_bias": bias}
                  for i in range(clients)]
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(_stream(c, b) for b in bodies), return_exceptions=True)
        wall = time.perf_counter() - t0
    errors = [str(r) if isinstance(r, BaseException) else r["error"] for r in runs
              if isinstance(r, BaseException) or r["error"]]
    ok = [r for r in runs if not isinstance(r, BaseException) and not r["error"] and r["timings"]]
    by_seq = sorted(ok, key=lambda r: r["timings"]["seq"])
    ahead_s, worst_extra_s = 0.0, 0.0
    for r in by_seq:
        t = r["timings"]
        # all arrive together: a fair wait is what the requests ahead took
        worst_extra_s = max(worst_extra_s, t["queue_ms"] / 1e3 - ahead_s)
        ahead_s += (t["prompt_ms"] + t["generation_ms"]) / 1e3
    started = [r["timings"]["started"] for r in by_seq]
    fifo = started == sorted(started)  # started in the order they arrived
    complete = [r for r in ok if r["usage"]["completion_tokens"] == max_tokens]
    return {"clients": clients, "finished": len(complete), "errors": errors, "wall_s": wall,
            "max_wait_s": max((r["timings"]["queue_ms"] / 1e3 for r in ok), default=0.0),
            "worst_wait_beyond_fair_s": worst_extra_s, "fifo": fifo,
            "ttft_s": sorted(r["ttft_s"] for r in ok),
            "meets": not errors and len(complete) == clients and fifo and worst_extra_s <= 0.25}


def main(argv: Optional[list] = None) -> int:
    from ..runtime.model import resolve_model_path
    from ..tokenizer import load_tokenizer

    p = argparse.ArgumentParser(prog="python -m kimi_mlx.server.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prefix-tokens", type=int, default=32768, help="shared prefix length (default 32768)")
    p.add_argument("--clients", type=int, default=20, help="concurrent streaming clients (default 20)")
    p.add_argument("--max-tokens", type=int, default=32, help="reply length (default 32)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    tok = load_tokenizer(resolve_model_path(args.model))
    proc, url = start_server(["--model", args.model])
    try:
        import httpx

        model_id = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        asyncio.run(_warm_up(url, model_id))
        prefix = asyncio.run(shared_prefix(url, tok, model_id, args.prefix_tokens, args.max_tokens))
        conc = asyncio.run(concurrent(url, model_id, args.clients, args.max_tokens, tok.eos_token_ids))
        health = httpx.get(f"{url}/health").json()
    finally:
        stop_server(proc)
    res = {"model": args.model, "shared_prefix": prefix, "concurrent": conc, "prefix_cache": health["prefix_cache"]}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        _report(res)
    return 0 if prefix["meets_ttft"] and prefix["meets_cached"] and conc["meets"] else 1


async def _warm_up(url: str, model_id: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await _stream(c, {"model": model_id, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})


def _report(res: dict) -> None:
    s, c = res["shared_prefix"], res["concurrent"]
    mark = lambda ok: "ok" if ok else "MISSED"  # noqa: E731
    print(f"model {res['model']}")
    print(f"shared prefix: {s['shared_prefix_tokens']:,} tokens of prompts of {s['prompt_tokens'][0]:,} and "
          f"{s['prompt_tokens'][1]:,}")
    print(f"  time to first token: first {s['ttft_first_s'] * 1e3:,.0f} ms, second {s['ttft_second_s'] * 1e3:,.1f} ms"
          f" = {s['ttft_ratio']:.2%} of the first (target <= 10%: {mark(s['meets_ttft'])})")
    print(f"  second request's cached_tokens: {s['cached_tokens_second']:,} = {s['cached_fraction']:.2%} of the "
          f"shared prefix (target >= 99%: {mark(s['meets_cached'])})")
    print(f"{c['clients']} concurrent streaming clients: {c['finished']} finished, {len(c['errors'])} errors, "
          f"{c['wall_s']:.1f} s in all; first come first served: {c['fifo']}; longest queue wait "
          f"{c['max_wait_s']:.2f} s; worst wait beyond the fair turn {c['worst_wait_beyond_fair_s'] * 1e3:.0f} ms "
          f"({mark(c['meets'])})")
    t = c["ttft_s"]
    if t:
        print(f"  time to first token: fastest {t[0]:.2f} s, median {t[len(t) // 2]:.2f} s, slowest {t[-1]:.2f} s")
    pc = res["prefix_cache"]
    print(f"prefix cache: {pc['bytes'] / 2**20:,.1f} MB in {pc['states']} states "
          f"(bound {pc['max_bytes'] / 2**20:,.0f} MB)")


if __name__ == "__main__":
    raise SystemExit(main())
