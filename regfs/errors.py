"""The one place where exceptions become errnos; nothing else may escape a FUSE handler.

pyfuse3 turns only FUSEError into an errno: any other exception ends its main loop, so every
handler is wrapped. Expected errors are logged in one line; unexpected ones with a traceback.
An ExceptionGroup of one error (a nursery's: trio wraps even one) is that error
(`storage.nurseries.sole_error`); a group of several is unexpected.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3
from pyfuse3 import RequestContext as Context

from storage.errors import (
    AccessDenied,
    Busy,
    CorruptEntry,
    DigestMismatch,
    InvalidManifest,
    InvalidName,
    InvalidOffset,
    InvalidPath,
    NotEmpty,
    RemoteError,
    RemoteUnavailable,
)
from storage.nurseries import sole_error

log = logging.getLogger("regfs.ops")

P = ParamSpec("P")
T = TypeVar("T")

# Checked in order: the first class that matches decides.
ERRNOS: tuple[tuple[type[BaseException], int], ...] = (
    (AccessDenied, errno.EACCES),
    (RemoteUnavailable, errno.EIO),
    (LookupError, errno.ENOENT),  # not in the tree; unknown layer, manifest, tag, upload
    (RemoteError, errno.EIO),  # a registry's answer that no caller expected
    (CorruptEntry, errno.EIO),
    (Busy, errno.EBUSY),
    (NotEmpty, errno.ENOTEMPTY),
    (DigestMismatch, errno.EINVAL),
    (InvalidManifest, errno.EINVAL),
    (InvalidOffset, errno.EINVAL),
    (InvalidName, errno.EINVAL),
    (InvalidPath, errno.EINVAL),
    (IsADirectoryError, errno.EISDIR),
    (PermissionError, errno.EPERM),
)

LEVELS = {errno.ENOENT: logging.DEBUG, errno.EIO: logging.ERROR}


def errno_of(exc: BaseException) -> int | None:
    """The errno exc answers (a group of one error: that error's), or None: unexpected."""
    exc = sole_error(exc)
    if isinstance(exc, PermissionError) and exc.errno in (errno.EACCES, errno.EPERM):
        return exc.errno  # the system's own (EACCES: a root the daemon may not read)
    for kind, code in ERRNOS:
        if isinstance(exc, kind):
            return code
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return None


def _brief(arg: object) -> object:
    """A write's buffer is logged by its size: its repr (up to 4 bytes of log per byte) would
    swamp a --debug log and slow every write to the pace of the log file."""
    if isinstance(arg, bytes) and len(arg) > 64:
        return f"<{len(arg)} bytes>"
    return arg


def fuse_errors(
    handler: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Wrap a FUSE handler: log the call at debug level, map every exception to an errno."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        if log.isEnabledFor(logging.DEBUG):
            shown = tuple(_brief(a) for a in args[1:] if not isinstance(a, Context))
            log.debug("%s%r", name, shown)
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s", name, errno.errorcode.get(exc.errno, exc.errno))
            raise
        except Exception as error:
            failed = sole_error(error)
            if isinstance(failed, pyfuse3.FUSEError):  # a nursery's task answered an errno
                raise failed from None
            code = errno_of(failed)
            if code is None:
                log.exception("%s: unexpected error, answering EIO", name)
                raise pyfuse3.FUSEError(errno.EIO) from None
            # A missing name is routine (shells probe many); anything else is worth a line.
            level = LEVELS.get(code, logging.WARNING)
            log.log(level, "%s: %s (%s)", name, failed, errno.errorcode.get(code, code))
            raise pyfuse3.FUSEError(code) from None

    return wrapper
