"""Property tests: the parsers against the registry's grammar, uploads against a model."""

from __future__ import annotations

import json
import re

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import uploads
from storage.digests import Digest, digest_bytes
from storage.drivers import FilesystemDriver, InMemoryDriver
from storage.errors import InvalidManifest, InvalidName, InvalidOffset
from storage.manifest_format import parse_manifest
from storage.names import validate_name, validate_tag
from storage.registry import Registry

pytestmark = pytest.mark.storage

# The registry's grammar, written independently of storage/names.py.
COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
NAME = re.compile(rf"{COMPONENT}(?:/{COMPONENT})*")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

name_alphabet = st.sampled_from("ab09._-/A ü\0\n")


@given(st.text(name_alphabet, max_size=12) | st.from_regex(NAME, fullmatch=True))
def test_names_follow_the_grammar(text):
    valid = NAME.fullmatch(text) is not None and len(text) <= 255
    try:
        validate_name(text)
    except InvalidName:
        assert not valid
    else:
        assert valid


@given(st.text(st.sampled_from("aZ9_.-/ ü\n"), max_size=130) | st.from_regex(TAG, fullmatch=True))
def test_tags_follow_the_grammar(text):
    try:
        validate_tag(text)
    except InvalidName:
        assert TAG.fullmatch(text) is None
    else:
        assert TAG.fullmatch(text) is not None


@given(st.text(st.sampled_from("sha256:0123456789abcdefABCDEFxyz"), max_size=72))
def test_digest_parse_accepts_exactly_sha256_hex(text):
    try:
        digest = Digest.parse(text)
    except InvalidName:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", text) is None
    else:
        assert str(digest) == text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
manifest_like = st.fixed_dictionaries(
    {"schemaVersion": st.sampled_from([1, 2, "2"])},
    optional={
        "mediaType": st.sampled_from(
            [
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json",
                "text/plain",
            ]
        ),
        "config": json_values,
        "layers": json_values,
        "manifests": json_values,
    },
)


@given(st.binary(max_size=64) | manifest_like.map(lambda m: json.dumps(m).encode()))
def test_manifest_parser_never_crashes(data):
    """Any input is parsed or refused with InvalidManifest: nothing else escapes."""
    try:
        parsed = parse_manifest(data)
    except InvalidManifest:
        return
    assert parsed.media_type.startswith("application/vnd.")


# An upload is a file: writes at offsets up to its end, truncates to a smaller size,
# close and resume in between. The model is a bytearray; the digest must always agree.
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 300), st.binary(min_size=1, max_size=200)),
        st.tuples(st.just("truncate"), st.integers(0, 300)),
        st.tuples(st.just("reopen")),
    ),
    max_size=12,
)


async def run_model(driver_factory, steps) -> None:
    layers = Registry(driver_factory()).repository("p/q").layers
    upload = await layers.upload()
    model = bytearray()
    for step in steps:
        if step[0] == "write":
            _, offset, data = step
            if offset > len(model):
                with pytest.raises(InvalidOffset):
                    await upload.write_at(offset, data)
                continue
            await upload.write_at(offset, data)
            model[offset : offset + len(data)] = data
        elif step[0] == "truncate":
            size = min(step[1], len(model))
            await upload.truncate(size)
            del model[size:]
        else:
            await upload.close()
            upload = await layers.resume(upload.uuid)
        assert upload.size == len(model)
    assert await upload.digest() == digest_bytes(bytes(model))
    await upload.finish(digest_bytes(bytes(model)))
    async with await layers.fetch(digest_bytes(bytes(model))) as reader:
        assert await reader.read() == bytes(model)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops)
def test_upload_write_sequences_match_a_model(tmp_path_factory, steps):
    root = tmp_path_factory.mktemp("root")
    saved = uploads.CHECKPOINT
    uploads.CHECKPOINT = 50  # many saved states: rewinds land on them
    try:
        for factory in (InMemoryDriver, lambda: FilesystemDriver(root)):
            trio.run(run_model, factory, steps)
    finally:
        uploads.CHECKPOINT = saved
