"""The one reader of the files a user names: configs, edge lists, profile files, metrics.

A path a user gives (``--config``, ``topology.path``, ``--compute FILE``, a run folder's
``metrics.csv`` read back by ``relaxsgd report``, a data set's files) may be anything: a
folder, ``/dev/zero``, a FIFO nobody writes to, a 100 GB file, a binary file. Every such
file is read here, so that the answer is the same everywhere and is one
:class:`~relaxsgd.errors.ConfigError` line naming the file:

- regular files only: a folder, a device, a FIFO or a socket is refused before it is
  opened (``stat``), and the file is opened non-blocking and checked again (``fstat``), so
  a FIFO swapped in between cannot block the reader;
- a size bound, checked before reading (from ``fstat``), then enforced while reading (a
  file that grows is cut at the bound + 1 byte and refused);
- text is UTF-8 without NUL bytes; a decoding error names the byte offset.
"""

from __future__ import annotations

import contextlib
import os
import stat

from .errors import ConfigError

MAX_TEXT_BYTES = 1 << 20  # configs, edge lists, profiles: a few KB in practice


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.3g} MB" if n >= 1 << 20 else f"{n} bytes"


def read_bytes(path: str | os.PathLike[str], what: str, max_bytes: int,
               hint: str = "") -> bytes:
    """The bytes of the regular file ``path`` (at most ``max_bytes``), else one ConfigError.

    ``what`` names the file in the message ("config file", "edge list"); ``hint`` says
    what would be right (appended after a semicolon)."""
    name = os.fspath(path)
    tail = f"; {hint}" if hint else ""
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise ConfigError(f"{what} {name!r} not found{tail}") from None
    except OSError as e:
        raise ConfigError(f"{what} {name!r} cannot be read ({e.strerror or e}){tail}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {name!r} is {_kind(st.st_mode)}, not a regular "
                          f"file{tail}")
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ConfigError(f"{what} {name!r} cannot be read ({e.strerror or e}){tail}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped for something else since the stat
            raise ConfigError(f"{what} {name!r} is {_kind(st.st_mode)}, not a regular "
                              f"file{tail}")
        if st.st_size > max_bytes:
            raise ConfigError(f"{what} {name!r} is {_mb(st.st_size)}, more than the "
                              f"{_mb(max_bytes)} such a file may hold{tail}")
        chunks, got = [], 0
        while got <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        raise ConfigError(f"{what} {name!r} cannot be read ({e.strerror or e}){tail}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if got > max_bytes:  # it grew while being read
        raise ConfigError(f"{what} {name!r} holds more than the {_mb(max_bytes)} such a "
                          f"file may hold{tail}")
    return b"".join(chunks)


def decode_text(raw: bytes, name: str, what: str, hint: str = "") -> str:
    """``raw`` as UTF-8 text without NUL bytes, else one ConfigError naming the offset."""
    tail = f"; {hint}" if hint else ""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"{what} {name!r} is not a text file (a NUL byte at byte "
                          f"{nul}){tail}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {name!r} is not UTF-8 text ({e.reason} at byte "
                          f"{e.start}){tail}") from None


def read_text(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_TEXT_BYTES,
              hint: str = "") -> str:
    """The UTF-8 text of the regular file ``path`` (see :func:`read_bytes`); a leading
    byte-order mark is dropped."""
    text = decode_text(read_bytes(path, what, max_bytes, hint), os.fspath(path), what, hint)
    return text[1:] if text.startswith("\ufeff") else text
