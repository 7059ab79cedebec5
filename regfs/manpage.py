"""regfs(1), written from the parser that prints `--help`, so the two cannot drift.

`python -m regfs.manpage > regfs.1` (make install runs it), or `regfs --print-man-page`.
Every command and option comes from regfs.cli.build_parser(); the prose around them (mount(8)
and fstab, files, exit status) is below, where an option name appears only as an example.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from importlib.metadata import version
from pathlib import Path

from .cli import build_parser

MOUNT_HELPER = """\
.SH MOUNT(8) AND FSTAB
.B make install
links
.B /sbin/mount.fuse.regfs
(and
.BR mount.regfs )
to
.BR regfs ,
so
.B mount \\-t fuse.regfs
and fstab lines of type
.B fuse.regfs
run
.B regfs mount \\-o OPTIONS SOURCE MOUNTPOINT
and take the same options, refused in the same words.
Without those links, fuse3's
.B mount.fuse
runs
.B regfs SOURCE MOUNTPOINT \\-o OPTIONS
(a
.B regfs
on its default PATH, such as /usr/local/bin, where pip as root installs it with the system's
Python), which works the same for
.BR "\\-t fuse.regfs" .
A regfs installed elsewhere (a virtualenv, pipx) needs the link:
.B ln \\-s \\(dq$(command \\-v regfs)\\(dq /sbin/mount.fuse.regfs
(this page:
.BR "regfs \\-\\-print\\-man\\-page" ).
.PP
.nf
mount \\-t fuse.regfs /var/lib/docker\\-registry /mnt/registry \\-o ro,tag_ttl=30
umount /mnt/registry
.fi
.PP
/etc/fstab:
.PP
.nf
/var/lib/docker\\-registry  /mnt/registry  fuse.regfs  ro,allow_other,uid=1000  0 0
https://registry.example.com  /mnt/remote  fuse.regfs  \
_netdev,ro,username=me,password_file=/etc/regfs/pw  0 0
.fi
.PP
A password never goes on a command line or in fstab: a remote registry's login comes from
root's
.I ~/.docker/config.json
or from
.BR password_file= ,
a file that must belong to root (or to the mounting user) and be closed to everyone else
(mode 600), or the mount is refused.
.B _netdev
makes systemd wait for the network before mounting;
.B nofail
and
.B x\\-systemd.*
options are for mount(8) and systemd and are ignored here.
"""

TRAILER = """\
.SH FILES
.TP
.I ~/.local/share/regfs/registry
the storage root used when no SOURCE is given
.TP
.I ~/.local/state/regfs/log/regfs.log
the background daemon's log, unless
.B \\-\\-log
or
.B log=
says otherwise
.TP
.I ~/.local/state/regfs
the state of uploads started over https://, so that a remount resumes them
.TP
.I ~/.docker/config.json
logins for remote registries (auths, credsStore, credHelpers)
.SH EXIT STATUS
.B regfs mount
and
.B umount
exit 0 on success, 1 when the mount or unmount failed, 2 for bad options or a bad SOURCE.
.B regfs check
exits 0 when nothing is wrong, 1 when all it found is what garbage collection or
.B purge\\-uploads
would remove, 2 for damage.
.SH SEE ALSO
.BR mount (8),
.BR fstab (5),
.BR mount.fuse3 (8),
.BR fusermount3 (1),
.BR systemd.mount (5)
"""


def roff(text: str) -> str:
    """Text as roff prints it: backslashes and hyphens escaped, no line taken as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def _home_as_tilde(text: str) -> str:
    """Help texts name the builder's own directories; the page says ~ for any user."""
    return text.replace(str(Path.home()), "~")


def _item(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    names = formatter._format_action_invocation(action)  # as --help writes it: -o OPTS
    text = formatter._expand_help(action) if action.help else ""
    return f".TP\n.B {roff(names)}\n{roff(_home_as_tilde(text))}\n"


def _actions(parser: argparse.ArgumentParser) -> str:
    """Every documented argument, group by group, as --help shows them."""
    formatter = parser._get_formatter()
    out = []
    for group in parser._action_groups:
        shown = [
            a
            for a in group._group_actions
            if a.help != argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)
        ]
        if shown:
            out.append(f".PP\n.I {roff(group.title or '')}\n")
            out.extend(_item(action, formatter) for action in shown)
    return "".join(out)


def _usage(parser: argparse.ArgumentParser) -> str:
    program, *usage = parser.format_usage().removeprefix("usage: ").split(" [", 1)
    return f".PP\n.B {roff(program)}\n{roff(' '.join(('[' + ''.join(usage)).split()))}\n"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """regfs's commands by name, in the order --help lists them."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def manpage(parser: argparse.ArgumentParser, when: datetime.date) -> str:
    commands = subcommands(parser)
    out = [
        f'.TH REGFS 1 "{when:%Y-%m-%d}" "regfs {version("regfs")}" "User Commands"\n',
        ".SH NAME\nregfs \\- a Linux filesystem view of a container registry\n",
        ".SH SYNOPSIS\n",
        *(_usage(command) for command in commands.values()),
        ".SH DESCRIPTION\n",
        roff(parser.description or "") + "\n",
        _actions(parser),
        ".SH COMMANDS\n",
    ]
    for name, command in commands.items():
        out.append(f".SS {roff(name)}\n{roff(_home_as_tilde(command.description or ''))}\n")
        out.append(_actions(command))
    return "".join(out) + MOUNT_HELPER + TRAILER


def build_date() -> datetime.date:
    """SOURCE_DATE_EPOCH when set (reproducible builds), else today."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).date()
    return datetime.date.today()


if __name__ == "__main__":
    sys.stdout.write(manpage(build_parser(), build_date()))
