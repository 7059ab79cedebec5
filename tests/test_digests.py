from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.digests import EMPTY_DIGEST, GO_STATE_SIZE, Digest, Sha256State, digest_bytes
from storage.errors import InvalidName, UnsupportedDigest

pytestmark = pytest.mark.storage

HEX = "a" * 64


def test_parse_roundtrip():
    d = Digest.parse(f"sha256:{HEX}")
    assert (d.algorithm, d.hex, str(d)) == ("sha256", HEX, f"sha256:{HEX}")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256",
        f"sha256:{HEX[:-1]}",
        f"sha256:{HEX}0",
        f"sha256:{HEX.upper()}",
        f"SHA256:{HEX}",
        f"sha256:{HEX[:-1]}g",
        f"sha256:{HEX}\n",
        f"sha256 :{HEX}",
        "../x:y",
        f"md5:{HEX}",
    ],
)
def test_parse_rejects(text):
    with pytest.raises(InvalidName):
        Digest.parse(text)


@pytest.mark.parametrize("text", ["sha512:" + "b" * 128, "sha384:" + "c" * 96])
def test_other_algorithms_are_refused_clearly(text):
    with pytest.raises(UnsupportedDigest, match="not supported"):
        Digest.parse(text)


def test_empty_digest():
    assert str(EMPTY_DIGEST) == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


@given(st.lists(st.binary(max_size=300), max_size=8))
def test_incremental_matches_hashlib(chunks):
    state = Sha256State()
    for chunk in chunks:
        state.update(chunk)
    data = b"".join(chunks)
    assert state.size == len(data)
    assert state.digest() == digest_bytes(data)


@given(st.binary(max_size=500), st.binary(max_size=200))
def test_marshal_roundtrip_resumes(head, tail):
    state = Sha256State()
    state.update(head)
    blob = state.marshal()
    assert len(blob) == GO_STATE_SIZE and blob.startswith(b"sha\x03")
    resumed = Sha256State.unmarshal(blob)
    resumed.update(tail)
    assert resumed.digest() == digest_bytes(head + tail)
    assert resumed.marshal()[:4] == b"sha\x03"


def test_marshal_layout_is_go_binary_form():
    """Go: magic, h0..h7 big-endian, the len%64 pending bytes zero padded, the length."""
    data = os.urandom(64 * 3 + 5)
    state = Sha256State()
    state.update(data)
    blob = state.marshal()
    assert blob[36 : 36 + 5] == data[-5:]
    assert blob[41:100] == b"\0" * 59
    assert int.from_bytes(blob[100:], "big") == len(data)
    fresh = Sha256State().marshal()
    # The initial chaining values of SHA-256.
    assert fresh[4:8] == bytes.fromhex("6a09e667")


def test_digest_does_not_end_hashing():
    state = Sha256State()
    state.update(b"abc")
    assert state.digest() == digest_bytes(b"abc")
    state.update(bytearray(b"def"))
    state.update(memoryview(b"xghi")[1:])
    assert state.digest().hex == hashlib.sha256(b"abcdefghi").hexdigest()


@pytest.mark.parametrize("blob", [b"", b"sha\x03" + b"\0" * 103, b"xxx\x03" + b"\0" * 104])
def test_unmarshal_refuses_garbage(blob):
    with pytest.raises(ValueError):
        Sha256State.unmarshal(blob)


def test_loading_libcrypto_starts_no_process():
    """The daemon and every indexing child import this module: OpenSSL's soname is tried
    before ctypes.util.find_library, which runs `ldconfig -p` in a subprocess."""
    probe = (
        "import sys\n"
        "def hook(event, args):\n"
        "    if event in ('subprocess.Popen', 'os.posix_spawn', 'os.fork'):\n"
        "        raise SystemExit(f'started a process: {event} {args!r:.200}')\n"
        "sys.addaudithook(hook)\n"
        "import storage.digests\n"
        "assert storage.digests.Sha256State().size == 0\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
