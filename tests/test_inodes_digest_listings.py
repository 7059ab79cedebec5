"""A listing of layers/ or manifests/ numbered at once (`InodeTable.inode_all`, the names made
in C by `inodes._digests_named`): the same numbers as each one's lookup gives it, which a
remount and the next release must give too."""

from __future__ import annotations

import pytest

import regfs.inodes
from regfs.inodes import KEY_SIZE, InodeTable
from regfs.nodes import LayerNode, ManifestNode, Node
from storage.digests import Digest, digest_bytes

pytestmark = pytest.mark.storage

KEY = bytes(range(KEY_SIZE))
DIGESTS = [digest_bytes(b"%d" % i) for i in range(300)]


def test_a_digest_nodes_number_does_not_move() -> None:
    layer, manifest = LayerNode("org/app", DIGESTS[0]), ManifestNode("org/app", DIGESTS[0])
    for numbered in (InodeTable(KEY).inode, lambda n: InodeTable(KEY).inode_all([n])[0]):
        assert numbered(LayerNode("org/app", digest_bytes(b"layer"))) == 7035622098760000959
        assert numbered(ManifestNode("org/app", digest_bytes(b"layer"))) == 7871122217985737469
    assert InodeTable(KEY).inode(layer) != InodeTable(KEY).inode(manifest)


@pytest.mark.parametrize("kind", [LayerNode, ManifestNode])
def test_a_listing_of_digests_is_numbered_as_its_lookups_number_it(
    kind: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed: list[Node] = [node for _, node in kind.listing("org/a-b_c.d", DIGESTS)]
    named = regfs.inodes._named
    reprs: list[Node] = []

    def counted(node: Node) -> str:
        reprs.append(node)
        return named(node)

    monkeypatch.setattr(regfs.inodes, "_named", counted)
    InodeTable(KEY).inode_all(listed)
    assert reprs == listed[:1]  # the first's repr, the others' made from it
    others: list[Node] = [  # what is numbered one by one: two repositories, two kinds
        LayerNode("org/a", DIGESTS[0]),
        LayerNode("org/b", DIGESTS[1]),
        ManifestNode("org/a", DIGESTS[2]),
        kind("org/a", Digest("sha512", "ab" * 64)),
    ]
    for nodes in (listed, others[:2], others[:3], [others[0], others[3]]):
        at_once = list(InodeTable(KEY).inode_all(nodes))
        looked_up = InodeTable(KEY)
        assert at_once == [looked_up.inode(node) for node in nodes]
        assert len(set(at_once)) == len(nodes)
