"""Pipeline parallel over the ranks mlx.launch starts (mx.distributed; ring backend or JACCL).

    mlx.launch --hostfile hosts.json --backend ring -- python -m kimi_mlx.generate --model M --prompt hi

Each rank holds a contiguous run of layers and their caches; rank 0 also the embedding and the head,
and does the tokenizing, sampling and I/O. See docs/DISTRIBUTED.md.

    start(split)            None outside mlx.launch; else this process joined to the other ranks (Pipeline)
    Pipeline.load(path)     rank 0: (PipelineModel, tokenizer), used like any model; others: their part
    Pipeline.follow()       ranks > 0: serve rank 0's commands until it stops (the seam for any front end)
    Pipeline.close()        rank 0: tell the others to stop
"""
from __future__ import annotations

from typing import Optional

from .link import DEFAULT_TIMEOUT, PeerLost, PeerTimeout, PipelineError, launched

# loaded on first use: `python -m kimi_mlx.distributed.split` / `.bench` run without importing them twice
_LAZY = {"Pipeline": "pipeline", "PipelineModel": "pipeline", "PipelineCache": "pipeline",
         "RemoteLayerCache": "pipeline", "StageModel": "pipeline", "Follower": "pipeline", "connect": "pipeline",
         "choose_split": "split", "parse_split": "split"}

__all__ = ["start", "launched", "PipelineError", "PeerLost", "PeerTimeout", "DEFAULT_TIMEOUT", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def start(split: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT):
    """This process as one rank of a pipeline (a Pipeline) when mlx.launch started several; None
    otherwise. split: layers per rank ("14,13"); None: chosen from each rank's memory. timeout:
    seconds a rank waits for data it is owed before it gives up on a silent peer (a dead one is
    seen at once). Ranks don't read stdin: mlx.launch never closes it."""
    if not launched():
        return None
    from .link import quiet_launcher_relay
    from .pipeline import Pipeline, connect

    quiet_launcher_relay()  # no rank reads stdin (generate refuses --prompt - under mlx.launch)

    return Pipeline(connect(timeout), split)
