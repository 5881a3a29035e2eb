"""``relaxsgd join HOST:PORT --runtime dist ...``: a worker started by hand joins a running
elastic job (issue 20, ELASTIC.md).

The joiner is given the job's rendezvous address (the launcher's ``MASTER_ADDR:MASTER_PORT``)
and its secret (``RELAXSGD_SECRET`` or ``RELAXSGD_SECRET_FILE``, as every worker), and the
same run flags as the job (so that it resolves the same config: ``workers``,
``elastic.max_workers``). It then:

1. claims the lowest id never used, atomically in the store
   (:func:`.membership.claim_id`); a job that already has ``elastic.max_workers`` ids
   refuses it with one line (exit status 2);
2. becomes that worker: ``RANK`` = its id (at or above ``WORLD_SIZE`` = ``workers``: only
   a joiner may), ``RELAXSGD_JOIN=1``, ``RELAXSGD_ELASTIC=1``, incarnation 0, the store
   hosted elsewhere (``TORCHELASTIC_USE_AGENT_STORE=True``), and runs the job's run as a
   dist worker: it registers in the member registry, proves the secret to each peer it
   talks to (a wrong secret is refused by the handshake; the job goes on), and takes its
   state from a donor (the runtime's live recovery).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError
from .environment import resolve
from .store import StoreForged


def parse_job_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of a running job's store; one line if it is not that."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"relaxsgd join needs the job's address as HOST:PORT (its "
                          f"MASTER_ADDR:MASTER_PORT), got {text[:80]!r}")
    return host, int(port)


def max_workers_of(cfg: Any) -> int:
    """``elastic.max_workers`` of ``cfg`` (default ``workers``: then no one can join)."""
    e = getattr(cfg, "elastic", None)
    most = getattr(e, "max_workers", None)
    return int(most) if most is not None else int(cfg.workers)


def claim(address: str, cfg: Any) -> dict[str, str]:
    """Claim this joiner's id in the job at ``address``; the environment that makes this
    process that worker (see the module docstring)."""
    from . import auth as A
    from .membership import claim_id
    from .options import from_env
    from .rendezvous import _client

    host, port = parse_job_address(address)
    check_joinable(cfg)
    ip = resolve(host, "relaxsgd join's HOST")
    opts = from_env()
    A.job_auth(opts)  # a missing or weak secret: one line, before connecting
    raw = _client(ip, port, opts.rendezvous_s)
    check_secret(raw, A.store_key(A.job_auth(opts)))
    wid = claim_id(raw, int(cfg.workers), max_workers_of(cfg))
    return {"MASTER_ADDR": host, "MASTER_PORT": str(port), "RANK": str(wid),
            "WORLD_SIZE": str(cfg.workers), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "RELAXSGD_JOIN": "1", "RELAXSGD_ELASTIC": "1", "RELAXSGD_INCARNATION": "0",
            "TORCHELASTIC_USE_AGENT_STORE": "True"}


def check_joinable(cfg: Any) -> None:
    """Refuse (one line, before connecting or spending an id) to join a job whose
    algorithm cannot take a new worker (``membership`` ``"fixed"``: its instance says, as
    SwarmSGD's sequential schedule does): such a job would fail at the join."""
    from ..algorithms import ALGORITHMS
    from ..algorithms.base import RunInfo
    from ..run import _typed

    cls = ALGORITHMS.get(cfg.algo)
    try:  # (the instance, without data or graph: its membership may depend on options)
        algo = cls(_typed(cls.Config, cfg.algo_options, f"algorithm {cfg.algo!r}"),
                   RunInfo(n=int(cfg.workers), seed=int(cfg.seed)))
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - a constructor that needs the run: its class says
        algo = cls
    if getattr(algo, "membership", "fixed") == "fixed":
        why = getattr(algo, "fixed_reason", "it has no elastic support")
        raise ConfigError(f"algorithm {cfg.algo!r} cannot take a new worker (membership "
                          f"'fixed': {why}); only a job of a gossip or quorum algorithm can "
                          "be joined (docs/distributed.md, Membership)")


def check_secret(raw: Any, key: bytes) -> None:
    """Refuse at once (one line, before an id is spent) a joiner whose secret does not
    sign the job's member records; a job without them yet cannot be checked here (the
    peers' handshakes refuse such a joiner anyway)."""
    from .membership import ROOT
    from .store import verify

    name = f"{ROOT}/members/0"
    if not raw.check([name]):
        return
    try:
        verify(key, name, raw.get(name))
    except StoreForged:
        raise ConfigError("the job at this address signs its records with another secret: "
                          "set RELAXSGD_SECRET (or RELAXSGD_SECRET_FILE) to the job's "
                          "secret") from None


def become(env: dict[str, str]) -> None:
    """This process's environment becomes the joiner's (before the runtime reads it)."""
    os.environ.update(env)
