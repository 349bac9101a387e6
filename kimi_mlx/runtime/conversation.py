"""A conversation that owns its cache: each turn prefills only what is new.

After every reply two checkpoints are kept: the state after the prompt (with its next-token
logits, so regenerating costs no prefill) and the state after the reply. The next turn's prompt
ids must extend a checkpoint's ids exactly (a reply re-encoded by the chat template can differ
from the sampled tokens); otherwise the longest kept prefix is used, else the documents, else a
full prefill. The system prompt is part of every prefix, so changing it drops the checkpoints;
sampling settings don't touch the cache and keep them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..generate import check_prompt_length, stream_from_logits
from ..sampling import make_logits_processors, make_sampler
from ..session import DocumentSession, ProgressFn, SessionError, model_identity, prefill
from .checkpoints import Checkpoint, CheckpointStore, as_ids
from .prompt import Message, PromptBuilder, as_messages

DEFAULT_SAMPLING = {"max_tokens": 256, "temp": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                    "repetition_penalty": None, "seed": None, "logit_bias": None}


class Conversation:
    """Messages, documents and the checkpoints of one chat with one model.

    store: shared between the conversations of a model (the chat app: one per engine), so memory
    is bounded once; `key` tags this conversation's checkpoints in it.
    """

    def __init__(self, model, tokenizer, system_prompt: Optional[str] = None,
                 documents: Optional[DocumentSession] = None, store: Optional[CheckpointStore] = None,
                 key: Optional[str] = None, mla_bits: Optional[int] = None, prefill_step: int = 2048):
        from ..settings import settings

        self.model, self.tokenizer = model, tokenizer
        self.prompts = PromptBuilder(tokenizer)
        self._system = system_prompt or None
        self.documents = documents
        self.store = store if store is not None else CheckpointStore(settings().checkpoint_bytes)
        self.key = key if key is not None else f"conversation-{id(self)}"
        self.mla_bits, self.prefill_step = mla_bits, prefill_step
        self.messages: list[Message] = []
        self.reused_tokens = 0  # of the last turn: taken from a checkpoint
        self.prefilled_tokens = 0  # of the last turn: run through the model before the reply

    # -- prompt ------------------------------------------------------------
    @property
    def system_prompt(self) -> Optional[str]:
        return self._system

    def set_system_prompt(self, system_prompt: Optional[str]) -> None:
        """A new system prompt changes every prefix: this conversation's checkpoints go."""
        system_prompt = system_prompt or None
        if system_prompt != self._system:
            self._system = system_prompt
            self.store.drop(self.key)

    def set_documents(self, documents: Optional[DocumentSession]) -> None:
        if documents is not self.documents:
            self.documents = documents
            self.store.drop(self.key)
            self.store.held_elsewhere(self.key, documents.cache if documents is not None else None)

    def prompt_ids(self, messages: Optional[Sequence] = None) -> list[int]:
        """Ids of `messages` (default: this conversation's) after the system prompt and the documents."""
        msgs = as_messages(self.messages if messages is None else messages)
        if self._system:
            msgs = [Message("system", self._system)] + msgs
        if self.documents is None:
            return self.prompts.chat(msgs)
        return list(self.documents.tokens) + self.prompts.chat(msgs, after_documents=True)

    # -- turns -------------------------------------------------------------
    def send(self, text: str, **kw) -> Iterator:
        """Add a user message and stream the reply (see `reply`)."""
        self.messages.append(Message("user", text))
        return self.reply(**kw)

    def regenerate(self, **kw) -> Iterator:
        """Drop the last reply and answer its question again (from the checkpoint before it)."""
        while self.messages and self.messages[-1].role == "assistant":
            self.messages.pop()
        if not self.messages:
            raise ValueError("nothing to regenerate")
        return self.reply(**kw)

    def edit_last(self, text: str, **kw) -> Iterator:
        """Replace the last user message (and what followed it) with `text` and answer it."""
        last = max((i for i, m in enumerate(self.messages) if m.role == "user"), default=None)
        if last is None:
            raise ValueError("no user message to edit")
        del self.messages[last:]
        return self.send(text, **kw)

    def respond(self, messages: Sequence, **kw) -> Iterator:
        """Take `messages` (the system prompt excluded) as the conversation and stream the reply to them.
        Replies this conversation generated keep their sampled token ids where the text is unchanged."""
        msgs = [m if m.ids is None or self._ids_say(m) else Message(m.role, m.content) for m in as_messages(messages)]
        for i, (old, new) in enumerate(zip(self.messages, msgs)):
            if old.ids is not None and new.ids is None and old == new:
                msgs[i] = old
        self.messages = msgs
        return self.reply(**kw)

    def _ids_say(self, m: Message) -> bool:
        """Ids handed in (e.g. stored with a chat) are used only if they are tokens that spell the text."""
        try:
            return all(0 <= int(t) < self.tokenizer.vocab_size for t in m.ids) and self.tokenizer.decode(
                [int(t) for t in m.ids]) == m.content
        except (TypeError, ValueError, KeyError, IndexError):
            return False

    def reply(self, progress: Optional[ProgressFn] = None, should_stop: Optional[Callable[[], bool]] = None,
              ids: Optional[Sequence[int]] = None, keep_at: Sequence[int] = (), **sampling) -> Iterator:
        """Stream the reply to the messages (GenerationResponse per token, see generate.stream_generate);
        when it ends the reply is appended to the messages and the states kept as checkpoints.
        Each response's `cached_tokens` is the part of the prompt taken from a checkpoint.

        ids: the prompt's token ids as given (a server's request) instead of `prompt_ids()`.
        keep_at: prompt lengths whose states are kept as checkpoints too on the way (e.g. where messages
        begin), so a later prompt that shares only that much continues from there."""
        opts = {**DEFAULT_SAMPLING, **sampling}
        if opts["max_tokens"] < 1:
            raise ValueError(f"max_tokens must be >= 1, got {opts['max_tokens']}")
        ids = self.prompt_ids() if ids is None else [int(t) for t in ids]
        arr = as_ids(ids)
        cache, logits, reused = self._start(arr)
        new = ids[reused:]
        check_prompt_length(self.model, max(len(new), 1), reused)
        sampler = make_sampler(temp=opts["temp"], top_p=opts["top_p"], top_k=opts["top_k"], min_p=opts["min_p"],
                               seed=opts["seed"])
        processors = make_logits_processors(opts["repetition_penalty"], logit_bias=opts["logit_bias"])
        self.reused_tokens, self.prefilled_tokens = reused, len(new)
        keep = sorted({int(k) for k in keep_at if reused < int(k) < len(ids)})
        return self._stream(ids, arr, cache, logits, new, sampler, processors, opts["max_tokens"], progress,
                            should_stop, keep)

    def _start(self, ids: np.ndarray):
        """(cache to continue, its logits or None, tokens it holds) for a prompt of `ids`."""
        ckpt = self.store.best(ids)
        docs = self.documents
        if docs is not None and (ckpt is None or ckpt.num_tokens < docs.num_tokens):
            if ckpt is None and not np.array_equal(ids[:docs.num_tokens], as_ids(docs.tokens)):
                raise SessionError("the prompt does not start with the documents")
            return docs.fork(), None, docs.num_tokens
        if ckpt is None:
            return self.model.make_cache(mla_bits=self.mla_bits), None, 0
        return ckpt.cache.copy(), ckpt.logits, ckpt.num_tokens

    def _stream(self, ids, arr, cache, logits, new, sampler, processors, max_tokens, progress, should_stop,
                keep=()):
        tic = time.perf_counter()
        base = cache.offset  # the prompt's tokens before `new`
        for end in keep:  # prefill to each kept length (its MLA segment ends there: shared, never copied)
            done = cache.offset - base
            cache = prefill(self.model, new[done:end - base], cache, step=self.prefill_step,
                            progress=_offset_progress(progress, done, len(new)), should_stop=should_stop)
            self.store.add(Checkpoint(arr[:end].copy(), cache.copy(), None, self.key))
        cache.reserve(len(ids) + max_tokens)
        if new:
            done = cache.offset - base
            cache, logits = prefill(self.model, new[done:], cache, step=self.prefill_step,
                                    progress=_offset_progress(progress, done, len(new)), should_stop=should_stop,
                                    return_logits=True)
        self.store.add(Checkpoint(arr, cache.copy(), logits, self.key))
        start = cache.offset
        tokens, text, finish = [], [], None
        try:
            for r in stream_from_logits(self.model, self.tokenizer, cache, logits, ids, sampler, processors,
                                        max_tokens, should_stop, prompt_tokens=len(new), tic=tic):
                r.cached_tokens = start - len(new)
                tokens.append(r.token)
                text.append(r.text)
                finish = r.finish_reason
                yield r
        finally:  # also when the consumer stops early: what was generated is kept
            self._keep_reply(arr, cache, start, tokens, "".join(text), finish)

    def _keep_reply(self, arr, cache, start, tokens, reply, finish) -> None:
        # the cache holds the sampled tokens the model was fed (all but the last when max_tokens ran out)
        fed = tokens[:cache.offset - start]
        if fed:
            self.store.add(Checkpoint(np.concatenate([arr, as_ids(fed)]), cache, None, self.key))
        if reply or finish not in ("cancelled", None):
            content_ids = tokens[:-1] if finish == "stop" else tokens  # the end-of-turn token is the template's
            self.messages.append(Message("assistant", reply, tuple(content_ids)))

    # -- memory and files -----------------------------------------------------
    @property
    def checkpoint_bytes(self) -> int:
        return self.store.nbytes

    def last_checkpoint(self) -> Optional[Checkpoint]:
        return self.store.latest(self.key)

    def save(self, path: str | Path) -> Optional[Path]:
        """Write the last checkpoint in the document-session format (atomic, checksummed); None if there is none."""
        ckpt = self.last_checkpoint()
        if ckpt is None:
            return None
        sess = DocumentSession(ckpt.ids.tolist(), ckpt.cache, model_identity(self.model), self.tokenizer.sha256)
        docs = self.documents
        if docs is not None and not np.array_equal(ckpt.ids[:docs.num_tokens], as_ids(docs.tokens)):
            docs = None
        return sess.save(path, mla_bits=self.mla_bits, base=docs)  # with documents: only what follows them

    def restore(self, path: str | Path) -> Optional[Checkpoint]:
        """Keep the checkpoint saved at `path` (see `save`), to continue from it. SessionError if the file
        is damaged, from another model or tokenizer, or continues other documents."""
        sess = DocumentSession.load(path, self.model, self.tokenizer, base=self.documents)
        return self.store.add(Checkpoint(as_ids(sess.tokens), sess.cache, None, self.key))


def _offset_progress(progress: Optional[ProgressFn], done: int, total: int) -> Optional[ProgressFn]:
    """A prefill's progress reported as part of a longer one (`done` of `total` tokens before it)."""
    if progress is None or not done:
        return progress
    return lambda d, t, tps, eta: progress(done + d, total, tps, eta)
