"""From a run's ``elastic:`` config to the engine's churn (:mod:`.churn`), with its checks.

:func:`check_churn` refuses, with one line (exit 2) before anything runs, what churn in
the simulator cannot do: an algorithm whose ``membership`` is ``"fixed"`` (the line gives
its reason), and checkpoints (the engine's checkpoint barrier does not hold membership
state yet: a run with churn is not checkpointed). :func:`start_churn` reads the trace,
computes the join times and turns the engine's churn on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..elastic_config import read_trace
from ..errors import ConfigError
from ..membership import ChurnDraws, Membership

if TYPE_CHECKING:
    from ..run import Prepared


def check_churn(prep: Prepared) -> None:
    """ConfigError when ``prep``'s churn cannot run in the simulator."""
    cfg, algo = prep.cfg, prep.algo
    if algo.membership == "fixed":
        why = getattr(algo, "fixed_reason", "it has no elastic support")
        raise ConfigError(f"algorithm {cfg.algo!r} cannot run with elastic.churn (membership "
                          f"'fixed': {why}); choose a gossip or quorum algorithm (relaxsgd "
                          "list algorithms), or leave elastic.churn out")
    if cfg.checkpoint_every is not None:
        raise ConfigError("checkpoint_every cannot be combined with elastic.churn in the "
                          "simulator yet (membership state is not checkpointed); leave one "
                          "of them out")
    if cfg.elastic.churn.trace is not None:
        read_trace(cfg.elastic.churn.trace, cfg.workers, cfg.elastic.ids(cfg.workers))


def start_churn(engine: Any, cfg: Any) -> None:
    """Turn on ``engine``'s churn as ``cfg.elastic`` describes."""
    el, ch = cfg.elastic, cfg.elastic.churn
    ids = el.ids(cfg.workers)
    events = read_trace(ch.trace, cfg.workers, ids) if ch.trace is not None else []
    timed = [e for e in events if e.time is not None]
    stepped = [e for e in events if e.step is not None]
    if ch.joins and len({e.worker for e in events if e.event == "join"}) + ch.joins + \
            cfg.workers > ids:
        raise ConfigError(f"elastic.churn.joins={ch.joins} and the trace's joins need more "
                          f"than elastic.max_workers={ids} ids; raise it")
    joins = [ch.join_every_s * (k + 1) for k in range(ch.joins)]
    engine.enable_churn(Membership(cfg.workers, ids, el.min_quorum),
                        ChurnDraws(cfg.seed, ch.mtbf_s), ch.downtime_s, el.min_quorum,
                        el.quorum_wait_s, timed, stepped, joins)
