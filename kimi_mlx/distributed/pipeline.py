"""Pipeline parallel: each rank holds a contiguous run of decoder layers and their caches.

Rank 0 (the leader) holds the embedding, its layers, the final norm and the head, and runs all the
usual code (generate, Conversation, sessions, the server) on a `PipelineModel`, which looks like
a model: `model(ids, cache, last_n)` gives logits, `model.make_cache()` a cache, and so on. The
other ranks (followers) run `Follower.run()`: they wait for rank 0's commands and do their part.

One forward pass goes around the ring 0 -> 1 -> ... -> N-1 -> 0: each rank sends the next a header
(what to do, the batch and token count, the cache ids of every layer, the queued cache
operations) and its hidden states [B, T, d], exactly as computed (no cast: the logits are the
single-process logits). The last rank sends back only the positions whose logits are wanted, and
nothing for a prefill chunk that needs none, so rank 0 starts the next chunk while the others still
work on this one. Per decode token one hidden vector crosses each link.

Caches live where their layers are. Rank 0's cache (`PipelineCache`, a KimiCache) holds its own
layers' caches and, for the others, `RemoteLayerCache` handles: copying, reserving and dropping one
only queues an operation (sent with the next command); loading arrays into one (a saved session)
sends them to the rank that holds it, and `PipelineCache.gathered()` fetches them back (saving).
"""
from __future__ import annotations

import json
import weakref
from itertools import count
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import KDACache, KimiCache, MLACache
from ..config import ModelConfig
from ..model.kimi_linear import DecoderLayer, KimiLinearModel, Model
from . import split as S
from .link import DEFAULT_TIMEOUT, Link, PeerLost, PeerTimeout, PipelineError, code_dtype, dtype_code, pack, ring_allgather, unpack

OP_FORWARD, OP_FETCH, OP_PUT, OP_STOP, OP_REPLY, OP_SIZES = 1, 2, 3, 4, 5, 6
# a frame's fields: op, B, T, positions wanted back, dtype of the hidden states, bytes of queued
# operations (JSON, next message), whether the hidden states are in this frame, spare; then the
# cache id of every layer (-1: none or rank 0's own)
_HEAD = 8


class Frames:
    """Every command and reply is one fixed-size message: the fields (int64) and, when they are one
    token's (B * T == 1: decode), the hidden states themselves, so a decode step costs one message
    per link. Longer hidden states follow in a message of their own."""

    def __init__(self, cfg: ModelConfig):
        self.nfields = _HEAD + cfg.num_hidden_layers
        self.inline_bytes = 4 * cfg.hidden_size  # one vector in up to 4 bytes a value
        self.size = 8 * self.nfields + self.inline_bytes

    def make(self, fields: list[int], h: Optional[mx.array] = None) -> tuple[mx.array, bool]:
        """(the frame, whether h is in it)."""
        fields = list(fields) + [0] * (self.nfields - len(fields))
        inline = h is not None and h.size * h.itemsize <= self.inline_bytes
        fields[6] = int(inline)
        parts = [mx.array(fields, dtype=mx.int64).view(mx.uint8)]
        if inline:
            parts.append(h.reshape(-1).view(mx.uint8))
        pad = self.size - sum(p.size for p in parts)
        if pad:
            parts.append(mx.zeros((pad,), dtype=mx.uint8))
        return mx.concatenate(parts), inline

    def read(self, link: Link, what: str, timeout=-1.0) -> tuple[list[int], Optional[mx.array]]:
        """(fields, the inline hidden states [B, T, d] or None)."""
        msg = link.recv((self.size,), mx.uint8, what, timeout)
        # the whole (evaluated) message to numpy: a slice first would be one more MLX evaluation
        fields = np.array(msg)[:8 * self.nfields].view(np.int64).tolist()
        if not fields[6]:
            return fields, None
        B, T, dt = fields[1], fields[2], code_dtype(fields[4])
        n = B * T * (self.inline_bytes // 4)
        d = self.inline_bytes // 4
        h = msg[8 * self.nfields:8 * self.nfields + n * dt.size].view(dt).reshape(B, T, d)
        return fields, h


# ---------------------------------------------------------------------------
# one rank's part of the model
# ---------------------------------------------------------------------------
class _Elsewhere(nn.Module):
    """A decoder layer another rank holds: no parameters here."""

    def __init__(self, is_mla: bool):
        super().__init__()
        self.is_mla = is_mla


class _StageInner(KimiLinearModel):
    def __init__(self, cfg: ModelConfig, layers: range, edges: bool):
        super(KimiLinearModel, self).__init__()
        if edges:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.layers = [DecoderLayer(cfg, i) if i in layers else _Elsewhere(cfg.is_mla(i))
                       for i in range(cfg.num_hidden_layers)]


class StageModel(Model):
    """The model with only `layers` (the others are empty placeholders, so every parameter keeps its
    checkpoint name) and, with `edges`, the embedding, final norm and head."""

    def __init__(self, cfg: ModelConfig, layers: range, edges: bool):
        super(Model, self).__init__()
        self.config = cfg
        self.model = _StageInner(cfg, layers, edges)
        if edges and not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.stage_layers = layers

    def run_layers(self, h: mx.array, caches) -> mx.array:
        for i in self.stage_layers:
            h = self.model.layers[i](h, caches[i] if caches is not None else None)
        return h

    def head(self, h: mx.array) -> mx.array:
        h = self.model.norm(h)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)


def _keeps(layers: range, edges: bool):
    """Which checkpoint tensors a rank reads: its layers', and with edges everything that is no layer's."""
    def keep(name: str) -> bool:
        m = S._LAYER.match(name)
        if m:
            return int(m.group(1)) in layers
        return edges and not name.startswith("model.mtp")
    return keep


def load_stage(model_dir: Path, cfg: ModelConfig, layers: range, edges: bool) -> StageModel:
    from ..weights import load_model

    return load_model(model_dir, keep=_keeps(layers, edges), build=lambda c: StageModel(c, layers, edges))


# ---------------------------------------------------------------------------
# the group and the split
# ---------------------------------------------------------------------------
def connect(timeout: float = DEFAULT_TIMEOUT) -> Link:
    """Join the ranks mlx.launch started (MLX's ring backend when a ring hostfile is given, else
    whatever MLX finds, e.g. JACCL)."""
    import os

    from .link import _hostfile_nodes

    backend = "ring" if _hostfile_nodes() else ("jaccl" if os.environ.get("MLX_IBV_DEVICES") else "any")
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except Exception as e:  # RuntimeError / ValueError from the backend
        raise PipelineError(f"cannot join the other ranks ({backend} backend): {' '.join(str(e).split())}") from None
    if group.size() < 2:
        raise PipelineError("launched as a single rank: nothing to split (run without mlx.launch)")
    return Link(group, timeout)


class Pipeline:
    """This process's place in a pipeline: `load(path)` loads its part (after agreeing with the other
    ranks on the model and the split); then rank 0 gets a PipelineModel, the others `follow()`."""

    def __init__(self, link: Link, split: Optional[str] = None):
        self.link, self.split_arg = link, split
        self.rank, self.size = link.rank, link.size
        self.model: Optional[PipelineModel] = None
        self.stage: Optional[StageModel] = None
        self.counts: Optional[list[int]] = None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def plan(self, model_dir: Path, cfg: ModelConfig) -> list[int]:
        """The split every rank agrees on (checked: the same config and --split everywhere). Every
        rank reaches the same verdict; only rank 0 reports an error."""
        try:
            return self._plan(model_dir, cfg)
        except PipelineError as e:
            e.quiet = not self.leader and not isinstance(e, (PeerLost, PeerTimeout))
            if e.quiet:
                self.link.linger(10.0)
            raise

    def _plan(self, model_dir: Path, cfg: ModelConfig) -> list[int]:
        import hashlib
        import socket

        edge, layer_bytes = S.model_bytes(model_dir, cfg)
        digest = hashlib.sha256(json.dumps(cfg.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]
        mine = {"config": digest, "split": self.split_arg, "budget": S.split_budget(), "host": socket.gethostname(),
                "layers": layer_bytes, "edge": edge}
        every = ring_allgather(self.link, mine)
        self.sizes = (edge, layer_bytes, [o["budget"] for o in every])  # for PipelineModel.check_fits
        for r, other in enumerate(every):
            if other["config"] != digest:
                raise PipelineError(f"rank {r} ({other['host']}) loads a model with another config.json than "
                                    f"rank {self.rank}; every rank needs the same model")
            if other["split"] != self.split_arg:
                raise PipelineError(f"rank {r} was given --split {other['split']}, rank {self.rank} "
                                    f"--split {self.split_arg}")
            if other["layers"] != layer_bytes or other["edge"] != edge:
                raise PipelineError(f"rank {r} ({other['host']}) has other weight files than rank {self.rank} "
                                    "(tensor sizes differ); every rank needs the same model")
        if self.split_arg:
            return S.parse_split(self.split_arg, cfg.num_hidden_layers, self.size)
        return S.choose_split(cfg, edge, layer_bytes, [o["budget"] for o in every])

    def load(self, path, tokenizer: bool = True):
        """(PipelineModel, tokenizer) on rank 0 (tokenizer None when not wanted); (StageModel, None) on
        the others."""
        from ..runtime.model import resolve_model_path
        from ..weights import weights_identity

        model_dir = resolve_model_path(path)
        cfg = ModelConfig.from_file(model_dir)
        self.link.closing = False  # a model loaded after an earlier one stopped
        tok = None
        if self.leader and tokenizer:
            from ..tokenizer import load_tokenizer

            tok = load_tokenizer(model_dir)  # a broken tokenizer fails before the weights are read
        self.counts = self.plan(model_dir, cfg)
        mine = S.ranges(self.counts)[self.rank]
        self.stage = load_stage(model_dir, cfg, mine, self.leader)
        digests = ring_allgather(self.link, self.stage.shard_digests)
        if not self.leader:
            return self.stage, None
        every = {}
        for d in digests:
            every.update(d)
        self.model = PipelineModel(self.link, self.stage, self.counts, weights_identity(model_dir, cfg, every),
                                   self.sizes)
        return self.model, tok

    def follow(self) -> int:
        """Serve rank 0 until it stops (ranks > 0). Ctrl-C is rank 0's to act on: ignored here."""
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return Follower(self.link, self.stage).run()

    def close(self) -> None:
        """Rank 0: tell the others to stop (they exit once every rank has the word)."""
        if self.model is not None:
            self.model.stop()


# ---------------------------------------------------------------------------
# rank 0: the pipelined model
# ---------------------------------------------------------------------------
class RemoteLayerCache:
    """Rank 0's handle of a layer cache another rank keeps (id `cid`). Nothing is held here."""

    _ids = count(1)

    def __init__(self, model: "PipelineModel", layer: int, is_mla: bool, bits: Optional[int] = None,
                 offset: int = 0, announce: bool = True):
        self._model = weakref.ref(model)
        self.cid, self.layer, self.is_mla, self.bits = next(self._ids), layer, is_mla, bits
        self.kind = "mla" if is_mla else "kda"
        self.group_size = 64
        self.offset = offset
        self.held: tuple = ()  # _Held stand-ins of the arrays the other rank keeps (see refresh_sizes)
        model.stubs.add(self)
        if announce:
            model.queue(["new", self.cid, layer, int(is_mla), bits])

    def copy(self) -> "RemoteLayerCache":
        c = RemoteLayerCache(self._model(), self.layer, self.is_mla, self.bits, self.offset, announce=False)
        c.held = self.held  # a copy shares the arrays, there as here
        self._model().queue(["copy", self.cid, c.cid, self.layer])
        return c

    def reserve(self, total_tokens: int) -> None:
        self._model().queue(["reserve", self.cid, self.layer, int(total_tokens)])

    def load_arrays(self, arrays: dict[str, mx.array], offset: int) -> None:
        self._model().put([(self, "load", arrays, offset)])
        self.offset = offset

    def append(self, kv: mx.array) -> None:
        self._model().put([(self, "append", {"kv": kv}, self.offset + kv.shape[1])])
        self.offset += kv.shape[1]

    def arrays(self) -> dict:
        return {}  # held by another rank: see PipelineCache.gathered

    def eval_arrays(self) -> list:
        return []

    def segments(self) -> list:
        return []

    def elsewhere(self) -> tuple:
        """What the other rank holds for this layer, as of the last PipelineModel.refresh_sizes():
        one stand-in per array, the same object wherever the array is shared (memory bounds count
        each once)."""
        return self.held

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.held)

    def __del__(self):
        model = self._model()
        if model is not None:
            model.queue(["free", self.cid, self.layer])


class _Held:
    """An array another rank keeps: its size, for memory accounting on rank 0."""

    __slots__ = ("nbytes", "__weakref__")

    def __init__(self, nbytes: int):
        self.nbytes = nbytes


class _FetchedMLA(MLACache):
    """An MLA layer's rows fetched for saving, as MLACache.arrays() gives them (8-bit caches are not
    quantized a second time)."""

    def __init__(self, arrays: dict, offset: int, bits: Optional[int], group_size: int):
        super().__init__(bits=bits, group_size=group_size)
        self._arrays, self.offset = arrays, offset

    def arrays(self) -> dict:
        return self._arrays


class PipelineCache(KimiCache):
    """A KimiCache whose other ranks' layers are RemoteLayerCache handles. `split`: layers per rank."""

    def __init__(self, items=(), split: Optional[Sequence[int]] = None, model=None):
        super().__init__(items)
        self.split = list(split) if split else None
        self._model = model

    def copy(self) -> "PipelineCache":
        return PipelineCache((c.copy() for c in self), self.split, self._model)

    def reserve(self, total_tokens: int) -> None:
        for c in self:
            if isinstance(c, MLACache) or (isinstance(c, RemoteLayerCache) and c.is_mla):
                c.reserve(total_tokens)

    def refresh_sizes(self) -> None:
        """Bring the sizes of the other ranks' layer caches (every cache of this pipeline) up to date."""
        if self._model is not None:
            self._model.refresh_sizes()

    def gathered(self) -> KimiCache:
        """Every layer's cache here on rank 0 (other ranks' fetched): what a saved session holds."""
        remote = [c for c in self if isinstance(c, RemoteLayerCache)]
        got = self._model.fetch(remote) if remote else {}
        out = KimiCache()
        for c in self:
            if not isinstance(c, RemoteLayerCache):
                out.append(c)
                continue
            arrays, offset = got[c.cid]
            if c.is_mla:
                out.append(_FetchedMLA(arrays, offset, c.bits, c.group_size))
            else:
                k = KDACache()
                k.load_arrays(arrays, offset)
                out.append(k)
        return out


class _Hidden:
    """`model.model(ids, cache)`: a forward pass without logits (prefill chunks); returns None."""

    def __init__(self, pm: "PipelineModel"):
        self._pm = pm

    def __call__(self, input_ids: mx.array, cache=None):
        self._pm.forward(input_ids, cache, 0)


class PipelineModel:
    """Rank 0's view of the whole pipeline, used like kimi_mlx's Model (see the module docstring)."""

    def __init__(self, link: Link, stage: StageModel, counts: Sequence[int], identity: str, sizes=None):
        self.link, self.stage, self.split = link, stage, list(counts)
        self._sizes = sizes  # (edge bytes, [bytes of layer i], [each rank's memory for the split])
        self.config = stage.config
        self.weights_identity = identity
        self.model_dir = getattr(stage, "model_dir", None)
        self.cpu_fast_path = getattr(stage, "cpu_fast_path", None)
        self.layers = [SimpleNamespace(is_mla=self.config.is_mla(i)) for i in range(self.config.num_hidden_layers)]
        self.model = _Hidden(self)
        self._ops: list = []
        self._stopped = False
        self._mine = S.ranges(counts)[0]
        self._pending: Optional[mx.array] = None  # the last lazy receive: done before anything else arrives
        self.frames = Frames(self.config)
        self.stubs: "weakref.WeakSet[RemoteLayerCache]" = weakref.WeakSet()  # every live handle
        self._held: dict = {}  # (rank, array id there) -> _Held

    # -- what generation uses -----------------------------------------------
    def parameters(self):
        return self.stage.parameters()  # rank 0's share

    def make_cache(self, mla_bits: Optional[int] = None) -> PipelineCache:
        items = [(MLACache(bits=mla_bits) if l.is_mla else KDACache()) if i in self._mine
                 else RemoteLayerCache(self, i, l.is_mla, mla_bits) for i, l in enumerate(self.layers)]
        return PipelineCache(items, self.split, self)

    def check_fits(self, context_tokens: int, **kw):
        """planner.check_fits for every rank: its layers and caches in its memory (rank 0's as this
        machine has it free now, the others' as they reported for the split). The fullest rank's
        plan; PlanError naming the rank that can't hold the context."""
        from ..planner import PlanError, check_fits

        kw.pop("weights_bytes", None)
        edge, layer_bytes, budgets = self._sizes
        plans = []
        for r, layers in enumerate(S.ranges(self.split)):
            weights = sum(layer_bytes[i] for i in layers) + (edge if r == 0 else 0)
            mem = kw if r == 0 else {**kw, "machine_bytes": budgets[r]}
            try:
                plans.append(check_fits(self.config, context_tokens, layers=layers, edges=r == 0,
                                        weights_bytes=weights, **mem))
            except PlanError as e:
                raise PlanError(f"rank {r} (layers {layers.start}-{layers.stop - 1}): {e}", e.plan) from None
        return max(plans, key=lambda p: p.total_bytes / (p.machine_bytes or p.total_bytes or 1))

    def adopt_cache(self, cache: KimiCache) -> PipelineCache:
        """A cache built here for all layers (a loaded session): other ranks' layers are sent to them."""
        items, moves = list(cache), []
        for i, c in enumerate(items):
            if i in self._mine or isinstance(c, RemoteLayerCache):
                continue
            stub = RemoteLayerCache(self, i, c.kind == "mla", getattr(c, "bits", None), c.offset, announce=False)
            moves.append((stub, "load", c.arrays(), c.offset))
            items[i] = stub
        if moves:
            self.put(moves)
        return PipelineCache(items, self.split, self)

    def __call__(self, input_ids: mx.array, cache: Optional[KimiCache] = None, last_n: Optional[int] = None):
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        h = self.forward(input_ids, cache, last_n or input_ids.shape[1])
        return self.stage.head(h)

    # -- the ring ----------------------------------------------------------------
    def queue(self, op: list) -> None:
        if not self._stopped:
            self._ops.append(op)

    def _command(self, op: int, B: int = 0, T: int = 0, want: int = 0, h: Optional[mx.array] = None, cache=None,
                 arg=None) -> list[mx.array]:
        """The command's messages: the frame, then (when there are any) the queued cache operations
        and the command's argument as JSON, then the hidden states h unless the frame holds them."""
        if self._pending is not None:  # receives must run in the order the data comes in
            mx.eval(self._pending)
            self._pending = None
        queued, self._ops = self._ops, []  # one swap: a handle dropped on another thread lands in one or the other
        ops = json.dumps({"ops": queued, "arg": arg}).encode() if queued or arg is not None else b""
        ids = [c.cid if isinstance(c, RemoteLayerCache) else -1 for c in cache] if cache is not None \
            else [-1] * len(self.layers)
        dtype = dtype_code(h.dtype) if h is not None else 0
        frame, inline = self.frames.make([op, B, T, want, dtype, len(ops), 0, 0] + ids, h)
        return ([frame] + ([mx.array(np.frombuffer(ops, dtype=np.uint8))] if ops else [])
                + ([h] if h is not None and not inline else []))

    def forward(self, input_ids: mx.array, cache, want: int) -> Optional[mx.array]:
        """Embedding and this rank's layers here, the rest around the ring. want: positions (from the
        end) whose hidden states come back (0: none, a prefill chunk)."""
        if self._stopped:
            raise PipelineError("the pipeline was stopped")
        B, T = input_ids.shape
        h = self.stage.run_layers(self.stage.model.embed_tokens(input_ids), cache)
        self.link.send(self._command(OP_FORWARD, B, T, want, h, cache), "hidden states")
        if cache is not None:
            for c in cache:
                if isinstance(c, RemoteLayerCache):
                    c.offset += T
        if not want:
            return None
        fields, back = self.frames.read(self.link, "the last rank's hidden states")
        if back is None:
            _, b, t, _, dt = fields[:5]
            back = self._pending = self.link.recv_lazy((b, t, self.config.hidden_size), code_dtype(dt),
                                                       "the last rank's hidden states")
        return back

    def fetch(self, stubs: Sequence[RemoteLayerCache]) -> dict:
        """{cid: (arrays, offset)} of other ranks' layer caches."""
        ids = [s.cid for s in stubs]
        got = {}
        for _, meta, arrays in self._collect(OP_FETCH, ids, "cached states"):
            for cid, offset in meta:
                got[cid] = ({k.split(".", 1)[1]: v for k, v in arrays.items() if k.split(".", 1)[0] == str(cid)},
                            offset)
        missing = [i for i in ids if i not in got]
        if missing:
            raise PipelineError(f"the other ranks don't hold layer cache {missing[0]}")
        return got

    def refresh_sizes(self) -> None:
        """Ask the other ranks what every live handle's cache holds now (one round trip), so that
        the handles' elsewhere() and nbytes count the arrays there: a memory bound set on rank 0
        (the server's prefix cache, conversation checkpoints) covers every rank's share."""
        stubs = list(self.stubs)
        if not stubs or self._stopped or self.link.broken:
            return
        sizes = {}
        for rank, meta, _ in self._collect(OP_SIZES, [s.cid for s in stubs], "cache sizes"):
            for cid, arrays in meta:
                sizes[cid] = [((rank, key), n) for key, n in arrays]
        held = {}
        for s in stubs:
            s.held = tuple(held.setdefault(k, self._held.get(k) or _Held(n)) for k, n in sizes.get(s.cid, ()))
        self._held = held

    def _collect(self, op: int, ids: list[int], what: str) -> list:
        """Send command `op` about cache ids; [(rank, meta, arrays)] from each other rank."""
        self.link.send(self._command(op, arg=ids), f"a request for {what}")
        return [(r, *unpack(self.link.recv_blob(what))) for r in range(1, self.link.size)]

    def put(self, moves) -> None:
        """moves: (stub, "load" | "append", arrays, offset after): sent to the ranks holding the layers."""
        per_rank: list[list] = [[] for _ in range(self.link.size)]
        owners = S.ranges(self.split)
        for stub, action, arrays, offset in moves:
            r = next(k for k, rg in enumerate(owners) if stub.layer in rg)
            per_rank[r].append((stub, action, arrays, offset))
        blobs = []
        for r in range(1, self.link.size):
            meta = [[s.cid, s.layer, action, int(s.is_mla), s.bits, offset] for s, action, _, offset in per_rank[r]]
            blobs.append(pack(meta, {f"{s.cid}.{k}": v for s, _, a, _ in per_rank[r] for k, v in a.items()}))
        self.link.send(self._command(OP_PUT), "cached states")
        self.link.send_blobs(blobs, "cached states")

    def stop(self) -> None:
        """Tell the followers to exit; wait (briefly) until the word has gone around the ring."""
        if self._stopped or self.link.broken:
            self._stopped = True
            return
        self._pending = None  # an unread reply (a cancelled job): the followers only need the word
        try:
            self.link.send(self._command(OP_STOP), "the stop command")
            self._stopped = True
            self.link.recv((1,), mx.int64, "the last rank's goodbye", timeout=60.0)
        except PipelineError:
            pass
        finally:
            self._stopped = True
            self.link.closing = True


# ---------------------------------------------------------------------------
# ranks > 0
# ---------------------------------------------------------------------------
class Follower:
    """A rank > 0: does what rank 0's commands say, with its layers, until told to stop."""

    def __init__(self, link: Link, stage: StageModel):
        self.link, self.stage = link, stage
        self.cfg = stage.config
        self.mine = stage.stage_layers
        self.last = link.rank == link.size - 1
        self.caches: dict[int, object] = {}  # cid -> KDACache / MLACache of one of our layers

    def run(self) -> int:
        frames = Frames(self.cfg)
        while True:
            fields, x = frames.read(self.link, "the next command", timeout=None)
            op, B, T, want, dt, nops = fields[:6]
            ops = self.link.recv((nops,), mx.uint8, "queued cache operations") if nops else None
            arg = None
            if ops is not None:
                payload = json.loads(np.array(ops).tobytes())
                self._apply(payload["ops"])
                arg = payload["arg"]
            if op == OP_FORWARD:
                if x is None:
                    x = self.link.recv((B, T, self.cfg.hidden_size), code_dtype(dt), "hidden states")
                self._forward(frames, fields, ops, x, want)
                continue
            relay = [frames.make(fields)[0]] + ([ops] if ops is not None else [])
            if op in (OP_FETCH, OP_SIZES):
                self._relay(relay)
                self._fetch(arg, sizes=op == OP_SIZES)
            elif op == OP_PUT:
                self._relay(relay)
                self._put()
            elif op == OP_STOP:
                self.link.closing = not self.last  # the last rank still says goodbye
                if self.last:
                    self.link.send([mx.array([1], dtype=mx.int64)], "goodbye")
                    self.link.closing = True
                else:
                    self._relay(relay)
                return 0
            else:
                raise PipelineError(f"unknown command {op} from rank 0 (ranks of different kimi_mlx versions?)")

    def _relay(self, msg: list) -> None:
        if not self.last:
            self.link.send(msg, "a command")

    def _apply(self, ops: list) -> None:
        for op in ops:
            kind, cid, layer = op[0], op[1], op[2 if op[0] != "copy" else 3]
            if layer not in self.mine:
                continue
            if kind == "new":
                self.caches[cid] = MLACache(bits=op[4]) if op[3] else KDACache()
            elif kind == "copy":
                self.caches[op[2]] = self.caches[cid].copy()
            elif kind == "reserve":
                c = self.caches.get(cid)
                if isinstance(c, MLACache):
                    c.reserve(op[3])
            elif kind == "free":
                self.caches.pop(cid, None)

    def _forward(self, frames: Frames, fields: list[int], ops, x: mx.array, want: int) -> None:
        """Our layers on x (received before the graph is built: layers may read values on the host
        while building, e.g. the KDA C kernel), then on to the next rank, or back to rank 0."""
        ids = fields[_HEAD:]
        caches = {i: self.caches[ids[i]] for i in self.mine} if any(i >= 0 for i in ids) else None
        h = self.stage.run_layers(x, caches)
        keep = []
        if caches is not None:
            for c in caches.values():
                keep += c.eval_arrays()
        B, T = h.shape[:2]
        if not self.last:
            frame, inline = frames.make(fields[:4] + [dtype_code(h.dtype)] + fields[5:], h)
            msg = [frame] + ([ops] if ops is not None else []) + ([] if inline else [h])
        elif want:
            out = h[:, -want:]
            frame, inline = frames.make([OP_REPLY, B, out.shape[1], want, dtype_code(out.dtype)], out)
            msg = [frame] + ([] if inline else [out])
        else:
            mx.eval(h, *keep)
            return
        self.link.send(msg, "hidden states", extra=keep)

    def _fetch(self, ids: list[int], sizes: bool = False) -> None:
        """Our caches among `ids` on to rank 0 after the earlier ranks': their arrays and offsets,
        or (sizes) the id and byte count of each array they hold."""
        what = "cache sizes" if sizes else "cached states"
        before = [self.link.recv_blob(what) for _ in range(self.link.rank - 1)]
        meta, arrays = [], {}
        for cid in ids:
            c = self.caches.get(cid)
            if c is None:
                continue
            if sizes:
                meta.append([cid, [[id(a), a.nbytes] for a in c.eval_arrays()]])
            else:
                meta.append([cid, c.offset])
                arrays.update({f"{cid}.{k}": v for k, v in c.arrays().items()})
        self.link.send_blobs(before + [pack(meta, arrays)], what)

    def _put(self) -> None:
        blobs = [self.link.recv_blob("cached states") for _ in range(self.link.size - self.link.rank)]
        if len(blobs) > 1:
            self.link.send_blobs(blobs[1:], "cached states")
        meta, arrays = unpack(blobs[0])
        for cid, layer, action, is_mla, bits, offset in meta:
            a = {k.split(".", 1)[1]: mx.contiguous(v) for k, v in arrays.items() if k.split(".", 1)[0] == str(cid)}
            if action == "load":
                c = MLACache(bits=bits) if is_mla else KDACache()
                c.load_arrays(a, offset)
                self.caches[cid] = c
            else:
                self.caches[cid].append(a["kv"])
        mx.eval([v for c in self.caches.values() for v in c.eval_arrays()])
