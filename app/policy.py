"""Who may run what: actors, roles, and ContractSpec's auth levels (``anonymous``, ``user``, a role).

Every operation (the contract's refresh and each admin-shell command) declares its level in its
``OperationMeta``; ``authorize`` is the one check. See docs/design.md "Authorization".
"""

from __future__ import annotations

import getpass
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from app.contract import ID_MAX_LENGTH, OperationMeta
from app.errors import InvalidInput, PolicyDenied

ADMIN = "admin"
VIEWER = "viewer"  # reads only (the `user` level: any role)
ROLES = (ADMIN, VIEWER)
ANONYMOUS = "anonymous"  # the operation checks nobody (e.g. applying migrations)
USER = "user"  # any known actor, whatever its role
ACTOR_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.@-]{{0,{ID_MAX_LENGTH - 1}}}")
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
# Powens' pushes are recorded as this actor. It holds no role: a push is not a command anyone gave,
# its authority is Powens' signature (checked by the receiver) and the service's own on the message.
POWENS_PUSH = Actor(f"{SYSTEM_PREFIX}powens-webhook")
BUILTIN_ACTORS = {SCHEDULER.name: SCHEDULER, POWENS_PUSH.name: POWENS_PUSH}


def validate_actor_name(name: str) -> str:
    """Names a person can use with ``--as`` (``system:*`` is reserved for built-in actors)."""
    if not ACTOR_NAME_RE.fullmatch(name):  # fullmatch: "$" would let a trailing newline through
        raise InvalidInput(
            f"actor name {name[:40]!r} is invalid: use letters, digits and _ . @ - "
            f"(at most {ID_MAX_LENGTH} characters)"
        )
    return name


def default_actor_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def resolve(actor: Actor | str, roles_of: Callable[[str], frozenset[str]]) -> Actor:
    """The actor with its roles: built-in actors as declared, others as the store says."""
    if isinstance(actor, Actor):
        return actor
    if actor in BUILTIN_ACTORS:
        return BUILTIN_ACTORS[actor]
    return Actor(actor, roles_of(actor))


def authorize(operation: OperationMeta, actor: Actor) -> None:
    """Raise PolicyDenied unless the actor meets the operation's auth level (ContractSpec's wording)."""
    level = operation.policy_auth
    if level == ANONYMOUS or (level == USER and actor.roles) or level in actor.roles:
        return
    raise PolicyDenied(
        f'Operation "{operation.qualified_name}" requires "{level}" auth level '
        f"(actor {actor.name!r} has {', '.join(sorted(actor.roles)) or 'no role'})"
    )
