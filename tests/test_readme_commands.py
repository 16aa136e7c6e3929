"""The README's commands, as written, on the demo's database: what a new user types after `make demo`.

The blocks between `<!-- shell-demo:begin -->` and `<!-- shell-powens:end -->` run line by line in one
bash session, in the directory `balances demo` ran in, with `set -e`: every line must succeed. A line
that starts a server in the background (`… &`) is followed by a wait for it to answer, as a person
waits for a prompt; the servers are stopped at the end. The worker's broker is the suite's Redis
(`CELERY_BROKER_URL`), never the machine's db 0.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import ROOT, log_tail
from tests.test_demo import no_service_env, run_demo

pytestmark = pytest.mark.e2e


def readme_block(name: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {name}:begin -->\n```sh\n(.*?)```\n<!-- {name}:end -->", text, re.S)
    assert found, f"README block {name} is missing"
    return [line for line in found.group(1).splitlines() if line.strip()]


# What "wait until it answers" means for each server the README starts in the background.
READY = {
    "balances sandbox serve": "until curl -sf -o /dev/null http://127.0.0.1:8765/2.0/users/me/accounts "
    "-H 'Authorization: Bearer x' || [ $? -eq 22 ]; do sleep 0.2; done",
    "celery -A app worker": "until celery -A app inspect ping -t 1 >/dev/null 2>&1; do sleep 0.5; done",
}


def script(lines: list[str], logs: Path) -> str:
    out = [
        "set -euo pipefail",
        "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT",
    ]
    for n, line in enumerate(lines):
        out.append(f"echo {shlex.quote('$ ' + line)} >&2")
        command = line.split("  #", 1)[0].rstrip()
        if command.endswith("&"):
            starts = next(k for k in READY if command.startswith(k))
            out.append(f"{command[:-1].rstrip()} > {logs / f'background-{n}.log'} 2>&1 &")
            out.append(f"timeout 60 bash -c {shlex.quote(READY[starts])}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def test_the_readme_shell_commands_run_as_written_on_the_demo_database(
    tmp_path: Path, redis_url: str
) -> None:
    env = no_service_env()
    demo = run_demo(tmp_path, env)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    # The worker's broker: the suite's Redis; `balances` and `celery` from this interpreter's bin.
    env.update(
        CELERY_BROKER_URL=redis_url,
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        BALANCES_SHELL_LOG=str(tmp_path / "shell.log"),
    )
    lines = readme_block("shell-demo") + readme_block("shell-powens")
    logs = tmp_path / "logs"
    logs.mkdir()
    proc = subprocess.run(
        ["bash", "-c", script(lines, logs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-6000:] + log_tail(*sorted(logs.iterdir()))
    said = proc.stdout
    assert "balances " in said and "demo-acme" in said
    assert re.search(r"https://webview\.powens\.com/\S+connection_id=102", said)  # the reconnect link
    assert "Traceback" not in proc.stderr
    typed = [line for line in proc.stderr.splitlines() if line.startswith("$ ")]
    assert len(typed) == len(lines)  # every line ran
