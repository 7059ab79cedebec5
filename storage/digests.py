"""Content digests, and a sha256 whose running state can be saved in the registry's format.

Python's hashlib hides its state, so an upload could not be resumed without re-reading its
data. OpenSSL's libcrypto still exports the low-level SHA256_Init/Update/Final, whose context
holds everything needed to write and read the binary form of Go's crypto/sha256 state, which
is what the registry keeps in `_uploads/<uuid>/hashstates/sha256/<offset>`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import InvalidName, UnsupportedDigest

SHA256 = "sha256"
BytesLike = bytes | bytearray | memoryview
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_KNOWN_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
_HEX_RE = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _DIGEST_RE.fullmatch(text)
        if match is None:
            raise InvalidName(f"invalid digest {text!r}: expected <algorithm>:<hex>")
        algorithm, hexpart = match.groups()
        length = _KNOWN_HEX_LENGTHS.get(algorithm)
        if length is None or not _HEX_RE.fullmatch(hexpart) or len(hexpart) != length:
            if length is None:
                raise UnsupportedDigest(f"unknown digest algorithm {algorithm!r} in {text!r}")
            raise InvalidName(f"invalid digest {text!r}: want {length} lowercase hex digits")
        if algorithm != SHA256:
            raise UnsupportedDigest(f"digest algorithm {algorithm} is not supported (only sha256)")
        return cls(algorithm, hexpart)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def digest_bytes(data: BytesLike) -> Digest:
    return Digest(SHA256, hashlib.sha256(data).hexdigest())


EMPTY_DIGEST = digest_bytes(b"")

# Go's crypto/sha256 MarshalBinary: magic, 8 chaining words, the pending block, the length.
_GO_MAGIC = b"sha\x03"
_GO_FORMAT = struct.Struct(">4s8I64sQ")
GO_STATE_SIZE = _GO_FORMAT.size  # 108
_BLOCK = 64


class _ShaCtx(ctypes.Structure):
    """OpenSSL's SHA256_CTX: `data` holds the pending bytes as raw memory, Nl/Nh count bits."""

    _fields_ = (
        ("h", ctypes.c_uint32 * 8),
        ("Nl", ctypes.c_uint32),
        ("Nh", ctypes.c_uint32),
        ("data", ctypes.c_uint8 * _BLOCK),
        ("num", ctypes.c_uint32),
        ("md_len", ctypes.c_uint32),
    )
    # What the fields read as, for the type checker (ctypes makes them from _fields_).
    Nl: int
    Nh: int


def _libcrypto_names() -> Iterator[str | None]:
    """OpenSSL 3's soname first: dlopen finds it alone, where find_library runs `ldconfig -p`
    in a subprocess (~10 ms of every daemon's and every indexing child's start)."""
    yield "libcrypto.so.3"
    yield ctypes.util.find_library("crypto")
    yield "libcrypto.so"


def _load_libcrypto() -> ctypes.CDLL:
    for name in _libcrypto_names():
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if hasattr(lib, "SHA256_Update"):
            break
    else:
        raise ImportError("libcrypto with SHA256_Init/Update/Final is required")
    ctx_p = ctypes.POINTER(_ShaCtx)
    lib.SHA256_Init.argtypes = (ctx_p,)
    lib.SHA256_Update.argtypes = (ctx_p, ctypes.c_void_p, ctypes.c_size_t)
    lib.SHA256_Final.argtypes = (ctypes.c_char_p, ctx_p)
    return lib


_lib = _load_libcrypto()


class Sha256State:
    """An incremental sha256 whose state can be saved and restored in Go's binary form.

    ctypes releases the GIL during SHA256_Update, so large updates can run in a worker thread.
    """

    __slots__ = ("_ctx",)

    def __init__(self) -> None:
        self._ctx = _ShaCtx()
        _lib.SHA256_Init(ctypes.byref(self._ctx))

    @property
    def size(self) -> int:
        """Bytes hashed so far."""
        return ((self._ctx.Nh << 32) | self._ctx.Nl) >> 3

    def update(self, data: BytesLike) -> None:
        if isinstance(data, bytes):
            _lib.SHA256_Update(ctypes.byref(self._ctx), data, len(data))
            return
        view = memoryview(data).cast("B")
        # ctypes passes bytes, or a writable buffer in place; a read-only view is copied.
        raw: bytes | ctypes.Array[ctypes.c_char] = (
            view.tobytes() if view.readonly else (ctypes.c_char * view.nbytes).from_buffer(view)
        )
        _lib.SHA256_Update(ctypes.byref(self._ctx), raw, view.nbytes)

    def copy(self) -> Sha256State:
        twin = Sha256State.__new__(Sha256State)
        twin._ctx = _ShaCtx()
        ctypes.pointer(twin._ctx)[0] = self._ctx
        return twin

    def digest(self) -> Digest:
        """The digest of everything hashed so far; hashing can go on afterwards."""
        out = ctypes.create_string_buffer(32)
        _lib.SHA256_Final(out, ctypes.byref(self.copy()._ctx))
        return Digest(SHA256, out.raw.hex())

    def marshal(self) -> bytes:
        """The state in the binary form of Go's crypto/sha256 (what the registry saves)."""
        size = self.size
        pending = bytes(self._ctx.data)[: size % _BLOCK].ljust(_BLOCK, b"\0")
        return _GO_FORMAT.pack(_GO_MAGIC, *self._ctx.h, pending, size)

    @classmethod
    def unmarshal(cls, blob: bytes) -> Sha256State:
        if len(blob) != GO_STATE_SIZE or not blob.startswith(_GO_MAGIC):
            raise ValueError(f"not a Go sha256 state ({len(blob)} bytes)")
        fields = _GO_FORMAT.unpack(blob)
        h, block, size = fields[1:9], fields[9], fields[10]
        state = cls()
        ctx = state._ctx
        ctx.h[:] = h
        bits = size * 8
        ctx.Nl, ctx.Nh = bits & 0xFFFFFFFF, (bits >> 32) & 0xFFFFFFFF
        ctypes.memmove(ctx.data, block, _BLOCK)
        ctx.num = size % _BLOCK
        return state
