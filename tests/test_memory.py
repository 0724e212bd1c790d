"""runtime.memory: the malloc arena cap reaches this process and the processes it starts."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e_support import ROOT

_PROBE = """
import os, subprocess, sys
from runtime.memory import limit_malloc_arenas
print(limit_malloc_arenas(), os.environ.get("MALLOC_ARENA_MAX"))
print(subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MALLOC_ARENA_MAX'))"],
                     capture_output=True, text=True).stdout.strip())
"""


def _probe(env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=str(ROOT), env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


def test_arena_cap_applies_here_and_to_children():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    here, child = _probe(env)[:2]
    assert here == "True 2" and child == "2"


def test_an_operators_own_setting_wins():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "4"}
    here, child = _probe(env)[:2]
    assert here == "False 4" and child == "4"


def test_tune_gc_freezes_what_is_loaded_and_collects_young_objects_less_often():
    probe = ("import gc; from runtime.memory import GC_GEN0, tune_gc; before = gc.get_freeze_count(); tune_gc(); "
             "print(gc.get_threshold()[0] == GC_GEN0 > 700, gc.get_freeze_count() > before)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=str(ROOT), capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
