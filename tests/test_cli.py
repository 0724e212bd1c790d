"""The ``tapflow`` command line, run as ``python -m tapflow_cli.main`` against a real socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import config
from tests.e2e_support import free_port
from tests.test_client import _ServerThread, ident_frame, rec_frame

ROOT = Path(__file__).resolve().parent.parent


def tapflow(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("TAP_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "tapflow_cli.main", *args], cwd=str(ROOT), env=e,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def server():
    st = _ServerThread()
    yield st
    st.stop()


@pytest.fixture
def secret_server():
    st = _ServerThread(password="s3cret")
    yield st
    st.stop()


def _repo(did: str, state: str, error: str = "", retries: int = 0) -> dict:
    return {"did": did, "handle": "alice.test", "state": state, "rev": "3l", "records": 2, "error": error,
            "retries": retries, "status": "active"}


def test_run_help_lists_every_setting():
    r = tapflow("run", "--help")
    assert r.returncode == 0
    for s in config.SETTINGS:
        assert s.env[0] in r.stdout, s.env[0]
        default = s.default if s.default != "" else '""'
        assert f"{s.env[0]}" in r.stdout and f"(default {default})" in r.stdout
        flag = ("--no-" if s.kind == "bool" and s.default == "true" else "--") + s.attr.replace("_", "-")
        assert flag in r.stdout, flag
    top = tapflow("--help")
    assert top.returncode == 0 and "run --help" in top.stdout.replace("\n", " ")


def test_run_sets_the_environment_then_runs_the_flow():
    r = tapflow("run", "--relay-url", "https://bsky.network", "--bind", ":9999", "--full-network",
                "--no-resync-deletes", "--admin-password", "pw", "--collection-filters", "app.bsky.*",
                "--dry-run", "--", "-w", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "TAP_RELAY_URL=https://bsky.network" in lines and "TAP_BIND=:9999" in lines
    assert "TAP_FULL_NETWORK=true" in lines and "TAP_RESYNC_DELETES=false" in lines
    assert "TAP_ADMIN_PASSWORD=***" in lines and "TAP_COLLECTION_FILTERS=app.bsky.*" in lines
    assert lines[-1].endswith("-m bytewax.run flows.tap -w 2")


def test_run_reports_bad_settings_before_starting():
    r = tapflow("run", "--bind", "nonsense", "--retry-timeout", "soon", "--dry-run")
    assert r.returncode == 2
    assert "TAP_BIND='nonsense'" in r.stderr and "TAP_RETRY_TIMEOUT='soon'" in r.stderr


@pytest.mark.parametrize("args", [["status"], ["add", "did:plc:abc"], ["remove", "did:plc:abc"],
                                  ["info", "did:plc:abc"], ["tail", "--max", "1"]])
def test_not_reachable(args):
    url = f"http://127.0.0.1:{free_port()}"
    r = tapflow(*args, "--url", url)
    assert r.returncode == 1
    assert r.stderr.strip() == f"tapflow is not reachable at {url}"
    assert r.stdout == ""


def test_not_reachable_from_tap_url_env():
    url = f"http://127.0.0.1:{free_port()}"
    r = tapflow("status", env={"TAP_URL": url})
    assert r.returncode == 1 and r.stderr.strip() == f"tapflow is not reachable at {url}"


@pytest.mark.parametrize("args", [["status"], ["add", "did:plc:abc"], ["info", "did:plc:abc"], ["tail"]])
def test_wrong_password(secret_server, args):
    url = secret_server.server.url
    r = tapflow(*args, "--url", url, "--password", "nope")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"tapflow: wrong admin password for {url} (401): use --password or "
                                "TAP_ADMIN_PASSWORD")
    r = tapflow(*args, "--url", url)
    assert r.returncode == 1 and "missing admin password" in r.stderr


def test_password_from_env(secret_server):
    secret_server.call(lambda s: s.repos.update({"did:plc:abc": _repo("did:plc:abc", "active")}))
    r = tapflow("info", "did:plc:abc", "--url", secret_server.server.url, env={"TAP_ADMIN_PASSWORD": "s3cret"})
    assert r.returncode == 0, r.stderr
    assert "state    active" in r.stdout


def test_add_info_remove(server):
    url = server.server.url
    server.call(lambda s: s.handles.update({"alice.test": "did:plc:alice"}))
    r = tapflow("add", "did:plc:abc", "@alice.test", "--url", url, "--handle-resolver", f"xrpc:{url}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["added did:plc:abc", "added did:plc:alice (@alice.test)"]
    assert set(server.server.repos) == {"did:plc:abc", "did:plc:alice"}

    r = tapflow("info", "did:plc:abc", "--url", url)
    assert r.returncode == 0
    assert "did      did:plc:abc" in r.stdout and "state    pending" in r.stdout and "error    -" in r.stdout
    r = tapflow("info", "did:plc:abc", "--json", "--url", url)
    assert json.loads(r.stdout)["state"] == "pending"
    r = tapflow("info", "did:plc:nope", "--url", url)
    assert r.returncode == 1 and r.stderr.strip() == "tapflow: did:plc:nope is not tracked (tapflow add did:plc:nope)"

    r = tapflow("remove", "alice.test", "--url", url, "--handle-resolver", f"xrpc:{url}")
    assert r.returncode == 0 and r.stdout.strip() == "removed did:plc:alice (alice.test)"
    assert set(server.server.repos) == {"did:plc:abc"}


def test_add_rejects_what_is_not_a_did_or_handle(server):
    url = server.server.url
    r = tapflow("add", "not a handle", "--url", url)
    assert r.returncode == 1 and r.stderr.strip() == "tapflow: not a DID or handle: not a handle"
    r = tapflow("add", "unknown.test", "--url", url, "--handle-resolver", f"xrpc:{url}")
    assert r.returncode == 1
    assert r.stderr.startswith("tapflow: could not resolve handle unknown.test")
    assert "pass its DID" in r.stderr
    assert server.server.repos == {}


def test_tail_prints_json_lines(server):
    url = server.server.url
    server.call(lambda s: [s.push(f) for f in (rec_frame(1), ident_frame(2), rec_frame(3))])
    r = tapflow("tail", "--max", "2", "--url", url)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [ev["id"] for ev in lines] == [1, 2]
    assert lines[1] == json.loads(ident_frame(2))  # the wire form, as Tap sends it
    assert server.server.acks == []  # --no-ack is the default
    r = tapflow("tail", "--max", "3", "--ack", "--url", url)
    assert r.returncode == 0, r.stderr
    deadline = time.time() + 5
    while len(server.server.acks) < 3 and time.time() < deadline:
        time.sleep(0.02)
    assert sorted(server.server.acked_ids()) == [1, 2, 3]


def test_status(server):
    url = server.server.url

    def setup(s):
        for i in range(6):
            s.repos[f"did:plc:ok{i}"] = _repo(f"did:plc:ok{i}", "active")
        s.repos["did:plc:pend"] = _repo("did:plc:pend", "pending")
        s.repos["did:plc:sync"] = _repo("did:plc:sync", "resyncing")
        s.repos["did:plc:bad"] = _repo("did:plc:bad", "error", "getRepo: 404 RepoNotFound", retries=3)

    server.call(setup)
    r = tapflow("status", "--url", url, "--sample", "0.1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "health: ok" in out
    assert "active 6" in out and "pending 1" in out and "resyncing 1" in out and "error 1" in out
    assert "77.8%" in out and "7/9" in out  # done = everything not pending/resyncing/desynchronized
    assert "firehose   cursor 1,234" in out and "outbox     7" in out and "records    42" in out
    assert "did:plc:bad  error  retries 3  getRepo: 404 RepoNotFound" in out
    assert "\x1b[" not in out  # no ANSI codes when not a terminal


def test_status_watch_refreshes(server):
    import threading

    url = server.server.url
    server.call(lambda s: s.repos.update({"did:plc:a": _repo("did:plc:a", "pending")}))
    p = subprocess.Popen([sys.executable, "-m", "tapflow_cli.main", "status", "--watch", "--interval", "0.2",
                          "--url", url], cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(p.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()

    def wait_for(text: str) -> None:
        deadline = time.time() + 30
        while text not in "".join(out):
            assert time.time() < deadline, f"{text!r} never shown:\n{''.join(out)}"
            time.sleep(0.05)

    try:
        wait_for("0.0%")
        server.call(lambda s: s.repos.update({"did:plc:a": _repo("did:plc:a", "active")}))
        wait_for("100.0%")
    finally:
        p.terminate()
        p.wait(10)
        reader.join(5)
    text = "".join(out)
    assert text.count("health: ok") >= 2 and "done" in text


@pytest.mark.e2e
def test_run_starts_the_service_and_stops_on_sigterm(tmp_path):
    """`tapflow run` execs the real service; SIGTERM stops it even when the caller ignored
    SIGINT (as `cmd &` in a shell script does), since the flow turns SIGTERM into SIGINT."""
    import signal
    import urllib.request

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAP_")}
    p = subprocess.Popen([sys.executable, "-m", "tapflow_cli.main", "run", "--bind", f"127.0.0.1:{port}",
                          "--data-dir", str(tmp_path / "data"), "--outbox-only", "--log-level", "warn"],
                         cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN), start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                    break
            except OSError:
                assert p.poll() is None, "tapflow run exited"
                assert time.time() < deadline, "service not healthy"
                time.sleep(0.3)
        r = tapflow("status", "--url", f"http://127.0.0.1:{port}", "--sample", "0.1")
        assert r.returncode == 0 and "health: ok" in r.stdout
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) is not None
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
