"""Who may talk to a worker: the job secret, the peer handshake, frame MACs, optional TLS.

The secret. Every worker of a job holds the same secret: ``RELAXSGD_SECRET`` (at least 16
characters) or the contents of the file ``RELAXSGD_SECRET_FILE``. ``python -m
relaxsgd.distributed.launch`` generates one per job (``secrets.token_hex(32)``) and hands it to its
workers in their environment; under torchrun the user sets it. It never crosses the network
and never goes into torch's TCPStore (which anyone who reaches its port can read and
write). Without a secret a worker refuses to start, unless ``RELAXSGD_INSECURE=1`` and
every address involved is a loopback one (then a fixed, public key is used: framing, rank
and size checks still apply, authentication does not).

The handshake (a connection carries messages from the connecting worker ``a`` to the
accepting one ``b``; both sides prove the secret, so neither talks to an impostor):

1. a -> b: ``HELLO`` = magic, version, TLS flag, a's rank, b's rank, world size, nonce_a
   (in an elastic job, flag :data:`F_INC` and a's incarnation follow: 4 more bytes,
   part of HELLO for the MACs below; a restarted worker keeps its rank and has a higher
   incarnation, see :mod:`.transport`);
2. b checks every field (ranks in range, b's own rank, a's rank not yet connected, or
   connected as an older incarnation, same world and TLS setting), answers nonce_b and
   ``HMAC(K, "acceptor" | HELLO | nonce_b)``;
3. a checks b's proof and answers ``HMAC(K, "connector" | HELLO | nonce_b)``;
4. b checks it, registers the connection as a's (if that rank is still free), sends OK.

The whole handshake must finish within :data:`HANDSHAKE_S`. The session key is
``HMAC(K, "session" | HELLO | nonce_b | mode)`` (fresh nonces: unique per connection).
Every frame after that is ``u64 length | body | tag``, the tag authenticating ``seq |
length | body`` with ``seq`` the frame's number on that connection (not sent: both sides
count), so a garbled, truncated, reordered or replayed frame is rejected. The tag
(:class:`FrameMac`) is Poly1305 with a one-time key ``HMAC(session key, seq)`` when both
sides have the ``cryptography`` package (``mode`` 1; the acceptor picks it, under its
proof), else HMAC-SHA256 (``mode`` 0). Why: a frame carries a whole model, and
HMAC-SHA256 (0.7-1.8 GB/s here) cost 10-15% of SwarmSGD's samples/s on a loaded 2-core
machine; Poly1305 runs at 4-5 GB/s. With TLS on (``RELAXSGD_TLS_CERT``, ``_KEY``, ``_CA``:
mutual TLS, each side's certificate signed by the job's CA) TLS protects the frames and
the tag is left out; the handshake above still runs inside TLS.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .sockets import local_address

try:  # optional: a fast one-time MAC (see the module docstring)
    from cryptography.hazmat.primitives.poly1305 import Poly1305
except ImportError:  # pragma: no cover - depends on the environment
    Poly1305 = None

MAGIC = b"RSGD"
VERSION = 1
HELLO = struct.Struct("!4sBBIII16s")  # magic, version, flags, src, dst, world, nonce
F_TLS, F_POLY, F_INC = 1, 2, 4  # flags: TLS on; can do Poly1305 tags; incarnation follows
INC = struct.Struct("!I")  # the connector's incarnation (F_INC)
NONCE = 16
MAC_SIZE = 32
HANDSHAKE_S = 10.0
INSECURE_KEY = b"relaxsgd-insecure-loopback-only!"
_ENV_HINT = ("set RELAXSGD_SECRET to the same random string (16+ characters) on every "
             "worker, e.g. export RELAXSGD_SECRET=$(python -c 'import secrets; "
             "print(secrets.token_hex(32))'), or RELAXSGD_SECRET_FILE to a file holding it")


class HandshakeError(Exception):
    """A connection failed to authenticate; the message names why (for one log line).
    ``retry``: the other side hung up before answering (busy, say): worth another try."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class Auth:
    """The job's credentials: ``key`` (the secret), ``tls`` contexts (server, client)."""

    key: bytes
    insecure: bool = False
    server_ctx: ssl.SSLContext | None = None
    client_ctx: ssl.SSLContext | None = None

    @property
    def tls(self) -> bool:
        return self.server_ctx is not None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def regular_file(path: str, what: str, limit: int) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes, else one line
    naming ``what`` (a FIFO, a device such as /dev/zero or a folder would block, read
    without end or fail later, so they are refused before reading)."""
    import stat

    try:
        with open(path, "rb", opener=lambda p, fl: os.open(p, fl | os.O_NONBLOCK)) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{what} {path!r} is not a regular file; give the path "
                                  "of a file")
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{what} {path!r} cannot be read ({e.strerror or e}); give a "
                          "readable file") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {path!r} is over {limit // 1024} KiB; it is not what "
                          "it should be")
    return data


def _read_secret_file(path: str) -> bytes:
    return regular_file(path, "RELAXSGD_SECRET_FILE", 4096).strip()


def from_env(hosts: tuple[str, ...] = ()) -> Auth:
    """The job's credentials from the environment (see the module docstring); ``hosts``:
    the addresses this worker listens on and meets the others at (for the loopback check
    of ``RELAXSGD_INSECURE``)."""
    from .options import flag

    text, path = os.environ.get("RELAXSGD_SECRET"), os.environ.get("RELAXSGD_SECRET_FILE")
    if text and path:
        raise ConfigError("both RELAXSGD_SECRET and RELAXSGD_SECRET_FILE are set; keep one")
    key = text.encode("utf-8") if text else _read_secret_file(path) if path else None
    insecure = False
    if key is None:
        if not flag("RELAXSGD_INSECURE"):
            raise ConfigError(f"no job secret: {_ENV_HINT} (python -m relaxsgd.distributed.launch "
                              "makes one; RELAXSGD_INSECURE=1 runs without one on loopback "
                              "addresses only)")
        far = [h for h in hosts if not is_loopback(h)]
        if far:
            raise ConfigError(f"RELAXSGD_INSECURE=1 is for loopback-only runs, but this job "
                              f"uses {far[0]}; {_ENV_HINT}")
        key, insecure = INSECURE_KEY, True
    elif len(key) < 16:
        raise ConfigError(f"the job secret has {len(key)} characters; use 16 or more "
                          "(e.g. 64 hex digits from secrets.token_hex(32))")
    server, client = tls_from_env()
    if not insecure and len(set(key)) < 4:
        raise ConfigError("the job secret is one or a few characters repeated, which anyone "
                          "can guess; use a random one (e.g. 64 hex digits from "
                          "secrets.token_hex(32))")
    return Auth(key, insecure, server, client)


def listen_host(opts: Any) -> str:
    """The address this worker listens on for point-to-point messages."""
    return opts.host or local_address(os.environ.get("MASTER_ADDR", "127.0.0.1"))


def job_auth(opts: Any) -> Auth:
    """The job's credentials (:mod:`.auth`); a ConfigError before any connection."""
    return from_env((listen_host(opts), os.environ.get("MASTER_ADDR", "127.0.0.1")))


def tls_from_env() -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """Mutual-TLS contexts from RELAXSGD_TLS_CERT/KEY/CA (all three, or none)."""
    names = ("RELAXSGD_TLS_CERT", "RELAXSGD_TLS_KEY", "RELAXSGD_TLS_CA")
    vals = [os.environ.get(n) or None for n in names]
    if not any(vals):
        return None, None
    if not all(vals):
        missing = [n for n, v in zip(names, vals, strict=True) if not v]
        raise ConfigError(f"TLS needs RELAXSGD_TLS_CERT, _KEY and _CA; {missing[0]} is "
                          "not set")
    cert, key, ca = vals
    for name, path in zip(names, vals, strict=True):
        regular_file(path, name, 1 << 20)  # (ssl would block on a FIFO, read /dev/zero)
    ctxs = []
    for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        for what, load in (("certificate (RELAXSGD_TLS_CERT) or its key (_KEY)",
                            lambda c=ctx: c.load_cert_chain(cert, key)),
                           ("CA (RELAXSGD_TLS_CA)", lambda c=ctx: c.load_verify_locations(ca))):
            try:
                load()
            except (OSError, ssl.SSLError, ValueError) as e:
                why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                raise ConfigError(f"cannot load the TLS {what}: {why}; give PEM files, "
                                  "the key matching the certificate") from None
        ctx.check_hostname = False  # peers are addressed by IP; trust is the job's CA
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctxs.append(ctx)
    return ctxs[0], ctxs[1]


def store_key(auth: Auth) -> bytes:
    """The key that signs this job's values in the rendezvous store (:mod:`.store`):
    derived from the secret, so that a store tag reveals nothing usable elsewhere."""
    return _mac(auth.key, b"relaxsgd rendezvous store v1")


def _mac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod="sha256")
    for p in parts:
        h.update(p)
    return h.digest()


def recv_exact(sock: socket.socket, k: int, deadline: float | None = None) -> bytes:
    """``k`` bytes; EOFError if the connection closes first, TimeoutError past
    ``deadline`` (time.monotonic(); a peer dripping bytes cannot stretch it)."""
    buf = bytearray(k)
    view, got = memoryview(buf), 0
    while got < k:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the handshake took too long")
            sock.settimeout(left)
        r = sock.recv_into(view[got:], k - got)
        if r == 0:
            raise EOFError("the connection closed")
        got += r
    return bytes(buf)


class FrameMac:
    """The tag of each frame on one connection: Poly1305 under a one-time key derived
    from the session key and the frame number (``fast``), else HMAC-SHA256."""

    def __init__(self, key: bytes, fast: bool, peer_incarnation: int = 0) -> None:
        self.key, self.fast = key, fast and Poly1305 is not None
        self.size = 16 if self.fast else 32
        self.peer_incarnation = peer_incarnation  # (acceptor side: the connector's)

    def tag(self, seq: int, header: bytes, frames: list) -> bytes:
        if self.fast:
            p = Poly1305(hmac.digest(self.key, seq.to_bytes(8, "big"), "sha256"))
            p.update(header)
            for f in frames:
                p.update(f)
            return p.finalize()
        return frame_mac(self.key, seq, header, frames)


def _flags(auth: Auth) -> int:
    return (F_TLS if auth.tls else 0) | (F_POLY if Poly1305 is not None else 0)


def client_handshake(sock: socket.socket, auth: Auth, src: int, dst: int,
                     world: int, incarnation: int = 0) -> FrameMac:
    """Connector side (see the module docstring); returns the session's frame MAC.
    ``incarnation`` > 0 (a restarted or joining worker): sent after HELLO (F_INC)."""
    flags = _flags(auth) | (F_INC if incarnation else 0)
    hello = HELLO.pack(MAGIC, VERSION, flags, src, dst, world, secrets.token_bytes(NONCE))
    if incarnation:
        hello += INC.pack(incarnation)
    deadline = time.monotonic() + HANDSHAKE_S
    sock.sendall(hello)
    try:
        got = recv_exact(sock, NONCE + 1 + MAC_SIZE, deadline)
    except EOFError:
        raise HandshakeError(f"worker {dst} closed the connection during the handshake "
                             "(it refused us: different TLS setting or world size?)",
                             retry=True) from None
    nonce_b, mode, proof = got[:NONCE], got[NONCE:NONCE + 1], got[NONCE + 1:]
    if not hmac.compare_digest(proof, _mac(auth.key, b"acceptor", hello, nonce_b, mode)):
        raise HandshakeError(f"worker {dst} did not prove the job secret (its "
                             "RELAXSGD_SECRET differs, or something else listens at its "
                             "published address)")
    if mode not in (b"\x00", b"\x01") or (mode == b"\x01" and Poly1305 is None):
        raise HandshakeError(f"worker {dst} chose an unknown frame tag {mode!r}")
    sock.sendall(_mac(auth.key, b"connector", hello, nonce_b, mode))
    try:
        ok = recv_exact(sock, 1, deadline)
    except EOFError:
        ok = b""
    if ok != b"\x01":
        raise HandshakeError(f"worker {dst} refused our connection as rank {src} (is "
                             "another process using that rank?)")
    return FrameMac(_mac(auth.key, b"session", hello, nonce_b, mode), mode == b"\x01")


def server_handshake(sock: socket.socket, auth: Auth, me: int, world: int,
                     is_free: object) -> tuple[int, FrameMac]:
    """Acceptor side: (the peer's rank, frame MAC), or :class:`HandshakeError`.
    ``is_free(rank)`` tells whether that rank may still connect; with an incarnation
    (F_INC) ``is_free(rank, incarnation)``; the MAC's ``peer_incarnation`` holds it."""
    deadline = time.monotonic() + HANDSHAKE_S
    try:
        hello = recv_exact(sock, HELLO.size, deadline)
    except EOFError:
        raise HandshakeError("closed before saying hello") from None
    magic, version, flags, src, dst, n, _ = HELLO.unpack(hello)
    if magic != MAGIC:
        raise HandshakeError(f"not a relaxsgd peer (it began with {hello[:8]!r})")
    if version != VERSION:
        raise HandshakeError(f"protocol version {version}, not {VERSION}")
    inc = 0
    if flags & F_INC:
        try:
            ext = recv_exact(sock, INC.size, deadline)
        except EOFError:
            raise HandshakeError("closed before saying hello") from None
        hello += ext
        (inc,) = INC.unpack(ext)
    if n != world or dst != me or not 0 <= src < world or src == me:
        raise HandshakeError(f"claims rank {src} of {n} calling rank {dst}; this is rank "
                             f"{me} of {world}")
    if flags & F_TLS != _flags(auth) & F_TLS:
        raise HandshakeError("its TLS setting differs from ours")
    if not (is_free(src, inc) if inc else is_free(src)):  # type: ignore[operator]
        raise HandshakeError(f"claims rank {src}, which is already connected" + (
            f" (incarnation {inc}: not newer than the one known)" if inc else ""))
    nonce_b = secrets.token_bytes(NONCE)
    mode = b"\x01" if flags & F_POLY and Poly1305 is not None else b"\x00"
    sock.sendall(nonce_b + mode + _mac(auth.key, b"acceptor", hello, nonce_b, mode))
    try:
        proof = recv_exact(sock, MAC_SIZE, deadline)
    except EOFError:
        raise HandshakeError(f"claimed rank {src}, then closed without a proof") from None
    if not hmac.compare_digest(proof, _mac(auth.key, b"connector", hello, nonce_b, mode)):
        raise HandshakeError(f"claimed rank {src} without proving the job secret (wrong "
                             "RELAXSGD_SECRET)")
    return src, FrameMac(_mac(auth.key, b"session", hello, nonce_b, mode), mode == b"\x01",
                         inc)


def frame_mac(key: bytes, seq: int, header: bytes, frames: list) -> bytes:
    """HMAC-SHA256 of one frame: its number on the connection, header and body."""
    h = hmac.new(key, seq.to_bytes(8, "big") + header, digestmod="sha256")
    for f in frames:
        h.update(f)
    return h.digest()
