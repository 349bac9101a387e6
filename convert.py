#!/usr/bin/env python
"""Convert a Kimi-Linear checkpoint into an MLX directory: `python convert.py --hf-path SRC --mlx-path DST -q`.

See `python convert.py --help`; the work is done by kimi_mlx.convert.
"""
import sys

import kimi_mlx  # noqa: F401  (loads the BLAS before mlx.core)
from kimi_mlx.convert import main

if __name__ == "__main__":
    sys.exit(main())
