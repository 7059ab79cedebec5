"""Review (stop 23): regfs syscall by syscall against the man 2 pages, on a real mount of a
local storage root: what a program (not a named tool) meets below cp, rsync and tar.

Each `xfail(strict=True)` test is a bug found here: it fails today for the reason it names,
and passes once the mount answers as a local filesystem would (then drop its mark); the
comment at its top says what ext4 (or, for a read-only place, a read-only mount) does. The
tests without a mark cover what nothing else did and holds today: lseek's SEEK_DATA and
SEEK_HOLE, copy_file_range and splice into an upload, private mmaps, xattr size probing,
telldir/seekdir, d_ino, locks, O_APPEND's pwrite, O_EXCL on every kind, a read-only mount,
another user's permission checks.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.images import directory, file, symlink
from support.mounts import Mount
from support.registry import repo_path
from support.roots import build_root, put_layer_image
from support.tools import digest_of, errno_of, open_errno
from support.uploads import write_file
from support.users import shared_directory

pytestmark = pytest.mark.mount

NAME = "library/demo"
HELLO = b"hello world\n" * 100
LIBC = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Demo:
    """A mount of a root holding library/demo (a config, a 200 KB layer, tag `latest`) and
    library/img (an image of one tar layer, for rootfs/)."""

    m: Mount
    root: Path
    image: dict

    @property
    def repo(self) -> Path:
        return self.m.path(*NAME.split("/"))

    @property
    def layer(self) -> Path:
        return self.repo / "layers" / self.image["layer"]

    @property
    def tag(self) -> Path:
        return self.repo / "tags" / "latest"

    @property
    def manifest(self) -> Path:
        return self.repo / "manifests" / self.image["digest"]

    @property
    def rootfs(self) -> Path:
        return self.m.path("library", "img", "rootfs", "latest")

    def upload(self, name: str, data: bytes) -> Path:
        return write_file(self.repo / "uploads" / name, data)

    def kinds(self) -> dict[str, tuple[Path, bytes]]:
        """Each kind of file with the bytes it holds (an upload made here)."""
        return {
            "layer": (self.layer, self.image["blobs"][self.image["layer"]]),
            "tag": (self.tag, self.image["manifest"]),
            "manifest": (self.manifest, self.image["manifest"]),
            "upload": (self.upload("kind", b"u" * 5000), b"u" * 5000),
            "rootfs file": (self.rootfs / "etc" / "hello", HELLO),
        }


async def make_root(root: Path) -> dict:
    image = await build_root(root, size=200_000)
    entries = [directory("etc"), file("etc/hello", HELLO), symlink("etc/link", "hello")]
    await put_layer_image(root, "library/img", "latest", entries)
    return image


@pytest.fixture
async def demo(tmp_path: Path, mount) -> Demo:
    image = await make_root(tmp_path / "root")
    return Demo(mount(tmp_path / "root", "--tag-ttl", "0"), tmp_path / "root", image)


def libc_call(result: int) -> None:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def renameat2(old: Path, new: Path, flags: int) -> None:
    AT_FDCWD = -100
    libc_call(LIBC.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags))


def fallocate(path: Path, mode: int, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        libc_call(LIBC.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)))
    finally:
        os.close(fd)


def readdir_names(path: Path) -> list[str]:
    """Every name getdents(2) returns, `.` and `..` too (os.listdir drops them)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    names = []
    try:
        while True:
            buf = ctypes.create_string_buffer(65536)
            n = LIBC.syscall(217, fd, buf, len(buf))  # SYS_getdents64 (x86_64)
            libc_call(n)
            if n == 0:
                return names
            i = 0
            while i < n:
                (reclen,) = struct.unpack_from("H", buf.raw, i + 16)
                names.append(buf.raw[i + 19 : i + reclen].split(b"\0", 1)[0].decode())
                i += reclen
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ fsync / fdatasync


@pytest.mark.registry
@pytest.mark.remote
def test_fsync_of_a_remote_upload_sends_what_was_written(remote_mount, module_registry_server):
    # ext4: fsync(2) returns once every byte written before it is stored, and reports a
    # failed write (EIO, ENOSPC) there; `dd conv=fsync`, rsync --fsync and databases rely on
    # it. On a local root the same gap shows as a race (the appends in flight, up to 16 MiB).
    m = remote_mount()
    repo = m.path("fsync", "app")
    os.makedirs(repo)
    path = repo / "uploads" / "synced"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, os.urandom(12 << 20))  # one PATCH's worth and a tail
        os.fsync(fd)
        uuid = os.getxattr(path, "user.regfs.uuid").decode()
        data = repo_path(module_registry_server.root, "fsync/app") / "_uploads" / uuid / "data"
        assert data.stat().st_size == 12 << 20  # every byte written before the fsync
    finally:
        os.close(fd)


async def test_fsync_of_a_local_upload_returns_once_it_is_stored(demo):
    # ext4: as above. On a root, appends return before they are written (up to 16 MiB in
    # flight): fsync waits for them, and for the data file's own fsync.
    path = demo.repo / "uploads" / "synced"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for _ in range(64):
            os.write(fd, os.urandom(1 << 20))
        os.fsync(fd)
        uuid = os.getxattr(path, "user.regfs.uuid").decode()
        data = repo_path(demo.root, "library/demo") / "_uploads" / uuid / "data"
        assert data.stat().st_size == 64 << 20
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ inode numbers


async def test_inode_numbers_survive_a_remount(tmp_path, mount):
    # ext4: an inode number is the file's for its life, across remounts and reboots; backup
    # tools (borg's and restic's file caches, tar --listed-incremental) and git's index key
    # unchanged files on it, and re-read every file whose number moved.
    await make_root(tmp_path / "root")
    paths = [
        ("library",),
        (*NAME.split("/"), "tags"),
        (*NAME.split("/"), "tags", "latest"),
        ("library", "img", "rootfs", "latest", "etc", "hello"),
    ]
    first = mount(tmp_path / "root")
    before = [first.path(*p).stat().st_ino for p in paths]
    first.stop()
    after = [mount(tmp_path / "root").path(*p).stat().st_ino for p in paths]
    assert after == before


async def test_d_ino_is_st_ino_in_every_listing(demo):
    # ext4: readdir's d_ino is the inode number stat gives (ls -i, find -inum, du's hard
    # link check); the daemon numbers an entry when it lists it, before any lookup.
    demo.upload("listed", b"x")
    for directory_path in (
        demo.m.mountpoint,
        demo.repo,
        demo.repo / "tags",
        demo.repo / "layers",
        demo.repo / "uploads",
        demo.rootfs,
        demo.rootfs / "etc",
    ):
        for entry in os.scandir(directory_path):
            assert entry.inode() == os.lstat(entry.path).st_ino, entry.path


# ------------------------------------------------------------------------ readdir


async def test_readdir_lists_dot_and_dotdot(demo):
    # ext4 (and every local filesystem): getdents(2) returns `.` and `..` first; `ls -a`
    # prints what getdents returns, and a script that counts `ls -a` lines for an empty
    # directory expects 2.
    empty = demo.m.path("dots", "empty")
    os.makedirs(empty)
    for directory_path in (
        demo.m.mountpoint, demo.repo, demo.repo / "tags", demo.repo / "layers", demo.rootfs,
        demo.rootfs / "etc", empty / "uploads",
    ):  # fmt: skip
        names = readdir_names(directory_path)
        assert names[:2] == [".", ".."], (directory_path, names)
        assert names.count(".") == names.count("..") == 1, (directory_path, names)
        assert sorted(names[2:]) == sorted(os.listdir(directory_path)), directory_path
    listed = subprocess.run(["ls", "-a", empty / "uploads"], capture_output=True, text=True)
    assert listed.stdout.split() == [".", ".."]
    # `..` names the parent: `ls -ai`'s numbers are those stat gives
    ino = {n: int(i) for i, n in (line.split() for line in _ls_ai(demo.repo / "tags"))}
    assert ino["."] == os.stat(demo.repo / "tags").st_ino
    assert ino[".."] == os.stat(demo.repo).st_ino


def _ls_ai(path: Path) -> list[str]:
    return subprocess.run(
        ["ls", "-1ai", path], check=True, capture_output=True, text=True
    ).stdout.splitlines()


async def test_telldir_seekdir_rewinddir_return_to_each_entry(demo):
    # ext4: seekdir(telldir()) returns to the same entry, rewinddir to the first, in a
    # listing larger than one getdents buffer too (Samba, Perl's File::Find do this).
    namespace = demo.m.path("many")
    os.mkdir(namespace)
    for i in range(300):
        os.mkdir(namespace / f"r{i:03d}")
    LIBC.opendir.restype = LIBC.readdir.restype = ctypes.c_void_p
    LIBC.telldir.restype = ctypes.c_long
    for fn in (LIBC.readdir, LIBC.telldir, LIBC.rewinddir, LIBC.closedir):
        fn.argtypes = [ctypes.c_void_p]
    LIBC.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]

    def name_of(entry: int) -> str:
        return ctypes.string_at(entry + 19).decode()  # struct dirent64's d_name

    for directory_path in (namespace, demo.repo / "layers", demo.rootfs / "etc"):
        d = LIBC.opendir(bytes(directory_path))
        try:
            where = {}
            while True:
                here = LIBC.telldir(d)
                entry = LIBC.readdir(d)
                if not entry:
                    break
                where[name_of(entry)] = here
            assert len(where) >= 2
            for name, here in reversed(where.items()):
                LIBC.seekdir(d, here)
                assert name_of(LIBC.readdir(d)) == name
            LIBC.rewinddir(d)
            assert name_of(LIBC.readdir(d)) == next(iter(where))
        finally:
            LIBC.closedir(d)


# ------------------------------------------------------------------------ stat fields


async def test_a_directorys_link_count_counts_its_subdirectories(demo):
    # ext4: a directory's st_nlink is 2 plus its subdirectories (each one's `..`); find's
    # and fts's leaf optimisation trust it where they know the filesystem.
    for path in (demo.repo, demo.rootfs, demo.rootfs / "etc", demo.m.path("library")):
        subdirectories = [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
        assert path.stat().st_nlink == 2 + len(subdirectories), path


@pytest.mark.parametrize("section", ["uploads", "tags"])
async def test_a_sections_mtime_moves_when_an_entry_comes_or_goes(demo, section):
    # ext4: creating, renaming or unlinking an entry sets its directory's mtime and ctime
    # (make's directory prerequisites, `find -newer`, `ls -lt` of the repository, and
    # watchers that poll a directory's mtime rely on it), as mkdir in a namespace does.
    where = demo.repo / section
    data = demo.image["manifest"] if section == "tags" else b"bytes"
    before = where.stat()
    time.sleep(1.1)
    write_file(where / "new", data)
    created = where.stat()
    time.sleep(1.1)
    os.unlink(where / "new")
    removed = where.stat()
    assert before.st_mtime_ns < created.st_mtime_ns < removed.st_mtime_ns
    assert before.st_ctime_ns < created.st_ctime_ns < removed.st_ctime_ns


async def test_chmod_of_an_upload_moves_its_ctime(demo):
    # ext4: chmod, chown and utimes set st_ctime to now (backup tools and `find -cmin` look
    # for changed metadata there); the mode itself is kept, as the README says.
    upload = demo.upload("moded", b"bytes")
    before = upload.stat()
    time.sleep(1.1)
    os.chmod(upload, 0o600)
    after = upload.stat()
    assert after.st_mode & 0o777 == 0o600  # today too
    assert after.st_ctime_ns > before.st_ctime_ns


# ------------------------------------------------------------------------ open flags


async def test_o_creat_o_excl_on_every_existing_kind_is_eexist(demo):
    # ext4: O_CREAT|O_EXCL of an existing name is EEXIST, whatever it is and whatever the
    # mount's writability (a lock-file idiom and mkstemp's loop rely on it); O_DIRECTORY of
    # a file is ENOTDIR.
    excl = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    files = {kind: path for kind, (path, _) in demo.kinds().items()}
    directories = {"section": demo.repo / "tags", "repository": demo.repo, "rootfs": demo.rootfs}
    for kind, path in (files | directories).items():
        assert open_errno(path, excl) == errno.EEXIST, kind
    for kind, path in files.items():
        assert open_errno(path, os.O_RDONLY | os.O_DIRECTORY) == errno.ENOTDIR, kind


async def test_o_excl_create_of_a_tag_being_written_is_eexist(demo):
    # ext4: the name exists from the first create on: a second O_CREAT|O_EXCL is EEXIST
    # (the lock-file idiom: whoever gets EEXIST knows someone else holds it), as an upload
    # being written does.
    excl = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    fd = os.open(demo.repo / "tags" / "v2", excl, 0o644)
    try:
        os.write(fd, demo.image["manifest"][:100])
        assert open_errno(demo.repo / "tags" / "v2", excl) == errno.EEXIST
    finally:
        os.write(fd, demo.image["manifest"][100:])
        os.close(fd)
    writer = os.open(demo.repo / "uploads" / "u", excl, 0o644)
    try:
        assert open_errno(demo.repo / "uploads" / "u", excl) == errno.EEXIST
    finally:
        os.close(writer)


async def test_pwrite_on_an_o_append_upload_appends(demo):
    # Linux (pwrite(2), BUGS): with O_APPEND, pwrite appends whatever the offset; so does
    # write after an lseek to 0.
    upload = demo.upload("appended", b"x" * 1000)
    fd = os.open(upload, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"AB")
        os.pwrite(fd, b"CD", 0)
    finally:
        os.close(fd)
    assert upload.read_bytes() == b"x" * 1000 + b"ABCD"


async def test_a_read_only_mount_answers_as_one(tmp_path, mount):
    # A read-only ext4 mount: statvfs has ST_RDONLY, access(W_OK) is false, an open for
    # writing is EROFS, and O_CREAT|O_EXCL of an existing name is still EEXIST.
    image = await make_root(tmp_path / "root")
    m = mount(tmp_path / "root", "--read-only")
    repo = m.path(*NAME.split("/"))
    assert os.statvfs(m.mountpoint).f_flag & os.ST_RDONLY
    for path in (repo / "tags" / "latest", repo / "layers" / image["layer"]):
        assert not os.access(path, os.W_OK)
        assert open_errno(path, os.O_WRONLY) == errno.EROFS
        excl = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        assert open_errno(path, excl) == errno.EEXIST
    new = os.O_CREAT | os.O_WRONLY
    assert open_errno(repo / "uploads" / "new", new) == errno.EROFS


async def test_another_user_meets_the_modes_as_on_ext4(tmp_path, other_user):
    # ext4 (default_permissions here): a user who owns nothing reads what its mode lets it
    # read (access R_OK, X_OK of an executable), and a create or unlink in a directory it
    # cannot write is EACCES before the filesystem is asked (not EPERM).
    image = await make_root(tmp_path / "root")
    entries = [directory("bin"), file("bin/tool", b"#!/bin/sh\n", mode=0o755)]
    await put_layer_image(tmp_path / "root", "library/tools", "v1", entries)
    with (
        shared_directory(0o755) as top,
        Mount(str(tmp_path / "root"), top / "mnt", top / "regfs.log", ["--allow-other"]) as m,
    ):
        repo = m.path(*NAME.split("/"))
        tool = m.path("library", "tools", "rootfs", "v1", "bin", "tool")
        for path in (repo / "layers" / image["layer"], repo / "tags" / "latest", tool):
            assert other_user.run("test", "-r", str(path), check=False).returncode == 0, path
            assert other_user.run("test", "-w", str(path), check=False).returncode == 1, path
        assert other_user.run("test", "-x", str(tool), check=False).returncode == 0
        assert (
            other_user.run("cat", str(repo / "tags" / "latest")).stdout
            == image["manifest"].decode()
        )
        upload = other_user.run("touch", str(repo / "uploads" / "mine"), check=False)
        assert "Permission denied" in upload.stderr
        removed = other_user.run("rm", "-f", str(repo / "tags" / "latest"), check=False)
        assert "Permission denied" in removed.stderr
        assert (repo / "tags" / "latest").read_bytes() == image["manifest"]


# ------------------------------------------------------------------------ unlink, rename


@pytest.mark.parametrize("change", ["unlink", "rename"])
async def test_an_upload_being_written_can_be_removed_or_renamed(demo, change):
    # ext4: unlink and rename act on the name, never on an open file: `rm` of a file a
    # stopped `cp` still holds succeeds (the writer goes on into the unlinked file, its data
    # gone at close); a rename moves the name and the writer's bytes go to the new one.
    path = demo.repo / "uploads" / "held"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"a" * 1000)
        if change == "unlink":
            os.unlink(path)
        else:
            os.rename(path, demo.repo / "uploads" / "moved")
        os.write(fd, b"b" * 1000)
    finally:
        os.close(fd)
    if change == "unlink":
        assert not path.exists()
    else:
        assert (demo.repo / "uploads" / "moved").read_bytes() == b"a" * 1000 + b"b" * 1000


async def test_rename_exchange_swaps_two_tags(demo, tmp_path):
    # ext4: RENAME_EXCHANGE swaps two names in one step (coreutils 9.5's `mv --exchange`);
    # for tags that is a swap of what they point at, as `mv tags/a tags/b` is a retag.
    other = json.loads(demo.image["manifest"])
    other["annotations"] = {"swap": "1"}
    other_bytes = json.dumps(other).encode()
    write_file(demo.repo / "tags" / "other", other_bytes)
    renameat2(demo.tag, demo.repo / "tags" / "other", 2)  # RENAME_EXCHANGE
    assert demo.tag.read_bytes() == other_bytes
    assert (demo.repo / "tags" / "other").read_bytes() == demo.image["manifest"]


async def test_a_tags_reader_keeps_its_manifest_across_a_retag(demo):
    # ext4: rename(2) over a name leaves a descriptor open on the old file reading the old
    # file to its end (the README's "a reader finds the old manifest or the new one"). A
    # tag read through the page cache (one per inode, and a tag's inode stays with its
    # name) would mix the old and the new: another open drops the pages and reads the new.
    other = demo.image["manifest"].replace(b"{", b'{"annotations": {"swap": "1"}, ', 1)
    fd = os.open(demo.tag, os.O_RDONLY)
    try:
        head = os.pread(fd, 100, 0)
        write_file(demo.repo / "tags" / "next", other)
        os.rename(demo.repo / "tags" / "next", demo.tag)
        assert demo.tag.read_bytes() == other  # retagged, today too
        assert head + os.pread(fd, 1 << 20, 100) == demo.image["manifest"]
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["layer", "tag", "upload"])
async def test_an_open_file_outlives_its_name(demo, kind):
    # ext4: unlink removes the name; a descriptor still open reads the whole file and fstat
    # says st_nlink 0, until the last close (`tail -f`, a `cp` of a file someone removes).
    path, data = demo.kinds()[kind]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(data) + 1, 0) == data
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ inotify


@pytest.mark.xfail(
    strict=True,
    reason="no IN_DELETE when an upload named by its digest leaves uploads/ at close: FUSE's "
    "delete notice takes uploads/'s lock, which a client's create() there holds while it waits "
    "for the daemon, so a daemon killed while it waits never finishes dying and the mount "
    "hangs (docs/concurrency.md, Why no kernel notification)",
)
async def test_inotify_sees_a_digest_named_upload_leave_uploads(demo):
    # ext4 has no file that moves itself; the nearest is a rename, which a watcher sees
    # (IN_MOVED_FROM here, IN_MOVED_TO in layers/, as `mv uploads/x layers/<digest>` gives).
    # Only a FUSE delete notice (d_delete_notify: IN_DELETE) could say it, and that one can
    # hang a dying daemon: see the mark.
    IN_DELETE, IN_MOVED_FROM = 0x200, 0x40
    ifd = LIBC.inotify_init1(os.O_NONBLOCK)
    libc_call(ifd)
    try:
        libc_call(LIBC.inotify_add_watch(ifd, bytes(demo.repo / "uploads"), 0xFFF))
        data = os.urandom(5000)
        write_file(demo.repo / "uploads" / digest_of(data), data)
        assert digest_of(data) in os.listdir(demo.repo / "layers")  # finished, today too
        time.sleep(0.2)
        events = []
        with pytest.raises(BlockingIOError):
            while True:
                buf = os.read(ifd, 65536)
                i = 0
                while i < len(buf):
                    _, mask, _, size = struct.unpack_from("iIII", buf, i)
                    name = buf[i + 16 : i + 16 + size].rstrip(b"\0").decode()
                    events.append((mask, name))
                    i += 16 + size
        assert any(mask & (IN_DELETE | IN_MOVED_FROM) and name == digest_of(data)
                   for mask, name in events), events  # fmt: skip
    finally:
        os.close(ifd)


# ------------------------------------------------------------------------ fallocate


@pytest.mark.xfail(
    strict=True,
    reason="fallocate(2) of an upload is EOPNOTSUPP in every mode (pyfuse3 has no fallocate "
    "handler)",
)
@pytest.mark.parametrize("mode", [0, 1], ids=["mode 0 within the size", "KEEP_SIZE"])
async def test_fallocate_of_an_upload_that_changes_no_byte(demo, mode):
    # ext4: fallocate of a range inside the file (mode 0), or with FALLOC_FL_KEEP_SIZE past
    # it, succeeds and changes no byte and no size (rsync --preallocate, download managers
    # and qemu-img do it before writing). A range that grows the file would be a gap here.
    upload = demo.upload("reserved", b"x" * 10_000)
    fallocate(upload, mode, 0, 10_000 if mode == 0 else 1 << 20)
    assert upload.read_bytes() == b"x" * 10_000


# ------------------------------------------------------------------------ seeking, copying


async def test_lseek_data_hole_end_on_every_kind(demo):
    # ext4 (no holes): SEEK_DATA at 0 is 0, SEEK_HOLE is the size, SEEK_END the size, and
    # SEEK_DATA/SEEK_HOLE at or past the end are ENXIO (cp --sparse=auto and tar --sparse
    # probe with them).
    for kind, (path, data) in demo.kinds().items():
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 0, kind
            assert os.lseek(fd, 0, os.SEEK_HOLE) == len(data), kind
            assert os.lseek(fd, 0, os.SEEK_END) == len(data), kind
            assert errno_of(lambda f=fd, d=data: os.lseek(f, len(d), os.SEEK_DATA)) == errno.ENXIO
            assert (
                errno_of(lambda f=fd, d=data: os.lseek(f, len(d) + 1, os.SEEK_HOLE)) == errno.ENXIO
            )
            assert os.pread(fd, 10, len(data)) == b"", kind
            assert os.pread(fd, 10, 1 << 62) == b"", kind
        finally:
            os.close(fd)


async def test_copy_file_range_sendfile_splice_into_an_upload(demo, tmp_path):
    # ext4: copy_file_range within one filesystem copies (cp uses it first); sendfile and
    # splice from a pipe write as write(2) does. Here: a layer of one repository into
    # another's upload, then finished with mv; a local file and a pipe into uploads.
    layer = demo.image["blobs"][demo.image["layer"]]
    other = demo.m.path("org", "other")
    os.makedirs(other)
    fin = os.open(demo.layer, os.O_RDONLY)
    fout = os.open(other / "uploads" / "copied", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        copied = 0
        while copied < len(layer):
            copied += os.copy_file_range(fin, fout, len(layer) - copied)
    finally:
        os.close(fin)
        os.close(fout)
    os.rename(other / "uploads" / "copied", other / "layers" / demo.image["layer"])
    assert (other / "layers" / demo.image["layer"]).read_bytes() == layer

    local = write_file(tmp_path / "local", os.urandom(70_000))
    fin = os.open(local, os.O_RDONLY)
    fout = os.open(other / "uploads" / "sent", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        sent = 0
        while sent < 70_000:
            sent += os.sendfile(fout, fin, sent, 70_000 - sent)
    finally:
        os.close(fin)
        os.close(fout)
    assert (other / "uploads" / "sent").read_bytes() == local.read_bytes()

    r, w = os.pipe()
    fout = os.open(other / "uploads" / "spliced", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(w, b"z" * 3000)
        os.close(w)
        assert os.splice(r, fout, 3000) == 3000
    finally:
        os.close(r)
        os.close(fout)
    assert (other / "uploads" / "spliced").read_bytes() == b"z" * 3000


async def test_private_mmap_of_every_kind(demo):
    # ext4: mmap(MAP_PRIVATE) maps any regular file, PROT_WRITE too (copy on write, the file
    # unchanged): the dynamic loader maps a binary so, and a tag or upload (direct_io, which
    # refuses a shared map) maps too.
    for kind, (path, data) in demo.kinds().items():
        with open(path, "rb") as f:
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=prot) as m:
                assert m[:] == data, kind
                m[0] = 0
        assert path.read_bytes() == data, kind


# ------------------------------------------------------------------------ xattrs, locks


async def test_xattr_size_probing(demo):
    # ext4 (getxattr(2), listxattr(2)): a size of 0 returns the size needed, a buffer too
    # small is ERANGE; getfattr and libattr probe so.
    LIBC.getxattr.restype = LIBC.listxattr.restype = ctypes.c_ssize_t
    name = b"user.regfs.digest"
    for path in (demo.layer, demo.tag, demo.manifest):
        target = bytes(path)
        value = os.getxattr(path, name)
        listed = b"".join(n.encode() + b"\0" for n in os.listxattr(path))
        assert LIBC.getxattr(target, name, None, 0) == len(value)
        assert LIBC.listxattr(target, None, 0) == len(listed)
        small = ctypes.create_string_buffer(3)
        assert LIBC.getxattr(target, name, small, 3) == -1
        assert ctypes.get_errno() == errno.ERANGE
        assert LIBC.listxattr(target, small, 3) == -1
        assert ctypes.get_errno() == errno.ERANGE


async def test_locks_on_every_kind(demo):
    # ext4: flock and fcntl (POSIX and OFD) locks work on any file a process can open; a
    # second exclusive flock through another descriptor is EWOULDBLOCK (`flock -n`).
    F_OFD_SETLK = 37
    for kind, (path, _) in demo.kinds().items():
        a, b = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert errno_of(lambda d=b: fcntl.flock(d, fcntl.LOCK_EX | fcntl.LOCK_NB)) == (
                errno.EWOULDBLOCK
            ), kind
            fcntl.flock(a, fcntl.LOCK_UN)
            fcntl.lockf(a, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.fcntl(b, F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_RDLCK, 0, 0, 0, 0))
        finally:
            os.close(a)
            os.close(b)
