"""The Redis ACL rules of qworker's roles: the one place they are written down.

``compose/redis/users.acl`` is generated from here (``python -m qworker.acl``) and the
tests check that the two agree. Three roles (docs/security.md explains each rule):

* **producer**: XADD to the jobs stream; read job events (SUBSCRIBE ``out:*``, XRANGE /
  XREAD ``log:*``) and results (GET ``result:*``); cancel (PUBLISH ``cancel``, SET
  ``cancelled:*``). ``job_ids`` narrows the job-scoped keys to a pattern (a tenant's
  producer gets ``job_ids="acme-*"`` and can read and cancel only ids it chose).
* **worker**: exactly what a worker sends (see qworker/worker/: intake, feeder, publisher
  and the Lua scripts, whose own commands Redis checks against the caller's ACL too).
* **admin**: everything, for operators (``qworker status``, ``dead-letter retry``, INFO).

Each command is tied to its keys by a Redis 7 selector ``(+cmd ~key)``, so a role cannot
use a command it has on one key against another key (a producer's XADD reaches the jobs
stream, never the dead-letter stream or a replay log). Needs Redis >= 7.0.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

ROLES = ("producer", "worker", "admin")
# What every client sends outside the protocol: health checks (PING, also inside pub/sub),
# the RESP3 handshake, db selection, transactions (the client's cancel is MULTI/EXEC) and
# leaving pub/sub. AUTH is always allowed by Redis itself.
CONNECTION = ("+ping", "+hello", "+select", "+multi", "+exec", "+discard", "+unsubscribe",
              "+punsubscribe")
PLACEHOLDER = "{{{var}:sha256}}"   # in the template; replaced by start.sh


def _selector(commands: str, keys: tuple[str, ...] = (), channels: tuple[str, ...] = ()) -> str:
    parts = [f"+{c}" for c in commands.split()]
    parts += [f"~{k}" for k in keys] + [f"&{c}" for c in channels]
    return "(" + " ".join(parts) + ")"


def producer_rules(prefix: str = "qworker", job_ids: str = "*") -> list[str]:
    """ACL rules of a producer: add jobs, read its jobs' events and results, cancel."""
    p = prefix
    return [*CONNECTION,
            _selector("xadd", keys=(f"{p}:jobs",)),
            _selector("xrange xread", keys=(f"{p}:log:{job_ids}",)),
            _selector("get", keys=(f"{p}:result:{job_ids}",)),
            _selector("set", keys=(f"{p}:cancelled:{job_ids}",)),
            _selector("subscribe", channels=(f"{p}:out:{job_ids}",)),
            _selector("publish", channels=(f"{p}:cancel",))]


def worker_rules(prefix: str = "qworker") -> list[str]:
    """ACL rules of a worker: consume the jobs stream, publish events and results,
    dead-letter, hand jobs back, follow cancellations, write its heartbeat."""
    p = prefix
    jobs, out, log, result = f"{p}:jobs", f"{p}:out:*", f"{p}:log:*", f"{p}:result:*"
    return [*CONNECTION,
            # consumer group; XADD for the SIGTERM handoff; XLEN/XINFO/XPENDING for metrics
            _selector("xgroup|create xreadgroup xautoclaim xclaim xpending xack xdel xadd "
                      "xlen xinfo|groups xinfo|stream", keys=(jobs,)),
            _selector("xadd xrange expire", keys=(log,)),               # replay logs
            _selector("exists set", keys=(result,)),                     # SET NX, once
            _selector("exists", keys=(f"{p}:cancelled:*",)),             # cancel markers
            _selector("xadd xlen", keys=(f"{p}:dead",)),                 # dead letters
            _selector("hset expire del", keys=(f"{p}:worker:*",)),       # heartbeat
            _selector("publish", channels=(out,)),                       # live events
            _selector("subscribe", channels=(f"{p}:cancel",)),
            # the fenced Lua scripts (scripts.py): EVALSHA checks the KEYS it is given (the
            # out channel travels as a key); every call inside is checked on its own.
            _selector("script|load script|exists evalsha",
                      keys=(jobs, f"{p}:dead", out, log, result))]


def admin_rules(prefix: str = "qworker") -> list[str]:
    """Every command on every key and channel (for people, not for services)."""
    return ["~*", "&*", "+@all"]


def rules(role: str, prefix: str = "qworker", job_ids: str = "*") -> list[str]:
    """The ACL rules of ``role`` (one of ROLES) for a key prefix."""
    if role == "producer":
        return producer_rules(prefix, job_ids)
    if role == "worker":
        return worker_rules(prefix)
    if role == "admin":
        return admin_rules(prefix)
    raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")


def username(role: str, prefix: str = "qworker") -> str:
    """The default user name of a role: ``qworker-producer``, ``qworker-worker``, ..."""
    return f"{prefix}-{role}"


def password_env(role: str) -> str:
    """The environment variable holding a role's password in compose (``.env``)."""
    return f"QWORKER_{role.upper()}_PASSWORD"


def sha256_password(password: str) -> str:
    """The ``#<hex>`` ACL form of a password (Redis stores only the hash)."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def setuser_args(role: str, password: str, prefix: str = "qworker", user: str | None = None,
                 job_ids: str = "*") -> list[str]:
    """Arguments of ``ACL SETUSER`` that create (or reset) the user of a role:
    ``r.execute_command("ACL", "SETUSER", *setuser_args("worker", pw))``."""
    return [user or username(role, prefix), "reset", "on", sha256_password(password),
            *rules(role, prefix, job_ids)]


def acl_file(prefix: str = "qworker", passwords: dict[str, str] | None = None) -> str:
    """An ACL file: the default user off, then one user per role. Without ``passwords``
    (role -> password) each password is a placeholder that ``compose/redis/start.sh``
    replaces with the SHA-256 of the role's environment variable; Redis refuses to load
    a file whose placeholders were not replaced, so a forgotten password fails closed."""
    lines = ["user default reset off"]   # Redis ACL files allow no comments
    for role in ROLES:
        secret = (sha256_password(passwords[role]) if passwords
                  else "#" + PLACEHOLDER.format(var=password_env(role)))
        lines.append(" ".join(["user", username(role, prefix), "reset", "on", secret,
                               *rules(role, prefix)]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m qworker.acl [--prefix P]``: print the ACL file template."""
    ap = argparse.ArgumentParser(prog="python -m qworker.acl", description=main.__doc__)
    ap.add_argument("--prefix", default="qworker", help="key prefix of the deployment")
    ap.add_argument("--role", choices=ROLES, help="print only this role's rules, one line")
    ap.add_argument("--job-ids", default="*", help="producer: pattern of its job ids")
    args = ap.parse_args(argv)
    if args.role:
        sys.stdout.write(" ".join(rules(args.role, args.prefix, args.job_ids)) + "\n")
    else:
        sys.stdout.write(acl_file(args.prefix))


if __name__ == "__main__":
    main()
