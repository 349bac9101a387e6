"""Which model directory to load: a local path, or a Hugging Face repo's snapshot.

The one resolver of the CLI, the chat app (which never downloads: `download=False`) and
convert.py (which fetches the original checkpoint, remote code included).
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence, Union

# the 4-bit MLX conversion (~27 GB): the bf16 original (~98 GB) fits no laptop
DEFAULT_MODEL = "mlx-community/Kimi-Linear-48B-A3B-Instruct-4bit"
ORIGINAL_MODEL = "moonshotai/Kimi-Linear-48B-A3B-Instruct"  # what convert.py quantizes
# what a model directory needs: config, weights, tokenizer, chat template, remote code
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "tiktoken.model", "*.tiktoken", "*.jinja", "*.py"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

LogFn = Callable[[str], None]


class ModelLoadError(OSError):
    """The model could not be found or downloaded (message is one line, ready to show).

    kind: "no_path" (no such directory), "not_model_dir" (no config.json), "not_downloaded"
    (a repo id not in the local cache while downloads are off), "hub" (the Hub refused or failed)."""

    def __init__(self, message: str, kind: str = "no_path"):
        super().__init__(message)
        self.kind = kind


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def is_repo_id(s: str) -> bool:
    return bool(_REPO_ID.match(s)) and not s.startswith((".", "~", "/"))


def _hub_reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


def _cached_snapshot(repo: str, patterns: Sequence[str]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, allow_patterns=list(patterns), local_files_only=True))


def _offline_snapshot(repo: str, why: str, patterns: Sequence[str]) -> Path:
    """A snapshot already in the local Hugging Face cache, for when the Hub can't be reached."""
    try:
        return _cached_snapshot(repo, patterns)
    except Exception:
        raise ModelLoadError(
            f"{repo}: cannot reach the Hugging Face Hub ({why}) and the model is not in the local cache; "
            f"connect to the internet once to download it, or give a local model directory instead", "hub") from None


def _announce(repo: str, files, missing: int, log: LogFn, cache_dir: str, for_running: bool) -> None:
    """What a download will fetch, and whether the model fits this machine, before any byte moves."""
    from ..planner import RUNTIME_OVERHEAD_BYTES, format_bytes, machine_memory_bytes

    total = sum(s.size or 0 for s in files)
    weights = sum(s.size or 0 for s in files if s.rfilename.endswith(".safetensors"))
    need = weights + RUNTIME_OVERHEAD_BYTES
    log(f"Downloading {repo}: {format_bytes(missing)} to fetch ({format_bytes(total)} in {len(files)} files) "
        f"into {cache_dir}.")
    if not for_running:  # convert.py streams the checkpoint: its size in memory doesn't matter
        return
    have = machine_memory_bytes()
    log(f"Running it needs about {format_bytes(need)} of memory for the weights and runtime, plus the cache"
        + (f"; this machine has about {format_bytes(have)} usable." if have else "."))
    if have and need > have:
        pick = (f"a quantized conversion such as {DEFAULT_MODEL} (4-bit, about 27 GB) is a better fit"
                if repo != DEFAULT_MODEL else "it needs a machine with more memory (or a smaller quantization)")
        log(f"warning: that is more memory than this machine has free; {pick}.")


def _download(repo: str, log: LogFn, patterns: Sequence[str], for_running: bool) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import (GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        info = HfApi().model_info(repo, files_metadata=True)
    except GatedRepoError:
        raise ModelLoadError(f"{repo}: the repository is gated; accept its terms on huggingface.co and log in "
                             f"with `hf auth login`", "hub") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{repo}: no such model on the Hugging Face Hub and no local directory of that name",
                             "hub") from None
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"{repo}: {_hub_reason(e)}", "hub") from None
    except OfflineModeIsEnabled:
        return _offline_snapshot(repo, "HF_HUB_OFFLINE is set", patterns)
    except Exception as e:  # connection refused, DNS, timeouts, 5xx: try the cache
        return _offline_snapshot(repo, _hub_reason(e), patterns)

    files = [s for s in (info.siblings or []) if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)]
    missing = sum(s.size or 0 for s in files
                  if not isinstance(try_to_load_from_cache(repo, s.rfilename, revision=info.sha), str))
    if missing:
        from ..planner import format_bytes

        _announce(repo, files, missing, log, constants.HF_HUB_CACHE, for_running)
        try:
            Path(constants.HF_HUB_CACHE).mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(constants.HF_HUB_CACHE).free
        except OSError:
            free = None
        if free is not None and free < missing:
            raise ModelLoadError(f"{repo}: needs {format_bytes(missing)} of disk space to download, "
                                 f"but only {format_bytes(free)} is free in {constants.HF_HUB_CACHE}", "hub")
    try:
        return Path(snapshot_download(repo, revision=info.sha, allow_patterns=list(patterns)))
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise ModelLoadError(f"{repo}: download failed ({_hub_reason(e)}); run the command again to resume",
                             "hub") from None


def resolve_model_path(path_or_repo: Union[str, os.PathLike] = DEFAULT_MODEL, log: LogFn = _stderr,
                       download: bool = True, patterns: Sequence[str] = MODEL_FILE_PATTERNS,
                       require_config: bool = False, for_running: bool = True) -> Path:
    """A local model directory: the path itself, or a Hugging Face repo's snapshot.

    download=False only looks in the local Hugging Face cache (the chat app never fetches tens
    of GB on its own). require_config: a local directory must hold config.json. for_running: say
    before a download whether the model fits this machine's memory (not for convert.py's source)."""
    s = os.fspath(path_or_repo)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{s}: not a directory (expected a model directory with config.json)")
        if require_config and not (p / "config.json").exists():
            raise ModelLoadError(f"{p} has no config.json; is it a model directory?", "not_model_dir")
        return p
    if not is_repo_id(s):
        raise ModelLoadError(f"{s}: no such model directory")
    if download:
        return _download(s, log, patterns, for_running)
    try:
        return _cached_snapshot(s, patterns)
    except Exception:
        raise ModelLoadError(f"{s} is not in the local Hugging Face cache.", "not_downloaded") from None


def load(path_or_repo: Union[str, os.PathLike] = DEFAULT_MODEL, lazy: bool = False, log: LogFn = _stderr,
         download: bool = True):
    """(model, tokenizer) from a local directory or a Hugging Face repo id.

    The config and the tokenizer are checked before the weights are read, so a broken
    directory fails in milliseconds, not after loading tens of GB.
    """
    from ..config import ModelConfig
    from ..tokenizer import load_tokenizer
    from ..weights import load_model

    model_dir = resolve_model_path(path_or_repo, log, download=download)
    ModelConfig.from_file(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, lazy=lazy)
    return model, tokenizer
