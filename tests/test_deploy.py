"""deploy/ and the alert rules, checked as far as this machine allows (no Docker here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
YAML_FILES = sorted(p for p in DEPLOY.rglob("*.y*ml"))


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is not installed (`make test` installs Debian's prometheus package)"
        if IN_CI:
            pytest.fail(message + "; under CI=true this is a failure", pytrace=False)
        pytest.skip(message)
    return path


def test_alert_rules_pass_promtool_check() -> None:
    out = subprocess.run(
        [promtool(), "check", "rules", str(PROM / "alerts.yml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    out = subprocess.run(
        [promtool(), "test", "rules", str(PROM / "alerts.test.yml")], capture_output=True, text=True, cwd=PROM
    )
    assert out.returncode == 0, out.stdout + out.stderr


def rules() -> list[dict[str, object]]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_every_alert_is_tested_documented_and_has_a_runbook_section() -> None:
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    tested_firing = {t["alertname"] for g in tests for t in g["alert_rule_test"] if t["exp_alerts"]}
    tested_silent = {t["alertname"] for g in tests for t in g["alert_rule_test"] if not t["exp_alerts"]}
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^## (.+)$", runbook, re.M)
    }
    for rule in rules():
        name = str(rule["alert"])
        ann = rule["annotations"]
        assert isinstance(ann, dict) and ann.get("summary") and ann.get("description"), name
        assert name in tested_firing and name in tested_silent, f"{name} needs a firing and a silent test"
        anchor = str(ann["runbook_url"]).rsplit("#", 1)[1]
        assert anchor in anchors or name in runbook, f"{name}: runbook has no section #{anchor}"
        assert f"docs/runbook.md#{anchor}" in str(ann["runbook_url"])
        assert rule["labels"]["severity"] in ("page", "ticket", "warning")  # type: ignore[index]


def exported_metric_names() -> set[str]:
    from prometheus_client import REGISTRY

    import app.ops.metrics  # noqa: F401
    from app.worker.queues import Queue  # the queues the beat's ServiceCollector measures

    names: set[str] = {"up"}
    for family in REGISTRY.collect():
        for sample in family.samples:
            names.add(sample.name)
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
        elif family.type == "counter":
            names.add(f"{family.name}_total")  # also families with no labelled child yet
        else:
            names.add(family.name)
    names |= {
        "balances_celery_queue_length",
        "openbanking_connections_needing_user",
        "openbanking_connections_consent_expiring",
        "openbanking_connections",
        "openbanking_accounts_by_data_age",
        "balances_service_gauges_computed_timestamp_seconds",
        "balances_service_gauges_compute_duration_seconds",
    }
    assert tuple(q.value for q in Queue) == ("interactive", "push", "reports", "refresh")  # priority order
    # Gauges with no value yet (no sample) still exist as families.
    names |= {
        "openbanking_balances_last_success_timestamp_seconds",
        "openbanking_nightly_run_last_success_timestamp_seconds",
    }
    return names


METRIC_RE = re.compile(r"\b((?:openbanking|powens|balances)_[a-z_]+)\b")


def used_metrics(expr: str) -> set[str]:
    return {m for m in METRIC_RE.findall(expr)}


def test_every_metric_an_alert_or_panel_uses_is_exported_by_the_code() -> None:
    exported = exported_metric_names()
    exprs = [str(r["expr"]) for r in rules()]
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "balances.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set().union(*(used_metrics(e) for e in exprs))
    assert {
        "openbanking_balances_refreshed_total",
        "powens_http_requests_total",
        "balances_celery_queue_length",
    } <= used
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    # Labels used in alerts exist on the metrics that carry them.
    assert 'reason!="needs_user_action"' in exprs[0]


def test_dashboard_has_the_panels_operators_need() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "balances.json").read_text())
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for needed in (
        "refreshes per second",
        "failure ratio by reason",
        "duration quantiles",
        "nightly run age",
        "powens calls",
        "powens latency",
        "queue",
        "webhooks",
        "bank data age",
    ):
        assert needed in titles


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(d is not None for d in docs)


def test_compose_file_validates_against_the_compose_specification() -> None:
    exe = shutil.which("check-jsonschema", path=str(Path(os.sys.executable).parent)) or shutil.which(
        "check-jsonschema"
    )
    assert exe, "check-jsonschema is part of the dev extra"
    out = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "docker-compose.yml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert {
        "postgres",
        "redis",
        "migrate",
        "worker",
        "beat-a",
        "beat-b",
        "prometheus",
        "alertmanager",
        "grafana",
    } <= set(compose["services"])


def known_env() -> set[str]:
    from pydantic import AliasChoices

    names = set()
    for f in Settings.model_fields.values():
        if isinstance(f.validation_alias, AliasChoices):
            names |= {str(c) for c in f.validation_alias.choices}
    return names


def test_every_variable_the_deployment_sets_is_one_settings_knows() -> None:
    known = known_env()
    third_party = re.compile(r"^(POSTGRES_|GF_|PYTHON|PIP_|REDIS_PASSWORD$|pgbouncer\.ini$)")
    seen: set[str] = set()
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] in ("ConfigMap",):
                seen |= set(doc["data"])
            if doc["kind"] == "Secret":
                seen |= set(doc["stringData"])
            spec = doc.get("spec", {})
            pod = spec.get("template", {}).get("spec", {}) if isinstance(spec, dict) else {}
            for c in pod.get("containers", []):
                seen |= {e["name"] for e in c.get("env", [])}
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for svc in compose["services"].values():
        env = svc.get("environment") or {}
        seen |= set(env)
    seen |= set(
        re.findall(r"^ENV (.+)$", (DEPLOY / "Dockerfile").read_text(), re.M)[0]
        .replace("\\", " ")
        .split()[0::1]
    )
    seen = {s.split("=", 1)[0] for s in seen if s and not s.startswith("<<")}
    unknown = sorted(s for s in seen if s not in known and not third_party.match(s))
    assert unknown == [], f"variables Settings does not know: {unknown}"
    assert {"DATABASE_URL", "BALANCES_ENCRYPTION_KEY", "BALANCES_SIGNING_KEY", "POWENS_CLIENT_SECRET"} <= seen


def test_redis_needs_a_password_and_tls_where_traffic_crosses_hosts() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "requirepass" in command and "--requirepass" not in command  # through stdin, not argv
    assert compose["x-balances-env"]["CELERY_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD")
    docs = [d for p in (DEPLOY / "k8s").glob("*.yaml") for d in yaml.safe_load_all(p.read_text())]
    [secret] = [d for d in docs if d["kind"] == "Secret"]
    assert secret["stringData"]["CELERY_BROKER_URL"].startswith("rediss://:")  # TLS, with a password
    for config in (d for d in docs if d["kind"] == "ConfigMap"):
        assert "CELERY_BROKER_URL" not in config["data"]  # a URL with a password is a secret
    [scaler] = [d for d in docs if d["kind"] == "ScaledObject"]
    trigger = scaler["spec"]["triggers"][0]
    assert trigger["metadata"]["enableTLS"] == "true" and trigger["authenticationRef"]["name"]
    assert "sslmode=verify-full" in secret["stringData"]["DATABASE_URL"]


def test_every_schedule_the_deployment_sets_exists_once_a_day() -> None:
    from app.config import load_settings

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    docs = [d for p in (DEPLOY / "k8s").glob("*.yaml") for d in yaml.safe_load_all(p.read_text())]
    crons = [compose["x-balances-env"]["BALANCES_NIGHTLY_CRON"]]
    crons += [
        d["data"]["BALANCES_NIGHTLY_CRON"] for d in docs if "BALANCES_NIGHTLY_CRON" in d.get("data", {})
    ]
    for cron in crons:
        load_settings(nightly_cron=cron, timezone="Europe/Paris")  # raises on a DST-unsafe time


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, re.M)
    assert len(froms) >= 2 and all("slim" in image for image, _ in froms)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    assert "COPY --from=build" in text


def test_k8s_has_worker_pdb_autoscaling_beat_and_migration() -> None:
    kinds = {
        (d["kind"], d["metadata"]["name"])
        for p in (DEPLOY / "k8s").glob("*.yaml")
        for d in yaml.safe_load_all(p.read_text())
    }
    assert {
        ("Deployment", "balances-worker"),
        ("PodDisruptionBudget", "balances-worker"),
        ("ScaledObject", "balances-worker"),
        ("Deployment", "balances-beat"),
        ("Job", "balances-migrate"),
        ("ConfigMap", "balances-config"),
        ("Secret", "balances-secrets"),
        ("Deployment", "balances-webhooks"),
        ("Service", "balances-webhooks"),
        ("PodDisruptionBudget", "balances-webhooks"),
    } <= kinds


def test_the_webhook_receiver_is_deployed_ready_only_with_the_broker_and_scraped() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    receiver = compose["services"]["webhooks"]
    assert receiver["command"][:3] == ["balances", "webhooks", "serve"]
    # The internet-facing receiver holds only the broker, Powens' secret and its push key.
    assert set(receiver["environment"]) >= {
        "CELERY_BROKER_URL",
        "POWENS_WEBHOOK_SECRET",
        "BALANCES_PUSH_SIGNING_KEY",
    }
    assert not {"DATABASE_URL", "BALANCES_ENCRYPTION_KEY", "BALANCES_SIGNING_KEY"} & set(
        receiver["environment"]
    )
    assert "BALANCES_PUSH_SIGNING_KEY" in compose["x-balances-env"]  # the workers accept its pushes
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "webhooks.yaml").read_text())]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert not any("secretRef" in source for source in container.get("envFrom", []))  # not every secret
    assert {e["name"] for e in container["env"]} == {
        "CELERY_BROKER_URL",
        "POWENS_WEBHOOK_SECRET",
        "BALANCES_PUSH_SIGNING_KEY",
    }
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert "balances-webhooks" in {job["job_name"] for job in scrape["scrape_configs"]}
