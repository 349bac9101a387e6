"""kimi_mlx: Kimi Linear (KDA + NoPE MLA + MoE) in MLX."""
from ._blas import preload as _preload_blas

_preload_blas()  # must run before mlx.core is imported anywhere

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("kimi_mlx.weights", "load_model"),
    "load": ("kimi_mlx.runtime.model", "load"),
    "generate": ("kimi_mlx.generate", "generate"),
    "stream_generate": ("kimi_mlx.generate", "stream_generate"),
    "ModelConfig": ("kimi_mlx.config", "ModelConfig"),
    "Conversation": ("kimi_mlx.runtime.conversation", "Conversation"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'kimi_mlx' has no attribute {name!r}")


__all__ = list(_LAZY)
