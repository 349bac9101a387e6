"""`python -m kimi_mlx` is `python -m kimi_mlx.generate`."""
import sys

from .generate import main

if __name__ == "__main__":
    sys.exit(main())
