"""Every code block in README.md runs: Python blocks against the offline fixture model, shell
commands for real where they are offline (generation, documents, sessions) and as `--help` where
they would download, install or run for minutes."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TINY_CHAT = REPO / "tests" / "fixtures" / "models" / "tiny_chat"
# the model paths the README uses, all standing for the fixture model here
MODEL_PATHS = {"./Kimi-Linear-4bit", "M", "path/to/checkpoint", "tests/fixtures/models/tiny_chat"}
RUN_MODULES = {"kimi_mlx.generate", "kimi_mlx.session"}  # offline and quick with the fixture
SKIP = {"pip"}  # installing is what made this environment


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def commands() -> list[str]:
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _env():
    env = dict(os.environ)
    env.pop("KIMI_MLX_HOME", None)
    return env


def _argv(cmd: str) -> tuple[list[str], bool]:
    """(argv with the fixture model substituted, whether to run it for real rather than --help)."""
    argv = shlex.split(cmd)
    for i, a in enumerate(argv[:-1]):
        if a == "--model" and argv[i + 1] in MODEL_PATHS:
            argv[i + 1] = str(TINY_CHAT)
    unknown = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--model" and argv[i + 1] != str(TINY_CHAT)]
    assert not unknown, f"README command uses model {unknown[0]!r}: add it to MODEL_PATHS"
    if argv[0] == "python":
        argv[0] = sys.executable
        if argv[1].endswith(".py"):  # the README runs scripts from the repository root
            argv[1] = str(REPO / argv[1])
    else:  # a console script of this package, next to the interpreter
        argv[0] = str(Path(sys.executable).with_name(argv[0]))
    real = argv[1:2] == ["-m"] and argv[2] in RUN_MODULES
    return (argv if real else argv + ["--help"]), real


def test_readme_has_snippets():
    assert blocks("python") and commands()
    assert "python -m kimi_mlx.generate --model tests/fixtures/models/tiny_chat --prompt hi --max-tokens 8" in commands()


@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_python_blocks_run(i, tmp_path):
    code = blocks("python")[i]
    paths = set(re.findall(r"""load(?:_model)?\(\s*["']([^"']+)["']""", code))
    assert paths <= MODEL_PATHS, f"README Python block {i} loads {paths - MODEL_PATHS}: add to MODEL_PATHS"
    for p in paths:
        code = code.replace(f'"{p}"', repr(str(TINY_CHAT))).replace(f"'{p}'", repr(str(TINY_CHAT)))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"README Python block {i} failed:\n{code}\n{r.stderr[-3000:]}"


def test_shell_commands_run(tmp_path):
    """In order, in one scratch directory (later commands use the session an earlier one saved)."""
    (tmp_path / "book.txt").write_text("Call me Ishmael. Some years ago I went to sea.\n" * 20)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("print('hello')\n")
    ran = 0
    for cmd in commands():
        if shlex.split(cmd)[0] in SKIP:
            continue
        argv, real = _argv(cmd)
        if real and "--max-tokens" not in argv and "kimi_mlx.generate" in argv:
            argv += ["--max-tokens", "8"]  # the fixture's replies are noise: a few tokens show it runs
        r = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"README command failed: {cmd}\n{shlex.join(argv)}\n{r.stderr[-3000:]}"
        if not real:
            assert "usage" in r.stdout.lower(), f"{cmd}: no usage from --help\n{r.stdout[-500:]}"
        ran += real
    assert ran >= 4
    assert (tmp_path / "book.kimisession").exists()
