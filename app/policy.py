"""Who may run what: actors, roles, and the contract's ``auth: 'admin'`` policy."""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass, field

from app.contract import OperationMeta
from app.errors import InvalidInput, PolicyDenied

ADMIN = "admin"
ACTOR_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
SYSTEM_PREFIX = "system:"


@dataclass(frozen=True)
class Actor:
    name: str
    roles: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_system(self) -> bool:
        return self.name.startswith(SYSTEM_PREFIX)


# The scheduler (beat, the nightly pipeline) acts as this built-in admin; no row, no grant needed.
SCHEDULER = Actor(f"{SYSTEM_PREFIX}scheduler", frozenset({ADMIN}))
BUILTIN_ACTORS = {SCHEDULER.name: SCHEDULER}


def validate_actor_name(name: str) -> str:
    """Names a person can use with ``--as`` (``system:*`` is reserved for built-in actors)."""
    if not ACTOR_NAME_RE.match(name):
        raise InvalidInput(
            f"actor name {name[:40]!r} is invalid: use letters, digits and _ . @ - (at most 128 characters)"
        )
    return name


def default_actor_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def authorize(operation: OperationMeta, actor: Actor) -> None:
    """Raise PolicyDenied unless the actor holds the operation's role (ContractSpec's wording)."""
    if operation.policy_auth not in actor.roles:
        raise PolicyDenied(
            f'Operation "{operation.qualified_name}" requires "{operation.policy_auth}" auth level '
            f"(actor {actor.name!r} has {', '.join(sorted(actor.roles)) or 'no role'})"
        )
