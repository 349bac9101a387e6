"""What a newcomer does first: the offline smoke test named in the README, and the one layout that
confuses Python (running it from the parent of a clone named kimi_mlx)."""
from __future__ import annotations

import filecmp
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from fixtures.tiny_tokenizer import write_tiny_tokenizer
from helpers import MODELS

REPO = Path(__file__).resolve().parents[1]
SMOKE = "python -m kimi_mlx.generate --model tests/fixtures/models/tiny_chat --prompt hi --max-tokens 8"


def _env():
    env = dict(os.environ)
    env.pop("KIMI_MLX_HOME", None)
    return env


def test_offline_smoke_test_runs():
    """The README's exact command, from the repository root: loads, tokenizes, generates, exits 0."""
    assert SMOKE in (REPO / "README.md").read_text()
    argv = shlex.split(SMOKE)
    argv[0] = sys.executable
    r = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), "no reply printed"
    assert "Traceback" not in r.stderr


def test_tiny_chat_is_what_its_script_makes(tmp_path):
    """tests/fixtures/make_tiny_chat.py's recipe: tiny_grouped's weights plus the tiny tokenizer."""
    chat = MODELS / "tiny_chat"
    assert filecmp.cmp(chat / "model.safetensors", MODELS / "tiny_grouped" / "model.safetensors", shallow=False)
    config = json.loads((chat / "config.json").read_text())
    assert config == json.loads((MODELS / "tiny_grouped" / "config.json").read_text())
    write_tiny_tokenizer(tmp_path)
    for name in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):
        assert filecmp.cmp(chat / name, tmp_path / name, shallow=False), name
    assert sum(f.stat().st_size for f in chat.iterdir()) < 4 * 2**20


def _from_parent_of_clone(tmp_path, clone_name):
    """`import kimi_mlx; kimi_mlx.load` run in the folder holding a clone named `clone_name`."""
    clone = tmp_path / clone_name
    clone.mkdir()
    os.symlink(REPO / "kimi_mlx", clone / "kimi_mlx")  # the package inside the clone
    code = ("import kimi_mlx._native as n; why = n.shadowed_package(); print(why or '')\n"
            "import kimi_mlx; kimi_mlx.load; print('ok')")
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=120)


def test_parent_of_a_clone_named_kimi_mlx_is_explained(tmp_path):
    """Python takes the clone's folder for the package (an empty namespace package) before the
    installed one, unless the install is a plain path entry; whatever happens here must either work
    or be the error the README explains, with its way out."""
    r = _from_parent_of_clone(tmp_path, "kimi_mlx")
    readme = (REPO / "README.md").read_text()
    if r.returncode != 0:
        symptom = "module 'kimi_mlx' has no attribute 'load'"
        assert symptom in r.stderr, r.stderr[-2000:]
        assert f"`{symptom}`" in readme and "git clone URL kimi-mlx" in readme
        # what entry points print instead: the folder taken for the package, and the way out
        assert f"Python imported {tmp_path / 'kimi_mlx'} as the kimi_mlx package" in r.stdout
        assert "rename the clone (e.g. kimi-mlx)" in r.stdout
    else:
        assert r.stdout.split() == ["ok"]


def test_parent_of_a_clone_named_kimi_dash_mlx_works(tmp_path):
    """The README's way out: a folder name that isn't a Python identifier is never imported."""
    r = _from_parent_of_clone(tmp_path, "kimi-mlx")
    assert r.returncode == 0 and r.stdout.split() == ["ok"], r.stderr[-2000:]  # and nothing to explain
