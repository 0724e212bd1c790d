"""pytest fixtures: a throw-away Kafka-protocol broker, started with the shared scripts.

    from tests.kafka_broker import kafka_broker, broker_factory  # noqa: F401  (in a test module)

``kafka_broker`` (session scope) is a running tansu broker on a free port, shared by the
tests of a session; ``broker_factory`` makes brokers a test owns (its own port, kind, stop
and restart), stopped at the end of the test.

The broker comes from ``../shared/kafka/start-broker.sh`` (``$TAPFLOW_SHARED`` overrides the
shared dir). On a clean machine the script pip-installs the broker wheel into the running
interpreter's environment (``KAFKA_VENV=sys.prefix``). ``TAPFLOW_TEST_KAFKA_BOOTSTRAP`` =
``host:port`` makes ``kafka_broker`` use an existing broker instead of starting one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def shared_kafka_dir() -> Path:
    return Path(os.environ.get("TAPFLOW_SHARED", ROOT.parent / "shared")) / "kafka"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Broker:
    """A broker started by the shared script on ``port``; ``stop()``/``start()`` may be repeated."""

    kind: str = "tansu"
    port: int = field(default_factory=free_port)
    env: dict = field(default_factory=dict)
    owned: bool = False  # started by us (so ours to stop)
    pid: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _env(self) -> dict:
        env = dict(os.environ)
        env["KAFKA_VENV"] = sys.prefix
        env.update(self.env)
        return env

    def start(self) -> "Broker":
        script = shared_kafka_dir() / "start-broker.sh"
        if not script.is_file():
            raise RuntimeError(f"{script} not found: the shared kafka scripts are needed (set TAPFLOW_SHARED)")
        out = subprocess.run(["bash", str(script), self.kind, str(self.port)], env=self._env(),
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"start-broker.sh {self.kind} {self.port} failed ({out.returncode}):\n"
                               f"{out.stdout}\n{out.stderr}")
        vals = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        self.pid = int(vals["PID"]) if vals.get("PID", "").isdigit() else None
        self.owned = "READY_MS" in vals  # else it was already running: not ours
        return self

    def stop(self) -> None:
        if not self.owned:
            return
        subprocess.run(["bash", str(shared_kafka_dir() / "stop-broker.sh"), str(self.port)], env=self._env(),
                       capture_output=True, text=True, timeout=60)
        deadline = time.monotonic() + 10
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.owned = False

    def restart(self) -> "Broker":
        self.stop()
        return self.start()


@pytest.fixture(scope="session")
def kafka_broker():
    """A running broker for the session (tansu on a free port, or TAPFLOW_TEST_KAFKA_BOOTSTRAP)."""
    given = os.environ.get("TAPFLOW_TEST_KAFKA_BOOTSTRAP")
    if given:
        host, _, port = given.rpartition(":")
        yield Broker(port=int(port))
        return
    b = Broker().start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def broker_factory():
    """Make brokers this test owns: ``broker_factory(kind="tansu", **env)``; all stopped at the end."""
    made: list[Broker] = []

    def make(kind: str = "tansu", **env: str) -> Broker:
        b = Broker(kind=kind, env=env)
        made.append(b)
        return b.start()

    try:
        yield make
    finally:
        for b in made:
            b.stop()
