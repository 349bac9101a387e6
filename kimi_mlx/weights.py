"""Checkpoint discovery, integrity checks, lazy loading and published-name -> module-name mapping.

Checkpoint-name plumbing lives here, never in the layers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ConfigError, ModelConfig

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class WeightsError(ValueError):
    pass


# ---------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------
def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header: catches truncated or corrupt shards before loading."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise WeightsError(f"{path}: corrupt safetensors header (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            nbytes = _DTYPE_BYTES.get(info["dtype"])
            count = 1
            for s in info["shape"]:
                count *= s
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt entry for tensor '{name}' in the header") from None
        if end > data_len:
            raise WeightsError(
                f"{path}: truncated: tensor '{name}' needs bytes up to {end} but the file holds {data_len} data bytes")
        if nbytes is not None and end - start != count * nbytes and info["dtype"] not in ("U32",):
            raise WeightsError(f"{path}: tensor '{name}' has {end - start} bytes for shape {info['shape']} {info['dtype']}")
    return header


def _check_inside(model_dir: Path, shard: Path, what: str) -> None:
    """Refuse a shard that is not in the model directory (absolute, `..`, or a symlink out of it).

    A Hugging Face cache snapshot links its files to ../../blobs/<hash> of the same repo: allowed."""
    root = model_dir.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    target = shard.resolve()
    if not any(r in target.parents for r in roots):
        raise WeightsError(f"{what}: shard '{shard.name}' resolves to {target}, outside the model directory "
                           f"{model_dir}; refusing to read it")


def find_shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            files = sorted(set(wm.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise WeightsError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
        for f in files:
            if not isinstance(f, str) or not f or Path(f).is_absolute() or ".." in Path(f).parts:
                raise WeightsError(f"{index}: shard {f!r} is not a file name inside the model directory")
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise WeightsError(f"{index}: shard(s) listed but missing: {', '.join(missing)}")
        shards = [model_dir / f for f in files]
        for shard in shards:
            _check_inside(model_dir, shard, str(index))
        return shards
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise WeightsError(f"{model_dir}: no *.safetensors files found")
    for shard in shards:
        _check_inside(model_dir, shard, str(model_dir))
    return shards


# ---------------------------------------------------------------------------
# file scan: a digest of the bytes and the tensors holding NaN/inf, once per file
# ---------------------------------------------------------------------------
# exponent bits of each float format (all ones: inf or NaN), read through an unsigned view
_FLOAT_BITS = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000),
               "F64": (np.uint64, 0x7FF0000000000000)}
_SCAN_VERSION = 1
_SCAN_BLOCK = 1 << 24
_scans: dict[str, dict] = {}  # this process: file id -> scan


def _scan_dir() -> Path | None:
    """The remembered scans, in the user cache; None where it is not ours alone (a planted entry
    could hide a corrupt file) or not writable."""
    from ._native import cache_root

    d = Path(cache_root()) / "weights"
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(d)
    except OSError:
        return None
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return None
    return d


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (another user's counts: it may still be writing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, not ours
        return True
    return True


def stale_temporaries(parent: Path, pattern: str) -> list[Path]:
    """Entries of `parent` whose whole name matches `pattern` (a regex whose group 'pid' is the
    writer's process id) and whose writer is gone: what a killed run left behind."""
    rx = re.compile(pattern)
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    return [parent / n for n in names
            if (m := rx.fullmatch(n)) and int(m.group("pid")) != os.getpid() and not pid_alive(int(m.group("pid")))]


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _scan_bytes(path: Path, header: dict) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(0)
        while block := f.read(_SCAN_BLOCK):
            h.update(block)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    bad = []
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in _FLOAT_BITS:
            continue
        kind, mask = _FLOAT_BITS[info["dtype"]]
        mask = kind(mask)
        start, end = (8 + n + o for o in info["data_offsets"])
        step = _SCAN_BLOCK // mask.itemsize * mask.itemsize  # blocks: bounded temporaries
        for a in range(start, end, step):
            if ((data[a:min(a + step, end)].view(kind) & mask) == mask).any():
                bad.append(name)
                break
    del data
    return {"sha256": h.hexdigest(), "nonfinite": sorted(bad)}


def scan_file(path: Path, header: dict | None = None) -> dict:
    """{"sha256": digest of the file's bytes, "nonfinite": tensors holding NaN or inf} of a safetensors
    file. Computed once per file: remembered in the user cache by resolved path, size and mtime."""
    from ._native import file_id

    fid = file_id(str(path))
    if fid in _scans:
        return _scans[fid]
    d = _scan_dir()
    entry = d / f"{hashlib.sha256(fid.encode()).hexdigest()[:32]}.json" if d is not None else None
    if entry is not None:
        try:
            got = json.loads(entry.read_text())
            if got.get("version") == _SCAN_VERSION and got.get("file") == fid:
                _scans[fid] = scan = {"sha256": got["sha256"], "nonfinite": list(got["nonfinite"])}
                return scan
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # none yet, or damaged: scan again
    scan = _scan_bytes(path, header if header is not None else read_safetensors_header(path))
    if file_id(str(path)) != fid:  # changed while we read it: don't remember a mix
        raise WeightsError(f"{path}: changed while it was being read; try again")
    _scans[fid] = scan
    if entry is not None:
        try:
            _write_atomic(entry, json.dumps({"version": _SCAN_VERSION, "file": fid, **scan}).encode())
        except OSError:
            pass  # remembering is an optimisation
    return scan


def weights_identity(model_dir: Path, cfg: ModelConfig, digests: dict[str, str] | None = None) -> str:
    """Identity of a checkpoint: the digest of every weight file's bytes, the config (the
    quantization block included) and nothing else; two directories with the same bytes agree.
    digests: {shard file name: sha256} already known (a pipeline's ranks each scan their own
    shards); the other shards are scanned here."""
    h = hashlib.sha256(b"kimi-mlx-weights-v1\0")
    keep = {k: v for k, v in cfg.raw.items() if k not in ("transformers_version", "_name_or_path")}
    h.update(json.dumps(keep, sort_keys=True, default=str).encode())
    h.update(json.dumps(cfg.quantization, sort_keys=True, default=str).encode())
    digests = digests or {}
    for digest in sorted(digests.get(s.name) or scan_file(s)["sha256"] for s in find_shards(model_dir)):
        h.update(b"\0" + digest.encode())
    return h.hexdigest()[:32]


def load_raw(model_dir: Path, keep=None) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """All tensors of all shards, lazily (mx.load maps tensors on demand), with their source file.
    keep(name): only the tensors it accepts (checkpoint names); shards holding none are not opened.

    Every shard read is scanned first (once per file, see scan_file): a tensor holding NaN or inf is refused."""
    weights, source = {}, {}
    for shard in find_shards(model_dir):
        header = read_safetensors_header(shard)
        if keep is not None and not any(keep(k) for k in header if k != "__metadata__"):
            continue
        bad = scan_file(shard, header)["nonfinite"]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise WeightsError(f"{shard}: tensor '{bad[0]}'{more} holds NaN or infinite values; "
                               "the file is corrupt")
        try:
            tensors = mx.load(str(shard))
        except Exception as e:  # mlx raises RuntimeError/ValueError with little context
            raise WeightsError(f"{shard}: cannot be read as safetensors ({e})") from None
        for k, v in tensors.items():
            if keep is not None and not keep(k):
                continue
            if k in weights:
                raise WeightsError(f"{shard}: tensor '{k}' also appears in {source[k]}")
            weights[k] = v
            source[k] = shard
    return weights, source


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def check_dtypes(weights: dict[str, mx.array], source: dict[str, Path], cfg: ModelConfig, where: Path) -> None:
    """Refuse stored dtypes that don't fit the checkpoint: every tensor is floating point, except, in a
    quantized checkpoint, packed weights (uint32) and fp-mode scales (uint8)."""
    for k, v in weights.items():
        if mx.issubdtype(v.dtype, mx.floating):
            continue
        if cfg.quantization and ((k.endswith(".weight") and v.dtype == mx.uint32)
                                 or (k.endswith(".scales") and v.dtype == mx.uint8)):
            continue
        why = ("the config has a quantization block: only packed weights (uint32) and scales (uint8) may be "
               "integers" if cfg.quantization else "the config has no quantization block: every tensor is "
               "floating point")
        raise WeightsError(f"{source.get(k, where)}: tensor '{k}' is stored as {_dtype_name(v.dtype)}; {why}")


# ---------------------------------------------------------------------------
# name mapping
# ---------------------------------------------------------------------------
_EXPERT = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.(weight|scales|biases)$")
_W_NAME = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def sanitize(weights: dict[str, mx.array], cfg: ModelConfig, source: dict[str, Path] | None = None):
    """Published (and transformers / mlx-lm) names -> our module names. Returns (weights, source)."""
    source = dict(source or {})
    out: dict[str, mx.array] = {}
    experts: dict[tuple, dict[int, mx.array]] = {}
    mlx_lm_mla: dict[str, dict[str, mx.array]] = {}  # mlx-lm's embed_q / unembed_out, per attention prefix

    def put(name, value, src_name):
        out[name] = value
        if src_name in source:
            source[name] = source[src_name]

    for k, v in weights.items():
        if k.startswith("model.mtp") or k.endswith("rotary_emb.inv_freq"):
            continue
        m = _EXPERT.match(k)
        if m:
            experts.setdefault((m.group(1), _W_NAME[m.group(3)], m.group(4)), {})[int(m.group(2))] = (v, k)
            continue
        m = _MLX_LM_MLA.match(k)
        if m:
            mlx_lm_mla.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = v
            if k in source:
                source.setdefault(f"{m.group(1)}.kv_b_proj.weight", source[k])
            continue
        n = k
        n = n.replace(".block_sparse_moe.gate.e_score_correction_bias", ".mlp.e_score_correction_bias")
        n = n.replace(".block_sparse_moe.", ".mlp.")
        if re.search(r"\.self_attn\.[qkv]_conv1d\.weight$", n) and v.ndim == 3:
            v = v.reshape(v.shape[0], -1)  # [C, 1, K] -> [C, K]
        elif re.search(r"\.self_attn\.[qkv]_conv\.conv\.weight$", n):  # mlx-lm: [C, K, 1]
            n = n.replace("_conv.conv.weight", "_conv1d.weight")
            v = v.reshape(v.shape[0], -1)
        elif n.endswith(".self_attn.A_log"):
            v = v.reshape(-1)
        elif n.endswith(".self_attn.dt_bias"):
            v = v.reshape(-1)
        put(n, v, k)

    for (prefix, proj, kind), per in experts.items():
        want = cfg.num_experts
        missing = [e for e in range(want) if e not in per]
        if missing:
            name = f"{prefix}.block_sparse_moe.experts.{missing[0]}.{ {v: k for k, v in _W_NAME.items()}[proj] }.{kind}"
            raise WeightsError(f"missing tensor '{name}' ({len(missing)} expert tensor(s) missing in {prefix})")
        first_src = per[0][1]
        put(f"{prefix}.mlp.switch_mlp.{proj}.{kind}", mx.stack([per[e][0] for e in range(want)]), first_src)

    for prefix, parts in mlx_lm_mla.items():
        out[f"{prefix}.kv_b_proj.weight"] = _kv_b_from_mlx_lm(prefix, parts, cfg)

    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out, source


_MLX_LM_MLA = re.compile(r"^(model\.layers\.\d+\.self_attn)\.(embed_q|unembed_out)\.(weight|scales|biases)$")
# modes whose scales are uint8 allow exactly one (bits, group size); affine keeps scales in a float dtype
_FP_MODES = {(4, 32): "mxfp4", (4, 16): "nvfp4", (8, 32): "mxfp8"}


def infer_quant_params(path: str, in_dims: int, weight: mx.array, scales: mx.array, qcfg: dict | None) -> dict:
    """group_size / bits / mode of a packed tensor: from the config's per-path entry, else from the shapes."""
    over = (qcfg or {}).get(path)
    bits = weight.shape[-1] * 32 // in_dims
    group_size = in_dims // scales.shape[-1]
    if isinstance(over, dict):
        return {"group_size": over.get("group_size", group_size), "bits": over.get("bits", bits),
                "mode": over.get("mode", "affine")}
    if scales.dtype != mx.uint8:
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    mode = _FP_MODES.get((bits, group_size))
    if mode is None:
        raise WeightsError(f"cannot tell how '{path}' was quantized ({bits} bits, group size {group_size})")
    return {"group_size": group_size, "bits": bits, "mode": mode}


def _kv_b_from_mlx_lm(prefix: str, parts: dict[str, mx.array], cfg: ModelConfig) -> mx.array:
    """Invert mlx-lm's kimi_linear sanitize: embed_q [H, rank, nope] and unembed_out [H, v, rank]
    (MultiLinear weights, possibly quantized along the last axis) -> kv_b_proj [H*(nope+v), rank].
    Dequantized: our absorbed MLA reads kv_b_proj densely anyway."""
    H, nope, vd, rank = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

    def dense(name: str, in_dims: int) -> mx.array:
        w = parts.get(f"{name}.weight")
        if w is None:
            raise WeightsError(f"missing tensor '{prefix}.{name}.weight' (mlx-lm layout needs embed_q and unembed_out)")
        if f"{name}.scales" not in parts:
            return w
        p = infer_quant_params(f"{prefix}.{name}", in_dims, w, parts[f"{name}.scales"], cfg.quantization)
        return mx.dequantize(w, parts[f"{name}.scales"], parts.get(f"{name}.biases"), **p)

    wk = dense("embed_q", nope)  # [H, rank, nope]
    wv = dense("unembed_out", rank)  # [H, v, rank]
    if tuple(wk.shape) != (H, rank, nope) or tuple(wv.shape) != (H, vd, rank):
        raise WeightsError(f"{prefix}: embed_q / unembed_out have shapes {tuple(wk.shape)} / {tuple(wv.shape)}, "
                           f"expected {(H, rank, nope)} / {(H, vd, rank)}")
    wv = wv.astype(wk.dtype)
    return mx.concatenate([wk.swapaxes(-1, -2), wv], axis=1).reshape(H * (nope + vd), rank)


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------
_KEEP_FP32 = ("e_score_correction_bias", "A_log", "dt_bias")


def apply_quantization(model: nn.Module, qcfg: dict, weights: dict[str, mx.array]) -> None:
    """Swap Linear/SwitchLinear modules for quantized ones where the checkpoint holds quantized tensors."""
    default = {"group_size": qcfg.get("group_size", 64), "bits": qcfg.get("bits", 4), "mode": qcfg.get("mode", "affine")}

    def predicate(path, module):
        # the tensors decide (a per-path `false` or a missing .scales means unquantized); the shapes
        # give bits / group size when the config has no per-path entry (mlx-lm configs often don't)
        if qcfg.get(path) is False or f"{path}.scales" not in weights or f"{path}.weight" not in weights:
            return False
        return infer_quant_params(path, module.weight.shape[-1], weights[f"{path}.weight"],
                                  weights[f"{path}.scales"], qcfg)

    nn.quantize(model, group_size=default["group_size"], bits=default["bits"], mode=default["mode"],
                class_predicate=predicate)


def build_model(cfg: ModelConfig):
    from .model.kimi_linear import Model

    return Model(cfg)


def load_weights_into(model: nn.Module, weights: dict[str, mx.array], source: dict[str, Path], where: Path) -> None:
    from mlx.utils import tree_flatten, tree_unflatten

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{where}: missing tensor '{missing[0]}'{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(f"{source.get(unexpected[0], where)}: unexpected tensor '{unexpected[0]}'{more}")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise WeightsError(
                f"{source.get(k, where)}: tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        want = expected[k].dtype
        if mx.issubdtype(want, mx.floating) != mx.issubdtype(v.dtype, mx.floating) or (
                not mx.issubdtype(want, mx.floating) and v.dtype != want):
            kind = "floating point" if mx.issubdtype(want, mx.floating) else _dtype_name(want)
            raise WeightsError(f"{source.get(k, where)}: tensor '{k}' is stored as {_dtype_name(v.dtype)}, "
                               f"expected {kind} (from config.json and its quantization block)")
    fixed = []
    for k, v in weights.items():
        if k.endswith(_KEEP_FP32) and v.dtype != mx.float32:
            v = v.astype(mx.float32)
        fixed.append((k, v))
    model.update(tree_unflatten(fixed))


def load_model(path: str | os.PathLike, lazy: bool = False, dtype: mx.Dtype | None = None,
               context_tokens: int | None = None, cpu_fast_path: bool | None = None, *, keep=None, build=None):
    """Load a Kimi-Linear model directory (published HF layout, or our / mlx-lm converted layout).

    context_tokens: if given, first check that the weights (their size on disk) plus the cache for
    that many tokens fit this machine; raises planner.PlanError (a ValueError) before reading any weights.
    cpu_fast_path: None (default) enables kimi_mlx.ops.cpu_fast on the CPU backend when it is faster
    (see cpu_fast_path_wanted; KIMI_MLX_CPU_FAST=off disables it); False never, True always.
    keep / build: a part of the model (a pipeline rank, kimi_mlx.distributed): keep(name) picks the
    checkpoint tensors to read (see load_raw), build(cfg) makes the module they go into. The part's
    `weights_identity` is then left unset (it covers every shard); `shard_digests` has the digests
    of the shards it read.
    """
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise WeightsError(f"{model_dir}: not a directory (expected a model directory with config.json)")
    cfg = ModelConfig.from_file(model_dir)
    if context_tokens is not None:
        from .planner import check_fits

        check_fits(cfg, context_tokens, weights_bytes=sum(s.stat().st_size for s in find_shards(model_dir)))
    weights, source = load_raw(model_dir, keep)
    check_dtypes(weights, source, cfg, model_dir)
    weights, source = sanitize(weights, cfg, source)
    model = (build or build_model)(cfg)
    if cfg.quantization:
        apply_quantization(model, cfg.quantization, weights)
    if dtype is not None:
        weights = {k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith(_KEEP_FP32)
                       and not k.endswith((".scales", ".biases")) else v) for k, v in weights.items()}
    load_weights_into(model, weights, source, model_dir)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    model.model_dir = model_dir
    if keep is None:
        model.weights_identity = weights_identity(model_dir, cfg)  # scans are remembered: no second read
    else:
        # a plain attribute (nn.Module would file a dict among the parameters)
        object.__setattr__(model, "shard_digests",
                           {s.name: scan_file(s)["sha256"] for s in sorted(set(source.values()))})
    from .ops import cpu_fast

    if cpu_fast_path is None:
        cpu_fast.auto_enable_cpu_fast_path(model)
    elif cpu_fast_path:
        cpu_fast.enable_cpu_fast_path(model, force=True)
    return model


__all__ = ["load_model", "WeightsError", "ConfigError", "sanitize", "find_shards", "read_safetensors_header",
           "infer_quant_params", "scan_file", "weights_identity", "check_dtypes", "pid_alive", "stale_temporaries"]
