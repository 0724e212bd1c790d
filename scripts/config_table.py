"""Print the README's configuration table from ``config.SETTINGS`` (the single source).

``python scripts/config_table.py`` prints it; tests/test_readme.py checks the README holds it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import SETTINGS  # noqa: E402


def table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        names = " / ".join(f"`{n}`" for n in s.env)
        default = f"`{s.default}`" if s.default else "(empty)"
        rows.append(f"| {names} | {default} | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
