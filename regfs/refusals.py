"""What the mount refuses on its own, before storage is asked: one errno and one log line."""

from __future__ import annotations

import errno
import logging

from pyfuse3 import FUSEError

from .nodes import Node

log = logging.getLogger(__name__)


def refusal(operation: str, node: Node | None, read_only: bool) -> FUSEError:
    """A change the mount does not make: EROFS on a read-only mount, else EPERM."""
    code = errno.EROFS if read_only else errno.EPERM
    log.info("%s: refused on %s (%s)", operation, node, errno.errorcode[code])
    return FUSEError(code)


def decode_name(raw: bytes, invalid: int = errno.ENOENT) -> str:
    """A name as text; bytes that are not UTF-8 never name anything (ENOENT), and make
    no new name (pass EINVAL, as for any other invalid name)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FUSEError(invalid) from None
