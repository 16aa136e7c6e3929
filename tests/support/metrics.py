"""Reading metrics: this process's registry, and the /metrics text a worker, beat or receiver serves
(one parser, prometheus_client's own)."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metric(name: str, **labels: str) -> float:
    """A sample of this process's registry (0 when it has none yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def failed_total(reason: str, trigger: str = "on_demand") -> float:
    return metric(
        "openbanking_balances_refresh_failed_total", provider="powens", trigger=trigger, reason=reason
    )


def refreshed_total(trigger: str = "on_demand") -> float:
    return metric("openbanking_balances_refreshed_total", provider="powens", trigger=trigger)


def samples(body: str) -> Samples:
    """A /metrics text body as {(sample name, sorted labels): value} (repeated samples summed)."""
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            out[key] = out.get(key, 0.0) + s.value
    return out


def total(scraped: str | Samples, name: str, **labels: str) -> float:
    """Every sample named ``name`` whose labels include ``labels``, summed."""
    parsed = samples(scraped) if isinstance(scraped, str) else scraped
    return sum(
        v
        for (n, ls), v in parsed.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


def sum_scrape(body: str, name: str) -> float:
    """Every sample named ``name`` in a /metrics text body, summed (all its labels)."""
    return total(body, name)
