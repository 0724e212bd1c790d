"""flows.tap refuses bytewax topologies it cannot run, with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.topology import TopologyError, check_topology

ROOT = Path(__file__).resolve().parent.parent
RUN = "/x/bytewax/run.py"


def test_one_process_one_worker_is_fine():
    check_topology([RUN, "flows.tap"], {})
    check_topology([RUN, "flows.tap", "-w", "1"], {"BYTEWAX_WORKERS_PER_PROCESS": "1"})
    check_topology([RUN, "flows.tap", "-i", "0", "-a", "127.0.0.1:2101"], {})


@pytest.mark.parametrize("argv,env,what", [
    ([RUN, "flows.tap", "-w", "2"], {}, "-w/BYTEWAX_WORKERS_PER_PROCESS=2"),
    ([RUN, "flows.tap", "--workers-per-process=3"], {}, "=3"),
    ([RUN, "flows.tap"], {"BYTEWAX_WORKERS_PER_PROCESS": "2"}, "=2"),
    ([RUN, "flows.tap", "-i", "1", "-a", "127.0.0.1:2101;127.0.0.1:2102"], {}, "several processes"),
    ([RUN, "flows.tap"], {"BYTEWAX_ADDRESSES": "a:1;b:2", "BYTEWAX_PROCESS_ID": "0"}, "several processes"),
])
def test_refused_topologies_name_what_was_asked(argv, env, what):
    with pytest.raises(TopologyError) as e:
        check_topology(argv, env)
    assert what in str(e.value) and "TAP_VERIFY_WORKERS" in str(e.value)


def test_the_service_exits_2_with_the_message(tmp_path):
    env = dict(os.environ, TAP_DATA_DIR=str(tmp_path / "data"), TAP_BIND="127.0.0.1:0",
               BYTEWAX_WORKERS_PER_PROCESS="2")
    p = subprocess.run([sys.executable, "-m", "bytewax.run", "flows.tap"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "one bytewax process with one worker" in p.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created
