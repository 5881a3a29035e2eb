"""Options of the distributed runtime, read from the environment of each process.

They are per-process launch settings, not part of an experiment's config (a simulated and
a distributed run of the same ``config.yaml`` train the same thing), so they come from
environment variables that ``torchrun``/``relaxsgd-launch`` pass to every worker:

==============================  =========  ==================================================
variable                        default    meaning
==============================  =========  ==================================================
``RELAXSGD_TIMEOUT``            120        seconds a collective (or any blocking wait) may
                                           take before the run fails naming the worker(s)
                                           behind; a worker whose process died is detected
                                           at once, whatever this says
``RELAXSGD_RENDEZVOUS_TIMEOUT`` 300        seconds the workers have to meet at start-up
                                           (store, process groups, connections): a worker
                                           that does not arrive is named after it
``RELAXSGD_PEER_TIMEOUT``       30         seconds an Exchange waits for its answer
                                           before ``PeerUnavailable`` is raised in the
                                           program (the partner is skipped and counted);
                                           above a partner's longest Compute when it
                                           answers with Deferred (a Recv waits up to
                                           RELAXSGD_TIMEOUT)
``RELAXSGD_BACKEND``            auto       gloo, nccl, or auto (nccl when CUDA is present)
``RELAXSGD_SPAWN_GROUPS``       4          process groups for collectives of spawned
                                           sub-programs (how many may be in flight at once)
``RELAXSGD_HOST``               (auto)     address this worker listens on for point-to-point
                                           messages (default: the interface that reaches
                                           ``MASTER_ADDR``)
``RELAXSGD_SAVE_MODELS``        0          1: rank 0 also writes ``models.pt``, every
                                           worker's final parameters (rows by rank)
``RELAXSGD_SECRET``             (none)     the job secret (16+ characters, the same on
                                           every worker) that peers prove to each other
                                           (:mod:`.auth`); the launcher makes one
``RELAXSGD_SECRET_FILE``        (none)     or: a file holding it
``RELAXSGD_INSECURE``           0          1: no secret, loopback-only runs (a public key)
``RELAXSGD_TLS_CERT``,          (none)     PEM certificate, key and CA: mutual TLS on the
``_KEY``, ``_CA``                          point-to-point connections
``RELAXSGD_MAX_MESSAGE_MB``     (auto)     the largest message accepted (default: 4 x the
                                           model and its buffers + 1 MiB; at least 1)
==============================  =========  ==================================================

Every value is checked when a worker starts (:mod:`.environment`), with the bounds below:
a careless value is one line and exit status 2, never a hang or a traceback.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..checks import require_float, require_int
from ..errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")
CONNECT = ("mesh", "demand")
STARTUP_S = 300.0  # rendezvous and connections: workers may start far apart
WEEK_S = 7 * 86400.0  # the longest wait: beyond it a timedelta or a socket timeout breaks
MIN_TIMEOUT_S = 0.1
MAX_SPAWN_GROUPS = 64  # each is a process group: sockets and threads on every worker
# the smallest message limit: control messages (abort, done, status) are under 4 KiB, a
# limit below 1 MiB only breaks a run in ways that hide its cause
MIN_MESSAGE_MB = 1.0
MAX_MESSAGE_MB = float(1 << 20)  # 1 TiB
FLAGS = {"": False, "0": False, "false": False, "no": False, "1": True, "true": True,
         "yes": True}


@dataclass(frozen=True)
class DistOptions:
    timeout_s: float = 120.0
    peer_timeout_s: float = 30.0
    rendezvous_s: float = STARTUP_S
    backend: str = "auto"
    spawn_groups: int = 4
    host: str | None = None
    save_models: bool = False
    max_message_mb: float | None = None
    connect: str = "mesh"  # RELAXSGD_CONNECT: mesh (all at start) or demand (.transport)

    def __post_init__(self) -> None:
        for value, name in ((self.timeout_s, "RELAXSGD_TIMEOUT"),
                            (self.peer_timeout_s, "RELAXSGD_PEER_TIMEOUT"),
                            (self.rendezvous_s, "RELAXSGD_RENDEZVOUS_TIMEOUT")):
            require_float(value, f"{name} (seconds)", at_least=MIN_TIMEOUT_S,
                          at_most=WEEK_S)
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown RELAXSGD_BACKEND {self.backend!r}; choose one of: "
                              f"{', '.join(BACKENDS)}")
        require_int(self.spawn_groups, "RELAXSGD_SPAWN_GROUPS", at_least=1,
                    at_most=MAX_SPAWN_GROUPS)
        if self.connect not in CONNECT:
            raise ConfigError(f"unknown RELAXSGD_CONNECT {self.connect[:40]!r}; choose "
                              "mesh (a connection to every worker at start) or demand "
                              "(only to the workers it talks to)")
        if self.max_message_mb is not None:
            require_float(self.max_message_mb, "RELAXSGD_MAX_MESSAGE_MB (MiB; or auto)",
                          at_least=MIN_MESSAGE_MB, at_most=MAX_MESSAGE_MB)

    def max_frame(self, model_bytes: int) -> int:
        """The largest message body accepted: the setting, else 4 x ``model_bytes`` (a
        snapshot, or a message of a model and its momentum, with room) + 1 MiB."""
        if self.max_message_mb is not None:
            return int(self.max_message_mb * (1 << 20))
        return 4 * model_bytes + (1 << 20)


def _num(name: str, default: float | None, kind: type = float) -> float | None:
    """The number in ``name`` (unset or empty: ``default``); one line if it is not one."""
    text = os.environ.get(name, "").strip()
    if text == "" or (default is None and text.lower() == "auto"):
        return default
    try:
        value = kind(text) if kind is float or text.isdigit() else None
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)):
        what = "a whole number" if kind is int else "a finite number"
        raise ConfigError(f"{name} must be {what}, got {text[:40]!r}")
    return value


def flag(name: str) -> bool:
    """A yes/no variable: 1/true/yes or 0/false/no (unset or empty: no); else one line."""
    text = os.environ.get(name, "")
    if text.strip().lower() not in FLAGS:
        raise ConfigError(f"{name} must be 1 or 0 (true/false, yes/no), got {text[:40]!r}")
    return FLAGS[text.strip().lower()]


def from_env() -> DistOptions:
    return DistOptions(
        timeout_s=_num("RELAXSGD_TIMEOUT", 120.0),
        peer_timeout_s=_num("RELAXSGD_PEER_TIMEOUT", 30.0),
        rendezvous_s=_num("RELAXSGD_RENDEZVOUS_TIMEOUT", STARTUP_S),
        backend=os.environ.get("RELAXSGD_BACKEND", "auto").strip() or "auto",
        spawn_groups=int(_num("RELAXSGD_SPAWN_GROUPS", 4, int)),
        host=os.environ.get("RELAXSGD_HOST", "").strip() or None,
        save_models=flag("RELAXSGD_SAVE_MODELS"),
        max_message_mb=_num("RELAXSGD_MAX_MESSAGE_MB", None),
        connect=os.environ.get("RELAXSGD_CONNECT", "mesh").strip().lower() or "mesh",
    )
