"""kimi_mlx.settings: one table, "off" parsed one way, every variable in the README."""
import re
from pathlib import Path

import pytest

from kimi_mlx import settings as S

OFF_SPELLINGS = ["off", "0", "false", "no", "none", " OFF ", "No"]


@pytest.mark.parametrize("word", OFF_SPELLINGS)
def test_off_means_off_everywhere(monkeypatch, word):
    for var in ("KIMI_MLX_BLAS", "KIMI_MLX_CPU_FAST", "KIMI_MLX_KDA_CPU", "KIMI_MLX_CHECKPOINT_MB",
                "KIMI_MLX_FAKE_ENGINE"):
        monkeypatch.setenv(var, word)
    s = S.settings()
    assert s.blas == "off" and s.cpu_fast == "off" and not s.kda_cpu
    assert s.checkpoint_bytes == 0 and not s.fake_engine


def test_values_and_changes_are_seen(monkeypatch):
    monkeypatch.setenv("KIMI_MLX_BLAS", "/opt/Lib/libopenblas.so")
    monkeypatch.setenv("KIMI_MLX_CPU_FAST", "yes")
    monkeypatch.setenv("KIMI_MLX_KDA_THREADS", "3")
    monkeypatch.setenv("KIMI_MLX_CHECKPOINT_MB", "1.5")
    monkeypatch.setenv("KIMI_MLX_KDA", "Reference")
    s = S.settings()
    assert s.blas == "/opt/Lib/libopenblas.so" and s.cpu_fast == "on" and s.kda_threads == 3
    assert s.checkpoint_bytes == int(1.5 * 2**20) and s.kda_reference
    assert S.settings() is s  # parsed once for one environment
    monkeypatch.setenv("KIMI_MLX_KDA_THREADS", "zero")
    assert S.settings().kda_threads is None and S.settings() is not s


def test_every_variable_read_anywhere_is_in_the_table_and_the_readme():
    root = Path(__file__).resolve().parents[1]
    used = set()
    for d in ("kimi_mlx", "tui", "metal_kernels"):
        for f in (root / d).rglob("*.py"):
            used |= set(re.findall(r"KIMI_MLX_[A-Z0-9_]+", f.read_text()))
    table = set(S.USER_SETTINGS) | set(S.KERNEL_SETTINGS)
    assert used <= table, sorted(used - table)
    readme = (root / "README.md").read_text()
    assert not [v for v in table if v not in readme]
    assert not set(S.USER_SETTINGS) & set(S.KERNEL_SETTINGS)


def test_the_readme_shows_the_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert S.table_markdown() in readme


def test_held_kernel_settings_read_once_per_block(monkeypatch):
    import threading

    from kimi_mlx.settings import held_kernel_settings, kernel_setting

    monkeypatch.setenv("KIMI_MLX_MLA_NBUF", "1")
    with held_kernel_settings():
        assert kernel_setting("KIMI_MLX_MLA_NBUF") == "1"
        monkeypatch.setenv("KIMI_MLX_MLA_NBUF", "2")
        with held_kernel_settings():  # nested: the same held values
            assert kernel_setting("KIMI_MLX_MLA_NBUF") == "1"
        seen = []
        t = threading.Thread(target=lambda: seen.append(kernel_setting("KIMI_MLX_MLA_NBUF")))
        t.start()
        t.join()
        assert seen == ["2"]  # another thread reads the environment
        assert kernel_setting("KIMI_MLX_MLA_NBUF") == "1"
    assert kernel_setting("KIMI_MLX_MLA_NBUF") == "2"  # after the block: read again
    with held_kernel_settings():
        assert kernel_setting("KIMI_MLX_MLA_NBUF") == "2"
