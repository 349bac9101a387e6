"""Text generation with Kimi Linear: `load`, `stream_generate`, `generate` and the CLI.

    python -m kimi_mlx.generate --prompt "Why is the sky blue?"
    python -m kimi_mlx.generate --document notes/ --prompt "Summarise these notes" --save-session notes.kimisession
    python -m kimi_mlx.generate --session notes.kimisession --prompt "What are the open questions?"

Documents always come first in the token stream, so the state after them is a true
prefix of every question: a saved session answers exactly as the documents would.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx

from .runtime.model import DEFAULT_MODEL, ModelLoadError, load, resolve_model_path
from .sampling import make_logits_processors, make_sampler
from .session import prefill

# Prompts at least this long get a progress bar and a memory estimate before the prefill.
PROGRESS_MIN_TOKENS = 4096

__all__ = ["DEFAULT_MODEL", "GenerationResponse", "ModelLoadError", "load", "resolve_model_path",
           "stream_generate", "generate", "main"]


# ---------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------
@dataclass
class GenerationResponse:
    """One step of `stream_generate`.

    text: the new text since the previous response (may be "" while a multi-byte
        character is incomplete). token: the token id of this step.
    logprobs: log-probabilities over the vocabulary for this step ([V]).
    prompt_tps / generation_tps: tokens per second. peak_memory: GB. prompt_tokens: the tokens
        prefilled for this reply.
    finish_reason: None while generating, then "stop" (end-of-turn token), "length"
        (max_tokens reached) or "cancelled" (should_stop returned True).
    """

    text: str
    token: int
    logprobs: Optional[mx.array]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None
    cached_tokens: int = 0  # prompt tokens taken from a checkpoint (runtime.Conversation), not prefilled


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        # raw text, no template; special-token text is honoured so a hand-written template works
        return list(tokenizer.encode(prompt, allow_special=True))
    if isinstance(prompt, mx.array):
        return [int(t) for t in prompt.reshape(-1).tolist()]
    return [int(t) for t in prompt]


def _context_limit(model) -> Optional[int]:
    return getattr(model.config, "model_max_length", None)


def check_prompt_length(model, n_prompt: int, n_cached: int = 0) -> None:
    """ValueError for an empty prompt or one that overflows the model's context."""
    if n_prompt == 0:
        raise ValueError("the prompt is empty")
    limit = _context_limit(model)
    if limit and n_prompt + n_cached > limit:
        cached = f" + {n_cached:,} tokens already in the cache" if n_cached else ""
        raise ValueError(f"the prompt is {n_prompt:,} tokens{cached}, longer than the model's context "
                         f"of {limit:,} tokens")


def _token_steps(model, cache, first_logits: mx.array, history: mx.array, sampler, processors,
                 max_tokens: int) -> Iterator[tuple[int, mx.array]]:
    """(token, logprobs) pairs. The graph for step n+1 is built and queued (async_eval) before
    step n's token is read back, so the device never waits on Python between tokens."""
    hist = [history]

    def sample(logits: mx.array, fed: Optional[mx.array]):
        logits = logits.astype(mx.float32)
        if processors:
            if fed is not None:
                hist[0] = mx.concatenate([hist[0], fed])
            for proc in processors:
                logits = proc(hist[0], logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    def step(y: mx.array):
        return sample(model(y[None], cache=cache)[:, -1, :], y)

    y, logprobs = sample(first_logits, None)
    mx.async_eval(y, logprobs)
    n = 0
    while True:
        if n + 1 < max_tokens:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
        n += 1
        if n >= max_tokens:
            return
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs


def stream_generate(model, tokenizer, prompt: Union[str, Sequence[int], mx.array], max_tokens: int = 256,
                    temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
                    prompt_cache=None, prefill_step_size: int = 2048,
                    progress: Optional[Callable[[int, int, float, float], None]] = None,
                    should_stop: Optional[Callable[[], bool]] = None) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text encoded as is, or token ids), yielding one response per token.

    prompt_cache: continue from this cache (e.g. a document session's fork); it is
        updated in place. Otherwise a fresh cache is used.
    progress(done, total, tokens_per_s, eta_s): called after each prefill chunk.
    should_stop(): polled between prefill chunks (raises session.PrefillCancelled) and
        after every generated token (ends with finish_reason "cancelled").
    Stops at any of tokenizer.eos_token_ids; the last response carries finish_reason.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if prefill_step_size < 1:
        raise ValueError(f"prefill step size must be >= 1, got {prefill_step_size}")
    ids = _prompt_ids(tokenizer, prompt)
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    check_prompt_length(model, len(ids), cache.offset)
    cache.reserve(cache.offset + len(ids) + max_tokens)  # the prompt and the reply in one MLA segment
    sampler = make_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    processors = make_logits_processors(repetition_penalty)
    tic = time.perf_counter()
    cache, logits = prefill(model, ids, cache, step=prefill_step_size, progress=progress,
                            should_stop=should_stop, return_logits=True)
    yield from stream_from_logits(model, tokenizer, cache, logits, ids, sampler, processors, max_tokens,
                                  should_stop, prompt_tokens=len(ids), tic=tic)


def stream_from_logits(model, tokenizer, cache, logits: mx.array, history: Sequence[int], sampler, processors,
                       max_tokens: int, should_stop: Optional[Callable[[], bool]] = None, prompt_tokens: int = 0,
                       tic: Optional[float] = None) -> Iterator[GenerationResponse]:
    """The reply after a prefill: `logits` are the next-token logits [1, V] of the state in `cache`,
    `history` the token ids the repetition penalty looks back on. prompt_tokens / tic: the tokens
    prefilled for this reply and when their prefill began (for prompt_tps)."""
    from .tokenizer import StreamingDetokenizer

    eos = set(int(t) for t in tokenizer.eos_token_ids)
    detok = StreamingDetokenizer(tokenizer)
    tic = time.perf_counter() if tic is None else tic
    # the history only matters to logits processors (a long conversation's ids are not copied otherwise)
    hist = mx.array(list(history) if processors else [], dtype=mx.int32)
    steps = _token_steps(model, cache, logits, hist, sampler, processors, max_tokens)
    prompt_tps = gen_tps = 0.0
    token, logprobs, n, finish = -1, None, 0, None
    for n, (token, logprobs) in enumerate(steps, 1):
        now = time.perf_counter()
        if n == 1:  # the first token closes the prompt phase (as in mlx-lm)
            prompt_tps = prompt_tokens / max(now - tic, 1e-9)
            tic = now
        else:
            gen_tps = (n - 1) / max(now - tic, 1e-9)
        if token in eos:
            finish = "stop"
            break
        detok.add_token(token)
        if n >= max_tokens:
            finish = "length"
            break
        if should_stop is not None and should_stop():
            finish = "cancelled"
            break
        yield GenerationResponse(detok.last_segment, token, logprobs, prompt_tokens, prompt_tps, n, gen_tps,
                                 mx.get_peak_memory() / 1e9, None)
    steps.close()
    detok.finalize()
    yield GenerationResponse(detok.last_segment, token, logprobs, prompt_tokens, prompt_tps, n, gen_tps,
                             mx.get_peak_memory() / 1e9, finish)


def _print_stats(r: GenerationResponse, file=None) -> None:
    file = file or sys.stderr
    print("==========", file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """All of `stream_generate`'s text as one string. verbose: stream it to stdout, stats to stderr."""
    text, last = [], None
    for r in stream_generate(model, tokenizer, prompt, **kwargs):
        text.append(r.text)
        if verbose:
            print(r.text, end="", flush=True)
        last = r
    if verbose and last is not None:
        print()
        _print_stats(last)
    return "".join(text)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
class _Interrupt:
    """First Ctrl-C asks for a clean stop (checked between prefill chunks and tokens);
    a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        return self

    def arm(self) -> None:
        """Install the handler (after loading: until then Ctrl-C simply aborts)."""
        if self._old is None:
            try:
                self._old = signal.signal(signal.SIGINT, self._handle)
            except ValueError:  # not the main thread
                self._old = None

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[stopping: Ctrl-C again to abort at once]", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.requested


class _Progress:
    """A rich progress bar on stderr for long prefills (tokens done/total, tokens/s, ETA)."""

    def __init__(self, total: int, label: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._p = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[tps]:>8.0f} tok/s  ETA {task.fields[eta]}"),
                           console=Console(stderr=True), transient=False)
        self._task = self._p.add_task(label, total=total, tps=0.0, eta="-")

    def __enter__(self):
        self._p.start()
        return self

    def __exit__(self, *exc):
        self._p.stop()
        return False

    def __call__(self, done: int, total: int, tps: float, eta: float) -> None:
        from .planner import format_duration

        self._p.update(self._task, completed=done, total=total, tps=tps,
                       eta=format_duration(eta) if eta != float("inf") else "?")


def _build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m kimi_mlx.generate",
                                description="Generate text with Kimi Linear (MLX), optionally about documents.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local model directory or Hugging Face repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--prompt", "-p", help="the prompt or question; '-' reads it from stdin")
    p.add_argument("--system-prompt", help="system message for the chat template")
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p threshold relative to the top token (default 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="e.g. 1.1; off by default")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--prefill-step-size", type=int, default=2048, help="prefill chunk size in tokens (default 2048)")
    p.add_argument("--verbose", "-v", action="store_true", help="print speed and peak memory on stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object with the answer and stats")
    p.add_argument("--document", "-d", action="append", default=[], metavar="PATH",
                   help="file or directory to read before the prompt (repeatable)")
    p.add_argument("--save-session", metavar="FILE", help="save the state after the documents to FILE")
    p.add_argument("--session", metavar="FILE", help="answer --prompt from a saved document session")
    p.add_argument("--mla-cache-bits", type=int, choices=[8], default=None,
                   help="store the MLA latent cache at 8 bits (half the memory, slightly less exact)")
    p.add_argument("--split", metavar="N,N,...",
                   help="under mlx.launch: decoder layers per rank, e.g. 14,13 (default: by each rank's memory; "
                        "see docs/DISTRIBUTED.md)")
    return p


def _err(msg: str) -> None:
    msg = " ".join(str(msg).split()) or "unknown error"
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _read_prompt(arg: Optional[str]) -> Optional[str]:
    if arg is None:
        return None
    if arg == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"the prompt on stdin is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates
        raise ValueError("the prompt is not valid UTF-8") from None
    return arg


def _check_args(args, parser) -> None:
    if args.session and args.document:
        parser.error("--session and --document can't be combined (the session already holds its documents)")
    if args.session and args.save_session:
        parser.error("--session and --save-session can't be combined")
    if args.save_session and not args.document:
        parser.error("--save-session needs --document")
    if args.session and args.prompt is None:
        parser.error("--session needs --prompt (the question)")
    if args.prompt is None and not args.save_session:
        parser.error("--prompt is required (or --document ... --save-session FILE to only save a session)")
    if (args.document or args.session) and args.ignore_chat_template:
        parser.error("--document/--session use the chat template; drop --ignore-chat-template")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    if args.prefill_step_size < 1:
        parser.error("--prefill-step-size must be >= 1")
    if args.split is not None:
        from .distributed import launched

        if not launched():
            parser.error("--split splits the layers between the ranks of mlx.launch; run under it "
                         "(see docs/DISTRIBUTED.md)")
    # sampler arguments are checked by building one (same messages as the API)
    try:
        make_sampler(args.temp, args.top_p, args.top_k, args.min_p, args.seed)
        make_logits_processors(args.repetition_penalty)
    except ValueError as e:
        parser.error(str(e))


def _weights_nbytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


def _plan_report(model, n_tokens: int, args, what: str, extra: int = 0) -> None:
    """Token count and memory estimate before a long prefill; PlanError if it can't fit."""
    from .planner import check_fits, format_bytes, format_duration, known_prefill_speed
    from .session import speed_key

    tps = known_prefill_speed(speed_key(model))
    # a pipeline (kimi_mlx.distributed) checks each rank: its layers in its memory
    fits = getattr(model, "check_fits", None) or (lambda n, **kw: check_fits(model.config, n, **kw))
    p = fits(n_tokens + extra, mla_bits=args.mla_cache_bits or 16, chunk_tokens=args.prefill_step_size,
             weights_bytes=_weights_nbytes(model), tokens_per_second=tps)
    avail = f" of {format_bytes(p.machine_bytes)} usable" if p.machine_bytes else ""
    more = f" (+{extra:,} for the question)" if extra else ""
    when = (f"prefill about {format_duration(p.prefill_seconds)} at {tps:,.0f} tok/s (an earlier run here)"
            if p.prefill_seconds is not None else "no earlier run here: prefill time is shown after the first chunk")
    print(f"{what}: {n_tokens:,} tokens{more}; memory needed about {format_bytes(p.total_bytes)}{avail} "
          f"({p.breakdown()}); {when}", file=sys.stderr, flush=True)


def _read_inputs(args):
    """The prompt and the documents, read (and the session paths checked) before loading tens of GB,
    so that mistakes fail fast."""
    from . import session as S

    prompt = _read_prompt(args.prompt)
    if prompt is not None and not prompt.strip():
        raise ValueError("the prompt is empty")
    docs = None
    if args.document:
        from .documents import load_documents

        docs = load_documents(args.document)
        print(f"documents: {docs.summary()}", file=sys.stderr)
        for w in docs.warnings:
            print(f"warning: {w}", file=sys.stderr)
    if args.session:
        S.DocumentSession.read_meta(args.session)  # a missing or foreign file
    if args.save_session:
        S.check_save_path(args.save_session)  # an unwritable path
    return prompt, docs


def _long_prefill(n: int, label: str):
    from contextlib import nullcontext

    return _Progress(n, label) if n >= PROGRESS_MIN_TOKENS else nullcontext(None)


def _document_session(model, tok, conv, docs, prompt, args, stop):
    """Prefill the documents (saving them with --save-session) and check that the question fits."""
    from . import session as S

    bits = args.mla_cache_bits
    doc_ids = conv.prompts.document_prefix(docs.render(), args.system_prompt)
    q_ids = conv.prompts.question(prompt, args.system_prompt) if prompt is not None else []
    limit = _context_limit(model)
    if limit and len(doc_ids) + len(q_ids) > limit:
        raise ValueError(f"the documents and prompt are {len(doc_ids) + len(q_ids):,} tokens, longer than "
                         f"the model's context of {limit:,} tokens")
    _plan_report(model, len(doc_ids), args, "documents", extra=len(q_ids))
    if args.save_session:
        from .planner import cache_bytes

        S.check_save_path(args.save_session, cache_bytes(model.config, len(doc_ids), mla_bits=bits or 16,
                                                         page_tokens=0))
    with _long_prefill(len(doc_ids), "documents") as bar:
        sess = S.DocumentSession.create(model, tok, doc_ids, progress=bar, step=args.prefill_step_size,
                                        should_stop=stop, mla_bits=bits)
    if args.save_session:
        path = sess.save(args.save_session, mla_bits=bits)
        print(f"saved session ({len(doc_ids):,} tokens) to {path}", file=sys.stderr, flush=True)
    return sess


def _start_reply(model, tok, prompt, docs, args, stop):
    """(responses, prompt length, document tokens); responses None when there is no prompt."""
    from . import session as S
    from .runtime import CheckpointStore, Conversation

    sampling = dict(max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, top_k=args.top_k,
                    min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.ignore_chat_template:
        ids = _prompt_ids(tok, prompt)
        check_prompt_length(model, len(ids))
        return (lambda bar: stream_generate(model, tok, ids, prefill_step_size=args.prefill_step_size, progress=bar,
                                            should_stop=stop, prompt_cache=model.make_cache(mla_bits=args.mla_cache_bits),
                                            **sampling)), len(ids), 0
    # one question: no checkpoints worth keeping
    conv = Conversation(model, tok, args.system_prompt, store=CheckpointStore(0), mla_bits=args.mla_cache_bits,
                        prefill_step=args.prefill_step_size)
    if docs is not None:
        conv.set_documents(_document_session(model, tok, conv, docs, prompt, args, stop))
    elif args.session:
        sess = S.DocumentSession.load(args.session, model, tok)
        print(f"session: {sess.num_tokens:,} document tokens", file=sys.stderr, flush=True)
        conv.set_documents(sess)
    if prompt is None:
        return None, 0, 0
    from .runtime import Message

    conv.messages.append(Message("user", prompt))
    n_cached = conv.documents.num_tokens if conv.documents is not None else 0
    n = len(conv.prompt_ids()) - n_cached
    check_prompt_length(model, n, n_cached)
    if not n_cached and n >= PROGRESS_MIN_TOKENS:
        _plan_report(model, n, args, "prompt")
    return (lambda bar: conv.reply(progress=bar, should_stop=stop, **sampling)), n, n_cached


def _run(args, stop: _Interrupt) -> int:
    from . import distributed

    if args.prompt == "-" and distributed.launched():
        if os.environ.get("MLX_RANK", "0") != "0":
            return 0  # rank 0 says why and fails (a rank failing first would have mlx.launch kill it)
        raise ValueError("--prompt - can't be used under mlx.launch: it keeps every rank's stdin open, so "
                         "the prompt would never end; pass the text with --prompt \"$(cat FILE)\"")
    pipe = distributed.start(args.split)  # None unless mlx.launch started several ranks
    if pipe is None:
        return _generate(args, stop, lambda: load(args.model))
    if not pipe.leader:  # ranks > 0 hold their layers and follow rank 0's commands
        pipe.load(args.model)
        return pipe.follow()
    try:
        return _generate(args, stop, lambda: pipe.load(args.model))
    finally:
        pipe.close()


def _generate(args, stop: _Interrupt, load_model) -> int:
    prompt, docs = _read_inputs(args)
    model, tok = load_model()
    stop.arm()
    start, n_prompt, n_cached = _start_reply(model, tok, prompt, docs, args, stop)
    if start is None:
        return 0
    pieces, tokens, last = [], [], None
    interrupted = False
    try:
        with _long_prefill(n_prompt, "prompt") as bar:
            gen = start(bar)
            first = next(gen)  # runs the prefill (under the bar)
        for r in _chain(first, gen):
            pieces.append(r.text)
            if r.finish_reason != "stop":  # the end-of-turn token is not part of the answer
                tokens.append(r.token)
            last = r
            if not args.json and r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
    except KeyboardInterrupt:  # second Ctrl-C: stop at once, keep what we have
        interrupted = True
    if last is not None and last.finish_reason == "cancelled":
        interrupted = True

    text = "".join(pieces)
    if args.json:
        out = {"text": text, "tokens": tokens,
               "prompt_tokens": last.prompt_tokens if last else n_prompt,
               "generation_tokens": last.generation_tokens if last else 0,
               "prompt_tps": last.prompt_tps if last else 0.0,
               "generation_tps": last.generation_tps if last else 0.0,
               "peak_memory": last.peak_memory if last else mx.get_peak_memory() / 1e9,
               "finish_reason": (last.finish_reason if last is not None and last.finish_reason
                                 else "cancelled" if interrupted else None)}
        if n_cached:
            out["document_tokens"] = n_cached
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if args.verbose and last is not None:
        _print_stats(last)
    if interrupted:
        print("[interrupted: generation stopped]", file=sys.stderr)
        return 130
    return 0


def _chain(first, rest):
    yield first
    yield from rest


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import ConfigError
    from .distributed.link import PipelineError
    from .documents import DocumentError
    from .planner import PlanError
    from .session import PrefillCancelled, SessionError
    from .tokenizer import TokenizerError
    from .weights import WeightsError

    from ._native import shadowed_package

    if why := shadowed_package():
        print(f"warning: {why}", file=sys.stderr)
    parser = _build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    try:
        sys.stdout.reconfigure(errors="replace")  # never die on a terminal that can't show a character
    except (AttributeError, ValueError):
        pass
    try:
        with _Interrupt() as stop:
            return _run(args, stop)
    except PrefillCancelled as e:
        _err(f"{e}; nothing was generated")
        return 130
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    except PipelineError as e:
        if not e.quiet:  # an error every rank found is said by rank 0 only
            _err(e)
        return 1
    except (ConfigError, WeightsError, TokenizerError, SessionError, DocumentError, PlanError, ModelLoadError) as e:
        _err(e)
        return 1
    except (ValueError, OSError) as e:  # runtime.PromptError is a ValueError
        _err(e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
