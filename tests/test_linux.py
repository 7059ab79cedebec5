"""regfs where Linux expects a filesystem: mount(8), fstab, fuse3's mount.fuse, `make install`
(helper, man page, completion), a release that installs, systemd units, progress bars.

The mount(8) tests need `make install` to have linked /sbin/mount.fuse.regfs to this
checkout's regfs (`make test` does, as root); they skip, saying so, where it points elsewhere.
"""

from __future__ import annotations

import configparser
import errno
import importlib.metadata
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import termios
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.credentials import docker_login
from support.mounts import REGFS, daemon_pids, is_mounted, regfs, wait_until
from support.registry import (
    RegistryServer,
    htpasswd_auth,
    started_registries,
    write_htpasswd,
)
from support.roots import build_root, link_blobs
from support.tools import C_LOCALE, errno_of, ls, sh

from regfs.cli import build_parser, main
from regfs.manpage import subcommands
from storage.drivers import FilesystemDriver
from storage.paths import UploadStartedAt, path_for
from storage.registry import Registry

pytestmark = pytest.mark.mount

PROJECT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(REGFS).parent
HELPER = Path("/sbin/mount.fuse.regfs")
MOUNT_FUSE3 = Path("/sbin/mount.fuse3")
USER, PASSWORD = "alice", "fstab-s3cret-Zq9"


def installed_here(path: Path) -> bool:
    """Whether `make install` linked path to this checkout's regfs."""
    return path.exists() and path.resolve() == Path(REGFS).resolve()


# Fixtures, not calls in the tests: pytest-trio drops the reason of a skip raised inside an
# async test, and a skip must say why.


@pytest.fixture
def installed_helper() -> None:
    if os.geteuid() != 0:
        pytest.skip("mount(8) with a helper mounts as root")
    if not installed_here(HELPER):
        pytest.skip(f"{HELPER} is not this checkout's regfs: `make install` as root links it")


@pytest.fixture
def installed_on_path() -> None:
    """regfs where a package installed as root puts it: /usr/local/bin (here make install's
    link), on /bin/sh's default PATH."""
    if not MOUNT_FUSE3.exists() or os.geteuid() != 0:
        pytest.skip(f"needs {MOUNT_FUSE3} (fuse3) and root")
    if not installed_here(Path("/usr/local/bin/regfs")):
        pytest.skip("/usr/local/bin/regfs is not this checkout's: `make install` links it")


def mount_options_of(mountpoint: Path) -> tuple[str, list[str]]:
    """The filesystem type and options /proc/mounts shows for mountpoint."""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == str(mountpoint):
                return fields[2], fields[3].split(",")
    raise AssertionError(f"{mountpoint} is not mounted")


def private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
async def root(tmp_path) -> Path:
    await build_root(tmp_path / "root", size=10_000)
    return tmp_path / "root"


@pytest.fixture
def servers(tmp_path) -> Iterator[Callable[..., RegistryServer]]:
    yield from started_registries(tmp_path)


# --------------------------------------------------------------------------- mount(8), fstab


@pytest.mark.usefixtures("installed_helper")
@pytest.mark.parametrize("fstype", ["fuse.regfs", "regfs"])
async def test_mount_t_regfs_then_umount(root, tmp_path, tracked, fstype):
    """`mount -t fuse.regfs` (and `-t regfs`) runs the installed helper with -o options;
    a plain `umount` unmounts and the daemon exits."""
    mnt, log = tmp_path / "mnt", tmp_path / "regfs.log"
    mnt.mkdir()
    m = tracked(mnt, log)
    sh("mount", "-t", fstype, root, mnt, "-o", f"ro,uid=1234,tag_ttl=2,log={log}")
    assert ls(mnt) == ["library"]
    assert os.stat(mnt / "library").st_uid == 1234
    kind, options = mount_options_of(mnt)
    assert kind == "fuse.regfs" and "ro" in options
    new_tag = mnt / "library" / "demo" / "tags" / "v2"
    assert errno_of(lambda: os.open(new_tag, os.O_WRONLY | os.O_CREAT)) == errno.EROFS
    (pid,) = m.pids()
    sh("umount", mnt)
    assert not is_mounted(mnt)
    wait_until(lambda: not m.pids(), 10, f"the daemon {pid} to exit after umount")
    assert "unmounted" in log.read_text()


def mounted_by_mount_fuse(command: list[str | Path], env: dict[str, str], mnt: Path) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert ls(mnt) == ["library"] and "ro" in mount_options_of(mnt)[1]
    assert regfs("umount", str(mnt)).returncode == 0 and not is_mounted(mnt)


async def test_fuse3_mount_fuse_runs_regfs_found_on_path(root, tmp_path, tracked):
    """fuse3's mount.fuse runs `regfs SOURCE MOUNTPOINT -o OPTIONS` (adding dev,suid)
    through /bin/sh, so a regfs anywhere on PATH (here the venv's) takes that form."""
    if not MOUNT_FUSE3.exists() or os.geteuid() != 0:
        pytest.skip(f"needs {MOUNT_FUSE3} (fuse3) and root")
    mnt, log = tmp_path / "mnt", tmp_path / "regfs.log"
    mnt.mkdir()
    tracked(mnt, log)
    command = [MOUNT_FUSE3, root, mnt, "-t", "fuse.regfs", "-o", f"ro,log={log}"]
    mounted_by_mount_fuse(command, {**C_LOCALE, "PATH": f"{VENV_BIN}:/usr/bin:/bin"}, mnt)


@pytest.mark.usefixtures("installed_on_path")
async def test_mount_8_finds_a_package_installed_as_root_without_the_helper(
    root, tmp_path, tracked
):
    """A package installed as root (pip) gives no /sbin/mount.fuse.regfs; for
    `-t fuse.regfs` mount(8) then runs /sbin/mount.fuse (shown with a type that has no
    helper), as for `-t fuse` with `regfs#SOURCE` (the form used here, so that make
    install's helper is not the one run). With no environment at all, mount.fuse's /bin/sh
    finds regfs on its default PATH, in /usr/local/bin, where pip as root puts it."""
    mnt, log = tmp_path / "mnt", tmp_path / "regfs.log"
    mnt.mkdir()
    tracked(mnt, log)
    mount = shutil.which("mount")
    assert mount is not None
    no_helper = subprocess.run(
        [mount, "-t", "fuse.regfs-no-helper", root, mnt], env={}, capture_output=True, text=True
    )
    assert "regfs-no-helper: not found" in no_helper.stderr, no_helper.stderr  # mount.fuse's sh
    command = [mount, "-t", "fuse", f"regfs#{root}", mnt, "-o", f"ro,log={log}"]
    mounted_by_mount_fuse(command, {}, mnt)


@pytest.mark.usefixtures("installed_helper")
async def test_fstab_lines_for_a_root_and_a_remote_registry(root, tmp_path, tracked, servers):
    """`mount -T FSTAB MNT` and `mount -a -T FSTAB` for a storage root and for a registry
    that wants a login, given by password_file= or by the Docker config (`_netdev`); the
    password shows nowhere; `umount` ends each. A password file open to others is refused
    through fstab too."""
    write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})
    await build_root(tmp_path / "root1", name="org/app", size=5_000)  # the server's root
    server = servers(auth=htpasswd_auth(tmp_path / "htpasswd"))
    password_file = private_file(tmp_path / "password", PASSWORD + "\n")
    open_file = private_file(tmp_path / "open-password", PASSWORD, 0o644)
    docker_login(tmp_path / "docker", server.host, USER, PASSWORD)
    local, remote, config = tmp_path / "local", tmp_path / "remote", tmp_path / "config"
    logs = {mnt: tmp_path / f"{mnt.name}.log" for mnt in (local, remote, config)}
    refused = tmp_path / "refused"
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# a storage root; a remote registry, its login from a file and from Docker's\n"
        f"{root}  {local}  fuse.regfs  ro,tag_ttl=2,nofail,log={logs[local]}  0 0\n"
        f"{server.url}  {remote}  fuse.regfs  _netdev,ro,username={USER},"
        f"password_file={password_file},x-systemd.mount-timeout=30,log={logs[remote]}  0 0\n"
        f"{server.url}  {config}  fuse.regfs  _netdev,ro,log={logs[config]}  0 0\n"
        f"{server.url}  {refused}  fuse.regfs  noauto,ro,username={USER},"
        f"password_file={open_file}  0 0\n"
    )
    # root's ~/.docker/config.json, as mount(8) leaves DOCKER_CONFIG alone
    env = {**C_LOCALE, "DOCKER_CONFIG": str(tmp_path / "docker")}
    for mnt in (local, remote, config, refused):
        mnt.mkdir()
    for mnt in (local, remote, config):
        tracked(mnt, logs[mnt])
    # One line by its mount point, then `mount -a`: the rest (not the noauto line, nor the
    # one mounted already)
    subprocess.run(["mount", "-T", fstab, local], env=env, check=True, timeout=60)
    subprocess.run(["mount", "-a", "-T", fstab], env=env, check=True, timeout=60)
    assert not is_mounted(refused)
    again = subprocess.run(["mount", "-a", "-T", fstab], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stderr == "", again.stderr  # all seen as mounted
    assert ls(local) == ["library"]
    for mnt in (remote, config):
        assert ls(mnt / "org" / "app" / "tags") == ["latest"]
        assert (mnt / "org" / "app" / "tags" / "latest").read_bytes().startswith(b"{")
    (pid,) = daemon_pids(remote)
    for place in (f"/proc/{pid}/cmdline", f"/proc/{pid}/environ", "/proc/mounts"):
        assert PASSWORD.encode() not in Path(place).read_bytes(), place
    for mnt in (local, remote, config):
        sh("umount", mnt)
        assert not is_mounted(mnt)
        assert PASSWORD not in logs[mnt].read_text()
    said = sh("mount", "-T", fstab, refused, check=False)
    assert said.returncode != 0 and not is_mounted(refused)
    assert f"password file {open_file} is open to others (mode 644)" in said.stderr, said.stderr


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: private_file(p, PASSWORD, 0o644), "is open to others (mode 644): chmod 600"),
        (lambda p: private_file(p, PASSWORD, 0o640), "is open to others (mode 640)"),
        (
            lambda p: os.chown(private_file(p, PASSWORD), 4321, 4321),
            "belongs to uid 4321: it must be root's or yours",
        ),
        (os.mkfifo, "is not a regular file"),
        (lambda p: None, "No such file or directory"),
        (lambda p: private_file(p, "\nsecond line"), "holds no password on its first line"),
    ],
    ids=["world-readable", "group-readable", "other-owner", "fifo", "missing", "empty"],
)
def test_a_password_file_open_to_others_is_refused(tmp_path, capsys, make, words):
    """Nothing is contacted and nothing mounted; the message names the file and the fix.
    (In-process: the refusal comes before anything a daemon would do.)"""
    make(tmp_path / "pw")
    (tmp_path / "mnt").mkdir()
    login = f"username={USER},password_file={tmp_path / 'pw'}"
    assert main(["mount", "-o", login, "http://127.0.0.1:9", str(tmp_path / "mnt")]) == 2
    said = capsys.readouterr().err
    assert said.startswith(f"regfs: mount failed: password file {tmp_path / 'pw'}"), said
    assert words in said and PASSWORD not in said and not is_mounted(tmp_path / "mnt")


def test_a_password_file_needs_a_user_name(tmp_path, capsys):
    private_file(tmp_path / "pw", PASSWORD)
    argv = ["mount", "--password-file", str(tmp_path / "pw"), "http://127.0.0.1:9", "/mnt"]
    assert main(argv) == 2
    said = capsys.readouterr().err
    assert "a password file needs a user name: username=USER or --username" in said


@pytest.mark.usefixtures("installed_helper")
@pytest.mark.parametrize(
    "bad",
    [
        "bogus",
        "ro,uid=someone",
        "index_cache_size=lots",
        f"username={USER},password_file=/nonexistent/pw",
    ],
)
def test_bad_options_are_refused_in_the_same_words_by_every_route(tmp_path, bad):
    """regfs mount -o, mount -t fuse.regfs (the helper) and fuse3's mount.fuse all say the
    same, exit 2, and mount nothing."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    routes = {
        "regfs mount": [REGFS, "mount", "-o", bad, "inmemory:", str(mnt)],
        "mount -t": ["mount", "-t", "fuse.regfs", "inmemory:", str(mnt), "-o", bad],
        "mount.fuse3": [str(MOUNT_FUSE3), "inmemory:", str(mnt), "-t", "fuse.regfs", "-o", bad],
    }
    env = {**C_LOCALE, "PATH": f"{VENV_BIN}:/usr/bin:/bin"}
    said = {}
    for route, command in routes.items():
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 2, (route, result.stderr)
        said[route] = result.stderr
    assert said["regfs mount"].startswith("regfs: mount failed: "), said
    assert said["mount -t"] == said["regfs mount"] == said["mount.fuse3"], said
    assert not is_mounted(mnt)


def test_helper_usage_errors_are_clear(tmp_path):
    """What mount(8) could pass that regfs cannot honour is refused by name; `mount -f`
    (fake) checks the options and mounts nothing."""
    helper = tmp_path / "mount.fuse.regfs"  # regfs knows the name it is run by
    helper.symlink_to(REGFS)
    for args, words in (
        (["-t", "ext4"], "type 'ext4' is not regfs's (fuse.regfs or regfs)"),
        (["-N", "/proc/1/ns/mnt"], "-N: mounting in another mount namespace is not supported"),
    ):
        result = sh(helper, "inmemory:", tmp_path, *args, check=False)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert result.stderr.startswith("usage: mount.fuse.regfs ")
        assert "SOURCE MOUNTPOINT" in result.stderr
    fake = sh(helper, "inmemory:", tmp_path, "-f", "-o", "ro,tag_ttl=3")
    assert fake.stderr == "" and not is_mounted(tmp_path)
    refused = sh(helper, "inmemory:", tmp_path, "-f", "-o", "tag_ttl=soon", check=False)
    assert refused.returncode == 2
    assert refused.stderr == "regfs: mount failed: -o tag_ttl: bad value 'soon'\n"


# --------------------------------------------------------------------------- install, docs


def test_make_install_puts_helper_man_page_and_completion(tmp_path):
    dest = tmp_path / "dest"
    sh("make", "-s", "-C", PROJECT, "-o", ".venv/.installed", "system", f"DESTDIR={dest}")
    for link in ("sbin/mount.fuse.regfs", "sbin/mount.regfs", "usr/local/bin/regfs"):
        assert (dest / link).resolve() == Path(REGFS).resolve(), link
    if shutil.which("man"):
        page = subprocess.run(
            ["man", "-M", dest / "usr/local/share/man", "-P", "cat", "regfs"],
            capture_output=True,
            text=True,
            env={**C_LOCALE, "MANWIDTH": "200"},
        )
        assert page.returncode == 0, page.stderr
        assert "--index-cache-size SIZE" in page.stdout and "mount.fuse.regfs" in page.stdout
    completion = dest / "usr/local/share/bash-completion/completions/regfs"
    for line, expected in (
        ("regfs pur", ["purge-uploads"]),
        ("regfs mount --index-c", ["--index-cache-size"]),
        ("regfs check --v", ["--verify"]),
    ):
        words = line.split(" ")
        script = (
            f"source {completion}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
            f'COMP_LINE="{line}"; COMP_POINT={len(line)}; _shtab_regfs; '
            'printf "%s\\n" "${COMPREPLY[@]}"'
        )
        assert sh("bash", "-c", script).stdout.split() == expected, line


BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


@pytest.mark.usefixtures("installed_helper")
def test_make_install_put_them_where_linux_looks():
    """On this machine, as `make install` left it: `man regfs` finds regfs(1) on man's own
    search path, bash-completion's loader finds regfs's completion, and `regfs` is on
    /bin/sh's default PATH (what mount(8), fuse3 and an empty environment see)."""
    page = sh("man", "-w", "regfs")
    assert page.stdout.strip().endswith("/man1/regfs.1"), page.stdout
    shown = subprocess.run(
        ["man", "-P", "cat", "regfs"],
        capture_output=True,
        text=True,
        env={**C_LOCALE, "MANWIDTH": "200"},
    )
    assert "--index-cache-size SIZE" in shown.stdout and "mount.fuse.regfs" in shown.stdout
    found = subprocess.run(
        ["/bin/sh", "-c", "command -v regfs"], capture_output=True, text=True, env={}
    )
    assert Path(found.stdout.strip()).resolve() == Path(REGFS).resolve(), found
    if not BASH_COMPLETION.exists():
        pytest.skip(f"{BASH_COMPLETION} missing: `make install` installs bash-completion")
    loaded = subprocess.run(
        ["bash", "-c", f"source {BASH_COMPLETION}; __load_completion regfs; complete -p regfs"],
        capture_output=True,
        text=True,
        env={},
    )
    assert loaded.stdout.strip() == "complete -o bashdefault -F _shtab_regfs regfs", loaded


def roff_sections(page: str) -> dict[str, str]:
    """A man page's roff source as plain text per section (.SH) and command (.SS)."""
    text = page.replace("\\-", "-").replace("\\&", "").replace("\\e", "\\")
    sections: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if line.startswith((".SH ", ".SS ")):
            name = line[4:].strip()
        sections[name] = sections.get(name, "") + line + "\n"
    return sections


def option_names(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", text))


def test_man_page_and_help_list_the_same_options():
    """Per command, the options regfs(1) documents are those `--help` prints; the -o
    names mount accepts are in both."""
    page = roff_sections(sh(sys.executable, "-m", "regfs.manpage").stdout)
    top = option_names(regfs("--help").stdout)
    assert option_names(page["DESCRIPTION"]) == top >= {"--version", "--print-completion"}
    for command, parser in subcommands(build_parser()).items():  # what `CMD --help` prints
        assert option_names(page[command]) == option_names(parser.format_help()), command
    assert set(subcommands(build_parser())) == {"mount", "umount", "check", "purge-uploads"}
    known = regfs("mount", "-o", "bogus", "inmemory:", "/nonexistent").stderr
    names = re.findall(r"(\w+)=?…?", known.split("known: ", 1)[1])
    assert len(names) > 15
    mount_help = " ".join(regfs("mount", "--help").stdout.split())
    for name in names:
        assert re.search(rf"\b{name}\b", mount_help), name
        assert re.search(rf"\b{name}\b", page["mount"]), name


def test_print_man_page_is_the_page_make_install_writes():
    """For a regfs installed without make (pip): the same page, from its own interpreter."""
    env = {**C_LOCALE, "SOURCE_DATE_EPOCH": "1764374400"}  # 2025-11-29: the date shown
    printed = subprocess.run(
        [REGFS, "--print-man-page"], capture_output=True, text=True, env=env, check=True
    )
    written = subprocess.run(
        [sys.executable, "-m", "regfs.manpage"], capture_output=True, text=True, env=env
    )
    assert printed.stdout == written.stdout
    assert printed.stdout.startswith('.TH REGFS 1 "2025-11-29" "regfs ')


def test_version_is_the_package_version_and_the_changelogs_newest_release():
    version = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["version"]
    assert importlib.metadata.version("regfs") == version
    result = regfs("--version")
    assert result.returncode == 0 and result.stdout == f"regfs {version}\n"
    # CHANGELOG.md: what is not released yet (if any) on top, then this version and its date.
    headings = re.findall(r"(?m)^## (.*)$", (PROJECT / "CHANGELOG.md").read_text())
    released = headings[1:] if headings[0] == "Unreleased" else headings
    assert re.fullmatch(rf"{re.escape(version)} — \d{{4}}-\d\d-\d\d", released[0]), headings


# pip's cache as the user has it, read at import: conftest's private XDG_CACHE_HOME (set
# later, for the session) would make pip fetch and build every dependency again (~40 s more).
PIP_CACHE = os.environ.get("PIP_CACHE_DIR") or str(
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip"
)
OFFLINE = ("No matching distribution", "Could not find a version", "Network is unreachable")


def built_or_skip(result: subprocess.CompletedProcess[str], what: str) -> None:
    """Fail on a build error; skip only where the packages it needs cannot be fetched."""
    if result.returncode != 0:
        if any(sign in result.stdout + result.stderr for sign in OFFLINE):
            pytest.skip(f"{what}: cannot fetch packages here: {result.stderr[-500:]}")
        raise AssertionError(f"{what} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def test_make_dist_wheel_installs_into_a_fresh_venv_and_mounts(tmp_path, tracked):
    """`make dist` builds an sdist and, from it, a wheel; the wheel and its dependencies
    install into a new virtualenv, whose regfs mounts inmemory:, lists, and unmounts."""
    dist = tmp_path / "dist"
    # pip's cache; no PYTHONPATH: a checkout on it (its regfs.egg-info, left by `make dist`)
    # would make pip call regfs installed already and install nothing.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PIP_CACHE_DIR": PIP_CACHE
    }
    built = subprocess.run(
        ["make", "-s", "-C", PROJECT, "-o", ".venv/.installed", "dist", f"DISTDIR={dist}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean,
    )
    built_or_skip(built, "make dist")
    version = importlib.metadata.version("regfs")
    (wheel,) = dist.glob(f"regfs-{version}-py3-none-any.whl")
    (sdist,) = dist.glob(f"regfs-{version}.tar.gz")
    listing = sh("tar", "-tzf", sdist).stdout.split()
    for name in ("LICENSE", "README.md", "CHANGELOG.md", "regfs/cli.py", "storage/api.py"):
        assert f"regfs-{version}/{name}" in listing, name
    venv = tmp_path / "venv"
    # No pip of its own (ensurepip takes ~8 s): this venv's pip installs into it.
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", venv / "bin/python", "install", "-q", wheel],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean,
    )
    built_or_skip(installed, "pip install of the wheel")
    fresh = str(venv / "bin/regfs")
    assert sh(fresh, "--version").stdout == f"regfs {version}\n"
    mnt, log = tmp_path / "mnt", tmp_path / "regfs.log"
    mnt.mkdir()
    tracked(mnt, log)
    sh(fresh, "mount", "--log", log, "inmemory:", mnt)
    (mnt / "smoke" / "test").mkdir(parents=True)
    assert ls(mnt) == ["smoke"]
    daemon = Path(f"/proc/{daemon_pids(mnt)[0]}/cmdline").read_bytes().split(b"\0")[0]
    assert Path(daemon.decode()).parent == venv / "bin", "the daemon is not the new venv's"
    sh(fresh, "umount", mnt)
    assert not is_mounted(mnt)
    metadata = (venv / "lib").glob("python3*/site-packages/regfs-*.dist-info/METADATA")
    assert "License-Expression: Apache-2.0" in next(metadata).read_text()


# --------------------------------------------------------------------------- systemd


def documented_units() -> dict[str, str]:
    """The unit files docs/systemd.md shows: ini blocks whose first line names the path."""
    text = (PROJECT / "docs" / "systemd.md").read_text()
    blocks = re.findall(r"```ini\n# (/etc/systemd/system/\S+)\n(.*?)```", text, re.DOTALL)
    return {Path(path).name: body for path, body in blocks}


def unit_fields(body: str) -> configparser.ConfigParser:
    """A unit file's [Section] Key=value fields (these units set no key twice)."""
    unit = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    unit.optionxform = str  # keys as written: ExecStart, not execstart
    unit.read_string(body)
    return unit


def test_systemd_units_in_the_docs_are_what_regfs_takes(tmp_path):
    """Runs everywhere (no systemd needed): the mount unit is named after its Where= and is
    of regfs's type, with options regfs accepts (the helper's -f checks them, mounting
    nothing); the service runs `regfs mount --foreground`, as systemd must supervise it."""
    units = documented_units()
    assert set(units) == {"mnt-registry.mount", "regfs-registry.service"}
    mount = unit_fields(units["mnt-registry.mount"])
    where = mount["Mount"]["Where"]
    assert where.strip("/").replace("/", "-") + ".mount" == "mnt-registry.mount"
    assert mount["Mount"]["Type"] == "fuse.regfs" and mount["Install"]["WantedBy"]
    helper = tmp_path / "mount.fuse.regfs"
    helper.symlink_to(REGFS)
    options = mount["Mount"]["Options"]
    checked = sh(helper, "inmemory:", tmp_path, "-f", "-o", options, check=False)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    service = unit_fields(units["regfs-registry.service"])["Service"]
    assert service["Type"] == "exec" and service["Restart"] == "on-failure"
    program, *argv = service["ExecStart"].split()
    assert program == "/usr/local/bin/regfs"
    args = build_parser().parse_args(argv)
    assert args.command == "mount" and args.foreground and args.read_only


@pytest.fixture
def systemd() -> str:
    """ "start" where systemd runs the machine (and we are root), else systemd-analyze."""
    if Path("/proc/1/comm").read_text().strip() == "systemd" and os.geteuid() == 0:
        return "start"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd is not PID 1 here and systemd-analyze is not installed")
    return analyze


async def test_systemd_units_in_the_docs(tmp_path, root, tracked, systemd):
    """Where systemd runs the machine, the mount unit is started and stopped for real (on a
    tmp mountpoint); else every documented unit passes `systemd-analyze verify` (the
    service's regfs taken from this checkout where `make install` has not linked it)."""
    units = documented_units()
    if systemd == "start":
        start_mount_unit(units["mnt-registry.mount"], tmp_path, root, tracked)
        return
    if not Path("/usr/local/bin/regfs").exists():
        units = {k: v.replace("/usr/local/bin/regfs", REGFS) for k, v in units.items()}
    for name, body in units.items():
        (tmp_path / name).write_text(body)
    result = subprocess.run(
        [systemd, "verify", *(tmp_path / name for name in units)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    # It does check: a mount unit whose name is not its Where= is refused.
    (tmp_path / "mnt-other.mount").write_text(units["mnt-registry.mount"])
    wrong = subprocess.run([systemd, "verify", tmp_path / "mnt-other.mount"], capture_output=True)
    assert wrong.returncode != 0


def start_mount_unit(body: str, tmp_path: Path, root: Path, tracked: Callable) -> None:
    mnt, log = tmp_path / "mnt", tmp_path / "regfs.log"
    mnt.mkdir()
    tracked(mnt, log)
    name = sh("systemd-escape", "--path", "--suffix=mount", mnt).stdout.strip()
    body = re.sub(r"(?m)^What=.*$", f"What={root}", body)
    body = re.sub(r"(?m)^Where=.*$", f"Where={mnt}", body)
    body = re.sub(r"(?m)^Options=.*$", f"Options=ro,log={log}", body)
    unit = Path("/run/systemd/system") / name
    unit.write_text(body)
    try:
        sh("systemctl", "daemon-reload")
        sh("systemctl", "start", name)
        assert ls(mnt) == ["library"]
        sh("systemctl", "stop", name)
        assert not is_mounted(mnt)
    finally:
        unit.unlink()
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True)


# --------------------------------------------------------------------------- progress


def on_a_terminal(*args: str, timeout: float = 60) -> tuple[int, str]:
    """Run regfs with stdout and stderr on a pseudo-terminal; its exit status and output."""
    controller, terminal = pty.openpty()
    termios.tcsetwinsize(terminal, (24, 120))  # a new pty is 0x0: tqdm would draw nothing
    try:
        proc = subprocess.Popen(
            [REGFS, *args], stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal
        )
        os.close(terminal)
        terminal = -1
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the terminal's other side is closed
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=10), out.decode(errors="replace")
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)


async def big_root(root: Path) -> None:
    """Blobs enough for progress to show, and stale uploads for purge-uploads."""
    await build_root(root, size=3 << 20)
    await link_blobs(root, "org/app", [os.urandom(1 << 20) for _ in range(4)])
    driver = FilesystemDriver(root)
    repo = Registry(driver).repository("org/app")
    for _ in range(5):
        upload = await repo.layers.upload()
        await upload.write(b"partial")
        await upload.close()
        await driver.put_content(
            path_for(UploadStartedAt("org/app", upload.uuid)), b"2020-01-01T00:00:00Z"
        )


async def test_check_verify_and_purge_show_progress_on_a_terminal_only(tmp_path):
    root = tmp_path / "root"
    await big_root(root)
    code, shown = on_a_terminal("check", "--verify", str(root))
    assert code == 1, shown  # the stale uploads: maintenance
    assert re.search(r"hashing blobs: 100%\|.*\| 7\.\d+M/7\.\d+M", shown), shown
    assert "checking repositories: 100%" in shown and "5 findings, 0 damage" in shown
    quiet = regfs("check", "--verify", str(root))
    assert quiet.returncode == 1 and quiet.stderr == "5 findings, 0 damage\n", quiet.stderr
    assert "%" not in quiet.stdout

    quiet = regfs("purge-uploads", "--older-than", "1h", "--dry-run", str(root))
    assert quiet.stderr == "would delete 5 uploads\n", quiet.stderr
    code, shown = on_a_terminal("purge-uploads", "--older-than", "1h", str(root))
    assert code == 0 and re.search(r"reading uploads: 100%\|.*\| 5/5", shown), shown
    assert "deleted 5 uploads" in shown
    assert regfs("check", str(root)).returncode == 0
