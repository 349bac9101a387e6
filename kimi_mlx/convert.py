"""Convert a Kimi-Linear checkpoint (Hugging Face layout) into an MLX model directory.

The conversion streams: the source shards are opened lazily (mx.load maps
tensors on demand), and one *unit* at a time (one module's weight, or one
stacked expert projection) is read, renamed, cast, quantized, written into the
open output shard, and released. Peak memory is a few units, not the model.

Two passes over the checkpoint:

1. plan: build every unit's output lazily to learn names, shapes and dtypes
   (nothing is computed), validate them against the model skeleton, and lay
   the tensors out into shards of bounded size;
2. write: recompute each unit, evaluate it, append its bytes to its shard.

Everything is written into a temporary directory beside DST which is renamed
to DST only when complete, so an interrupted or failed run never leaves a DST
that looks finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from . import quant as Q
from .config import ConfigError, ModelConfig
from .weights import (WeightsError, _KEEP_FP32, build_model, find_shards, read_safetensors_header, sanitize,
                      stale_temporaries)

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
DEFAULT_CONTEXT_TOKENS = 32768
# copied verbatim: the tokenizer, chat template, generation defaults and remote code
_AUX_FILES = ("tiktoken.model", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
              "chat_template.jinja", "chat_template.json", "generation_config.json")
_AUX_GLOBS = ("*.py", "*.jinja", "*.tiktoken")
_ST_DTYPE = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.uint8: "U8",
             mx.int32: "I32", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16"}
# conversion temporaries per unit: the source parts, their stacked copy, the cast copy (see _peak_estimate)
_UNIT_COPIES = 3
_RUNTIME_BYTES = 300 * 10**6


class ConvertError(ValueError):
    """A conversion that cannot go ahead; the message is meant for the user as is."""


# ---------------------------------------------------------------------------
# source and destination
# ---------------------------------------------------------------------------
def resolve_source(hf_path: str, log: Callable[[str], None] = lambda m: None) -> Path:
    """A local directory as is, or a Hub repo id fetched (or found in the HF cache)."""
    from .runtime.model import ModelLoadError, resolve_model_path

    try:
        return resolve_model_path(hf_path, log, for_running=False)
    except ModelLoadError as e:
        raise ConvertError(str(e)) from None


def _is_model_dir(d: Path) -> bool:
    return (d / "config.json").is_file() or any(d.glob("*.safetensors"))


def _check_destination(src: Path, dst: Path, force: int) -> None:
    """force: 0 keeps a non-empty DST, 1 replaces a model directory, 2 replaces any directory."""
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"{dst}: exists and is not a directory")
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ConvertError(f"{dst}: DST must not be SRC, inside it, or contain it")
    entries = sorted(p.name for p in dst.iterdir()) if dst.exists() else []
    if entries and not force:
        raise ConvertError(f"{dst}: exists and is not empty (pass --force to replace it)")
    if entries and force < 2 and not _is_model_dir(dst):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ConvertError(f"{dst}: is not a model directory (no config.json or *.safetensors) and --force would "
                           f"delete what it holds ({shown}); pass --force twice to replace it anyway")


# Beside DST: ".DST.partial-PID" (a conversion being written) and ".DST.old-PID" (the model that
# --force is replacing, between its two renames). A killed run leaves them behind.
def _side_dirs(dst: Path, kind: str, stale: bool) -> list[Path]:
    pattern = rf"\.{re.escape(dst.name)}\.{kind}-(?P<pid>\d+)"
    if stale:
        return stale_temporaries(dst.parent, pattern)
    try:
        return sorted(p for p in dst.parent.iterdir() if re.fullmatch(pattern, p.name))
    except OSError:
        return []


def _dir_size(d: Path) -> int:
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _recover(dst: Path, log: Callable[[str], None]) -> None:
    """Undo what killed runs left beside DST: their partial outputs are removed, and a model that an
    interrupted --force had moved aside is put back (or removed, if the new one was already in place)."""
    for old in _side_dirs(dst, "old", stale=True):
        if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
            if dst.exists():
                dst.rmdir()
            old.rename(dst)
            log(f"restored {dst} from {old.name}, left by an interrupted --force")
        else:
            shutil.rmtree(old, ignore_errors=True)
            log(f"removed {old.name}, the replaced model of an interrupted --force")
    for part in _side_dirs(dst, "partial", stale=True):
        size = _dir_size(part)
        shutil.rmtree(part, ignore_errors=True)
        log(f"removed {part.name} ({_fmt(size)}), the partial output of an interrupted conversion")
    busy = [p for p in _side_dirs(dst, "partial", stale=False) if not p.name.endswith(f"-{os.getpid()}")]
    if busy:
        pid = busy[0].name.rsplit("-", 1)[1]
        raise ConvertError(f"{dst}: another conversion (pid {pid}) is writing it ({busy[0]}); wait for it, or "
                           "stop it and run again")


def _partials_note(parent: Path) -> str:
    """Partial outputs in `parent` (of running conversions), named for a disk-space error."""
    try:
        parts = sorted(p for p in parent.iterdir() if re.fullmatch(r"\..+\.(partial|old)-\d+", p.name))
    except OSError:
        return ""
    if not parts:
        return ""
    return "; in that directory " + ", ".join(f"{p.name} ({_fmt(_dir_size(p))})" for p in parts) + \
        " belong to other conversions (they are removed once their process has ended)"


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '64KiB', '1000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConvertError(f"cannot read size '{text}' (examples: 5GB, 500MB, 1048576)")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    n = int(float(m.group(1)) * base**power)
    if n <= 0:
        raise ConvertError(f"size must be positive, got '{text}'")
    return n


def _fmt(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------
# units
# ---------------------------------------------------------------------------
@dataclass
class _Unit:
    src_name: str  # sanitized (our) name of the input tensor
    src_bytes: int
    names: list[str]
    shapes: list[tuple]
    dtypes: list
    params: dict | None  # quantization of the module, None: copied (cast)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(s, d) for s, d in zip(self.shapes, self.dtypes))


def _nbytes(shape, dtype) -> int:
    n = dtype.size
    for s in shape:
        n *= s
    return n


def _group_key(name: str) -> tuple:
    """Order of processing: embeddings, layers in order, then final norm and lm_head."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)))
    if name.startswith("model.embed_tokens."):
        return (0, 0)
    return (2, 0)


def _outputs(name: str, arr: mx.array, params: dict | None, dtype) -> dict[str, mx.array]:
    """The output tensors of one unit, lazily."""
    if params is not None:
        path = name[: -len(".weight")]
        w = arr.astype(dtype)  # cast first, so scales/biases come out in the target dtype (as mlx-lm does)
        q = mx.quantize(w, group_size=params["group_size"], bits=params["bits"], mode=params["mode"])
        out = {f"{path}.weight": q[0], f"{path}.scales": q[1]}
        if len(q) > 2 and q[2] is not None:
            out[f"{path}.biases"] = q[2]
        return out
    if name.endswith(_KEEP_FP32):
        return {name: arr.astype(mx.float32)}
    if mx.issubdtype(arr.dtype, mx.floating):
        return {name: arr.astype(dtype)}
    return {name: arr}


class _Source:
    """The source checkpoint: config, shard headers, and lazy per-group tensor access."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.cfg = ModelConfig.from_file(path)
        except ConfigError as e:
            raise ConvertError(f"not a Kimi-Linear checkpoint: {e}") from None
        raw = self.cfg.raw
        arch = raw.get("architectures") or []
        if raw.get("model_type") != "kimi_linear" and "KimiLinearForCausalLM" not in arch:
            raise ConvertError(f"{path}/config.json: not a Kimi-Linear checkpoint "
                               f"(model_type {raw.get('model_type')!r}, architectures {arch})")
        if self.cfg.quantization:
            raise ConvertError(f"{path}: already quantized (config has a quantization block); "
                               "convert from the original bf16 checkpoint")
        self.shards = find_shards(path)
        self.shard_of: dict[str, Path] = {}
        self.src_bytes = 0
        for shard in self.shards:
            header = read_safetensors_header(shard)
            for k, info in header.items():
                if k == "__metadata__":
                    continue
                if k in self.shard_of:
                    raise ConvertError(f"{shard}: tensor '{k}' also appears in {self.shard_of[k]}")
                if info["dtype"] not in ("BF16", "F16", "F32", "F64"):  # an unquantized checkpoint
                    raise ConvertError(f"{shard}: tensor '{k}' is stored as {info['dtype']}; an unquantized "
                                       "checkpoint holds floating-point tensors only")
                self.shard_of[k] = shard
                self.src_bytes += info["data_offsets"][1] - info["data_offsets"][0]
        groups: dict[tuple, list[str]] = {}
        for k in self.shard_of:
            groups.setdefault(_group_key(k), []).append(k)
        self.groups = [sorted(groups[g]) for g in sorted(groups)]

    @cached_property
    def _skeleton(self) -> tuple[dict, dict]:
        # the model itself (lazy parameters: nothing is allocated) gives the expected names and shapes
        from mlx.utils import tree_flatten

        skeleton = build_model(self.cfg)
        return {k: tuple(v.shape) for k, v in tree_flatten(skeleton.parameters())}, Q.quantizable_modules(skeleton)

    @property
    def expected(self) -> dict[str, tuple]:
        return self._skeleton[0]

    @property
    def qmods(self) -> dict[str, tuple]:
        """Paths of the modules nn.quantize could swap -> their weight shapes."""
        return self._skeleton[1]

    def load_group(self, names: list[str]) -> tuple[dict[str, mx.array], dict[str, Path]]:
        """Sanitized tensors of one group, lazily (nothing is read until evaluated)."""
        by_shard: dict[Path, list[str]] = {}
        for k in names:
            by_shard.setdefault(self.shard_of[k], []).append(k)
        raw, src = {}, {}
        for shard, keys in by_shard.items():
            try:
                tensors = mx.load(str(shard))
            except Exception as e:
                raise ConvertError(f"{shard}: cannot be read as safetensors ({e})") from None
            for k in keys:
                raw[k] = tensors[k]
                src[k] = shard
            del tensors  # keep references to this group's tensors only
        try:
            return sanitize(raw, self.cfg, src)
        except WeightsError as e:
            raise ConvertError(str(e)) from None


# ---------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------
@dataclass
class ConvertPlan:
    units: list[list[_Unit]]  # per source group
    quant_params: dict[str, dict | None]
    shard_of_unit: dict[tuple[int, int], int] = field(default_factory=dict)
    n_shards: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for g in self.units for u in g)

    @property
    def max_unit(self) -> _Unit:
        return max((u for g in self.units for u in g), key=lambda u: _UNIT_COPIES * u.src_bytes + u.nbytes)

    def peak_estimate(self) -> int:
        """Conversion peak: the largest unit's inputs and copies plus its outputs, plus the runtime."""
        u = self.max_unit
        return _UNIT_COPIES * u.src_bytes + u.nbytes + _RUNTIME_BYTES


def _unit_list(tensors: dict[str, mx.array], src: dict[str, Path], expected: dict, qmods: dict,
               settings: dict | None, dtype) -> list[tuple[_Unit, mx.array]]:
    units = []
    for name in sorted(tensors):
        arr = tensors[name]
        where = src.get(name, "")
        if name not in expected:
            raise ConvertError(f"{where}: unexpected tensor '{name}' (not part of this Kimi-Linear config)")
        if tuple(arr.shape) != expected[name]:
            raise ConvertError(f"{where}: tensor '{name}' has shape {tuple(arr.shape)}, expected {expected[name]}")
        params = None
        path = name[: -len(".weight")] if name.endswith(".weight") else None
        if settings is not None and path in qmods:
            params = Q.layer_params(path, qmods[path][-1], **settings)
        outs = _outputs(name, arr, params, dtype)
        units.append((_Unit(name, arr.nbytes, list(outs), [tuple(v.shape) for v in outs.values()],
                            [v.dtype for v in outs.values()], params), arr))
    return units


def _plan(source: _Source, settings: dict | None, dtype, max_shard: int) -> ConvertPlan:
    expected, qmods = source.expected, source.qmods
    groups, seen, qparams = [], set(), {}
    for names in source.groups:
        tensors, src = source.load_group(names)
        units = [u for u, _ in _unit_list(tensors, src, expected, qmods, settings, dtype)]
        for u in units:
            seen.add(u.src_name)
            path = u.src_name[: -len(".weight")]
            if settings is not None and u.src_name.endswith(".weight") and path in qmods:
                qparams[path] = u.params
        groups.append(units)
        del tensors
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"{source.path}: missing tensor '{missing[0]}'{more}")
    plan = ConvertPlan(groups, qparams)
    # shards in order of writing; a unit's tensors stay together
    shard, used = 0, 0
    for gi, g in enumerate(groups):
        for ui, u in enumerate(g):
            if used and used + u.nbytes > max_shard:
                shard, used = shard + 1, 0
            plan.shard_of_unit[(gi, ui)] = shard
            used += u.nbytes
    plan.n_shards = shard + 1
    return plan


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------
class _ShardWriter:
    """A safetensors file written tensor by tensor: the header is known from the plan up front."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple, object]]):
        self.path = path
        header, off = {}, 0
        for name, shape, dtype in entries:
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        header["__metadata__"] = {"format": "mlx"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
        self.order = [e[0] for e in entries]
        self.shapes = {e[0]: (tuple(e[1]), e[2]) for e in entries}
        self.next = 0
        self.f = open(path, "wb")
        self.f.write(len(blob).to_bytes(8, "little"))
        self.f.write(blob)

    def write(self, name: str, arr: mx.array) -> None:
        if self.order[self.next] != name or (tuple(arr.shape), arr.dtype) != self.shapes[name]:
            raise RuntimeError(f"internal error: '{name}' {arr.shape} {arr.dtype} differs from the plan")
        if arr.dtype == mx.bfloat16:
            arr = arr.view(mx.uint16)  # numpy has no bfloat16; the bytes are the same
        self.f.write(np.ascontiguousarray(np.asarray(arr)).data)
        self.next += 1

    @property
    def done(self) -> bool:
        return self.next == len(self.order)

    def close(self) -> None:
        if not self.f.closed:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def _write(source: _Source, plan: ConvertPlan, settings: dict | None, dtype, tmp: Path, show: bool) -> dict:
    # entries of each shard, in writing order
    entries: list[list] = [[] for _ in range(plan.n_shards)]
    for gi, g in enumerate(plan.units):
        for ui, u in enumerate(g):
            entries[plan.shard_of_unit[(gi, ui)]] += list(zip(u.names, u.shapes, u.dtypes))
    weight_map, writer = {}, None
    n_layers = source.cfg.num_hidden_layers
    with _progress(show) as bar:
        task = bar.add_task("converting", total=sum(u.src_bytes for g in plan.units for u in g))
        for gi, names in enumerate(source.groups):
            key = _group_key(names[0])
            bar.update(task, description={0: "embeddings", 2: "norm + lm_head"}.get(key[0], f"layer {key[1] + 1}/{n_layers}"))
            tensors, src = source.load_group(names)
            units = _unit_list(tensors, src, source.expected, source.qmods, settings, dtype)
            del tensors  # the units hold the only references: each source is freed once written
            for ui in range(len(units)):
                u, arr = units[ui]
                units[ui] = None
                si = plan.shard_of_unit[(gi, ui)]
                if writer is None or writer.done:
                    if writer is not None:
                        writer.close()
                    writer = _ShardWriter(tmp / _shard_name(si, plan.n_shards), entries[si])
                outs = _outputs(u.src_name, arr, u.params, dtype)
                del arr
                mx.eval(*outs.values())
                for name in u.names:
                    writer.write(name, outs.pop(name))
                    weight_map[name] = writer.path.name
                del outs
                bar.advance(task, u.src_bytes)
            mx.clear_cache()
        if writer is not None:
            writer.close()
    return weight_map


def _write_config(source: _Source, tmp: Path, qblock: dict | None, dtype_name: str) -> None:
    cfg = json.loads((source.path / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if qblock is not None:
        cfg["quantization"] = qblock
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
    for k in keys:
        cfg[k] = dtype_name
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _copy_aux(src: Path, tmp: Path) -> list[str]:
    files = {src / f for f in _AUX_FILES if (src / f).is_file()}
    for g in _AUX_GLOBS:
        files |= {p for p in src.glob(g) if p.is_file()}
    for p in sorted(files):
        shutil.copyfile(p, tmp / p.name)  # copyfile: follows HF-cache symlinks
    return sorted(p.name for p in files)


def _finalize(tmp: Path, dst: Path) -> None:
    """Move the finished directory into place; an old DST (--force) is removed only after that.
    A kill between the two renames leaves .DST.old-PID, which the next run puts back (_recover)."""
    if dst.exists():
        if any(dst.iterdir()):
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
            return
        dst.rmdir()
    tmp.rename(dst)


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------
@dataclass
class ConvertResult:
    path: Path
    shards: list[str]
    total_bytes: int
    source_bytes: int
    quantization: dict | None
    peak_estimate: int
    seconds: float


def _dtype_of(name: str | None, cfg: ModelConfig) -> tuple[str, object]:
    if name is None:
        name = cfg.raw.get("dtype") or cfg.raw.get("torch_dtype") or "bfloat16"
        if name not in Q.DTYPES:
            name = "bfloat16"
    if name not in Q.DTYPES:
        raise ConvertError(f"unsupported dtype '{name}'; choose one of: {', '.join(Q.DTYPES)}")
    return name, Q.DTYPES[name]


def _quant_settings(quantize: bool, q_bits, q_group_size, q_mode: str, recipe) -> dict | None:
    """The quantization the flags ask for (None: unquantized); ConvertError for what doesn't go together."""
    if not quantize:
        if recipe is not None or q_bits is not None or q_group_size is not None or q_mode != "affine":
            raise ConvertError("--q-bits, --q-group-size, --q-mode and --recipe need -q (quantize)")
        return None
    try:
        rec = Q.get_recipe(recipe)
        gs = q_group_size or (32 if q_mode == "mxfp4" else 64)
        bits = q_bits if q_bits is not None else (rec.experts or 4)
        if rec.fixed_bits and q_bits is not None and q_bits != rec.experts:
            raise ConvertError(f"recipe '{rec.name}' sets the bit widths itself (experts {rec.experts}-bit); "
                               f"drop --q-bits {q_bits} or use --recipe uniform")
        Q.check_settings(bits, gs, q_mode, rec)
    except Q.QuantError as e:
        raise ConvertError(str(e)) from None
    return {"bits": bits, "group_size": gs, "mode": q_mode, "recipe": rec}


def _estimate(source, plan, settings, qblock, src: Path, dst: Path, dtype_name: str, context_tokens: int,
              check_memory: bool, log) -> int:
    """Say what will be written and what it needs; ConvertError before anything is written if memory or
    disk are short. Returns the peak memory estimate."""
    from . import planner

    total, peak = plan.total_bytes, plan.peak_estimate()
    log(f"source: {src} ({_fmt(source.src_bytes)}, {source.cfg.num_hidden_layers} layers)")
    what = "unquantized" if settings is None else (
        f"{settings['recipe'].name}, {qblock['bits']}-bit experts, group {settings['group_size']}, {settings['mode']}")
    log(f"output: {dst} ({what}, {dtype_name}): {_fmt(total)} in {plan.n_shards} shard(s)")
    machine = planner.machine_memory_bytes()
    log(f"conversion memory: about {_fmt(peak)} peak (largest unit '{plan.max_unit.src_name}')"
        + (f", {_fmt(machine)} usable here" if machine else ""))
    if check_memory and machine is not None and peak > machine:
        raise ConvertError(f"converting needs about {_fmt(peak)} of memory but only {_fmt(machine)} is usable "
                           "on this machine; close other programs and retry")
    try:
        run = planner.plan(dataclasses.replace(source.cfg, quantization=qblock), context_tokens, weights_bytes=total)
        log(f"running it at {context_tokens:,} tokens of context needs about {_fmt(run.total_bytes)} "
            f"({run.breakdown()}); "
            + ("this machine could" if run.fits else "this machine could NOT") + " run it")
    except (planner.PlanError, ValueError):
        pass  # the estimate is informative only
    parent = next(p for p in (dst.parent.absolute(), *dst.parent.absolute().parents) if p.exists())
    free = shutil.disk_usage(parent).free
    if total > free:
        raise ConvertError(f"not enough disk space at {parent}: the output needs {_fmt(total)}, {_fmt(free)} free"
                           + _partials_note(dst.parent))
    return peak


def _write_dst(source, plan, settings, dt, qblock, dtype_name: str, src: Path, dst: Path, progress: bool) -> list:
    """Write into a temporary directory beside DST, then rename it to DST. Returns the copied aux files."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    old_limit = mx.set_cache_limit(64 * 2**20)  # freed buffers go back to the OS, so the peak stays a unit
    try:
        weight_map = _write(source, plan, settings, dt, tmp, progress)
        index = {"metadata": {"total_size": plan.total_bytes, "format": "mlx"},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _write_config(source, tmp, qblock, dtype_name)
        aux = _copy_aux(src, tmp)
        _finalize(tmp, dst)
        return aux
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConvertError(f"disk full while writing {dst} (needed {_fmt(plan.total_bytes)}); nothing was left "
                               "behind" + _partials_note(dst.parent)) from None
        raise ConvertError(f"cannot write {dst}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        mx.set_cache_limit(old_limit)


def convert(hf_path: str | os.PathLike, mlx_path: str | os.PathLike, *, quantize: bool = False,
            q_bits: int | None = None, q_group_size: int | None = None, q_mode: str = "affine",
            recipe: str | None = None, dtype: str | None = None, force: int = 0,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES, progress: bool = False,
            context_tokens: int = DEFAULT_CONTEXT_TOKENS, check_memory: bool = True,
            log: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert SRC (directory or Hub repo id) into DST. Raises ConvertError with a user-facing message.

    force: 1 (True) replaces a DST that holds a model, 2 any non-empty DST."""
    log = log or (lambda _msg: None)
    t0 = time.perf_counter()
    max_shard = parse_size(max_shard_size)
    settings = _quant_settings(quantize, q_bits, q_group_size, q_mode, recipe)
    src = resolve_source(str(hf_path), log)
    try:
        source = _Source(src)
    except WeightsError as e:
        raise ConvertError(str(e)) from None
    dst = Path(mlx_path).expanduser()
    _recover(dst, log)
    _check_destination(src, dst, int(force))
    dtype_name, dt = _dtype_of(dtype, source.cfg)
    plan = _plan(source, settings, dt, max_shard)
    qblock = None
    if settings is not None:
        qblock = Q.config_block(plan.quant_params, bits=settings["bits"], group_size=settings["group_size"],
                                mode=settings["mode"], recipe=settings["recipe"])
    peak = _estimate(source, plan, settings, qblock, src, dst, dtype_name, context_tokens, check_memory, log)
    aux = _write_dst(source, plan, settings, dt, qblock, dtype_name, src, dst, progress)
    shards = [_shard_name(i, plan.n_shards) for i in range(plan.n_shards)]
    dt_s = time.perf_counter() - t0
    log(f"wrote {dst}: {_fmt(plan.total_bytes)} in {len(shards)} shard(s)"
        + (f" + {', '.join(aux)}" if aux else "") + f" in {dt_s:.1f} s")
    return ConvertResult(dst, shards, plan.total_bytes, source.src_bytes, qblock, peak, dt_s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert a Kimi-Linear checkpoint (HF layout) into an MLX directory, optionally quantized.",
        epilog="recipes: " + "; ".join(f"{n}: {r.description}" for n, r in Q.RECIPES.items()))
    p.add_argument("--hf-path", required=True, help="source: a local HF-layout directory or a Hub repo id")
    p.add_argument("--mlx-path", required=True, help="destination directory (created; must be empty unless --force)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, default=None, help="bits per weight: 2, 3, 4, 5, 6 or 8 (default 4)")
    p.add_argument("--q-group-size", type=int, default=None, help="32, 64 or 128 (default 64; 32 for mxfp4)")
    p.add_argument("--q-mode", default="affine", help="affine or mxfp4 (default affine)")
    p.add_argument("--recipe", default=None, help=f"mixed precision: {', '.join(Q.RECIPES)} (default uniform)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 for unquantized tensors and "
                                                 "scales (default: the source's dtype)")
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES), help="bytes per shard (e.g. 5GB, 500MB)")
    p.add_argument("--context-tokens", type=int, default=DEFAULT_CONTEXT_TOKENS,
                   help="context length for the printed run-memory estimate")
    p.add_argument("--force", action="count", default=0,
                   help="replace a DST that holds a model; twice (--force --force) replaces any non-empty DST")
    p.add_argument("--quiet", action="store_true", help="no progress or summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        convert(args.hf_path, args.mlx_path, quantize=args.quantize, q_bits=args.q_bits,
                q_group_size=args.q_group_size, q_mode=args.q_mode, recipe=args.recipe, dtype=args.dtype,
                force=args.force, max_shard_size=args.max_shard_size, progress=not args.quiet,
                context_tokens=args.context_tokens, log=say)
    except (ConvertError, ConfigError, WeightsError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convert.py: interrupted; nothing was written to the destination", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"convert.py: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
    return 0


__all__ = ["convert", "main", "ConvertError", "ConvertResult", "resolve_source", "parse_size"]
