"""What the admin shell prints, on the demo's database (three demo runs: what a new user has after
`make demo` three times): listings whole in a pipe, fitted on a terminal of 80 columns (a real
pseudo-terminal), three formats, one timestamp format, money at its currency's scale, the operator
views, logs and telemetry off the operator's terminal, help and version."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pexpect
import pytest
import typer.main

from tests.support.processes import ROOT
from tests.test_demo import no_service_env, run_demo

ACTOR = ("--as", "demo-admin")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ACCOUNT_ID = re.compile(r"acc_[0-9a-f]{32}")
RECONNECT = "balances connections reconnect-link --tenant demo-initech --connection con_"


@dataclass
class Demo:
    dir: Path
    env: dict[str, str]

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            cwd=self.dir,
            env={**self.env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def tty(self, *args: str, columns: int = 80, **extra: str) -> str:
        """The command in a real pseudo-terminal of ``columns`` columns: everything it wrote, raw."""
        child = pexpect.spawn(
            sys.executable,
            ["-m", "app.cli", *args],
            cwd=str(self.dir),
            env={**self.env, "TERM": "xterm-256color", **extra},
            dimensions=(50, columns),
            encoding="utf-8",
            timeout=60,
        )
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        return str(child.before)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    where = tmp_path_factory.mktemp("demo")
    env = no_service_env()
    env["XDG_STATE_HOME"] = str(where / "state")  # the shell's log file on a terminal
    for _ in range(3):
        proc = run_demo(where, env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    yield Demo(where, env)


def account_ids(demo: Demo, tenant: str = "demo-acme") -> list[str]:
    proc = demo.run(*ACTOR, "accounts", "list", "--tenant", tenant, "--format", "tsv")
    assert proc.returncode == 0, proc.stderr
    return [line.split("\t")[0] for line in proc.stdout.splitlines()[1:]]


# -- 7: pipes ----------------------------------------------------------------------------------------


def test_a_piped_listing_keeps_every_column_and_whole_ids_without_colour(demo: Demo) -> None:
    ids = account_ids(demo)
    assert len(ids) == 2 and all(ACCOUNT_ID.fullmatch(i) for i in ids)
    proc = demo.run(*ACTOR, "accounts", "list", "--tenant", "demo-acme")
    assert proc.returncode == 0
    assert "…" not in proc.stdout and not ANSI.search(proc.stdout)
    for account in ids:
        [row] = [line for line in proc.stdout.splitlines() if account in line]
        # one row per account, with its last column (the Powens id) on the same line
        assert re.search(r"│ \d+\s+│$", row), row
    header = next(line for line in proc.stdout.splitlines() if "Powens id" in line)
    assert "connection state" in header and "consent ends" in header


def test_the_reconnect_command_of_a_summary_is_one_line_in_a_pipe(demo: Demo) -> None:
    proc = demo.run(*ACTOR, "summary", "--tenant", "demo-initech")
    assert proc.returncode == 0, proc.stderr
    commands = [line.strip() for line in proc.stdout.splitlines() if "reconnect-link" in line]
    assert commands and all(
        re.fullmatch(
            r"balances connections reconnect-link --tenant demo-initech --connection con_[0-9a-f]{32}", c
        )
        for c in commands
    ), proc.stdout


def test_run_ids_are_whole_whatever_the_columns_variable_says(demo: Demo) -> None:
    listed = demo.run(*ACTOR, "run", "list", "--format", "tsv")
    run_ids = [line.split("\t")[0] for line in listed.stdout.splitlines()[1:]]
    assert len(run_ids) == 3
    for columns in ("60", "100"):
        table = demo.run(*ACTOR, "run", "list", COLUMNS=columns).stdout
        assert all(r in table for r in run_ids) and "…" not in table


# -- formats ------------------------------------------------------------------------------------------

LISTINGS = [
    ("show", "--tenant", "demo-acme"),
    ("accounts", "list", "--tenant", "demo-acme"),
    ("run", "list"),
    ("connections", "list", "--tenant", "demo-initech"),
    ("attention",),
    ("tenant", "list"),
    ("admin", "list"),
    ("powens", "list", "--tenant", "demo-acme"),
]


@pytest.mark.parametrize("listing", LISTINGS, ids=lambda a: " ".join(a[:2]))
def test_every_listing_has_table_json_and_tsv(demo: Demo, listing: tuple[str, ...]) -> None:
    tsv = demo.run(*ACTOR, *listing, "--format", "tsv")
    assert tsv.returncode == 0, tsv.stderr
    lines = tsv.stdout.splitlines()
    assert len(lines) >= 2, tsv.stdout  # a header and at least one row on the demo database
    widths = {len(line.split("\t")) for line in lines}
    assert len(widths) == 1 and widths.pop() >= 2
    as_json = demo.run(*ACTOR, *listing, "--format", "json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)
    same = json.loads(demo.run(*ACTOR, *listing, "--json").stdout)
    assert _timeless(same) == _timeless(json.loads(as_json.stdout))
    assert demo.run(*ACTOR, *listing, "--format", "table").returncode == 0


def _timeless(doc: object) -> object:
    """A document less the moment it was made (``generatedAt``)."""
    return {k: v for k, v in doc.items() if k != "generatedAt"} if isinstance(doc, dict) else doc


def test_one_timestamp_format_everywhere_json_is_written(demo: Demo) -> None:
    acc = account_ids(demo)[0]
    outputs = [
        demo.run(*ACTOR, *args, "--json").stdout
        for args in (
            *LISTINGS,
            ("summary", "--tenant", "demo-initech"),
            ("forecast", "--tenant", "demo-acme"),
            ("run", "status"),
            ("accounts", "history", "--tenant", "demo-acme", "--account", acc),
        )
    ]
    stamps = re.findall(r'"(\d{4}-\d\d-\d\dT[^"]+)"', "\n".join(outputs))
    assert stamps and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", s) for s in stamps), {
        s for s in stamps if not s.endswith("Z")
    }


def test_money_in_json_is_exact_at_the_currencys_scale(demo: Demo) -> None:
    shown = demo.run(*ACTOR, "show", "--tenant", "demo-acme", "--json").stdout
    # The contract's records keep its JSON numbers, written with the currency's two decimals.
    amounts = re.findall(r'"(?:current|available)Balance": (-?[\d.]+)', shown)
    assert amounts and all(re.fullmatch(r"-?\d+\.\d\d", a) for a in amounts), amounts
    summary = json.loads(demo.run(*ACTOR, "summary", "--tenant", "demo-acme", "--json").stdout)
    totals = summary["totals"][0]
    for key in ("current", "available", "coming"):
        assert isinstance(totals[key], str) and re.fullmatch(r"-?\d+\.\d\d", totals[key])
    forecast = json.loads(demo.run(*ACTOR, "forecast", "--tenant", "demo-acme", "--json").stdout)[0]
    assert all(re.fullmatch(r"-?\d+\.\d\d", p["value"]) for p in forecast["points"])


# -- the operator views -----------------------------------------------------------------------------


def test_attention_lists_the_connection_needing_its_user_and_the_accounts_failing_every_run(
    demo: Demo,
) -> None:
    doc = json.loads(demo.run(*ACTOR, "attention", "--json").stdout)
    [needing] = doc["connectionsNeedingUser"]["items"]
    assert needing["tenantId"] == "demo-initech" and needing["state"] == "SCARequired"
    assert needing["reconnectCommand"].startswith("balances connections reconnect-link --tenant demo-initech")
    failing = doc["repeatedFailures"]["items"]
    assert {f["tenantId"] for f in failing} == {"demo-initech"} and len(failing) == 2
    assert all(f["reason"] == "needs_user_action" and f["failedRuns"] == 3 for f in failing)
    assert len(doc["repeatedFailures"]["runs"]) == 3
    fewer = json.loads(demo.run(*ACTOR, "attention", "--runs", "4", "--json").stdout)
    assert fewer["repeatedFailures"]["items"] == []  # only three runs exist


def test_run_list_shows_each_run_with_its_counts(demo: Demo) -> None:
    runs = json.loads(demo.run(*ACTOR, "run", "list", "--json").stdout)
    assert [r["status"] for r in runs] == ["completed"] * 3
    assert all(
        r["accounts"] == {"total": 6, "pending": 0, "succeeded": 4, "failed": 2, "stale": 0} for r in runs
    )
    assert runs[0]["createdAt"] > runs[1]["createdAt"] > runs[2]["createdAt"]  # newest first


def test_accounts_history_lists_daily_snapshots_newest_first(demo: Demo) -> None:
    acc = account_ids(demo)[0]
    doc = json.loads(
        demo.run(
            *ACTOR, "accounts", "history", "--tenant", "demo-acme", "--account", acc, "--days", "10", "--json"
        ).stdout
    )
    days = [s["day"] for s in doc["snapshots"] if s["balanceType"] == "current"]
    assert len(days) == 10 and days == sorted(days, reverse=True)  # the demo backfilled 45 days
    only = demo.run(
        *ACTOR,
        "accounts",
        "history",
        "--tenant",
        "demo-acme",
        "--account",
        acc,
        "--balance-type",
        "uncleared",
        "--format",
        "tsv",
    ).stdout.splitlines()[1:]
    assert only and all("\tuncleared\t" in line for line in only)


def test_connections_list_says_what_to_do_for_the_connection_needing_its_user(demo: Demo) -> None:
    [conn] = json.loads(demo.run(*ACTOR, "connections", "list", "--tenant", "demo-initech", "--json").stdout)
    assert conn["state"] == "SCARequired" and conn["needsAttention"] == "user_action"
    assert conn["reconnectCommand"].endswith(conn["connectionId"]) and conn["accounts"] == 2
    [fine] = json.loads(demo.run(*ACTOR, "connections", "list", "--tenant", "demo-acme", "--json").stdout)
    assert fine["needsAttention"] is None and fine["reconnectCommand"] is None


# -- a real terminal of 80 columns ---------------------------------------------------------------------


def test_on_an_80_column_terminal_the_table_fits_and_ids_stay_whole(demo: Demo) -> None:
    ids = account_ids(demo)
    raw = demo.tty(*ACTOR, "accounts", "list", "--tenant", "demo-acme")
    lines = [ANSI.sub("", line) for line in raw.split("\r\n")]
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    assert all(i in raw for i in ids) and "…" not in raw
    header = next(line for line in lines if " id " in line)
    assert "name" in header and "status" in header  # the columns that matter most are kept


def test_on_an_80_column_terminal_the_reconnect_command_copies_as_one_line(demo: Demo) -> None:
    raw = ANSI.sub("", demo.tty(*ACTOR, "summary", "--tenant", "demo-initech"))
    command = re.search(
        r"balances connections reconnect-link --tenant demo-initech --connection con_[0-9a-f]+", raw
    )
    # Written in one piece (the terminal wraps it on screen; a copy takes the line whole), not
    # broken by the program with a line feed.
    assert (
        command
        and len(command.group(0))
        == len("balances connections reconnect-link --tenant demo-initech --connection con_") + 32
    )


def test_logs_and_telemetry_stay_off_the_operators_terminal(demo: Demo) -> None:
    """A refused refresh on a terminal shows its one line; its telemetry event (the contract's
    ``openbanking.balances.refresh_failed``) goes to the shell's log file."""
    refused = (*ACTOR, "refresh", "--tenant", "demo-acme", "--account", "acc_nope")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "app.cli", *refused],
        cwd=str(demo.dir),
        env=demo.env,
        dimensions=(50, 80),
        encoding="utf-8",
        timeout=60,
    )
    child.expect(pexpect.EOF)
    child.close()
    shown = [line for line in ANSI.sub("", str(child.before)).split("\r\n") if line.strip()]
    assert child.exitstatus == 1 and len(shown) == 1 and shown[0].startswith("not_found:"), shown
    log = (Path(demo.env["XDG_STATE_HOME"]) / "balances" / "shell.log").read_text()
    assert '"event": "openbanking.balances.refresh_failed"' in log and "acc_nope" in log
    piped = demo.run(*refused)
    assert piped.stdout == "" and "openbanking.balances.refresh_failed" in piped.stderr  # a job's log


# -- 11: the demo's keys are kept beside its database -------------------------------------------------


def test_the_demo_keeps_its_keys_so_write_commands_work_on_its_database(demo: Demo) -> None:
    env_file = demo.dir / "balances.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    keys = dict(
        line.split("=", 1) for line in env_file.read_text().splitlines() if line and not line.startswith("#")
    )
    assert keys["BALANCES_ENCRYPTION_KEY"] and keys["BALANCES_SIGNING_KEY"]
    rotated = demo.run(*ACTOR, "keys", "rotate")
    assert rotated.returncode == 0 and "3 Powens tokens re-encrypted" in rotated.stderr, rotated.stderr
    added = demo.run(*ACTOR, "tenant", "add", "demo-extra")
    assert added.returncode == 0, added.stderr


# -- 12, 13: consistent words, help and version -------------------------------------------------------


def test_run_sweep_speaks_words_and_camel_case_json(demo: Demo, redis_url: str) -> None:
    said = demo.run(*ACTOR, "run", "sweep", CELERY_BROKER_URL=redis_url)
    assert said.returncode == 0, said.stderr
    assert said.stdout.startswith("swept: ") and "{" not in said.stdout
    doc = json.loads(demo.run(*ACTOR, "run", "sweep", "--json", CELERY_BROKER_URL=redis_url).stdout)
    assert set(doc) >= {"redispatched", "stale", "summariesReenqueued", "plansReenqueued", "runsMarkedStale"}


def test_the_json_log_drops_uvicorns_coloured_copy_of_each_message() -> None:
    import logging

    from app.ops.logs import JsonFormatter

    record = logging.makeLogRecord({"msg": "Started server", "color_message": "\x1b[1mStarted\x1b[0m server"})
    line = JsonFormatter().format(record)
    assert "color_message" not in line and "\\u001b" not in line and "Started server" in line


def test_version_and_help_that_says_what_each_option_is(demo: Demo) -> None:
    version = demo.run("--version")
    assert version.returncode == 0 and re.match(r"balances \d+\.\d+\.\d+", version.stdout)
    assert "<bool>" not in demo.run("refresh", "--help").stdout
    assert "--webhook-secret" not in demo.run("sandbox", "serve", "--help").stdout
    from app.cli import cli

    missing = []
    for path, command in _commands(typer.main.get_command(cli)):
        if not getattr(command, "commands", None) and not (command.help or "").strip():
            missing.append(f"{path} (the command)")
        missing += [f"{path} {p.name}" for p in command.params if not getattr(p, "help", None)]
    assert missing == []


def _commands(group: Any, path: str = "balances") -> Iterator[tuple[str, Any]]:
    """Every command of the shell (typer's own click: a group has ``commands``)."""
    yield path, group
    for name, sub in getattr(group, "commands", {}).items():
        yield from _commands(sub, f"{path} {name}")


def test_make_and_readme_agree_and_every_setting_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    from app.config import _FIELD_TO_ENV

    undocumented = [
        env for env in _FIELD_TO_ENV.values() if f"`{env}`" not in readme and env not in ("XDG_STATE_HOME",)
    ]
    assert undocumented == []
    # How long the full benchmark takes: the Makefile, the README and docs/performance.md say the same.
    said = [
        re.findall(r"bench-full[^(]*\((?:the full size, )?(about [a-z]+ minutes)\)", text)
        for text in (readme, (ROOT / "Makefile").read_text(), (ROOT / "docs" / "performance.md").read_text())
    ]
    assert all(said) and len({s for found in said for s in found}) == 1, said


# -- after review: the first ten minutes, literally -------------------------------------------------


def test_the_readmes_first_read_command_works_as_written_on_the_demo_database(demo: Demo) -> None:
    """`balances show --tenant demo-acme`, no --as: the demo's balances.env names its admin."""
    shown = demo.run("show", "--tenant", "demo-acme")
    assert shown.returncode == 0 and "demo-acme" in shown.stdout, shown.stderr
    denied = demo.run("--as", "nobody", "show", "--tenant", "demo-acme")
    assert denied.returncode == 3
    hint = re.search(r"`(balances [^`]+)`", denied.stderr)
    assert hint and hint.group(1) == "balances --as demo-admin admin grant nobody"  # a command that works


def test_on_an_80_column_terminal_run_ids_are_whole_and_json_is_never_broken(demo: Demo) -> None:
    run_ids = [
        line.split("\t")[0] for line in demo.run("run", "list", "--format", "tsv").stdout.splitlines()[1:]
    ]
    raw = ANSI.sub("", demo.tty("run", "status", run_ids[0]))
    assert run_ids[0] in raw
    as_json = ANSI.sub("", demo.tty("summary", "--tenant", "demo-initech", "--json"))
    assert re.search(r'"reconnectCommand": "' + RECONNECT + r'[0-9a-f]{32}"', as_json), as_json


def test_on_an_80_column_terminal_the_commands_to_copy_are_printed_under_the_table(demo: Demo) -> None:
    raw = ANSI.sub("", demo.tty("attention"))
    assert "too narrow for:" in raw  # says what it left out
    assert re.search(r"\r\n  " + RECONNECT + r"[0-9a-f]{32}\r\n", raw), raw  # whole, on a line of its own


def test_attention_counts_what_its_limit_leaves_out(demo: Demo) -> None:
    doc = json.loads(demo.run("attention", "--limit", "1", "--json").stdout)
    assert doc["repeatedFailures"]["total"] == 2 and len(doc["repeatedFailures"]["items"]) == 1
    said = demo.run("attention", "--limit", "1").stdout
    assert "in all: 2 accounts failing run after run" in said and "{" not in said
    [item] = doc["repeatedFailures"]["items"]  # failing on the bank's SCA: the reconnect link, not a refresh
    assert item["command"].startswith(RECONNECT)


def test_json_log_lines_use_the_one_timestamp_format(demo: Demo) -> None:
    refused = demo.run("refresh", "--tenant", "demo-acme", "--account", "acc_nope")  # logs a telemetry line
    stamps = re.findall(r'"(?:ts|timestamp)": "([^"]+)"', refused.stderr)
    assert stamps and all(s.endswith("Z") for s in stamps), refused.stderr


def test_the_demo_settings_file_is_ignored_when_the_environment_names_another_database(
    demo: Demo, tmp_path: Path
) -> None:
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    proc = demo.run("show", "--tenant", "demo-acme", DATABASE_URL=elsewhere)
    # Not the demo's actor, keys or sandbox: the OS user, on a database that is not there.
    assert proc.returncode == 1 and "no database at" in proc.stderr and not (tmp_path / "other.db").exists()
    import os

    from app.config import load_settings

    previous = os.getcwd()
    os.chdir(demo.dir)
    try:
        os.environ["DATABASE_URL"] = elsewhere
        assert load_settings().encryption_key is None and load_settings().actor is None
        del os.environ["DATABASE_URL"]
        assert load_settings().actor == "demo-admin"  # beside its own database, it applies
    finally:
        os.environ.pop("DATABASE_URL", None)
        os.chdir(previous)
