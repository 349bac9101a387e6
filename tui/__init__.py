"""kimi-chat: the terminal chat app for kimi_mlx (Textual)."""

__all__ = ["KimiChatApp", "main"]


def __getattr__(name):
    # Lazy so `import tui` (and `python -m tui --help`) stays cheap.
    if name == "KimiChatApp":
        from .app import KimiChatApp

        return KimiChatApp
    if name == "main":
        from .__main__ import main

        return main
    raise AttributeError(name)
