import os
import sys

try:
    from .app import main
except ImportError as e:  # the HTTP stack is an extra
    if e.name not in ("starlette", "uvicorn"):
        raise
    sys.exit(f"error: the server needs {e.name}: pip install 'kimi-mlx[server]'")

rc = main()
# Everything is closed by now (the MLX thread joined, the socket shut). MLX, once a thread other than the
# main one has used it, can abort in its C++ exit-time destructors ("terminate called without an active
# exception", about one exit in three on Linux CPU, MLX 0.32): leave without running them.
sys.stdout.flush()
sys.stderr.flush()
os._exit(rc)
