"""What the installed pyfuse3 offers beyond its release.

`make install` builds pyfuse3 with regfs's small patch (third_party/pyfuse3/): `readdir` learns
its directory's inode (`ReaddirToken.inode`), so opendir can answer ENOSYS and the kernel keeps
every listing (regfs/listings.py); and `readdir_reply` may hand an entry by name and type only
(`lookup=False`), so that listing N tags costs no inode in daemon or kernel; and
`Operations.getattr_kept` answers a GETATTR without a coroutine (an image directory's, asked
after each READDIR of it); and `readdir_ended` has the READDIR that only learns a listing's end
answered without one (an image directory's, which never changes); and `readdir_reply_many`
hands a run of a listing's entries in one call, their fields packed in arrays (no
`EntryAttributes` and no call per entry: regfs/directories.py); and a readdir's
`ReaddirToken.plus` says whether the kernel asked a READDIR (with
`Operations.enable_readdirplus_auto`: the rest of a plain `ls`), whose entries all go by
name, a run at a time (`readdir_reply_names`: names as they are, numbers in an array). A
stock pyfuse3 (a wheel from PyPI, as `pip install regfs` gets) works too, without these
savings: regfs asks which one it runs on, once.
"""

from __future__ import annotations

import pyfuse3

PATCHED: bool = hasattr(pyfuse3.ReaddirToken, "inode")
# Builds of the patch before getattr_kept lack it; a stock pyfuse3 never calls it.
GETATTR_KEPT: bool = hasattr(pyfuse3.Operations, "getattr_kept")
# Builds before readdir_ended ask readdir for the end of every listing.
READDIR_ENDED: bool = hasattr(pyfuse3, "readdir_ended")
# The fields readdir_reply_many takes per entry, in the order `Attributes.row` gives them;
# builds before it (or with other fields) hand a listing one readdir_reply per entry.
PACKED_FIELDS = (
    "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
    "st_blocks", "st_blksize", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
)  # fmt: skip
REPLY_MANY: bool = getattr(pyfuse3, "PACKED_FIELDS", None) == PACKED_FIELDS
# Builds before `ReaddirToken.plus` (and `readdir_reply_names`, which came with it) always
# ask READDIRPLUS.
READDIRPLUS_AUTO: bool = hasattr(pyfuse3.ReaddirToken, "plus")
