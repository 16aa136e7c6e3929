"""What the refresh handler and account discovery need from outside: settings, a Powens client, a
clock, the coordinator (locks, shared reads, rate limit) and the actor lookup.

Built lazily, so paths that never call Powens (input and policy checks, replays) work without Powens
configuration. Each ``Deps`` builds its own Powens client with the rate limiter given at
construction; clients share the process's pooled HTTP session.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from app.config import Settings, get_settings
from app.policy import Actor, resolve
from app.powens.client import PowensClient, build_client
from app.refresh.coordination import Coordinator, get_coordinator, throttle
from app.store import repo
from app.store.db import session_scope
from app.store.secrets import TokenCipher


class Deps:
    def __init__(
        self,
        settings: Settings,
        client: PowensClient | None = None,
        clock: Callable[[], datetime] | None = None,
        coord: Coordinator | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self._client = client
        self.clock = clock or (lambda: datetime.now(UTC))
        self.sleep = sleep
        self._coord = coord
        self._cipher: TokenCipher | None = None

    @classmethod
    def default(cls, settings: Settings | None = None, client: PowensClient | None = None) -> Deps:
        return cls(settings or get_settings(), client)

    @property
    def coord(self) -> Coordinator:
        if self._coord is None:
            self._coord = get_coordinator(self.settings)
        return self._coord

    @property
    def client(self) -> PowensClient:
        if self._client is None:
            s = self.settings
            hook = None
            if s.powens_rate_limit > 0:
                coord = self.coord

                # Every Powens call of this client passes the cluster-wide limiter first.
                def hook(_endpoint: str) -> None:
                    throttle(coord, s.rate_limit_max_wait)

            self._client = build_client(s, before_request=hook)
        return self._client

    @property
    def cipher(self) -> TokenCipher:
        if self._cipher is None:
            self._cipher = TokenCipher.from_settings(self.settings)
        return self._cipher

    def actor(self, actor: Actor | str) -> Actor:
        def roles_of(name: str) -> frozenset[str]:
            with session_scope(self.settings) as session:
                return repo.actor_roles(session, name)

        return resolve(actor, roles_of)
