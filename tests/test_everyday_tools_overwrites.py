"""Review (stop 25): everyday tools on a mount, each compared with what it does on a local
filesystem (ext4/tmpfs), as a user who judges regfs as sshfs or rclone mount.

Each `xfail(strict=True)` test is a bug found here: it fails today for the reason it names,
and passes once the mount answers as a local filesystem would, or as the README says where
regfs refuses by design (then drop its mark); the comment at its top says what ext4 does
and what happens today.

Mostly tools that write over what is there (a layer's or a manifest's own bytes copied over
it, locally and remotely, `tar -x` of a repository's own backup, a refused manifest or
retag, `mv` onto an upload being written); also xattrs (`tar -x --xattrs`, `rsync -aX`,
removexattr), flock, mmap and a backup suffix in uploads/.
"""

from __future__ import annotations

import errno
import mmap
import os

import pytest
from support.oci import push_images
from support.registry import RegistryServer
from support.roots import build_root, variants
from support.tools import digest_of, errno_of, ls, run
from support.uploads import write_file

pytestmark = pytest.mark.mount

NAME = "library/demo"


# --------------------------------------------------------------- layers/ and manifests/


@pytest.mark.registry
async def test_tar_x_of_a_repositorys_own_backup_keeps_the_image(
    tmp_path, registry_server: RegistryServer, mount
):
    # ext4: `tar -x` of a tarball of files that are already there, identical, rewrites them
    # (GNU tar unlinks an existing file, then creates it) and exits 0; nothing is lost.
    # Today: tags/ and layers/ end up empty (the manifest stays, untagged, naming layers the
    # repository no longer links), tar exits 2 on "Cannot open: Operation not permitted",
    # and the registry lists no tag. SPEC 7: nothing a user does through the mount can
    # corrupt the storage; a refused create must not follow a deletion it makes undoable.
    image = await build_root(registry_server.root, size=10_000)
    m = mount(registry_server.root, "--tag-ttl", "0")
    repo = m.path(*NAME.split("/"))
    backup = tmp_path / "backup.tar"
    run("tar", "-C", repo, "-cf", backup, "tags", "manifests", "layers")
    result = run("tar", "-C", repo, "-xf", backup, check=False)
    assert ls(repo / "tags") == ["latest"]
    assert sorted(ls(repo / "layers")) == sorted(image["blobs"])
    assert registry_server.client().tags(NAME) == ["latest"]
    assert result.returncode == 0, result.stderr.decode()


@pytest.mark.parametrize("tool", ["cp -f", "mv", "install"])
async def test_a_layers_own_bytes_copied_over_it_keeps_it_linked(tmp_path, mount, tool):
    # ext4: `cp -f x dst` (dst not writable: it unlinks dst, then creates it), `mv x dst`
    # from another filesystem (copy + unlink of the source) and `install x dst` (unlinks
    # dst first) replace dst with the same bytes: nothing changes. Today the layer is
    # unlinked from the repository (`rm layers/<digest>`'s meaning), then the create is
    # refused (EPERM, SPEC 7: no writing to layers/): the tag now names a layer its
    # repository no longer has, and the registry's garbage collection would delete the blob.
    # Either the create of layers/<digest> is taken as an upload verified by its name
    # (`uploads/<digest>`'s rule), or the tool must fail before anything is unlinked.
    image = await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    layer = image["layer"]
    own = write_file(tmp_path / "own", image["blobs"][layer])
    argv = {"cp -f": ["cp", "-f"], "mv": ["mv"], "install": ["install", "-m", "644"]}[tool]
    run(*argv, own, repo / "layers" / layer, check=False)
    assert layer in ls(repo / "layers")


@pytest.mark.parametrize("tool", ["cp -f", "install"])
async def test_a_manifests_own_bytes_copied_over_it_keeps_its_tags(tmp_path, mount, tool):
    # ext4: `cp -f x dst` (dst not writable: unlink, then create) and `install x dst`
    # (unlink first) of dst's own bytes change nothing, exit 0. Today both exit 0 too, and
    # the tag that pointed at the manifest is gone, silently: `rm manifests/<digest>`
    # deletes its tags (SPEC 6), and the create that follows stores the manifest untagged.
    image = await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    own = write_file(tmp_path / "manifest.json", image["manifest"])
    argv = {"cp -f": ["cp", "-f"], "install": ["install", "-m", "644"]}[tool]
    result = run(*argv, own, repo / "manifests" / image["digest"], check=False)
    assert ls(repo / "manifests") == [image["digest"]]  # stored again, today too
    assert result.returncode == 0  # today too
    assert ls(repo / "tags") == ["latest"]


@pytest.mark.parametrize("tool", ["install -m 600", "rsync -a --inplace"])
async def test_a_tool_that_sets_attributes_after_close_copies_a_manifest_by_digest(
    tmp_path, mount, tool
):
    # ext4: `install -m 600 src dst` copies, closes, then chmods dst by path; `rsync -a
    # --inplace` sets the times by path after the close: both exit 0. README: the times of
    # a tag (or of a manifest being written) are accepted and ignored, and the same tools
    # into tags/ exit 0 today, as into uploads/ (a finished upload's name takes them for
    # 10 s). Today into manifests/<digest> the manifest is stored and the tool exits 1
    # (install: "cannot change permissions") or 23 (rsync: "failed to set times"). (A
    # second `rsync -a --inplace`, seeing other times, is then refused at its open: EPERM,
    # an existing manifest never changes; only `--size-only` or `-c` skip it.)
    image = await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    [other] = variants(image, 1)
    src = write_file(tmp_path / "manifest.json", other)
    os.utime(src, (1_600_000_000, 1_600_000_000))
    dst = repo / "manifests" / digest_of(other)
    argv = ["install", "-m", "600"] if tool.startswith("install") else ["rsync", "-a", "--inplace"]
    result = run(*argv, src, dst, check=False)
    assert dst.read_bytes() == other  # stored, today too
    assert result.returncode == 0, result.stderr.decode()


# ------------------------------------------------------------------------------- tags/


@pytest.mark.parametrize("tool", ["install", "cp --remove-destination", "mv", "tar -x"])
async def test_a_refused_manifest_written_by_unlink_and_create_keeps_the_tag(tmp_path, mount, tool):
    # ext4: `install src dst`, `cp --remove-destination`, `mv` from another filesystem and
    # `tar -x` unlink dst, then create it with src's bytes: dst has them. SPEC 6: a manifest
    # that fails a check is not stored and close() fails (EINVAL); SPEC 7: a failed
    # operation leaves the registry as it was. Today each tool reports the EINVAL, but its
    # unlink has already removed the tag: the user asked to replace `latest` and has no
    # `latest` at all (`cp`, `cp -f`, `rsync --inplace` keep it: they truncate, not unlink).
    image = await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    bad = write_file(tmp_path / "latest", b'{"schemaVersion": 2}')
    tag = repo / "tags" / "latest"
    if tool == "tar -x":
        run("tar", "-C", tmp_path, "-cf", tmp_path / "bad.tar", "latest")
        result = run("tar", "-C", tag.parent, "-xf", tmp_path / "bad.tar", check=False)
    else:
        argv = {
            "install": ["install", "-m", "644"],
            "cp --remove-destination": ["cp", "--remove-destination"],
            "mv": ["mv"],
        }[tool]
        result = run(*argv, bad, tag, check=False)
    assert result.returncode != 0  # refused, today too
    assert tag.read_bytes() == image["manifest"]


@pytest.mark.parametrize("tool", ["cp /dev/null", "touch", ": >"])
async def test_an_empty_manifest_for_a_new_tag_is_refused(tmp_path, mount, tool):
    # ext4: each makes an empty file, which `ls` then lists. SPEC 6: a manifest that fails
    # a check (an empty file is not JSON) is not stored and close() fails with EINVAL, the
    # log saying which check; `: > tags/latest` on an existing tag is refused so (README).
    # Today, for a new name, every tool exits 0 and nothing is listed nor logged: a `cp`
    # of a manifest that a failed download left empty looks like a push that worked.
    await build_root(tmp_path / "root", size=10_000)
    m = mount(tmp_path / "root", "--tag-ttl", "0")
    new = m.path(*NAME.split("/"), "tags", "v2")
    if tool == "cp /dev/null":
        result = run("cp", "/dev/null", new, check=False)
    elif tool == "touch":
        result = run("touch", new, check=False)
    else:  # a redirect in a shell that checks close(2): Python's
        script = "import sys; open(sys.argv[1], 'wb').close()"
        result = run("python3", "-c", script, new, check=False)
    assert "v2" not in ls(new.parent)  # nothing stored, today too
    assert result.returncode != 0
    assert "tag library/demo:v2 not stored" in m.log_text()


# ----------------------------------------------------------------------------- uploads/


async def test_tar_x_with_xattrs_into_uploads(tmp_path, mount):
    # ext4: mknod(2) of a regular file makes an empty file, as open(O_CREAT) does; `tar
    # --xattrs -x` of a file with user xattrs (a downloaded file keeps user.xdg.origin.url)
    # creates it so, sets its xattrs, then opens it to write. Today tar says "Cannot open:
    # Operation not permitted" and nothing arrives; without --xattrs the same tar works
    # (tests/test_everyday_tools_uploads.py). The xattrs themselves may be refused, as by tmpfs
    # without user xattrs (EOPNOTSUPP): tar then warns, and the bytes arrive.
    await build_root(tmp_path / "root", size=10_000)
    uploads = mount(tmp_path / "root").path(*NAME.split("/"), "uploads")
    data = os.urandom(5_000)
    src = write_file(tmp_path / "blob", data)
    os.setxattr(src, "user.xdg.origin.url", b"https://example.com/blob")
    run("tar", "-C", tmp_path, "--xattrs", "-cf", tmp_path / "blob.tar", "blob")
    run("tar", "-C", uploads, "--xattrs", "-xf", tmp_path / "blob.tar", check=False)
    assert (uploads / "blob").read_bytes() == data


async def test_mv_onto_an_upload_being_written_replaces_it(tmp_path, mount):
    # ext4: rename(2) onto a file that a process is writing replaces the name at once; the
    # writer writes on to the unnamed file. README: rm or mv of an upload being written
    # acts on its name at once (the writer writes on, and a removed upload is cancelled at
    # its last close), and `rm uploads/b` here does. Today `mv uploads/a uploads/b`, which
    # removes b as rm would, is EBUSY with nothing in the log: `rsync` into uploads/ (a
    # temporary, then a rename) fails on a name that a slow `cp` still writes.
    await build_root(tmp_path / "root", size=10_000)
    m = mount(tmp_path / "root", "--tag-ttl", "0")
    uploads = m.path(*NAME.split("/"), "uploads")
    data = os.urandom(20_000)
    write_file(uploads / "a", data)
    with open(uploads / "b", "wb", buffering=0) as writer:
        writer.write(b"x" * 1000)
        result = run("mv", uploads / "a", uploads / "b", check=False)
        writer.write(b"y" * 1000)  # the writer writes on, today too
    assert result.returncode == 0, result.stderr.decode()
    assert ls(uploads) == ["b"]
    assert (uploads / "b").read_bytes() == data


async def test_flock_of_a_new_upload_then_an_append_to_it(tmp_path, mount):
    # ext4: `flock FILE -c 'cmd >> FILE'` (the file its own lock, util-linux's idiom)
    # opens FILE with O_RDONLY|O_CREAT, so an empty file exists, then the child appends.
    # SPEC 5: one writer per upload (EBUSY for a second); flock(1) opened it read-only, so
    # it is no writer, as a reader of an upload is none. Today the create counts as the
    # writer whatever its flags: the append is EBUSY and the upload stays empty.
    await build_root(tmp_path / "root", size=10_000)
    uploads = mount(tmp_path / "root").path(*NAME.split("/"), "uploads")
    data = os.urandom(5_000)
    src = write_file(tmp_path / "blob", data)
    result = run("flock", uploads / "blob", "-c", f"cat {src} >> {uploads / 'blob'}", check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert (uploads / "blob").read_bytes() == data


@pytest.mark.parametrize("section", ["uploads", "tags"])
async def test_rsync_aX_of_a_file_without_xattrs_exits_0(tmp_path, mount, section):
    # ext4 (and tmpfs): `rsync -aX` (and the backup habit `rsync -aHAX`) of a file that has
    # no xattrs copies it and exits 0. Today the copy arrives, but rsync finds
    # user.regfs.uuid and .startedat on its temporary upload (user.regfs.digest and
    # .mediatype on a tag written --inplace), which its source lacks, so it removes them:
    # EPERM, "some files/attrs were not transferred", exit 23 on every run. regfs's own
    # xattrs say what the registry holds; their removal could be accepted and ignored, as
    # a tag's times are (README).
    image = await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    if section == "uploads":
        data = os.urandom(5_000)
        dst = repo / "uploads" / "blob"
        argv = ["rsync", "-aX"]
    else:  # rsync's temporary `.v2.XXXXXX` is no tag name: --inplace (README)
        data = image["manifest"]
        dst = repo / "tags" / "v2"
        argv = ["rsync", "-aX", "--inplace"]
    src = write_file(tmp_path / "src", data)
    result = run(*argv, src, dst, check=False)
    assert dst.read_bytes() == data  # copied, today too
    assert result.returncode == 0, result.stderr.decode()


async def test_python_mmap_of_an_upload_opened_for_writing(tmp_path, mount):
    # ext4: open(..., "r+b") then mmap.mmap(fd, 0) (Python's default: shared, writable)
    # maps the file; a store into the map is a write at that offset, which reaches the
    # file at msync or munmap (an overwrite below the end: SPEC 5 allows it). Today mmap
    # raises ENODEV (a read-only shared map of the same descriptor too); a private map and
    # a map of a read-only descriptor work.
    await build_root(tmp_path / "root", size=10_000)
    uploads = mount(tmp_path / "root").path(*NAME.split("/"), "uploads")
    data = bytearray(os.urandom(20_000))
    write_file(uploads / "blob", bytes(data))
    with open(uploads / "blob", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[100:105] = b"hello"
        m.flush()
    data[100:105] = b"hello"
    assert (uploads / "blob").read_bytes() == bytes(data)


@pytest.mark.parametrize("section", ["tags", "uploads", "layers"])
async def test_removexattr_of_a_missing_xattr_is_enodata(tmp_path, mount, section):
    # ext4 (and tmpfs): removexattr(2) of a name the file does not have is ENODATA
    # (`setfattr -x user.x f`: "No such attribute"), whether or not the file could take
    # one; a tool that clears an xattr it may not have set ignores ENODATA. Today it is
    # EPERM, for files and directories alike.
    image = await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root").path(*NAME.split("/"))
    write_file(repo / "uploads" / "blob", b"an upload's bytes")
    name = {"tags": "latest", "uploads": "blob", "layers": image["layer"]}[section]
    path = repo / section / name
    assert errno_of(lambda: os.removexattr(path, "user.not-there")) == errno.ENODATA


# ---------------------------------------------------------------------------- https://


@pytest.mark.registry
@pytest.mark.remote
def test_cp_f_of_a_layers_own_bytes_on_a_remote_mount_keeps_the_blob(
    tmp_path, remote_mount, module_registry_server: RegistryServer
):
    # ext4: `cp -f` of a file's own bytes over it changes nothing. Today on an https://
    # mount the open for writing is EPERM, cp -f unlinks the layer, which deletes the blob
    # at the registry, and the create is EPERM: a pull of the tagged image then fails on
    # the missing layer (the same as test_a_layers_own_bytes_copied_over_it_keeps_it_linked
    # on a storage root, where the blob stays for garbage collection).
    client = module_registry_server.client()
    name = "r1s25/remote"
    push_images(client, name, 1, ["v1"])
    layer = b"a layer\n"  # push_images's shared layer
    repo = remote_mount().path(*name.split("/"))
    own = write_file(tmp_path / "own", layer)
    run("cp", "-f", own, repo / "layers" / digest_of(layer), check=False)
    assert client.get_blob(name, digest_of(layer)) == layer


@pytest.mark.registry
@pytest.mark.remote
@pytest.mark.parametrize(
    "tool",
    [
        "mv",
        pytest.param(
            "sed -i",
            marks=pytest.mark.xfail(
                strict=True,
                reason="sed's temporary is a tag put at its close: on a registry that "
                "deletes no tag (2.8) neither the rename (now refused before anything "
                "changes: v1 as it was) nor sed's unlink of it can remove it",
            ),
        ),
    ],
)
def test_a_refused_retag_on_a_remote_mount_changes_nothing(
    tmp_path, remote_mount, module_registry_server: RegistryServer, tool
):
    # ext4: `mv a b` and `sed -i f` (a temporary, then a rename over f) succeed. README: on
    # registries that delete no tag alone (registry 2.8) `rm tags/v1` is EPERM; SPEC 7: a
    # failed operation leaves the registry as it was. Today the rename first points the new
    # name at the manifest (`mv`: tag b made; `sed -i`: v1 edited), then its delete of the
    # old name is refused: `mv` exits 1 with both a and b tagged, `sed -i` exits 4 with
    # v1 edited and its `sedXXXXXX` tag left at the registry, which no `rm` through the
    # mount can remove. A refusal must come before the registry changes (or the rename
    # succeed as far as it can and say 0).
    client = module_registry_server.client()
    name = f"r1s25/retag-{tool.split()[0]}"
    [manifest] = push_images(client, name, 1, ["a"])
    tags = remote_mount("--tag-ttl", "0").path(*name.split("/"), "tags")
    if tool == "mv":
        result = run("mv", tags / "a", tags / "b", check=False)
    else:
        result = run("sed", "-i", "s/schemaVersion/schemaVersion/", tags / "a", check=False)
    if result.returncode != 0:  # refused: then nothing changed
        assert sorted(client.tags(name)) == ["a"]
        assert client.get_manifest(name, "a").body == manifest


@pytest.mark.parametrize("tool", ["cp -b", "mv -b", "install -b"])
async def test_a_backup_suffix_in_uploads(tmp_path, mount, tool):
    # ext4: `cp -b`, `mv -b` and `install -b` first rename the existing dst to `dst~` (as
    # nano -B and Emacs name a backup), then write dst. An upload's name is regfs's own
    # label (the registry names it by UUID), so `~` harms nothing there. Today each tool
    # fails ("cannot backup ...: Invalid argument") and writes nothing.
    await build_root(tmp_path / "root", size=10_000)
    uploads = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"), "uploads")
    old, new = os.urandom(3_000), os.urandom(4_000)
    write_file(uploads / "blob", old)
    src = write_file(tmp_path / "blob", new)
    argv = {"cp -b": ["cp", "-b"], "mv -b": ["mv", "-b"], "install -b": ["install", "-b"]}[tool]
    result = run(*argv, src, uploads / "blob", check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert (uploads / "blob").read_bytes() == new
    assert (uploads / "blob~").read_bytes() == old
