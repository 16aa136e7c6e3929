"""Real processes for end-to-end tests: ``celery -A app worker``, ``celery -A app beat``, the webhook
receiver and the ``balances`` CLI, each started one way only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from app.celery import worker_argv
from app.devtools.sandbox import Sandbox
from app.jsonio import loads
from tests.conftest import ENCRYPTION_KEY, SIGNING_KEY

ROOT = Path(__file__).resolve().parents[2]
SECRET_ENV = ("BALANCES_ENCRYPTION_KEY", "BALANCES_SIGNING_KEY", "POWENS_CLIENT_SECRET")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(*logs: Path, lines: int = 60) -> str:
    """The last lines of each worker log, for an assertion message: a failure in CI is read there."""
    out = []
    for log in logs:
        text = log.read_text(errors="replace").splitlines() if log.exists() else ["(no log)"]
        out.append(f"--- {log.name} (last {lines} lines)\n" + "\n".join(text[-lines:]))
    return "\n".join(out)


def service_env(pg_url: str, redis_url: str, sandbox: Sandbox, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BALANCES_", "POWENS_", "CELERY_"))}
    env.pop("DATABASE_URL", None)
    env.update(
        {
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": redis_url,
            "POWENS_BASE_URL": sandbox.base_url,
            "POWENS_CLIENT_ID": "test-client",
            "BALANCES_ENCRYPTION_KEY": ENCRYPTION_KEY,
            "BALANCES_SIGNING_KEY": SIGNING_KEY,
            "BALANCES_RETRY_BASE_SECONDS": "0.05",
            "BALANCES_RETRY_CAP_SECONDS": "0.5",
            "BALANCES_MAX_ATTEMPTS": "3",
            "BALANCES_POWENS_RATE_LIMIT": "0",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


def shipped_env(pg_url: str, redis_url: str, sandbox: Sandbox, **extra: str) -> dict[str, str]:
    """``service_env`` without the suite's fast retry settings: the configuration an operator runs."""
    env = service_env(pg_url, redis_url, sandbox, **extra)
    for name in ("BALANCES_RETRY_BASE_SECONDS", "BALANCES_RETRY_CAP_SECONDS", "BALANCES_MAX_ATTEMPTS"):
        if name not in extra:
            env.pop(name)
    if "BALANCES_POWENS_RATE_LIMIT" not in extra:
        env.pop("BALANCES_POWENS_RATE_LIMIT")
    return env


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path
    metrics_port: int

    def scrape(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def telemetry(self) -> list[dict[str, object]]:
        events = []
        for line in self.log_lines():
            if line.startswith('{"event": "openbanking.'):
                events.append(loads(line))
        return events


@contextmanager
def run_worker(
    env: dict[str, str],
    log: Path,
    *,
    queues: str = "interactive,push,refresh,reports",
    concurrency: int = 2,
    name: str = "e2e",
    extra_args: tuple[str, ...] = (),
) -> Iterator[Worker]:
    port = free_port()
    wenv = dict(
        env, BALANCES_METRICS_PORT=str(port), BALANCES_METRICS_DIR=str(log.parent / f"metrics-{port}")
    )
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            worker_argv(
                f"{name}-{port}@%h", queues=queues.split(","), concurrency=concurrency, extra=extra_args
            ),
            cwd=ROOT,
            env=wenv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a test may kill the whole worker (parent and pool) with killpg
        )
    try:
        _until_up(proc, log, "worker", 60, lambda: "ready." in log.read_text(errors="replace"))
        yield Worker(proc, wenv, log, port)
    finally:
        _stop(proc, 30)


def _until_up(
    proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float, up: Callable[[], bool]
) -> None:
    """Until ``up()``; the process dying first, or ``timeout``, fails with the end of its log."""
    deadline = time.monotonic() + timeout
    while not up():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not up in {timeout:.0f}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (a warm shutdown), then SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_beat(
    env: dict[str, str], workdir: Path, name: str, **extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """``celery -A app beat`` in ``workdir`` (its schedule file there, the project importable), in its
    own process group (a test may kill it with killpg), with its own metrics port and directory.
    Returns the process and its log; the caller stops it."""
    log = workdir / f"{name}.log"
    benv = dict(
        env,
        BALANCES_METRICS_PORT=str(free_port()),
        BALANCES_METRICS_DIR=str(workdir / f"m-{name}"),
        PYTHONPATH=str(ROOT),
        **extra,
    )
    argv = [sys.executable, "-m", "celery", "-A", "app", "beat", "--loglevel", "INFO"]
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [*argv, "-s", str(workdir / f"{name}-schedule")],
            cwd=workdir,
            env=benv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log


def run_cli(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Receiver:
    proc: subprocess.Popen[bytes]
    url: str  # .../webhooks/powens
    log: Path
    metrics_port: int

    def scrape(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text


@contextmanager
def run_receiver(env: dict[str, str], log: Path, **extra: str) -> Iterator[Receiver]:
    """``balances webhooks serve`` (uvicorn) on a free port, ready once /healthz answers."""
    port, metrics_port = free_port(), free_port()
    renv = dict(env, BALANCES_METRICS_PORT=str(metrics_port), **extra)
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "webhooks",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=renv,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    receiver = Receiver(proc, f"http://127.0.0.1:{port}/webhooks/powens", log, metrics_port)

    def answering() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code in (200, 503)
        except requests.ConnectionError:
            return False

    try:
        _until_up(proc, log, "receiver", 30, answering)
        yield receiver
    finally:
        _stop(proc, 15)
