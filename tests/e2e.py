"""Real processes for end-to-end tests: ``celery -A app worker`` and the ``balances`` CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from app.celery import worker_argv
from app.devtools.sandbox import Sandbox
from app.jsonio import loads
from tests.conftest import ENCRYPTION_KEY, SIGNING_KEY

ROOT = Path(__file__).resolve().parent.parent
SECRET_ENV = ("BALANCES_ENCRYPTION_KEY", "BALANCES_SIGNING_KEY", "POWENS_CLIENT_SECRET")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    worker = Worker(proc, wenv, log, port)
    try:
        deadline = time.monotonic() + 60
        while "ready." not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready in 60s:\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
        yield worker
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"receiver exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code in (200, 503):
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"receiver not up in 30s:\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
        yield receiver
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
