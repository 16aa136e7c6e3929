"""Balance refresh service: openbanking.balances.refresh v1.0.0 on Celery, backed by Powens.

Kept import-light on purpose: ``celery -A app`` imports this package first, and prometheus_client must
not be imported before the worker has chosen its multiprocess directory (see ``app.celery``).
"""

__all__: list[str] = []
