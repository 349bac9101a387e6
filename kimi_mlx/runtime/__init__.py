"""What the CLI and the chat app share: the model resolver, the prompt builder and conversations.

    model.py         resolve_model_path / load (hub or local), DEFAULT_MODEL
    prompt.py        PromptBuilder: token ids from the tokenizer's chat template, documents first
    checkpoints.py   CheckpointStore: kept states, found again by token prefix, bounded by bytes
    conversation.py  Conversation: owns the cache; each turn prefills only what is new
    mlx_thread.py    MLXThread: the one thread (and MLX stream) an app runs all model work on

Names are loaded on first use, so `runtime.model` (DEFAULT_MODEL, the resolver) doesn't load MLX.
"""
_LAZY = {
    "Checkpoint": "checkpoints", "CheckpointStore": "checkpoints", "Conversation": "conversation",
    "DEFAULT_MODEL": "model", "MODEL_FILE_PATTERNS": "model", "ModelLoadError": "model", "load": "model",
    "resolve_model_path": "model", "MLXThread": "mlx_thread", "Message": "prompt", "PromptBuilder": "prompt",
    "PromptError": "prompt",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
