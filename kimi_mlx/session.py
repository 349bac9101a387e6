"""Chunked prefill and saved document sessions.

A document session is the complete model state after the documents: KDA recurrent and
conv states plus the MLA latent caches. KDA state can't be rewound, so every question
starts from an in-memory snapshot (`fork()`), and N questions cost one prefill.

File format (one safetensors file, written atomically): tensors `tokens` (int32) and
`L{i}.{name}` per layer; metadata `kimi_mlx_session` = JSON with the format version,
model identity (format 2: a digest of every weight file's bytes and the config), tokenizer
hash, token count, token hash and a sha256 per tensor. A session that continues another (a chat after
its documents: `save(..., base=documents)`) holds only the MLA rows after the base's tokens, and
names the base by its token count and hash; `load` then needs that base.

    python -m kimi_mlx.session info FILE
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
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

FORMAT_VERSION = 2  # 2: the model id covers every weight byte (1 hashed a sample: refused)
_META_KEY = "kimi_mlx_session"


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


class PrefillEta:
    """Remaining prefill time from the chunks timed so far.

    Time per token grows with depth (the MLA layers attend to the whole prefix), so a plain
    tokens/s extrapolation is far too low for long inputs. Model: t(x) = a + b*x seconds per
    token at depth x. The slope b is a least-squares fit over the chunks so far (the first, which
    carries the warm-up, is left out once there are two others); the level comes from the most
    recent chunks, so a machine that slows down or speeds up is followed. The estimate integrates
    t over the remaining depth.
    """

    def __init__(self, recent: int = 4):
        self.recent = recent
        self.chunks: list[tuple[float, float, float]] = []  # (mid depth, tokens, seconds)

    def add(self, start: int, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self.chunks.append((start + tokens / 2, float(tokens), max(seconds, 0.0)))

    def per_token(self) -> tuple[float, float]:
        """(a, b) of t(x) = a + b*x."""
        obs = self.chunks[1:] if len(self.chunks) > 2 else self.chunks
        w = sum(n for _, n, _ in obs)
        mx_ = sum(n * x for x, n, _ in obs) / w
        my = sum(sec for _, _, sec in obs) / w  # token-weighted mean of sec/n
        var = sum(n * (x - mx_) ** 2 for x, n, _ in obs)
        cov = sum(n * (x - mx_) * (sec / n - my) for x, n, sec in obs)
        b = max(cov / var, 0.0) if var > 0 else 0.0
        recent = obs[-self.recent:]
        wr = sum(n for _, n, _ in recent)
        xr = sum(n * x for x, n, _ in recent) / wr
        yr = sum(sec for _, _, sec in recent) / wr
        return yr - b * xr, b

    def eta(self, done: int, total: int) -> float:
        if done >= total:
            return 0.0
        if not self.chunks:
            return math.inf
        a, b = self.per_token()
        return max(a * (total - done) + b * (total * total - done * done) / 2, 0.0)


def prefill(model, ids, cache: KimiCache | None = None, step: int = 2048, progress: ProgressFn | None = None,
            should_stop: Callable[[], bool] | None = None, return_logits: bool = False):
    """Run `ids` through the model in chunks of `step` tokens, growing `cache`.

    Temporaries are released between chunks (each chunk is evaluated before the next), so
    memory grows only with the MLA latent cache. On cancel, the cache holds exactly the
    chunks that finished (`cache.offset`), and PrefillCancelled is raised.
    Returns the cache, or (cache, logits of the last position) with return_logits.
    progress(done, total, mean tokens/s, eta seconds) after each chunk (eta: see PrefillEta).
    """
    if step < 1:
        raise ValueError("prefill step must be >= 1")
    ids = list(ids) if not isinstance(ids, list) else ids
    cache = cache if cache is not None else model.make_cache()
    total, done, t0 = len(ids), 0, time.perf_counter()
    if hasattr(cache, "reserve"):  # one MLA segment for the whole prompt
        cache.reserve(cache.offset + total)
    depth0 = cache.offset  # a continued cache: attention already spans what it holds
    eta = PrefillEta()
    logits = None
    for start in range(0, total, step):
        if should_stop is not None and should_stop():
            raise PrefillCancelled(done, total)
        t_chunk = time.perf_counter()
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
        now = time.perf_counter()
        eta.add(depth0 + start, chunk.shape[1], now - t_chunk)
        if progress is not None:
            tps = done / max(now - t0, 1e-9)
            progress(done, total, tps, eta.eta(depth0 + done, depth0 + total))
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
# identity
# ---------------------------------------------------------------------------
def model_identity(model) -> str:
    """Which model a session belongs to: for a loaded checkpoint, the digest of every weight file's
    bytes and of its config (weights.weights_identity, set by load_model); for a model built in
    code, the digest of every parameter and the config."""
    ident = getattr(model, "weights_identity", None)
    if isinstance(ident, str):
        return ident
    from mlx.utils import tree_flatten

    h = hashlib.sha256(b"kimi-mlx-params-v1\0")
    raw = getattr(model.config, "raw", {}) or {}
    keep = {k: v for k, v in raw.items() if k not in ("transformers_version", "_name_or_path")}
    h.update(json.dumps(keep, sort_keys=True, default=str).encode())
    for name, a in tree_flatten(model.parameters()):
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype}".encode())
        h.update(_array_bytes(a))
    return h.hexdigest()[:32]


def _tokens_hash(tokens: list[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def _array_bytes(a: mx.array) -> memoryview:
    return memoryview(np.ascontiguousarray(np.array(a.view(mx.uint8) if a.dtype == mx.bfloat16 else a)))


def _array_hash(a: mx.array) -> str:
    return hashlib.sha256(_array_bytes(a)).hexdigest()


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------
# temporaries of save(): ".<name>.tmp-<pid>-<random>.safetensors", removed once their writer is gone
_TMP_PATTERN = r"\..+\.tmp-(?P<pid>\d+)-[^/]*\.safetensors"


def _free_text(d: Path) -> str:
    try:
        return f"{shutil.disk_usage(d).free / 1e6:,.1f} MB free in {d}"
    except OSError:
        return f"free space in {d} unknown"


def check_save_path(path: str | os.PathLike, nbytes: int | None = None) -> Path:
    """SessionError now, rather than after a long prefill, if a session could not be written to
    `path` (a directory, no permission, or less than `nbytes` free). Also removes temporaries
    that killed runs left in its directory."""
    from .weights import stale_temporaries

    path = Path(path)
    if path.is_dir():
        raise SessionError(f"{path}: is a directory; give a file name for the session")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SessionError(f"{path}: cannot create its directory ({e.strerror or e})") from None
    for stale in stale_temporaries(path.parent, _TMP_PATTERN):
        stale.unlink(missing_ok=True)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=".safetensors",
                                     dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SessionError(f"{path}: cannot write there ({e.strerror or e})") from None
    if nbytes is not None:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        if free is not None and free < nbytes:
            raise SessionError(f"{path}: not enough disk space for the session (needs about "
                               f"{nbytes / 1e6:,.1f} MB, {_free_text(path.parent)})")
    return path


_HEX64 = re.compile(r"[0-9a-f]{64}")
_DTYPES = ("float32", "float16", "bfloat16")


def _check_meta(path: Path, meta, header: dict) -> None:
    """Every field save() writes, with its type and the relations between them."""
    def bad(what: str):
        raise SessionError(f"{path}: corrupt session metadata: {what}")

    if not isinstance(meta, dict):
        bad("not a JSON object")
    version = meta.get("version")
    if version == 1:
        raise SessionError(f"{path}: saved by an older kimi_mlx (session format 1), whose model check sampled "
                           "only a few weights; recreate the session from its documents")
    if version != FORMAT_VERSION:
        raise SessionError(f"{path}: session format version {version!r} is not supported "
                           f"(this kimi_mlx reads version {FORMAT_VERSION})")
    for key in ("model_id", "tokenizer_hash"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            bad(f"'{key}' is missing or not a string")
    n = meta.get("num_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        bad(f"'num_tokens' is {n!r}, not a positive integer")
    if not isinstance(meta.get("tokens_sha256"), str) or not _HEX64.fullmatch(meta["tokens_sha256"]):
        bad("'tokens_sha256' is missing or not a sha256")
    base = meta.get("base")
    if base is not None and (not isinstance(base, dict) or not _is_count(base.get("num_tokens"))
                             or base["num_tokens"] > n or not isinstance(base.get("tokens_sha256"), str)
                             or not _HEX64.fullmatch(base["tokens_sha256"])):
        bad("'base' is not a token count within the session and a sha256")
    rows = n - (base["num_tokens"] if base else 0)  # MLA rows the file holds
    tensors = {k for k in header if k != "__metadata__"}
    sums = meta.get("sha256")
    if not isinstance(sums, dict) or not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in sums.values()):
        bad("'sha256' is missing or not an object of sha256 digests")
    if set(sums) != tensors or "tokens" not in tensors:
        unchecked = sorted(tensors - set(sums)) or sorted(set(sums) - tensors) or ["tokens"]
        bad(f"the checksums don't match the file's tensors (e.g. '{unchecked[0]}')")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        bad("'layers' is missing or not a list")
    split = meta.get("split")
    if split is not None and (not isinstance(split, list) or len(split) < 2 or not all(_is_count(c) for c in split)
                              or sum(split) != len(layers)):
        bad("'split' is not a count of layers per rank")
    for i, e in enumerate(layers):
        if not isinstance(e, dict) or e.get("kind") not in ("kda", "mla"):
            bad(f"layer {i} has no kind 'kda' or 'mla'")
        if e.get("offset") != n or isinstance(e.get("offset"), bool):
            bad(f"layer {i} holds {e.get('offset')!r} tokens, the session lists {n}")
        if e["kind"] == "mla" and e.get("bits") not in (None, 8):
            bad(f"layer {i} has MLA cache bits {e.get('bits')!r}")
        if "stored_bits" in e:
            shape, gs = e.get("shape"), e.get("group_size")
            if (e["stored_bits"] != 8 or e["kind"] != "mla" or str(e.get("dtype")).split(".")[-1] not in _DTYPES
                    or not isinstance(gs, int) or gs < 1 or not isinstance(shape, list) or len(shape) != 3
                    or not all(isinstance(d, int) and d >= 1 for d in shape) or shape[1] != rows):
                bad(f"layer {i} has an invalid 8-bit cache description")


def _split_text(split) -> str:
    return f"a pipeline of {len(split)} ranks (--split {','.join(map(str, split))})" if split else "one process"


def _check_split(path: Path, saved, running) -> None:
    """A session is resumed by the same split of the layers as saved it (its caches are per rank)."""
    if (saved or None) == (list(running) if running else None):
        return
    fix = (f"resume it under mlx.launch -n {len(saved)} with --split {','.join(map(str, saved))}" if saved
           else "resume it without mlx.launch")
    raise SessionError(f"{path}: saved by {_split_text(saved)}, but this run is {_split_text(running)}; {fix}")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_layer_arrays(path: Path, i: int, entry: dict, a: dict, rows: int) -> None:
    """The tensors of layer i are the ones its kind stores, for the `rows` MLA rows the file holds."""
    if entry["kind"] == "kda":
        want = {"conv", "state"}
    elif not rows:
        want = set()
    else:
        want = {"kv_q", "kv_scales", "kv_biases"} if entry.get("stored_bits") == 8 else {"kv"}
    if set(a) != want:
        raise SessionError(f"{path}: corrupt: layer {i} holds tensors {sorted(a)}, expected {sorted(want)}")
    if entry["kind"] == "mla" and "kv" in a and (a["kv"].ndim != 3 or a["kv"].shape[1] != rows):
        raise SessionError(f"{path}: corrupt: layer {i} caches {tuple(a['kv'].shape)} rows for {rows} tokens")


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
    def save(self, path: str | os.PathLike, mla_bits: int | None = None,
             base: "DocumentSession | None" = None) -> Path:
        """Write atomically (temp file + rename). mla_bits=8 stores the latent cache at 8 bits.
        base: a session whose tokens start these (the documents of a chat): only the MLA rows after
        them are written, and `load` needs that base.

        SessionError (one line) when it can't be written, e.g. a full disk; nothing is left behind."""
        path = Path(path)
        base_n = base.num_tokens if base is not None else 0
        if base is not None and list(self.tokens[:base_n]) != list(base.tokens):
            raise ValueError("the base session's tokens don't start this session")
        arrays: dict[str, mx.array] = {"tokens": mx.array(np.asarray(self.tokens, dtype=np.int32))}
        layers = []
        # a pipeline's cache (kimi_mlx.distributed): the other ranks' layers fetched to this one
        cache = self.cache.gathered() if hasattr(self.cache, "gathered") else self.cache
        for i, c in enumerate(cache):
            entry = {"kind": c.kind, "offset": c.offset}
            if isinstance(c, MLACache):
                entry["bits"] = c.bits
                a = c.arrays()
                if a and base_n:
                    a = {"kv": a["kv"][:, base_n:]} if c.offset > base_n else {}
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
        if base is not None:
            meta["base"] = {"num_tokens": base_n, "tokens_sha256": _tokens_hash(base.tokens)}
        if getattr(self.cache, "split", None):
            meta["split"] = list(self.cache.split)  # layers per rank of the pipeline that saved it
        check_save_path(path, sum(v.nbytes for v in arrays.values()) + 2**16)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            mx.save_safetensors(tmp, arrays, metadata={_META_KEY: json.dumps(meta)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # mlx: RuntimeError "[write] Unable to write ..."
            Path(tmp).unlink(missing_ok=True)
            why = getattr(e, "strerror", None) or " ".join(str(e).split())
            if isinstance(e, RuntimeError) or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                why = f"{why}; {_free_text(path.parent)}"
            raise SessionError(f"{path}: cannot write the session ({why}); nothing was written") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # -- load ---------------------------------------------------------------
    @staticmethod
    def read_meta(path: str | os.PathLike) -> dict:
        """The session's metadata, checked field by field; SessionError naming the file otherwise."""
        from .weights import WeightsError, read_safetensors_header

        path = Path(path)
        if not path.exists():
            raise SessionError(f"{path}: session file not found")
        if path.is_dir():
            raise SessionError(f"{path}: is a directory, not a session file")
        try:
            header = read_safetensors_header(path)
        except WeightsError as e:
            raise SessionError(f"{e} (not a complete kimi_mlx session file)") from None
        except OSError as e:
            raise SessionError(f"{path}: cannot be read ({e.strerror or e})") from None
        try:
            meta = json.loads(header["__metadata__"][_META_KEY])
        except (KeyError, TypeError, json.JSONDecodeError):
            raise SessionError(f"{path}: not a kimi_mlx session file (no session metadata)") from None
        _check_meta(path, meta, header)
        return meta

    @classmethod
    def load(cls, path: str | os.PathLike, model, tokenizer, base: "DocumentSession | None" = None) -> "DocumentSession":
        """base: the session a file saved with `save(..., base=)` continues (else ignored)."""
        path = Path(path)
        meta = cls.read_meta(path)
        want = meta.get("base")
        if want is not None and base is None:
            raise SessionError(f"{path}: continues a document session; open it together with its documents")
        if want is not None and (base.num_tokens != want["num_tokens"]
                                 or _tokens_hash(base.tokens) != want["tokens_sha256"]):
            raise SessionError(f"{path}: continues other documents than the ones given")
        base = base if want is not None else None
        mid = model_identity(model)
        if meta["model_id"] != mid:
            raise SessionError(f"{path}: saved with a different model (model id {meta['model_id']}, loaded {mid})")
        if meta["tokenizer_hash"] != tokenizer.sha256:
            raise SessionError(f"{path}: saved with a different tokenizer")
        if len(meta["layers"]) != len(model.layers):
            raise SessionError(f"{path}: has {len(meta['layers'])} layers, the model has {len(model.layers)}")
        _check_split(path, meta.get("split"), getattr(model, "split", None))
        try:
            arrays = mx.load(str(path), format="safetensors")
        except Exception as e:
            raise SessionError(f"{path}: cannot be read ({e})") from None
        for k, want in meta["sha256"].items():  # read_meta checked these are exactly the file's tensors
            if k not in arrays or _array_hash(arrays[k]) != want:
                raise SessionError(f"{path}: corrupt: tensor '{k}' fails its checksum")
        tokens = np.array(arrays["tokens"]).reshape(-1).tolist()
        if len(tokens) != meta["num_tokens"] or _tokens_hash(tokens) != meta["tokens_sha256"]:
            raise SessionError(f"{path}: corrupt: token ids do not match their hash")
        if base is not None and tokens[:base.num_tokens] != list(base.tokens):
            raise SessionError(f"{path}: corrupt: its tokens don't start with its documents'")
        rows = len(tokens) - (base.num_tokens if base is not None else 0)
        cache = model.make_cache()
        for i, (entry, layer) in enumerate(zip(meta["layers"], model.layers)):
            if (entry["kind"] == "mla") != layer.is_mla:
                raise SessionError(f"{path}: layer {i} kind '{entry['kind']}' does not match the model")
            a = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"L{i}.")}
            _check_layer_arrays(path, i, entry, a, rows)
            try:
                if entry.get("stored_bits") == 8:
                    a = {"kv": dequantize_rows({"wq": a["kv_q"], "scales": a["kv_scales"], "biases": a["kv_biases"],
                                                "shape": tuple(entry["shape"]), "group_size": entry["group_size"],
                                                "bits": 8, "dtype": getattr(mx, entry["dtype"].split(".")[-1])})}
                    mx.eval(a["kv"])
                if entry["kind"] == "mla" and base is not None:  # the documents' rows are shared, not copied
                    cache[i] = base.cache[i].copy()
                    if a:
                        cache[i].reserve(entry["offset"])
                        cache[i].append(a["kv"])
                    if cache[i].offset != entry["offset"]:
                        raise ValueError(f"{cache[i].offset} tokens after its documents, {entry['offset']} listed")
                    continue
                if entry["kind"] == "mla":
                    cache[i] = MLACache(bits=entry.get("bits"))
                cache[i].load_arrays(a, entry["offset"])
            except (ValueError, RuntimeError, AssertionError) as e:  # shapes that don't fit this model
                raise SessionError(f"{path}: corrupt: layer {i} cannot be restored ({' '.join(str(e).split())})") from None
        if cache.offset != len(tokens):
            raise SessionError(f"{path}: corrupt: cache holds {cache.offset} tokens, the session lists {len(tokens)}")
        if hasattr(model, "adopt_cache"):  # a pipeline: other ranks' layers go to them
            cache = model.adopt_cache(cache)
        return cls(tokens, cache, mid, tokenizer.sha256)


def info(path: str | os.PathLike) -> str:
    meta = DocumentSession.read_meta(path)
    size = Path(path).stat().st_size
    mla = [l for l in meta["layers"] if l["kind"] == "mla"]
    lines = [
        f"session:        {path}",
        f"format version: {meta['version']}",
        f"tokens:         {meta['num_tokens']:,}"
        + (f" (after a document session of {meta['base']['num_tokens']:,})" if meta.get("base") else ""),
        f"file size:      {size / 1e6:,.1f} MB",
        f"layers:         {len(meta['layers'])} ({len(mla)} MLA, {len(meta['layers']) - len(mla)} KDA)",
        f"saved by:       {_split_text(meta.get('split'))}",
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
