import os
import tempfile

# remembered prefill speeds etc. go to a scratch dir, never the user's cache
os.environ.setdefault("KIMI_MLX_CACHE", tempfile.mkdtemp(prefix="kimi-mlx-test-cache-"))

import kimi_mlx  # noqa: F401,E402  (loads the optimized BLAS before mlx.core)
