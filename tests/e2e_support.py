"""Real parts for end-to-end tests: the PDS + PLC harness, the tapflow service as a process,
and the official ``@atproto/tap`` client.

Everything listens on 127.0.0.1 on ports picked here, and writes under a temp dir or
``$HOME/.cache`` (``../shared`` is read-only in CI).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TAPFLOW_SHARED", ROOT.parent / "shared")).resolve()
HARNESS = SHARED / "harness"
HARNESS_HOME = Path(os.environ.get("TAPFLOW_HARNESS_HOME", Path.home() / ".cache" / "tapflow-harness"))


def state_from_events(events: list[dict]) -> dict[str, dict[str, str]]:
    """What a consumer applying the (official client's) events holds: did -> {path: cid}."""
    from collections import defaultdict

    state: dict[str, dict[str, str]] = defaultdict(dict)
    for e in events:
        if e["type"] != "record":
            continue
        path = f"{e['collection']}/{e['rkey']}"
        if e["action"] == "delete":
            state[e["did"]].pop(path, None)
        else:
            state[e["did"]][path] = e["cid"]
    return state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_bin() -> str:
    """Node 22 installed by the harness (the PDS needs it), else node on PATH."""
    for p in sorted((HARNESS_HOME / "pds").glob("node-*/bin/node")):
        return str(p)
    return "node"


def http_json(method: str, url: str, body: object | None = None, password: str = "", timeout: float = 10.0):
    """(status, parsed JSON or raw text) of one HTTP call; never raises on HTTP errors."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if password:
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(f"admin:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


@dataclass
class Pds:
    """A running PDS + PLC harness on its own ports."""

    plc_port: int
    pds_port: int
    run_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {"PLC_PORT": str(self.plc_port), "PDS_PORT": str(self.pds_port), "HARNESS_RUN_DIR": str(self.run_dir)}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.pds_port}"

    @property
    def public_url(self) -> str:
        return f"http://localhost:{self.pds_port}"

    @property
    def plc_url(self) -> str:
        return f"http://127.0.0.1:{self.plc_port}"

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["PDS"] = self.url
        env["PLC"] = self.plc_url
        env.update(extra or {})
        return env

    def script(self, name: str, extra_env: dict[str, str] | None = None, timeout: float = 600) -> dict:
        """Run scenario.mjs / load.mjs; returns its JSON result."""
        out = subprocess.run([node_bin(), str(HARNESS / "pds" / name)], env=self._env(extra_env),
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def xrpc_script(self, code: str, timeout: float = 120) -> dict:
        """Run a small ESM snippet with the harness's xrpc.mjs helpers imported as X; prints JSON."""
        path = Path(tempfile.mkdtemp()) / "snippet.mjs"
        path.write_text(f"import * as X from {json.dumps(str(HARNESS / 'pds' / 'xrpc.mjs'))};\n"
                        f"const base = process.env.PDS;\n{code}\n")
        out = subprocess.run([node_bin(), str(path)], env=self._env(), capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"snippet failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def stop_pds(self, sig: str = "TERM") -> None:
        subprocess.run(["bash", str(HARNESS / "pds" / "down.sh"), "pds"], env=self._env({"SIGNAL": sig}),
                       capture_output=True, timeout=60)

    def start(self) -> None:
        out = subprocess.run(["bash", str(HARNESS / "pds" / "up.sh")], env=self._env(), capture_output=True,
                             text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"harness up.sh failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")

    def stop(self) -> None:
        subprocess.run(["bash", str(HARNESS / "pds" / "down.sh")], env=self._env(), capture_output=True, timeout=60)


def start_pds() -> Pds:
    setup = subprocess.run(["bash", str(HARNESS / "pds" / "setup.sh")], capture_output=True, text=True, timeout=900)
    if setup.returncode != 0:
        raise RuntimeError(f"harness setup failed: {setup.stderr[-3000:]}")
    pds = Pds(free_port(), free_port(), Path(tempfile.mkdtemp(prefix="tapflow-pds-")))
    pds.start()
    return pds


@dataclass
class TapService:
    """``python -m bytewax.run flows.tap`` as a real process with its own data dir and port."""

    env: dict[str, str]
    data_dir: Path
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    password: str = ""
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "TapService":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "bytewax.run", "flows.tap"], cwd=str(ROOT),
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tapflow exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = http_json("GET", self.url + "/health", password=self.password, timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"tapflow not healthy after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (flow and delivery child), then wait."""
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # the child dies with its parent (PDEATHSIG); make sure before the next start
        time.sleep(0.3)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def api(self, method: str, path: str, body: object | None = None):
        return http_json(method, self.url + path, body, password=self.password)

    def wait_for(self, predicate, timeout: float = 60, interval: float = 0.25, what: str = "condition"):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out waiting for {what} (last={last!r})\n{self.log_tail()}")


def make_service(pds: Pds | None, tmp: Path, **settings: str) -> TapService:
    """A TapService pointed at the harness (relay = the PDS itself, PLC, handles via XRPC)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAP_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update({
        "TAP_BIND": f"127.0.0.1:{port}",
        "TAP_DATA_DIR": str(tmp / "data"),
        "TAP_LOG_LEVEL": "info",
        "TAP_RETRY_TIMEOUT": "5s",
    })
    if pds is not None:
        env.update({
            "TAP_RELAY_URL": pds.url,
            "TAP_PLC_URL": pds.plc_url,
            "TAP_HANDLE_RESOLVER": f"xrpc:{pds.url}",
        })
    env.update(settings)
    return TapService(env=env, data_dir=tmp / "data", port=port, log_path=tmp / "tapflow.log",
                      password=settings.get("TAP_ADMIN_PASSWORD", ""))


@dataclass
class ClientRun:
    """The official client (harness/client/tap-client.mjs) running against a service."""

    proc: subprocess.Popen
    out_path: Path
    err_path: Path

    def events(self) -> list[dict]:
        lines = self.out_path.read_text().splitlines() if self.out_path.exists() else []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_client(service: TapService, tmp: Path, dids: list[str] = (), **env: str) -> ClientRun:
    e = dict(os.environ)
    e.update({"TAP_URL": service.url, "TIMEOUT_S": "0", "MAX_EVENTS": "0"})
    if service.password:
        e["TAP_ADMIN_PASSWORD"] = service.password
    e.update(env)
    n = len(list(tmp.glob("client-*.out")))
    out_path, err_path = tmp / f"client-{n}.out", tmp / f"client-{n}.err"
    proc = subprocess.Popen(["bash", str(HARNESS / "client" / "run-client.sh"), *dids], env=e,
                            stdout=open(out_path, "wb"), stderr=open(err_path, "wb"))
    return ClientRun(proc, out_path, err_path)
