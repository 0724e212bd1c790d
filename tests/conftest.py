"""Shared pytest fixtures. End-to-end fixtures start real parts (see tests/e2e_support.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def pds():
    """A real PDS + PLC on loopback ports of its own, for the whole test session."""
    from tests.e2e_support import start_pds

    harness = start_pds()
    try:
        yield harness
    finally:
        harness.stop()


@pytest.fixture(autouse=True)
def _close_databases():
    """Each test opens its own data dirs; close handles so the next test can reopen them."""
    yield
    from store.db import close_all

    close_all()
