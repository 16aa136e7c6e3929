"""The webhook receiver: an ASGI app (Starlette, served by uvicorn) that takes Powens' pushes.

``POST /webhooks/powens/{EVENT}`` (or ``/webhooks/powens``, the type then read from the body):
1. the body is read up to ``BALANCES_WEBHOOK_MAX_BODY_BYTES`` (a larger one is 413, unread);
2. its ``BI-Signature`` is checked against ``POWENS_WEBHOOK_SECRET`` (401 when bad or missing) and
   its ``BI-Signature-Date`` against the clock (401 when outside the window: a replay);
3. it is parsed and reduced to what a refresh reads (400 when it is not the event it claims; an event
   we do not act on is 202, ignored and counted);
4. it is published, signed by the service, on the ``push`` queue, and only then answered 202. When the
   broker cannot take it the answer is 503, so Powens sends it again.

Nothing here touches the database: the receiver needs only the broker, and ``GET /healthz`` is ready
only while the broker answers. Each answer carries ``Server-Timing`` (verification and parsing, and
the broker write, in milliseconds). See docs/design.md "The push path".
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import jsonio
from app.config import Settings
from app.ops import metrics
from app.ops.metrics import PushOutcome
from app.push import events, signature

log = logging.getLogger(__name__)
LIMIT_CONCURRENCY = 32
Publisher = Callable[[str, str], None]  # (payload JSON text, received_at ISO) -> durably queued or raise
BrokerCheck = Callable[[], bool]


class TooLarge(Exception):
    pass


def celery_publisher(settings: Settings) -> Publisher:
    from app.celery import app as celery_app
    from app.worker.queues import PUSH_TASK

    def publish(payload: str, received_at: str) -> None:
        # A short retry only: Powens is waiting on the answer, and a 503 makes it send the event again.
        celery_app.send_task(
            PUSH_TASK,
            args=(payload, received_at),
            task_id=f"push-{uuid.uuid4()}",
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        )

    return publish


def broker_check(settings: Settings) -> BrokerCheck:
    url = settings.celery_broker_url

    def reachable() -> bool:
        if url.startswith(("redis://", "rediss://")):
            import redis

            try:
                return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
            except (redis.RedisError, OSError):
                return False
        from kombu import Connection

        try:
            with Connection(url, connect_timeout=1) as conn:
                conn.ensure_connection(max_retries=1)
            return True
        except Exception:
            return False

    return reachable


def create_app(
    settings: Settings,
    publish: Publisher | None = None,
    broker_ok: BrokerCheck | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Starlette:
    publish = publish or celery_publisher(settings)
    broker_ok = broker_ok or broker_check(settings)
    secrets = settings.webhook_secrets
    limit = settings.webhook_max_body_bytes

    async def receive(request: Request) -> Response:
        started = time.perf_counter()
        try:
            return await _receive(request, request.path_params.get("event"))
        finally:
            metrics.WEBHOOK_DURATION.observe(time.perf_counter() - started)

    async def _receive(request: Request, name: str | None) -> Response:
        t0 = time.perf_counter()
        event = events.named(name) if name is not None else None
        label = event.value if event is not None else "unknown"

        def answer(
            status: int, outcome: PushOutcome, message: str, enqueue_ms: float | None = None
        ) -> Response:
            metrics.WEBHOOKS.labels(event=label, outcome=outcome.value).inc()
            timing = f"verify;dur={(time.perf_counter() - t0) * 1000 - (enqueue_ms or 0):.2f}"
            if enqueue_ms is not None:
                timing += f", enqueue;dur={enqueue_ms:.2f}"
            if status >= 400:
                log.warning("webhook %s refused: %s (%s)", label, outcome.value, message)
            return JSONResponse(
                {"status": outcome.value, "detail": message}, status, {"Server-Timing": timing}
            )

        # What the headers alone can refuse is refused before a byte of the body is read.
        sig, date = (
            request.headers.get(signature.SIGNATURE_HEADER),
            request.headers.get(signature.DATE_HEADER),
        )
        if not secrets or not sig or date is None:
            return answer(401, PushOutcome.REJECTED_SIGNATURE, "missing BI-Signature or BI-Signature-Date")
        if not signature.date_within(date, clock(), settings.webhook_tolerance_seconds):
            return answer(401, PushOutcome.REJECTED_STALE, "BI-Signature-Date outside the window")
        try:
            body = await _read(request, limit)
        except TooLarge:
            return answer(413, PushOutcome.REJECTED_SIZE, f"body larger than {limit} bytes")
        path = request.scope.get("raw_path") or request.url.path.encode()
        path_text = path.decode("latin-1") if isinstance(path, bytes) else str(path)
        # Verifying, parsing and reducing are CPU work: on a thread, not on the event loop.
        verdict, result = await run_in_threadpool(
            _verify_and_reduce, secrets, request.method, path_text.split("?", 1)[0], sig, date, body, event
        )
        if verdict is not None:
            status, outcome, message = verdict
            return answer(status, outcome, message)
        event, payload = result
        label = event.value if event is not None else "unknown"
        if event is None or payload is None:
            return answer(202, PushOutcome.UNKNOWN_EVENT, "not an event this service acts on")
        received_at = clock().isoformat()
        e0 = time.perf_counter()
        try:
            await run_in_threadpool(publish, payload, received_at)
        except Exception as exc:
            log.error("webhook %s could not be queued: %s", label, type(exc).__name__)
            return answer(503, PushOutcome.UNAVAILABLE, "the broker is unavailable; send it again")
        enqueue_ms = (time.perf_counter() - e0) * 1000
        metrics.WEBHOOK_ENQUEUE.observe(enqueue_ms / 1000)
        return answer(202, PushOutcome.QUEUED, "queued", enqueue_ms)

    async def healthz(request: Request) -> Response:
        ok = await run_in_threadpool(broker_ok)
        return JSONResponse({"status": "ok" if ok else "broker unreachable"}, 200 if ok else 503)

    return Starlette(
        routes=[
            Route("/webhooks/powens", receive, methods=["POST"]),
            Route("/webhooks/powens/{event}", receive, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


Refusal = tuple[int, PushOutcome, str]


def _verify_and_reduce(
    secrets: list[bytes],
    method: str,
    path: str,
    sig: str,
    date: str,
    body: bytes,
    event: events.Event | None,
) -> tuple[Refusal | None, tuple[events.Event | None, str | None]]:
    """The signature over the exact bytes, then the body as the event it claims to be, reduced to what
    goes on the broker. (A refusal, or the event and its payload; no payload: an event we ignore.)"""
    if not signature.valid(secrets, method, path, sig, date, body):
        return (401, PushOutcome.REJECTED_SIGNATURE, "invalid BI-Signature"), (event, None)
    try:
        doc = jsonio.loads(body)
    except ValueError:
        return (400, PushOutcome.INVALID_PAYLOAD, "the body is not JSON"), (event, None)
    event = event if event is not None else events.infer(doc)
    if event is None:
        return None, (None, None)
    try:
        return None, (event, jsonio.dumps(events.reduce(event, doc)))
    except events.PayloadError as err:
        return (400, PushOutcome.INVALID_PAYLOAD, str(err)), (event, None)


async def _read(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the receiver (one uvicorn process; run several behind the load balancer to scale)."""
    import uvicorn

    from app.ops import exporter, logs

    logs.configure(settings.log_level, settings.log_format)
    exporter.serve_worker_metrics(settings, restore_nightly=False)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,  # our JSON logs
        access_log=False,  # every refusal is logged by the app; acceptances are counted
        server_header=False,
        timeout_keep_alive=30,
        proxy_headers=True,
        # Bounded work at once (bodies are read, up to BALANCES_WEBHOOK_MAX_BODY_BYTES, before they can
        # be verified): beyond it uvicorn answers 503 and Powens sends again.
        limit_concurrency=LIMIT_CONCURRENCY,
    )
