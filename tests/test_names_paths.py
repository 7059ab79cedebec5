from __future__ import annotations

import pytest

from storage import paths as p
from storage.digests import Digest
from storage.errors import InvalidName
from storage.names import validate_name, validate_tag

pytestmark = pytest.mark.storage

D = Digest.parse("sha256:" + "ab" * 32)
R = "/docker/registry/v2/repositories/library/alpine"
U = "0d0c5e8f-57a1-4a5c-9d0e-6f1c2b3a4d5e"


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (p.BlobData(D), f"/docker/registry/v2/blobs/sha256/ab/{D.hex}/data"),
        (p.RepositoryDir(""), "/docker/registry/v2/repositories"),
        (p.LayerLink("library/alpine", D), f"{R}/_layers/sha256/{D.hex}/link"),
        (p.RevisionLink("library/alpine", D), f"{R}/_manifests/revisions/sha256/{D.hex}/link"),
        (p.TagsDir("library/alpine"), f"{R}/_manifests/tags"),
        (p.TagCurrentLink("library/alpine", "3.20"), f"{R}/_manifests/tags/3.20/current/link"),
        (
            p.TagIndexLink("library/alpine", "v1", D),
            f"{R}/_manifests/tags/v1/index/sha256/{D.hex}/link",
        ),
        (p.UploadData("library/alpine", U), f"{R}/_uploads/{U}/data"),
        (p.UploadStartedAt("library/alpine", U), f"{R}/_uploads/{U}/startedat"),
        (p.HashState("library/alpine", U, 1024), f"{R}/_uploads/{U}/hashstates/sha256/1024"),
    ],
)
def test_location_to_path(loc, path):
    assert p.path_for(loc) == path


@pytest.mark.parametrize(
    "name", ["a", "library/alpine", "a/b/c", "my-org/app_1", "a__b", "a.b-c", "x" * 255]
)
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A",
        "a/",
        "/a",
        "a//b",
        "..",
        "a/../b",
        "-a",
        "a-",
        "a_",
        "a___b",
        "a\0b",
        "ä",
        "a b",
        "x" * 256,
        "a\n",
    ],
)
def test_invalid_names(name):
    with pytest.raises(InvalidName):
        validate_name(name)


@pytest.mark.parametrize("tag", ["latest", "v1.0", "_x", "A-b_c.d", "9" * 128])
def test_valid_tags(tag):
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a/b", "..", "9" * 129, "ü", "a b", "a\n"])
def test_invalid_tags(tag):
    with pytest.raises(InvalidName):
        validate_tag(tag)
