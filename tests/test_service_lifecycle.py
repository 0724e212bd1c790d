"""The service as a process: starts with one command, stops cleanly on SIGTERM/SIGINT (also
when SIGINT was inherited as ignored), restarts on the same data dir, refuses bad settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e_support import ROOT, make_service


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child waiting to be reaped by init, e.g. the
    multiprocessing resource tracker of the verification pool, is not running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_restarts(tmp_path, sig):
    svc = make_service(None, tmp_path, TAP_RELAY_URL="http://127.0.0.1:9")
    # start like `cmd &` in a script: SIGINT ignored, inherited through exec
    svc.proc = subprocess.Popen([sys.executable, "-m", "bytewax.run", "flows.tap"], cwd=str(ROOT), env=svc.env,
                                stdout=open(svc.log_path, "ab"), stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    svc.wait_healthy()
    children = _children_of(svc.proc.pid)
    assert children, "the delivery child runs"
    assert svc.api("POST", "/repos/add", {"dids": ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"]})[0] == 200
    svc.proc.send_signal(sig)
    assert svc.proc.wait(15) == 0, svc.log_tail()
    assert "Traceback" not in svc.log_path.read_text()
    time.sleep(0.5)
    assert not [c for c in children if _running(c)], "every child of the flow has exited"
    svc.start()  # same data dir
    status, info = svc.api("GET", "/info/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
    assert status == 200 and info["did"] == "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
    svc.stop()


def test_bad_settings_fail_fast_with_every_reason(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAP_")}
    env.update({"PYTHONPATH": str(ROOT), "TAP_DATA_DIR": str(tmp_path / "d"), "TAP_RELAY_URL": "ftp://x",
                "TAP_RETRY_TIMEOUT": "soon", "TAP_NO_REPLAY": "true", "TAP_FULL_NETWORK": "true"})
    out = subprocess.run([sys.executable, "-m", "bytewax.run", "flows.tap"], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "TAP_RELAY_URL='ftp://x': must start with http:// or https://" in out.stderr
    assert "TAP_RETRY_TIMEOUT='soon'" in out.stderr
    assert not (tmp_path / "d").exists()


def test_verification_pool_only_when_something_is_verified(tmp_path):
    """The flow starts TAP_VERIFY_WORKERS processes beside the delivery child (as many more, the
    lanes, with live commits in the pool), and none in TAP_OUTBOX_ONLY mode (no firehose, no
    backfill: nothing to verify)."""
    def cmdlines(svc) -> list[str]:
        out = []
        for c in _children_of(svc.proc.pid):
            try:
                with open(f"/proc/{c}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode())
            except FileNotFoundError:
                pass
        return out

    # live commits inline: the 2 processes for repo CARs; in the pool: 2 lanes more
    for outbox_only, live_verify, want_workers in (("false", "inline", 2), ("false", "pool", 4), ("true", "pool", 0)):
        (tmp_path / live_verify / outbox_only).mkdir(parents=True)
        svc = make_service(None, tmp_path / live_verify / outbox_only, TAP_RELAY_URL="http://127.0.0.1:9",
                           TAP_OUTBOX_ONLY=outbox_only, TAP_VERIFY_WORKERS="2", TAP_LIVE_VERIFY=live_verify).start()
        try:
            kids = cmdlines(svc)
            assert sum("connectors.delivery_main" in k for k in kids) == 1, kids
            assert sum("multiprocessing.spawn" in k for k in kids) == want_workers, kids
        finally:
            svc.stop()


def test_a_data_dir_whose_databases_do_not_pair_is_refused(tmp_path):
    """flow/ removed but delivery/ kept: the old acks and cursors would drop the new flow's
    events (same outbox ids again), so the service refuses to start and says what to remove.
    delivery/ removed is harmless: it starts again and adopts the flow's incarnation."""
    import shutil

    from store.db import close_all, open_delivery_db, open_flow_db
    from store.pairing import INCARNATION

    svc = make_service(None, tmp_path, TAP_RELAY_URL="http://127.0.0.1:9")
    svc.start()
    assert svc.api("POST", "/repos/add", {"dids": ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"]})[0] == 200
    svc.stop()
    data = svc.data_dir
    try:
        first = open_flow_db(data, secondary=True).cf("meta").get(INCARNATION)
        assert first and open_delivery_db(data, secondary=True).cf("dmeta").get(INCARNATION) == first
    finally:
        close_all()

    shutil.rmtree(data / "flow")
    out = subprocess.run([sys.executable, "-m", "bytewax.run", "flows.tap"], cwd=str(ROOT), env=svc.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"Remove {data / 'delivery'} as well" in out.stderr and "Traceback" not in out.stderr

    shutil.rmtree(data / "delivery")
    svc.start()
    assert svc.api("GET", "/info/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")[0] == 404  # a new flow database: nothing tracked
    svc.stop()
    try:
        second = open_flow_db(data, secondary=True).cf("meta").get(INCARNATION)
        assert second and second != first and open_delivery_db(data, secondary=True).cf("dmeta").get(INCARNATION) == second
    finally:
        close_all()
