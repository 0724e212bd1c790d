"""Processes the end-to-end benchmarks drive: upstream, service, consumers, broker; CPU and RSS.

Used by ``bench/pipeline.py`` and ``bench/peers.py``; nothing here measures by itself.

- :class:`Upstream`: ``python -m bench.upstream`` on a data file (its own process).
- :class:`Service`: ``python -m bytewax.run flows.tap`` (``tests.e2e_support.TapService``) with a
  fresh data dir; the delivery child is found as its child process.
- :class:`Consumer`: ``python -m bench.consumers`` (channel, webhook, kafka), status lines read
  on a thread; ``wait(pred)`` polls them.
- :class:`ProcWatch`: CPU seconds (utime + stime) and RSS of a process tree from ``/proc``;
  a sampler thread keeps the peak of the summed RSS.
- :func:`kafka_broker`: the shared tansu test broker on a free port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e_support import free_port, http_json, make_service  # noqa: E402

PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SHARED = Path(os.environ.get("TAPFLOW_SHARED", ROOT.parent / "shared"))


# ----------------------------------------------------------------------------- /proc


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def tree(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(_children(p))
    return out


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (its threads included), seconds; 0 when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / CLK
    except (OSError, IndexError):
        return 0.0


def runq_wait_s(pid: int) -> float:
    """Seconds the threads of ``pid`` spent runnable but waiting for a CPU (schedstat)."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    except OSError:
        return 0.0
    return total / 1e9


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE / 1e6
    except (OSError, IndexError):
        return 0.0


def anon_mb(pid: int) -> float:
    """Resident memory of ``pid`` that is not file-backed (resident - shared of statm): what a
    mapped file's cached pages, which the kernel can drop, do not count in."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            v = f.read().split()
        return (int(v[1]) - int(v[2])) * PAGE / 1e6
    except (OSError, IndexError):
        return 0.0


def hwm_mb(pid: int) -> float:
    """Peak RSS of ``pid`` (VmHWM)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e3
    except OSError:
        pass
    return 0.0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine (all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v) - idle) / CLK, sum(v) / CLK


class ProcWatch:
    """CPU and RSS of named process trees over an interval; ``mark()`` starts it, ``stop()`` ends it."""

    def __init__(self, roots: dict[str, int], interval: float = 0.25) -> None:
        self.roots = roots
        self.interval = interval
        self.peak_rss: dict[str, float] = {k: 0.0 for k in roots}
        self.peak_anon: dict[str, float] = {k: 0.0 for k in roots}
        self.first_anon: dict[str, float] = {}  # the first sample's: what the processes held before the work
        self.first_rss: dict[str, float] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._cpu0: dict[str, float] = {}
        self._t0 = 0.0
        self._m0 = (0.0, 0.0)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _own(self, pid: int) -> list[int]:
        """``pid`` and its descendants, less the trees of the other roots (the delivery child is
        its own root, not part of the flow's figures)."""
        others = {p for p in self.roots.values() if p != pid}
        out, stack = [], [pid]
        while stack:
            p = stack.pop()
            out.append(p)
            stack.extend(c for c in _children(p) if c not in others)
        return out

    def _tree_cpu(self, pid: int) -> float:
        return sum(cpu_s(p) for p in self._own(pid))

    def _tree_rss(self, pid: int) -> float:
        return sum(rss_mb(p) for p in self._own(pid))

    def _tree_wait(self, pid: int) -> float:
        return sum(runq_wait_s(p) for p in self._own(pid))

    def start(self) -> "ProcWatch":
        self._t0 = time.monotonic()
        self._unix0 = time.time()
        self._cpu0 = {k: self._tree_cpu(p) for k, p in self.roots.items()}
        self._self0 = {k: cpu_s(p) for k, p in self.roots.items()}
        self._wait0 = {k: self._tree_wait(p) for k, p in self.roots.items()}
        self._m0 = machine_cpu()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rs = {k: self._tree_rss(p) for k, p in self.roots.items()}
            for k, v in rs.items():
                self.peak_rss[k] = max(self.peak_rss[k], v)
            for k, p in self.roots.items():
                a = sum(anon_mb(q) for q in self._own(p))
                self.peak_anon[k] = max(self.peak_anon[k], a)
                self.first_anon.setdefault(k, a)
                self.first_rss.setdefault(k, rs[k])
            self.samples.append((time.monotonic(), rs))

    def stop(self) -> dict:
        self._stop.set()
        wall = time.monotonic() - self._t0
        cpu = {k: self._tree_cpu(p) - self._cpu0.get(k, 0.0) for k, p in self.roots.items()}
        # the root process alone (the flow without its verification workers): live = 1 / this
        own = {k: cpu_s(p) - self._self0.get(k, 0.0) for k, p in self.roots.items()}
        wait = {k: self._tree_wait(p) - self._wait0.get(k, 0.0) for k, p in self.roots.items()}
        m1 = machine_cpu()
        busy = m1[0] - self._m0[0]
        total = m1[1] - self._m0[1]
        return {"wall_s": wall, "unix_s": (self._unix0, time.time()), "cpu_s": cpu, "own_cpu_s": own,
                "runq_wait_s": wait, "peak_rss_mb": dict(self.peak_rss),
                "peak_anon_mb": dict(self.peak_anon), "first_anon_mb": dict(self.first_anon),
                "first_rss_mb": dict(self.first_rss),
                "machine_busy_cores": busy / wall if wall else 0.0,
                "machine_cores": total / wall if wall else 0.0,
                "other_cpu_s": busy - sum(cpu.values())}


# ----------------------------------------------------------------------------- upstream


class Upstream:
    """``python -m bench.upstream`` in its own process."""

    def __init__(self, data_path: Path, *, rate: float = 0.0, hold: bool = True, hang_unknown: bool = False,
                 log_dir: Path | None = None) -> None:
        args = [PY, "-m", "bench.upstream", "--data", str(data_path)]
        if rate:
            args += ["--rate", str(rate)]
        if hold:
            args.append("--hold")
        if hang_unknown:
            args.append("--hang-unknown")
        err = open((log_dir or Path(tempfile.gettempdir())) / f"upstream-{os.getpid()}-{time.time_ns()}.log", "wb")
        self.proc = subprocess.Popen(args, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=err,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"upstream did not start (rc={self.proc.wait()})")
        self.info = json.loads(line)
        self.url = self.info["url"]
        self.pid = self.proc.pid

    def get(self, path: str, timeout: float = 60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def release(self, upto: int | None = None) -> None:
        q = "" if upto is None else f"?upto={upto}"
        req = urllib.request.Request(self.url + "/_replay/release" + q, data=b"", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def stats(self) -> dict:
        return self.get("/_replay/stats")

    def sendlog(self, conn: int = -1) -> list:
        return self.get(f"/_bench/sendlog?conn={conn}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ----------------------------------------------------------------------------- service


class Service:
    """The tapflow service against an upstream, with a fresh data dir under ``tmp``."""

    def __init__(self, upstream_url: str | None, tmp: Path, **settings: str) -> None:
        env = {"TAP_LOG_LEVEL": "warn", "TAP_RETRY_TIMEOUT": "60s"}
        if upstream_url:
            env.update(TAP_RELAY_URL=upstream_url, TAP_PLC_URL=upstream_url,
                       TAP_HANDLE_RESOLVER=f"xrpc:{upstream_url}")
        env.update(settings)
        tmp.mkdir(parents=True, exist_ok=True)
        self.svc = make_service(None, tmp, **env)
        self.tmp = tmp

    def start(self, timeout: float = 90) -> "Service":
        self.svc.start(wait=False)
        self.svc.wait_healthy(timeout)
        return self

    @property
    def pid(self) -> int:
        return self.svc.proc.pid

    @property
    def url(self) -> str:
        return self.svc.url

    def pids(self) -> dict[str, int]:
        """flow process and delivery child."""
        out = {"flow": self.pid}
        for c in _children(self.pid):
            if "delivery_main" in cmdline(c):
                out["delivery"] = c
        return out

    def add(self, dids: list[str], batch: int = 50_000) -> None:
        for i in range(0, len(dids), batch):
            status, body = http_json("POST", self.url + "/repos/add", {"dids": dids[i:i + batch]}, timeout=300)
            if status != 200:
                raise RuntimeError(f"/repos/add: {status} {body}")

    def remove(self, dids: list[str], batch: int = 50_000) -> None:
        for i in range(0, len(dids), batch):
            status, body = http_json("POST", self.url + "/repos/remove", {"dids": dids[i:i + batch]}, timeout=300)
            if status != 200:
                raise RuntimeError(f"/repos/remove: {status} {body}")

    def stat(self, name: str) -> int:
        status, body = http_json("GET", self.url + f"/stats/{name}", timeout=30)
        if status != 200 or not isinstance(body, dict):
            return -1
        return int(next(iter(body.values())))

    def log_tail(self, n: int = 40) -> str:
        return self.svc.log_tail(n)

    def stop(self) -> None:
        self.svc.stop()

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- consumers


class Consumer:
    """``python -m bench.consumers KIND ...``; ``status`` is the latest status line."""

    def __init__(self, kind: str, *args: str, out: Path, keep_live: bool = False) -> None:
        cmd = [PY, "-m", "bench.consumers", kind, "--out", str(out), *args]
        if keep_live:
            cmd.append("--keep-live")
        self.out = out
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(str(out) + ".err", "wb"),
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.pid = self.proc.pid
        self.status: dict = {"records": 0, "events": 0, "live": 0, "identity": 0, "t_last": 0.0, "t_first": 0.0}
        self.extra: list[dict] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if "records" in obj:
                self.status = obj
            else:
                self.extra.append(obj)

    def wait(self, pred, timeout: float, what: str = "", on_tick=None) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.status):
                return True
            if self.proc.poll() is not None:
                raise RuntimeError(f"consumer exited: {Path(str(self.out) + '.err').read_text()[-2000:]}")
            if on_tick:
                on_tick()
            time.sleep(0.05)
        return False

    def stop(self) -> dict:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            return json.loads(self.out.read_text())
        except (OSError, ValueError):
            return dict(self.status)


# ----------------------------------------------------------------------------- Kafka


class KafkaBroker:
    """The shared tansu test broker (``../shared/kafka/start-broker.sh``) on a free port."""

    def __init__(self, kind: str = "tansu") -> None:
        self.port = free_port()
        env = {**os.environ}
        env.setdefault("KAFKA_VENV", str(Path(sys.executable).parent.parent))  # the venv, not its target
        out = subprocess.run(["bash", str(SHARED / "kafka" / "start-broker.sh"), kind, str(self.port)],
                             env=env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"start-broker.sh failed: {out.stdout[-1000:]} {out.stderr[-1000:]}")
        kv = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        self.bootstrap = kv.get("BOOTSTRAP", f"127.0.0.1:{self.port}")
        self.pid = int(kv["PID"]) if kv.get("PID", "").isdigit() else 0

    def stop(self) -> None:
        subprocess.run(["bash", str(SHARED / "kafka" / "stop-broker.sh"), str(self.port)],
                       capture_output=True, timeout=60)
