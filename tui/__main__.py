"""`kimi-chat` / `python -m tui`: the terminal chat app."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

FAKE_ENV = "KIMI_MLX_FAKE_ENGINE"
MODEL_ENV = "KIMI_MLX_MODEL"


def build_parser() -> argparse.ArgumentParser:
    from .engine import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="kimi-chat", description="Chat with Kimi Linear locally, documents included.")
    from kimi_mlx.settings import settings

    p.add_argument(
        "--model",
        default=settings().model or DEFAULT_MODEL,
        help=f"model directory or Hugging Face repo id already downloaded (default: ${MODEL_ENV} or {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where chats and document sessions are kept (default: $KIMI_MLX_HOME or the platform data directory)",
    )
    # Hidden: a scripted engine for tests and demos (also KIMI_MLX_FAKE_ENGINE=1).
    p.add_argument("--fake-engine", action="store_true", help=argparse.SUPPRESS)
    return p


def make_engine_factory(fake: bool):
    from .engine import FakeEngine, KimiEngine

    if fake:
        from kimi_mlx.settings import settings

        delay = settings().fake_delay
        return lambda model: FakeEngine(model_name="fake-kimi", token_delay=delay)
    return KimiEngine


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from kimi_mlx.settings import settings

    fake = args.fake_engine or settings().fake_engine
    factory = make_engine_factory(fake)

    from .app import KimiChatApp
    from .store import StoreError

    try:
        app = KimiChatApp(engine=factory(args.model), data_dir=args.data_dir, engine_factory=factory)
    except StoreError as e:  # locked, unreadable, read-only: one line, nothing touched
        print(f"kimi-chat: {e}", file=sys.stderr)
        return 1
    app.run()
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
