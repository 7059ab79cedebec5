"""Crash safety through a real mount: `kill -9` the daemon mid-work, remount, resume, verify.

Each round (one seed) pushes three images into one repository through the mount, from bash
scripts in subprocesses: plain-named uploads written by `dd` and finished by `mv`, digest-named
ones written by `cp` (they finish on close), one layer shared by all images (concurrent
finishes of one digest), then `cp manifest tags/vN`. The seed picks a point of that work (a
script's marker line) and a delay after it; the daemon is killed there. The scripts must then
end with a dead-connection error (or have finished); `regfs mount` on the same, dead,
mountpoint must clean it up; the work is finished the way a user would (resume each upload
at its `stat` size, redo the tag pushes); and the root must be exactly right: `check` finds
no damage, every blob on disk hashes to its name, and the real registry serves everything.

The state found on disk right after each kill is tallied per kind (mid-write, finish half
done, tag push half done, ...); the last test prints the tally, so a run shows which crash
points it really hit.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from support.clients import DEAD
from support.mounts import Mount, wait_until
from support.registry import OCI_MANIFEST, RegistryServer, blob_data_path, repo_path, v2_root
from support.tools import MIB, digest_of, run, sha256_file

from storage.check import Severity, check
from storage.digests import Digest
from storage.drivers import FilesystemDriver
from storage.paths import BlobData, UploadData, path_for
from storage.registry import Registry
from storage.uploads import UUID_RE

pytestmark = pytest.mark.mount

REPO = "crash/app"
IMAGES = 3
SEEDS = range(20)
# The kill comes up to this long after the chosen marker, so it lands inside the next step:
# writes of a few MiB take tens of ms, a finish or a tag push (a few fsyncs) about ten.
KILL_DELAYS = {"start": 0.06, "write": 0.04, "finish": 0.015, "tag": 0.015}

CRASH_POINTS: Counter[str] = Counter()  # kind of half-done state → rounds that left one
ROUNDS_RUN: set[int] = set()


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Blob:
    name: str  # its name in uploads/: a label, or the digest itself
    source: Path  # the bytes, on local disk
    digest: str
    by_digest: bool  # named by its digest: finishes on close, not by mv

    @property
    def data(self) -> bytes:
        return self.source.read_bytes()

    @property
    def size(self) -> int:
        return self.source.stat().st_size


@dataclass(frozen=True)
class Image:
    tag: str
    blobs: list[Blob]  # in the order its script uploads them
    manifest: Path


def make_blob(src: Path, name: str | None, data: bytes) -> Blob:
    digest = digest_of(data)
    path = src / (name or digest.replace(":", "-"))
    path.write_bytes(data)
    return Blob(name or digest, path, digest, name is None)


def plan_images(rng: random.Random, src: Path) -> list[Image]:
    src.mkdir()
    shared = rng.randbytes(2 * MIB)
    images = []
    for i in range(IMAGES):
        config = json.dumps({"architecture": "amd64", "os": "linux", "seed": rng.random()})
        blobs = [
            make_blob(src, f"layer-{i}", rng.randbytes(rng.randint(MIB, 3 * MIB))),
            make_blob(src, None, rng.randbytes(rng.randint(MIB, 3 * MIB))),
            make_blob(src, f"shared-{i}", shared),
        ]
        rng.shuffle(blobs)
        config_blob = make_blob(src, f"config-{i}", config.encode())
        blobs.append(config_blob)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", config_blob),
            "layers": [
                descriptor("application/vnd.oci.image.layer.v1.tar", b)
                for b in blobs
                if b is not config_blob
            ],
        }
        path = src / f"manifest-{i}.json"
        path.write_bytes(json.dumps(manifest, indent=2).encode())
        images.append(Image(f"v{i}", blobs, path))
    return images


def descriptor(media_type: str, blob: Blob) -> dict:
    return {"mediaType": media_type, "digest": blob.digest, "size": blob.size}


def push_script(image: Image, repo: Path, marks: Path) -> str:
    """bash that pushes one image with dd, cp and mv, writing a marker line before each step."""
    q = shlex.quote
    uploads, layers = repo / "uploads", repo / "layers"
    lines = ["set -eu", f'mark() {{ echo "$1" >> {q(str(marks))}; }}']
    for blob in image.blobs:
        dest = q(str(uploads / blob.name))
        lines.append(f"mark 'write {blob.name}'")
        if blob.by_digest:
            lines.append(f"cp {q(str(blob.source))} {dest}")
        else:
            lines.append(f"dd if={q(str(blob.source))} of={dest} bs=64k status=none")
            lines.append(f"mark 'finish {blob.name}'")
            lines.append(f"mv {dest} {q(str(layers / blob.digest))}")
    lines.append(f"mark 'tag {image.tag}'")
    lines.append(f"cp {q(str(image.manifest))} {q(str(repo / 'tags' / image.tag))}")
    lines.append(f"mark 'done {image.tag}'")
    return "\n".join(lines) + "\n"


def kill_points(images: list[Image]) -> list[str]:
    points = ["start"]
    for image in images:
        for blob in image.blobs:
            points.append(f"write {blob.name}")
            if not blob.by_digest:
                points.append(f"finish {blob.name}")
        points.append(f"tag {image.tag}")
    return points


# --------------------------------------------------------------------------- what a crash left


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def crash_state(root: Path, images: list[Image]) -> list[str]:
    """The half-done states the kill left on disk, read straight from the root."""
    repo = repo_path(root, REPO)
    by_label: dict[str, list[Path]] = {}
    found = ["atomic put cut before its rename (.tmp-* left)" for _ in root.rglob(".tmp-*")]
    uploads = repo / "_uploads"
    for upload in sorted(uploads.iterdir()) if uploads.is_dir() else []:
        if not (upload / "startedat").exists():
            only_temps = all(p.name.startswith(".tmp-") for p in upload.iterdir())
            found.append(f"upload without startedat: cut {'create' if only_temps else 'delete'}")
            continue
        label = read_text(upload / "regfs-label")
        if label is None:
            found.append("upload created, not yet named")
            continue
        by_label.setdefault(label, []).append(upload)
    for image in images:
        for blob in image.blobs:
            hexdigest = blob.digest.split(":")[1]
            linked = (repo / "_layers/sha256" / hexdigest / "link").exists()
            for upload in by_label.get(blob.name, []):
                data = upload / "data"
                size = data.stat().st_size if data.exists() else None
                if linked:
                    found.append("finish: linked, upload not yet removed")
                elif size is None:
                    found.append("finish: data moved into blobs/, not yet linked")
                elif size < blob.size:
                    found.append("upload mid-write" if size else "upload created, no data yet")
                else:
                    found.append("upload written, finish not begun or cut before the move")
        manifest = image.manifest.read_bytes()
        hexdigest = digest_of(manifest).removeprefix("sha256:")
        tag_dir = repo / "_manifests/tags" / image.tag
        revision = (repo / "_manifests/revisions/sha256" / hexdigest / "link").exists()
        if (tag_dir / "current/link").exists():
            continue
        if tag_dir.exists():
            found.append("tag push: index written, current link not")
        elif revision:
            found.append("tag push: manifest stored, not tagged")
        elif blob_data_path(root, f"sha256:{hexdigest}").exists():
            found.append("tag push: manifest blob written, no revision link")
    return found


# --------------------------------------------------------------------------- finishing the work


def finish_work(m: Mount, images: list[Image], rng: random.Random) -> None:
    """What a user does after the crash: resume every upload at its size, redo the tags."""
    repo = m.path(REPO)
    uploads = repo / "uploads"
    blobs = {b.name: b for image in images for b in image.blobs}
    resumed = set()
    for name in sorted(os.listdir(uploads)):
        blob = blobs.get(name)
        if blob is None:  # created, but killed before its name was stored: start again
            assert UUID_RE.fullmatch(name), f"unexpected upload {name}"
            run("rm", uploads / name)
            continue
        size = os.stat(uploads / name).st_size
        with open(uploads / name, "rb") as f:
            assert f.read() == blob.data[:size], f"{name}: the {size} bytes kept are wrong"
        upload(m, blob, size, rng)
        resumed.add(name)
    for blob in blobs.values():
        if blob.name not in resumed and not (repo / "layers" / blob.digest).exists():
            upload(m, blob, 0, rng)
    for image in images:
        manifest = image.manifest.read_bytes()
        with contextlib.suppress(FileNotFoundError):
            if (repo / "tags" / image.tag).read_bytes() == manifest:
                continue
        run("cp", image.manifest, repo / "tags" / image.tag)


def upload(m: Mount, blob: Blob, size: int, rng: random.Random) -> None:
    """Write blob from `size` on (dd conv=notrunc), then finish it (mv; or close if by digest).

    A digest-named upload that is complete but unfinished has no tail to write, and a close
    without a write does not finish: it is copied again whole (cp truncates it first).
    """
    dest = m.path(REPO, "uploads", blob.name)
    if blob.by_digest and (size == blob.size or rng.random() < 0.5):
        run("cp", blob.source, dest)
        return
    run(
        "dd",
        f"if={blob.source}",
        f"of={dest}",
        "bs=64k",
        f"skip={size}",
        f"seek={size}",
        "iflag=skip_bytes",
        "oflag=seek_bytes",
        "conv=notrunc",
        "status=none",
    )
    if not blob.by_digest:
        run("mv", dest, m.path(REPO, "layers", blob.digest))


# --------------------------------------------------------------------------- checks


def assert_root_valid(root: Path) -> None:
    """check finds no damage, and every blob on disk hashes to its name.

    The one tolerated finding is `broken-upload` without a `data` file: an upload directory
    whose `startedat` is gone (a finish killed inside its final directory delete) or never
    arrived (a create killed before its first atomic put). It holds no bytes of anyone's
    upload, nothing links to it, neither regfs nor the registry lists it, and the registry's
    own finish (RemoveAll after the link) and DELETE leave the same; it is garbage, not damage
    to what is served. A `broken-upload` that still holds data would be a lost upload: fail.
    """
    findings = trio.run(partial(check, FilesystemDriver(root), verify=True))
    for finding in findings:
        if finding.severity != Severity.DAMAGE:
            continue
        assert finding.kind == "broken-upload", str(finding)
        assert not (root / finding.path.lstrip("/") / "data").exists(), str(finding)
    for data in (v2_root(root) / "blobs/sha256").glob("*/*/data"):
        assert sha256_file(data) == f"sha256:{data.parent.name}", (
            f"{data} does not hash to its name"
        )
    # An atomic put cut before its rename leaves `.tmp-*` (in blobs/ too, for a manifest):
    # never a blob, ignored by the registry, and check must report each one.
    temps = {str(p.relative_to(root)) for p in root.rglob(".tmp-*")}
    assert temps == {f.path.lstrip("/") for f in findings if f.kind == "temp-file"}


def assert_served(root: Path, workdir: Path, images: list[Image]) -> None:
    """The real registry on the root serves every blob and tag with the right digests.

    One HTTP client for every GET: RegistryClient opens one per request (~30 ms each).
    """
    with RegistryServer(root, workdir=workdir) as server, httpx.Client(timeout=30) as http:

        def get(path: str, **kw: object) -> httpx.Response:
            response = http.get(f"{server.url}/v2/{REPO}/{path}", **kw)
            assert response.status_code == 200, f"GET {path}: {response.text[:300]}"
            return response

        assert sorted(server.client().tags(REPO)) == sorted(image.tag for image in images)
        for image in images:
            for blob in image.blobs:
                content = get(f"blobs/{blob.digest}").content
                assert digest_of(content) == blob.digest
            manifest = image.manifest.read_bytes()
            digest = digest_of(manifest)
            for ref in (image.tag, digest):
                response = get(f"manifests/{ref}", headers={"Accept": OCI_MANIFEST})
                assert response.content == manifest
                assert response.headers["Content-Type"] == OCI_MANIFEST
                assert response.headers["Docker-Content-Digest"] == digest


def assert_complete_through(m: Mount, images: list[Image]) -> None:
    repo = m.path(REPO)
    assert os.listdir(repo / "uploads") == []
    for image in images:
        for blob in image.blobs:
            assert sha256_file(repo / "layers" / blob.digest) == blob.digest
        assert (repo / "tags" / image.tag).read_bytes() == image.manifest.read_bytes()


# --------------------------------------------------------------------------- the test


def wait_for_mark(marks: Path, target: str, scripts: list[subprocess.Popen]) -> None:
    """Until the target line is in marks (or every script has ended); polls every ms."""
    deadline = time.monotonic() + 30
    while target != "start":
        text = read_text(marks) or ""
        if target in text.splitlines() or all(s.poll() is not None for s in scripts):
            return
        assert time.monotonic() < deadline, f"marker {target!r} never came: {text}"
        time.sleep(0.001)


def kill_daemon(m: Mount) -> None:
    pids = m.pids()
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: not m.pids(), 10, "the killed daemon to be gone")


def wait_scripts(scripts: list[subprocess.Popen], images: list[Image]) -> None:
    """Each script either pushed its image or died of the dead connection, nothing else."""
    for script, image in zip(scripts, images, strict=True):
        _, stderr = script.communicate(timeout=20)
        text = stderr.decode(errors="replace")
        if script.returncode != 0:
            assert any(d in text for d in DEAD), f"{image.tag}: failed, not by the kill: {text}"


@pytest.mark.registry
@pytest.mark.parametrize("seed", SEEDS)
def test_kill_daemon_mid_push_then_resume(seed: int, tmp_path: Path, mount: Callable) -> None:
    rng = random.Random(seed)
    root = tmp_path / "root"
    images = plan_images(rng, tmp_path / "src")
    m: Mount = mount(root)
    os.makedirs(m.path(REPO))
    marks = tmp_path / "marks"
    target = rng.choice(kill_points(images))
    delay = rng.uniform(0, KILL_DELAYS[target.split()[0]])

    scripts = [
        subprocess.Popen(
            ["bash", "-c", push_script(image, m.path(REPO), marks)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "LC_ALL": "C"},
        )
        for image in images
    ]
    try:
        wait_for_mark(marks, target, scripts)
        time.sleep(delay)  # the seeded moment of the crash
        kill_daemon(m)
        wait_scripts(scripts, images)
    finally:
        for script in scripts:
            if script.poll() is None:
                script.kill()
                script.wait()

    state = crash_state(root, images)
    CRASH_POINTS.update(set(state) or {"nothing half done"})
    print(f"seed {seed}: killed {delay * 1000:.0f} ms after {target!r}: {state}")

    m.start()  # on the dead mountpoint: regfs mount cleans it up first
    finish_work(m, images, rng)
    assert_complete_through(m, images)
    m.stop()

    assert_root_valid(root)
    assert_served(root, tmp_path / "registry", images)
    ROUNDS_RUN.add(seed)


def test_crash_points_hit(capsys: pytest.CaptureFixture[str]) -> None:
    """Print which half-done states the kills left; most rounds must have cut something."""
    if set(SEEDS) != ROUNDS_RUN:
        pytest.skip("needs every round of test_kill_daemon_mid_push_then_resume")
    with capsys.disabled():
        print("\ncrash points hit (rounds that left each state):")
        for kind, count in CRASH_POINTS.most_common():
            print(f"  {count:3d}  {kind}")
    assert CRASH_POINTS["nothing half done"] <= len(SEEDS) // 2


# --------------------------------------------------------------------------- one state, fixed


@pytest.mark.parametrize("cut", ["after the move", "after the link"])
def test_upload_left_by_a_cut_finish_reads_empty_and_resumes(
    cut: str, tmp_path: Path, mount: Callable
) -> None:
    """A finish killed after moving the data into blobs/ leaves an upload without `data`.

    `ls -l` shows it with size 0 (the registry's view too), so reading it must give 0 bytes,
    not ENOENT (it did: the reader opened the missing file), and the user's resume, writing
    it again from 0 and `mv`, must complete it.
    """
    root = tmp_path / "root"
    data = random.Random(cut).randbytes(MIB + 7)
    digest = digest_of(data)

    async def cut_finish() -> None:
        driver = FilesystemDriver(root)
        repo = Registry(driver).repository(REPO)
        upload = await repo.layers.upload(label="cut")
        await upload.write(data)
        await upload.close()
        await driver.move(
            path_for(UploadData(REPO, upload.uuid)), path_for(BlobData(Digest.parse(digest)))
        )
        if cut == "after the link":
            await repo.layers.link(Digest.parse(digest))

    trio.run(cut_finish)
    m: Mount = mount(root)
    uploads = m.path(REPO, "uploads")
    assert os.listdir(uploads) == ["cut"]
    assert os.stat(uploads / "cut").st_size == 0
    assert run("cat", uploads / "cut").stdout == b""
    source = tmp_path / "blob"
    source.write_bytes(data)
    blob = Blob("cut", source, digest, by_digest=False)
    upload(m, blob, 0, random.Random(0))
    assert os.listdir(uploads) == []
    assert sha256_file(m.path(REPO, "layers", digest)) == digest
    m.stop()
    assert_root_valid(root)


# --------------------------------------------------------------------------- kill vs the kernel

CLIENT = """
import hashlib, os, sys
uploads, kind = sys.argv[1], sys.argv[2]
i = 0
try:
    while True:
        i += 1
        if kind == "create":  # holds uploads/'s lock while the daemon answers the create
            os.close(os.open(f"{uploads}/c{os.getpid()}-{i}", os.O_CREAT | os.O_WRONLY))
        else:  # finishes on close: uploads/<name> goes away behind the kernel's cache
            data = os.urandom(4096)
            name = "sha256:" + hashlib.sha256(data).hexdigest()
            fd = os.open(f"{uploads}/{name}", os.O_CREAT | os.O_WRONLY)
            os.write(fd, data)
            os.close(fd)
except OSError as exc:
    sys.exit(f"{kind}: {exc}")
"""


def stacks(pid: int) -> str:
    text = ""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            text += (task / "stack").read_text()
    return text


def test_kill_frees_clients_waiting_in_the_directory_it_changed(
    tmp_path: Path, mount: Callable
) -> None:
    """kill -9 while clients create and finish uploads in one directory frees the mount.

    The daemon used to tell the kernel about a finished upload (and a changed tag) with an
    entry invalidation. The kernel does that under the parent directory's lock, which a client
    in create() holds while it waits for the daemon. A daemon killed while its notification
    waited for that lock could not finish dying (that thread sleeps uninterruptibly), so
    /dev/fuse stayed open and the connection was never aborted: clients, zombie daemon and
    mount hung for good. Now such entries are not cached by the kernel and nothing is sent.
    The kill is aimed at a thread in fuse_reverse_inval_entry if one shows up within 1.5 s.
    """
    root = tmp_path / "root"
    m: Mount = mount(root)
    os.makedirs(m.path(REPO))
    uploads = str(m.path(REPO, "uploads"))
    (pid,) = m.pids()
    if not os.access(f"/proc/{pid}/task/{pid}/stack", os.R_OK):
        pytest.skip("needs /proc/PID/stack (root)")
    clients = [
        subprocess.Popen([sys.executable, "-c", CLIENT, uploads, kind], stderr=subprocess.PIPE)
        for kind in ("create", "create", "finish")
    ]
    try:
        deadline = time.monotonic() + 1.5
        while "fuse_reverse_inval_entry" not in stacks(pid) and time.monotonic() < deadline:
            time.sleep(0.0002)
        os.kill(pid, signal.SIGKILL)
        for client in clients:
            try:
                _, stderr = client.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"a client still hangs on the mount of the killed daemon:\n{stacks(pid)}"
                )
            assert any(d in stderr.decode() for d in DEAD), stderr.decode()
    finally:
        for client in clients:
            if client.poll() is None:
                # Abort the wedged connection (umount -f), or nothing can free the client.
                subprocess.run(["umount", "-f", m.mountpoint], capture_output=True, timeout=10)
                client.kill()
                client.wait(10)
