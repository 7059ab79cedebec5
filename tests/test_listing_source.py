"""What a listing's source is read into, made in bulk (issue 18: the first READDIR of a cold
`ls -l` of 10,000 layers or manifests spends ~70 ms of Python beside its ~110 ms of
syscalls): the bulk ways say exactly what the one-at-a-time ways say."""

from __future__ import annotations

import copy
import pickle
import weakref

import pytest

from regfs.nodes import DigestNode, LayerNode, ManifestNode, Node, TagNode
from storage.digests import digest_bytes

pytestmark = pytest.mark.storage

NAME = "org/app"


@pytest.mark.parametrize("kind", [LayerNode, ManifestNode])
def test_digest_nodes_made_in_bulk_are_those_made_one_by_one(kind: type[DigestNode]) -> None:
    """`listing` makes (name, node) pairs equal to, hashed as, of the type of, and as weakly
    referable as (the tree shares one manifest node among a repository's tags) nodes made
    one at a time; never equal to the other kind's, nor to a tag's."""
    digests = [digest_bytes(b"%d" % i) for i in range(3)]
    listed = kind.listing(NAME, digests)
    assert listed == [(str(d), kind(NAME, d)) for d in digests]
    for (_, node), digest in zip(listed, digests, strict=True):
        assert type(node) is kind and hash(node) == hash(kind(NAME, digest))
        assert (node.repo, node.digest) == (NAME, digest)
        assert weakref.ref(node)() is node
        assert copy.copy(node) == node == pickle.loads(pickle.dumps(node))
        other = ManifestNode if kind is LayerNode else LayerNode
        held: set[Node] = {node}
        assert node != other(NAME, digest) and other(NAME, digest) not in held
        assert TagNode(NAME, str(digest)) not in held and kind(NAME, digest) in held
        assert not hasattr(node, "__dict__")  # slots: 108 bytes a node, not 140 (tracemalloc)
    assert kind.listing(NAME, []) == []
