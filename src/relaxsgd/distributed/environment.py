"""One check of a distributed worker's environment, on every rank, before the rendezvous.

torchrun (or ``python -m relaxsgd.distributed.launch``, the network lab, or a person) hands
each worker ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT``, and relaxsgd's own ``RELAXSGD_*`` settings (:mod:`.options`,
:mod:`.auth`). A careless value used to hang a worker in the rendezvous (``RANK=5`` of 2),
end it with a traceback from deep in torch (``MASTER_PORT=99999``), or retry without end
(an address that does not resolve). :func:`check` reads them all once, before anything
connects, and says what is wrong and what would be right in one line
(:class:`~relaxsgd.errors.ConfigError`, exit status 2):

- whole numbers written as such (``RANK=01``, ``RANK=+1``, ``RANK= 1`` are refused: rank 0
  alone writes the outputs, so two spellings of one rank must not exist), ``0 <= RANK <
  WORLD_SIZE <= MAX_WORLD``, ``0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE``;
- ``MASTER_ADDR`` and ``MASTER_PORT`` both set when there is more than one worker (a
  one-worker job without them meets itself on a free loopback port), the port in
  1..65535, the address resolved within :data:`RESOLVE_S`;
- every ``RELAXSGD_*`` option in its bounds (:class:`~.options.DistOptions`),
  ``RELAXSGD_HOST`` an address of this machine that peers can reach, NCCL only with CUDA;
- the job secret and the TLS files (:func:`.auth.from_env`: regular files of bounded
  size, loaded once here).

A ``RELAXSGD_*`` name close to a known one (``RELAXSGD_TIMEOUTS``) gets a warning line:
it would otherwise be ignored without a word.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .auth import Auth
from .options import DistOptions

MAX_WORLD = 1024  # the full mesh costs two sockets and two threads per peer on every worker
RESOLVE_S = 10.0  # a resolver that does not answer within this is a wrong address
LAUNCH_HINT = ("launch with torchrun or python -m relaxsgd.distributed.launch -n N, which "
               "set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
KNOWN = ("TIMEOUT", "PEER_TIMEOUT", "RENDEZVOUS_TIMEOUT", "BACKEND", "SPAWN_GROUPS", "HOST",
         "SAVE_MODELS", "SECRET", "SECRET_FILE", "INSECURE", "TLS_CERT", "TLS_KEY",
         "TLS_CA", "MAX_MESSAGE_MB", "DATA_DIR", "LAB", "CONNECT", "ELASTIC", "INCARNATION",
         "RESTART", "MAX_RESTARTS", "JOIN")


@dataclass(frozen=True)
class JobEnv:
    """A worker's place in its job. ``master_ip``: ``MASTER_ADDR`` resolved (where rank 0
    binds the store); ``master_port`` 0: a one-worker job's store on any free port;
    ``agent_store``: torchrun's agent hosts the store (rank 0 does not)."""

    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_ip: str
    master_port: int
    agent_store: bool


def _whole(name: str, text: str | None, lo: int, hi: int, hint: str = "") -> int:
    """``text`` as a whole number in lo..hi, written plainly (digits, no sign or zeros
    in front), else one line naming ``name``."""
    if text is None:
        raise ConfigError(f"{name} is not set; {hint or LAUNCH_HINT}")
    if not (text.isascii() and text.isdigit() and str(int(text)) == text):
        raise ConfigError(f"{name} must be a whole number written in digits (like {lo}), "
                          f"got {text[:40]!r}; {hint or LAUNCH_HINT}")
    value = int(text)
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value} is out of range: it must be in {lo}..{hi}"
                          f"{'; ' + hint if hint else ''}")
    return value


def resolve(host: str, what: str, family: int = 0) -> str:
    """The first address of ``host`` (IPv4 first), within :data:`RESOLVE_S`; else one
    line naming ``what``."""
    if not host or len(host) > 253 or any(c.isspace() or not c.isprintable() for c in host):
        raise ConfigError(f"{what} {host[:60]!r} is not a host name or address; give rank "
                          "0's machine's address (e.g. 10.0.0.11 or node1.example.org)")
    box: dict[str, Any] = {}

    def look() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            box["error"] = e

    t = threading.Thread(target=look, daemon=True, name="relax-resolve")
    t.start()
    t.join(RESOLVE_S)
    if "infos" not in box:
        why = "no answer from the resolver" if t.is_alive() else \
            getattr(box.get("error"), "strerror", None) or str(box.get("error"))
        raise ConfigError(f"{what} {host!r} does not resolve ({why}); give the name or "
                          "address of a machine of the job")
    infos = sorted(box["infos"], key=lambda i: i[0] != socket.AF_INET)
    return str(infos[0][4][0])


def read_job_env(env: Any = None) -> JobEnv:
    """The torchrun variables of this process, checked (see the module docstring)."""
    env = os.environ if env is None else env
    if env.get("RANK") is None and env.get("WORLD_SIZE") is None:
        raise ConfigError("--runtime dist runs one worker per process: launch it with "
                          "torchrun --nproc-per-node N (or "
                          "python -m relaxsgd.distributed.launch -n N) "
                          "so that RANK and WORLD_SIZE are set")
    world = _whole("WORLD_SIZE", env.get("WORLD_SIZE"), 1, MAX_WORLD)
    # (a joiner of an elastic job, relaxsgd join, has an id at or above WORLD_SIZE)
    joiner = env.get("RELAXSGD_JOIN") == "1"
    rank = _whole("RANK", env.get("RANK"), 0, (MAX_WORLD if joiner else world) - 1,
                  f"each of the {world} workers needs its own RANK in 0..{world - 1}")
    lws_text = env.get("LOCAL_WORLD_SIZE")
    local_world = world if lws_text is None else _whole(
        "LOCAL_WORLD_SIZE", lws_text, 1, world if not joiner else MAX_WORLD,
        f"the workers on this machine, at most WORLD_SIZE={world}")
    local = env.get("LOCAL_RANK")
    local_rank = rank if local is None else _whole(
        "LOCAL_RANK", local, 0, local_world - 1,
        f"this worker's number on its machine, 0..{local_world - 1}")
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").strip().lower()
    if agent not in ("", "true", "false", "1", "0"):
        raise ConfigError(f"TORCHELASTIC_USE_AGENT_STORE must be True or False, got "
                          f"{agent[:20]!r} (torchrun sets it; unset it otherwise)")
    addr, port_text = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if world == 1 and not addr and not port_text:  # nobody to meet: any free local port
        return JobEnv(rank, world, local_rank, "127.0.0.1", "127.0.0.1", 0, False)
    for name, value in (("MASTER_ADDR", addr), ("MASTER_PORT", port_text)):
        if not value:
            raise ConfigError(f"{name} is not set (a job of {world} workers meets at "
                              f"MASTER_ADDR:MASTER_PORT, rank 0's machine); {LAUNCH_HINT}")
    port = _whole("MASTER_PORT", port_text, 1, 65535,
                  "give a free TCP port in 1..65535 (above 1023 unless privileged)")
    assert addr is not None
    ip = resolve(addr, "MASTER_ADDR")
    return JobEnv(rank, world, local_rank, addr, ip, port, agent in ("true", "1"))


def check_listen_host(host: str) -> None:
    """``RELAXSGD_HOST``: an IPv4 address of this machine that peers can reach."""
    if ":" in host:
        raise ConfigError(f"RELAXSGD_HOST={host[:60]} is not an IPv4 address or host name; "
                          "the point-to-point transport listens on IPv4: give this "
                          "machine's IPv4 address")
    ip = resolve(host, "RELAXSGD_HOST", socket.AF_INET)
    what = ipaddress.ip_address(ip)
    if what.is_unspecified or what.is_multicast:
        raise ConfigError(f"RELAXSGD_HOST={host} is not an address peers can reach: give "
                          "this machine's address on the network the workers share")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError as e:
            raise ConfigError(f"RELAXSGD_HOST={host} is not an address of this machine "
                              f"({e.strerror}); give one of its own addresses (ip -brief "
                              "address), or leave it unset") from None


def warn_unknown(env: Any = None) -> list[str]:
    """Warn (one line each) of RELAXSGD_* names that look like a misspelt known one."""
    env = os.environ if env is None else env
    known = [f"RELAXSGD_{k}" for k in KNOWN]
    lines = []
    for name in sorted(env):
        if not name.startswith("RELAXSGD_") or name in known or name.startswith(
                ("RELAXSGD_TEST_", "RELAXSGD_BENCH_")):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if close:
            lines.append(f"relaxsgd: warning: {name} is not a relaxsgd setting and is "
                         f"ignored; did you mean {close[0]}?")
    for line in lines:
        sys.stderr.write(line + "\n")
    return lines


def check(env: Any = None) -> tuple[JobEnv, DistOptions, Auth]:
    """Every distributed setting of this worker, checked once (see the module docstring):
    its place in the job, the options and the credentials; one ConfigError line on the
    first that is wrong."""
    from . import auth as A
    from .options import from_env

    job = read_job_env(env)
    opts = from_env()
    if opts.host is not None:
        check_listen_host(opts.host)
    if opts.backend == "nccl":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("RELAXSGD_BACKEND=nccl needs CUDA, and torch sees no GPU on "
                              "this machine; use gloo (or auto)")
    warn_unknown(env)
    auth = A.job_auth(opts)
    return job, opts, auth
