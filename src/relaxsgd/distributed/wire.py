"""The wire format of the distributed runtime: a small tagged encoding, no pickle.

Why not pickle: unpickling runs code named by the sender (one pickled ``os.system`` sent
to a worker's port ran on it, issue 10). Why not msgpack: it would add a dependency and
still needs an extension type for tensors, dtypes and payload dataclasses; the encoding
below is ~150 lines, has exactly the value kinds the algorithms send, and each of them is
checked while decoding.

A message body is ``u32 len(meta) | meta | (pad, tensor bytes)*``: ``meta`` encodes the
object with one tag byte per value:

=====  ===================================================================================
tag    value
=====  ===================================================================================
N T F  None, True, False
i      int (signed 64-bit)
f      float (IEEE double)
s b    str (UTF-8) / bytes: u32 length, then the bytes
l t    list / tuple: u32 count, then the items
d      dict: u32 count, then key, value, ... (keys: None, bool, int, float, str, tuple)
X      tensor: u8 dtype code (:data:`DTYPES`, an allow-list), u8 ndim, ndim x u64 sizes;
       its bytes come after ``meta``, each tensor 16-byte aligned in order of appearance
Z Y    torch.Size (u8 ndim, u64 sizes) / torch.dtype (u8 code)
C      a payload dataclass of the allow-list :data:`PAYLOADS` (u8 name length, name, u8
       field count, then the fields in declaration order); plug-ins add theirs with
       :func:`register_payload`
=====  ===================================================================================

Decoding checks every length against what is left of the buffer before allocating
anything (a count is at most the bytes left, a tensor's size must fit exactly), nests at
most :data:`MAX_DEPTH` deep, and raises :class:`WireError` (one line) on anything else; the
tensor bytes must end exactly at the end of the body. Tensors are views into the received
buffer (one fresh buffer per message, owned by the receiver), so decoding copies nothing.

:data:`KINDS` is the fixed set of messages of the runtime: :func:`check_message` accepts a
decoded message only if it is a tuple of a known kind with fields of the right types.
"""

from __future__ import annotations

import dataclasses
import importlib
import struct
from typing import Any

import torch

MAX_DEPTH = 32
ALIGN = 16
DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
    torch.int16, torch.int32, torch.int64, torch.bool)
_CODE = {dt: k for k, dt in enumerate(DTYPES)}
# the payload classes of the built-in compressors and quantizers, imported on first use
PAYLOADS: dict[str, str] = {
    "LatticePayload": "relaxsgd.quantize.lattice:LatticePayload",
    "QSGDDiffPayload": "relaxsgd.quantize.qsgd_diff:QSGDDiffPayload",
    "SparsePayload": "relaxsgd.compress.topk:SparsePayload",
    "QSGDPayload": "relaxsgd.compress.qsgd:QSGDPayload",
    "SignPayload": "relaxsgd.compress.sign:SignPayload",
    "PowerSGDPayload": "relaxsgd.compress.powersgd:PowerSGDPayload",
}
_classes: dict[str, type] = {}
_names: dict[type, str] = {}
_U8, _U32, _I64, _F64, _U64 = (struct.Struct(f) for f in ("!B", "!I", "!q", "!d", "!Q"))


class WireError(ValueError):
    """A message that cannot be encoded, or received bytes that are not a valid message."""


def register_payload(cls: type) -> type:
    """Allow a dataclass (a plug-in's payload) on the wire; usable as a class decorator."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    name = cls.__name__
    if len(name) > 64 or _classes.get(name, cls) is not cls:
        raise ValueError(f"payload name {name!r} is too long or taken")
    _classes[name], _names[cls] = cls, name
    return cls


def _payload_class(name: str) -> type:
    if name not in _classes:
        if name not in PAYLOADS:
            raise WireError(f"unknown payload class {name!r}")
        mod, attr = PAYLOADS[name].split(":")
        register_payload(getattr(importlib.import_module(mod), attr))
    return _classes[name]


def _load_builtin_payloads() -> None:
    for name in PAYLOADS:
        _payload_class(name)


# -- encoding --------------------------------------------------------------------------
_STR_CACHE: dict[str, bytes] = {}


class _Enc:
    def __init__(self) -> None:
        self.out = bytearray()
        self.tensors: list[torch.Tensor] = []

    def value(self, x: Any, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise WireError(f"message nested deeper than {MAX_DEPTH}")
        out = self.out
        t = type(x)
        if t is str and len(x) <= 32:  # keys and tags: the commonest values, cached
            enc = _STR_CACHE.get(x)
            if enc is None:
                enc = b"s" + _U32.pack(len(x.encode("utf-8"))) + x.encode("utf-8")
                if len(_STR_CACHE) < 4096:
                    _STR_CACHE[x] = enc
            out += enc
        elif t is dict:
            out += b"d" + _U32.pack(len(x))
            for k, v in x.items():
                self.value(k, depth + 1)
                self.value(v, depth + 1)
        elif t is torch.Tensor:
            self._tensor(x)
        elif x is None:
            out += b"N"
        elif x is True or x is False:
            out += b"T" if x else b"F"
        elif isinstance(x, int):
            if not -(1 << 63) <= x < (1 << 63):
                raise WireError(f"int {x} does not fit 64 bits")
            out += b"i" + _I64.pack(x)
        elif isinstance(x, float):
            out += b"f" + _F64.pack(x)
        elif isinstance(x, str):
            self._blob(b"s", x.encode("utf-8"))
        elif isinstance(x, (bytes, bytearray, memoryview)):
            self._blob(b"b", bytes(x))
        elif isinstance(x, torch.Tensor):
            self._tensor(x)
        elif isinstance(x, torch.Size):
            out += b"Z" + _U8.pack(len(x)) + b"".join(_U64.pack(s) for s in x)
        elif isinstance(x, torch.dtype):
            out += b"Y" + _U8.pack(_dtype_code(x))
        elif isinstance(x, (list, tuple)) and type(x) in (list, tuple):
            out += (b"l" if isinstance(x, list) else b"t") + _U32.pack(len(x))
            for item in x:
                self.value(item, depth + 1)
        elif type(x) is dict:
            out += b"d" + _U32.pack(len(x))
            for k, v in x.items():
                self.value(k, depth + 1)
                self.value(v, depth + 1)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            self._dataclass(x, depth)
        else:
            raise WireError(f"cannot send a {type(x).__name__} (the wire carries None, "
                            "bool, int, float, str, bytes, list, tuple, dict, tensors and "
                            "registered payload dataclasses)")

    def _blob(self, tag: bytes, data: bytes) -> None:
        self.out += tag + _U32.pack(len(data)) + data

    def _tensor(self, t: torch.Tensor) -> None:
        if t.layout != torch.strided:
            raise WireError("sparse tensors cannot be sent; send indices and values")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        code = _dtype_code(t.dtype)
        self.tensors.append(t.contiguous())
        self.out += b"X" + _U8.pack(code) + _U8.pack(t.dim()) + b"".join(
            _U64.pack(s) for s in t.shape)

    def _dataclass(self, x: Any, depth: int) -> None:
        cls = type(x)
        if cls not in _names:
            _load_builtin_payloads()
        name = _names.get(cls)
        if name is None:
            raise WireError(f"{cls.__name__} is not a registered payload class "
                            "(relaxsgd.distributed.wire.register_payload)")
        fs = [f for f in dataclasses.fields(x) if f.init]
        raw = name.encode("ascii")
        self.out += b"C" + _U8.pack(len(raw)) + raw + _U8.pack(len(fs))
        for f in fs:
            self.value(getattr(x, f.name), depth + 1)


def _dtype_code(dt: torch.dtype) -> int:
    if dt not in _CODE:
        raise WireError(f"tensors of dtype {dt} cannot be sent")
    return _CODE[dt]


def _pad(off: int) -> int:
    return (-off) % ALIGN


def encode(obj: Any) -> list[memoryview | bytes]:
    """The buffers of one message body (send them in order); their total is its size."""
    enc = _Enc()
    enc.value(obj)
    meta = bytes(enc.out)
    frames: list[memoryview | bytes] = [_U32.pack(len(meta)) + meta]
    off = 4 + len(meta)
    for t in enc.tensors:
        b = _bytes_of(t)
        pad = _pad(off)
        if pad:
            frames.append(bytes(pad))
        frames.append(b)
        off += pad + b.nbytes
    return frames


def _bytes_of(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def wire_size(frames: list[memoryview | bytes]) -> int:
    return sum(memoryview(f).nbytes for f in frames)


# -- decoding --------------------------------------------------------------------------
class _Dec:
    """Reads ``meta`` (a small copy) with one index; tensors are views into ``buf``."""

    def __init__(self, buf: bytearray, meta_end: int, device: torch.device | None) -> None:
        self.buf, self.meta, self.pos, self.device = buf, bytes(buf[4:meta_end]), 0, device
        self.end = len(self.meta)
        self.data_off = meta_end  # where the next tensor's bytes start (before padding)

    def need(self, k: int) -> int:
        """The position of the next ``k`` bytes (consumed)."""
        pos = self.pos
        if pos + k > self.end:
            raise WireError("truncated message")
        self.pos = pos + k
        return pos

    def unpack(self, s: struct.Struct) -> Any:
        return s.unpack_from(self.meta, self.need(s.size))[0]

    def count(self) -> int:
        k = self.unpack(_U32)
        if k > self.end - self.pos:  # every item takes at least one byte
            raise WireError(f"a count of {k} exceeds the message")
        return k

    def value(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise WireError(f"message nested deeper than {MAX_DEPTH}")
        tag = self.meta[self.need(1)]
        if tag == 0x69:  # i
            return self.unpack(_I64)
        if tag == 0x73:  # s
            k = self.count()
            return self.meta[self.need(k):self.pos].decode("utf-8")
        if tag in (0x6C, 0x74):  # l t
            items = [self.value(depth + 1) for _ in range(self.count())]
            return items if tag == 0x6C else tuple(items)
        if tag == 0x64:  # d
            out = {}
            for _ in range(self.count()):
                k = self.value(depth + 1)
                if not _hashable(k):
                    raise WireError(f"a dict key of type {type(k).__name__}")
                out[k] = self.value(depth + 1)
            return out
        if tag == 0x58:  # X
            return self.tensor()
        if tag in _CONST:
            return _CONST[tag]
        if tag == 0x66:  # f
            return self.unpack(_F64)
        if tag == 0x62:  # b
            k = self.count()
            return self.meta[self.need(k):self.pos]
        if tag == 0x5A:  # Z
            return torch.Size(self.shape())
        if tag == 0x59:  # Y
            return self.dtype()
        if tag == 0x43:  # C
            return self.dataclass(depth)
        raise WireError(f"unknown value tag {bytes([tag])!r}")

    def dtype(self) -> torch.dtype:
        code = self.unpack(_U8)
        if code >= len(DTYPES):
            raise WireError(f"unknown dtype code {code}")
        return DTYPES[code]

    def shape(self) -> list[int]:
        return [self.unpack(_U64) for _ in range(self.unpack(_U8))]

    def tensor(self) -> torch.Tensor:
        dtype = self.dtype()
        shape = self.shape()
        numel = 1
        for s in shape:
            numel *= s
        off = self.data_off + _pad(self.data_off)
        nbytes = numel * dtype.itemsize
        if off + nbytes > len(self.buf):  # checked before any allocation
            raise WireError(f"a tensor of shape {tuple(shape)} exceeds the message")
        self.data_off = off + nbytes
        if numel == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(self.buf, dtype=dtype, count=numel, offset=off)
            t = t.view(shape)
        return t.to(self.device) if self.device is not None else t

    def dataclass(self, depth: int) -> Any:
        k = self.unpack(_U8)
        name = self.meta[self.need(k):self.pos].decode("ascii")
        cls = _payload_class(name)
        fs = [f for f in dataclasses.fields(cls) if f.init]
        k = self.unpack(_U8)
        if k != len(fs):
            raise WireError(f"{name} has {len(fs)} fields, the message gives {k}")
        return cls(*(self.value(depth + 1) for _ in range(k)))


_CONST = {0x4E: None, 0x54: True, 0x46: False}  # N T F


def _hashable(k: Any) -> bool:
    if isinstance(k, tuple):
        return all(_hashable(x) for x in k)
    return k is None or isinstance(k, (bool, int, float, str, bytes))


def decode(buf: bytearray, device: torch.device | None = None) -> Any:
    """The object of one message body; :class:`WireError` if it is not a valid one."""
    try:
        if len(buf) < 4:
            raise WireError("truncated message")
        (mlen,) = _U32.unpack_from(buf, 0)
        if 4 + mlen > len(buf):
            raise WireError("truncated message")
        dec = _Dec(buf, 4 + mlen, device)
        obj = dec.value()
        if dec.pos != dec.end:
            raise WireError("bytes left over after the message's structure")
        if dec.data_off != len(buf):
            raise WireError("bytes left over after the message's tensors")
        return obj
    except WireError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError, OverflowError, RecursionError,
            struct.error) as e:
        raise WireError(f"malformed message ({type(e).__name__}: {e})") from None


# -- the runtime's messages ------------------------------------------------------------
ANY = object()
TAG = (type(None), bool, int, float, str, tuple)
KINDS: dict[str, tuple[Any, ...]] = {
    "bye": (), "idle": (), "done": (), "abort": (str,), "snap": (dict,),
    "xreq": (int, ANY), "xrep": (int, ANY), "xerr": (int, str),
    "msg": (TAG, ANY), "status?": (int,), "status": (int, int, int, bool),
    # checkpoints asked for now (.stopping)
    "ckask": (int,), "ckq": (int,), "ckpos": (int, float, bool), "ckgo": (float, int),
    # quorum collectives of an elastic job (.quorum): contribution, result, ask
    "qpart": (int, int, ANY), "qres": (int, tuple, ANY), "qneed": (int,),
    # the parameter server's rounds of an elastic job (.quorum_server): the same, apart
    "spart": (int, int, ANY), "sres": (int, tuple, ANY), "sneed": (int,),
    # live recovery (.handover): ask, one part of the answer, "joined from evaluation k"
    "hask": (int,), "hand": (int, str, ANY), "hjoin": (int,),
    # a scripted trace (.scripted): "I left", "worker k is back (its donor says)"
    "sleave": (int,), "sback": (int,),
}


def check_message(msg: Any) -> tuple:
    """``msg`` if it is one of :data:`KINDS` with fields of the right types, else
    :class:`WireError`."""
    if type(msg) is not tuple or not msg or msg[0] not in KINDS:
        head = msg[0] if type(msg) is tuple and msg else type(msg).__name__
        raise WireError(f"unknown message kind {str(head)[:40]!r}")
    want = KINDS[msg[0]]
    if len(msg) != 1 + len(want):
        raise WireError(f"a {msg[0]!r} message has {len(msg) - 1} fields, not {len(want)}")
    for v, t in zip(msg[1:], want, strict=True):
        if t is not ANY and not isinstance(v, t):
            raise WireError(f"a {msg[0]!r} message with a field of type {type(v).__name__}")
    if msg[0] == "msg" and not _hashable(msg[1]):
        raise WireError("a 'msg' message with an unhashable tag")
    return msg
