"""`python -m kimi_mlx.server`: an OpenAI-compatible HTTP server whose prefix cache works for Kimi Linear.

    protocol.py  the OpenAI wire format: requests checked field by field, errors, response objects
    engine.py    the model on one MLX thread, a FIFO job queue, the prefix cache (runtime checkpoints)
    app.py       Starlette routes, uvicorn, the command line
    bench.py     `python -m kimi_mlx.server.bench`: time to first token with a shared prefix, 20 clients

The seam for other models: the server drives whatever `Engine(loader=...)` returns, where
`loader(model_arg) -> (model, tokenizer)` is `kimi_mlx.runtime.load` by default and is called once, on
the MLX thread. The model must be what `runtime.Conversation` drives (`make_cache`, `__call__` with a
cache, `.model` for prefill, `config.model_max_length`), so a pipeline-parallel model from
kimi_mlx.distributed plugs in there without changing the HTTP side.
"""
_LAZY = {"Engine": "engine", "Server": "app", "main": "app", "serve": "app"}  # Starlette loads on first use


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
