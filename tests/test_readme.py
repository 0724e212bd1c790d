"""The README stays true: its configuration table is the one config.SETTINGS gives, and the
two commands it names exist and are what CI runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_config_table_matches_settings():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts" / "config_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index("<!-- config-table:start -->"), readme.index("<!-- config-table:end -->")
    assert readme[start:end].split("\n", 1)[1].strip() == mod.table().strip()


def test_two_commands_and_ci():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/setup.sh && .venv/bin/python -m bytewax.run flows.tap" in readme
    assert "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
