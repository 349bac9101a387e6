"""Chunked prefill and saved document sessions.

A document session is the complete model state after the documents: KDA recurrent and
conv states plus the MLA latent caches. KDA state can't be rewound, so every question
starts from an in-memory snapshot (`fork()`), and N questions cost one prefill.

File format (one safetensors file, written atomically): tensors `tokens` (int32) and
`L{i}.{name}` per layer; metadata `kimi_mlx_session` = JSON with the format version,
model identity, tokenizer hash, token count, token hash and a sha256 per tensor.

    python -m kimi_mlx.session info FILE
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from . import planner
from .cache import KimiCache, MLACache, dequantize_rows, quantize_rows

FORMAT_VERSION = 1
_META_KEY = "kimi_mlx_session"
_SENTINEL = "\ue000kimi-doc\ue001"  # private-use marker to split the rendered chat template


class SessionError(ValueError):
    pass


class PrefillCancelled(Exception):
    def __init__(self, done: int, total: int):
        super().__init__(f"prefill cancelled after {done} of {total} tokens")
        self.done, self.total = done, total


# ---------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------
ProgressFn = Callable[[int, int, float, float], None]  # (done, total, tokens/s, eta seconds)


def prefill(model, ids, cache: KimiCache | None = None, step: int = 2048, progress: ProgressFn | None = None,
            should_stop: Callable[[], bool] | None = None, return_logits: bool = False):
    """Run `ids` through the model in chunks of `step` tokens, growing `cache`.

    Temporaries are released between chunks (each chunk is evaluated before the next), so
    memory grows only with the MLA latent cache. On cancel, the cache holds exactly the
    chunks that finished (`cache.offset`), and PrefillCancelled is raised.
    Returns the cache, or (cache, logits of the last position) with return_logits.
    """
    if step < 1:
        raise ValueError("prefill step must be >= 1")
    ids = list(ids) if not isinstance(ids, list) else ids
    cache = cache if cache is not None else model.make_cache()
    total, done, t0 = len(ids), 0, time.perf_counter()
    logits = None
    for start in range(0, total, step):
        if should_stop is not None and should_stop():
            raise PrefillCancelled(done, total)
        chunk = mx.array(ids[start:start + step], dtype=mx.int32)[None]
        last = start + step >= total
        if last and return_logits:
            logits = model(chunk, cache=cache, last_n=1)[:, -1]
            mx.eval(logits)
            cache.eval()
        else:
            model.model(chunk, cache)  # hidden states only: no [T, vocab] logits
            cache.eval()
        mx.clear_cache()
        done += chunk.shape[1]
        if progress is not None:
            dt = max(time.perf_counter() - t0, 1e-9)
            tps = done / dt
            progress(done, total, tps, (total - done) / tps if tps > 0 else float("inf"))
    if total >= planner.SPEED_MIN_TOKENS:
        planner.record_prefill_speed(speed_key(model), total, time.perf_counter() - t0)
    return (cache, logits) if return_logits else cache


def speed_key(model) -> str:
    """Model identity plus device: the key of remembered prefill speeds."""
    ident = getattr(model, "_kimi_identity", None)
    if ident is None:
        ident = model_identity(model)
        try:
            model._kimi_identity = ident
        except AttributeError:
            pass
    return f"{ident}:{mx.default_device()}"


# ---------------------------------------------------------------------------
# prompt layout: documents always first, so their state is a true prefix
# ---------------------------------------------------------------------------
def _template_halves(tokenizer, system_prompt: str | None) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat template before and after the user message.

    Rendered with a marker as the user message and split on the marker's ids, so that the
    template's own special tokens stay special while a system prompt stays plain text.
    """
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    msgs.append({"role": "user", "content": _SENTINEL})
    ids = list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    mark = tokenizer.encode(_SENTINEL)
    hits = [i for i in range(len(ids) - len(mark) + 1) if ids[i:i + len(mark)] == mark]
    if len(hits) != 1:
        raise SessionError("the chat template does not place the user message exactly once")
    return ids[:hits[0]], ids[hits[0] + len(mark):]


def document_prompt(tokenizer, doc_text: str, system_prompt: str | None = None) -> list[int]:
    """Tokens of the chat prefix and the documents; any question's tokens follow these unchanged."""
    before, _ = _template_halves(tokenizer, system_prompt)
    return before + tokenizer.encode(doc_text + "\n\n")


def question_prompt(tokenizer, question: str, system_prompt: str | None = None) -> list[int]:
    """The rest of the user turn after the documents, and the generation prompt."""
    _, after = _template_halves(tokenizer, system_prompt)
    return tokenizer.encode(question) + after


# ---------------------------------------------------------------------------
# identity
# ---------------------------------------------------------------------------
def model_identity(model) -> str:
    """Hash of the architecture, parameter shapes/dtypes and a sample of the weights."""
    from mlx.utils import tree_flatten

    h = hashlib.sha256()
    raw = getattr(model.config, "raw", {}) or {}
    keep = {k: v for k, v in raw.items() if k not in ("transformers_version", "_name_or_path", "torch_dtype", "dtype")}
    h.update(json.dumps(keep, sort_keys=True, default=str).encode())
    params = tree_flatten(model.parameters())
    for name, a in params:
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype}".encode())
    for name, a in params:
        if name.endswith(("embed_tokens.weight", "lm_head.weight", "model.norm.weight")):
            sample = a[:2] if a.ndim > 1 else a
            h.update(np.array(sample.astype(mx.float32)).tobytes())
    return h.hexdigest()[:32]


def _tokens_hash(tokens: list[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def _array_hash(a: mx.array) -> str:
    return hashlib.sha256(memoryview(np.array(a.view(mx.uint8) if a.dtype == mx.bfloat16 else a))).hexdigest()


# ---------------------------------------------------------------------------
# session
# ---------------------------------------------------------------------------
@dataclass
class DocumentSession:
    tokens: list[int]
    cache: KimiCache
    model_id: str
    tokenizer_hash: str

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def fork(self) -> KimiCache:
        """A copy of the snapshot to continue from; the snapshot itself is never modified."""
        return self.cache.copy()

    @classmethod
    def create(cls, model, tokenizer, doc_ids: list[int], progress: ProgressFn | None = None, step: int = 2048,
               should_stop=None, mla_bits: int | None = None) -> "DocumentSession":
        cache = prefill(model, doc_ids, model.make_cache(mla_bits=mla_bits), step=step, progress=progress,
                        should_stop=should_stop)
        return cls(list(doc_ids), cache, model_identity(model), tokenizer.sha256)

    # -- save ---------------------------------------------------------------
    def save(self, path: str | os.PathLike, mla_bits: int | None = None) -> Path:
        """Write atomically (temp file + rename). mla_bits=8 stores the latent cache at 8 bits."""
        path = Path(path)
        arrays: dict[str, mx.array] = {"tokens": mx.array(np.asarray(self.tokens, dtype=np.int32))}
        layers = []
        for i, c in enumerate(self.cache):
            entry = {"kind": c.kind, "offset": c.offset}
            if isinstance(c, MLACache):
                entry["bits"] = c.bits
                a = c.arrays()
                if a and (mla_bits == 8 or c.bits == 8):
                    q = quantize_rows(a["kv"], c.group_size)
                    a = {"kv_q": q["wq"], "kv_scales": q["scales"], "kv_biases": q["biases"]}
                    entry.update(stored_bits=8, shape=list(q["shape"]), dtype=str(q["dtype"]), group_size=c.group_size)
            else:
                a = c.arrays()
            for k, v in a.items():
                arrays[f"L{i}.{k}"] = v
            layers.append(entry)
        mx.eval(list(arrays.values()))
        meta = {
            "version": FORMAT_VERSION, "model_id": self.model_id, "tokenizer_hash": self.tokenizer_hash,
            "num_tokens": len(self.tokens), "tokens_sha256": _tokens_hash(self.tokens), "layers": layers,
            "sha256": {k: _array_hash(v) for k, v in arrays.items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            mx.save_safetensors(tmp, arrays, metadata={_META_KEY: json.dumps(meta)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # -- load ---------------------------------------------------------------
    @staticmethod
    def read_meta(path: str | os.PathLike) -> dict:
        from .weights import WeightsError, read_safetensors_header

        path = Path(path)
        if not path.exists():
            raise SessionError(f"{path}: session file not found")
        try:
            header = read_safetensors_header(path)
        except WeightsError as e:
            raise SessionError(f"{e} (not a complete kimi_mlx session file)") from None
        try:
            meta = json.loads(header["__metadata__"][_META_KEY])
        except (KeyError, TypeError, json.JSONDecodeError):
            raise SessionError(f"{path}: not a kimi_mlx session file (no session metadata)") from None
        if meta.get("version") != FORMAT_VERSION:
            raise SessionError(f"{path}: session format version {meta.get('version')} is not supported "
                               f"(this kimi_mlx reads version {FORMAT_VERSION})")
        return meta

    @classmethod
    def load(cls, path: str | os.PathLike, model, tokenizer) -> "DocumentSession":
        path = Path(path)
        meta = cls.read_meta(path)
        mid = model_identity(model)
        if meta["model_id"] != mid:
            raise SessionError(f"{path}: saved with a different model (model id {meta['model_id']}, loaded {mid})")
        if meta["tokenizer_hash"] != tokenizer.sha256:
            raise SessionError(f"{path}: saved with a different tokenizer")
        if len(meta["layers"]) != len(model.layers):
            raise SessionError(f"{path}: has {len(meta['layers'])} layers, the model has {len(model.layers)}")
        try:
            arrays = mx.load(str(path), format="safetensors")
        except Exception as e:
            raise SessionError(f"{path}: cannot be read ({e})") from None
        for k, want in meta["sha256"].items():
            if k not in arrays or _array_hash(arrays[k]) != want:
                raise SessionError(f"{path}: corrupt: tensor '{k}' fails its checksum")
        tokens = np.array(arrays["tokens"]).tolist()
        if len(tokens) != meta["num_tokens"] or _tokens_hash(tokens) != meta["tokens_sha256"]:
            raise SessionError(f"{path}: corrupt: token ids do not match their hash")
        cache = model.make_cache()
        for i, (entry, layer) in enumerate(zip(meta["layers"], model.layers)):
            if (entry["kind"] == "mla") != layer.is_mla:
                raise SessionError(f"{path}: layer {i} kind '{entry['kind']}' does not match the model")
            a = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"L{i}.")}
            if entry.get("stored_bits") == 8:
                a = {"kv": dequantize_rows({"wq": a["kv_q"], "scales": a["kv_scales"], "biases": a["kv_biases"],
                                            "shape": tuple(entry["shape"]), "group_size": entry["group_size"],
                                            "bits": 8, "dtype": getattr(mx, entry["dtype"].split(".")[-1])})}
            if entry["kind"] == "mla":
                cache[i] = MLACache(bits=entry.get("bits"))
            cache[i].load_arrays(a, entry["offset"])
        if cache.offset != len(tokens):
            raise SessionError(f"{path}: corrupt: cache holds {cache.offset} tokens, the session lists {len(tokens)}")
        return cls(tokens, cache, mid, tokenizer.sha256)


def info(path: str | os.PathLike) -> str:
    meta = DocumentSession.read_meta(path)
    size = Path(path).stat().st_size
    mla = [l for l in meta["layers"] if l["kind"] == "mla"]
    lines = [
        f"session:        {path}",
        f"format version: {meta['version']}",
        f"tokens:         {meta['num_tokens']:,}",
        f"file size:      {size / 1e6:,.1f} MB",
        f"layers:         {len(meta['layers'])} ({len(mla)} MLA, {len(meta['layers']) - len(mla)} KDA)",
        f"MLA cache:      {'8-bit' if any(l.get('stored_bits') == 8 for l in mla) else 'full precision'}",
        f"model id:       {meta['model_id']}",
        f"tokenizer hash: {meta['tokenizer_hash'][:32]}",
        f"tokens sha256:  {meta['tokens_sha256'][:32]}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kimi_mlx.session", description="Inspect saved document sessions")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="print what a session file holds")
    pi.add_argument("file")
    args = p.parse_args(argv)
    try:
        print(info(args.file))
    except SessionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
