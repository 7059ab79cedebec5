"""Typed storage errors; the mount maps each kind to one errno."""


class StorageError(Exception):
    """Base of every error the storage layer raises on purpose."""


class InvalidPath(StorageError, ValueError):
    """A storage path outside the grammar every driver is held to (see drivers/base)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"invalid storage path: {path!r}")
        self.path = path


class InvalidName(StorageError, ValueError):
    """A repository name, tag or digest that the registry's grammar refuses."""


class UnsupportedDigest(InvalidName):
    """A digest algorithm that is valid in the grammar but not supported here."""


class UnknownRepository(StorageError, LookupError):
    pass


class UnknownLayer(StorageError, LookupError):
    pass


class UnknownUpload(StorageError, LookupError):
    pass


class UnknownManifest(StorageError, LookupError):
    pass


class UnknownTag(StorageError, LookupError):
    pass


class DigestMismatch(StorageError):
    def __init__(self, expected: object, actual: object) -> None:
        super().__init__(f"content digest {actual} does not match {expected}")
        self.expected = expected
        self.actual = actual


class AccessDenied(StorageError, PermissionError):
    """The registry refused the credentials (401) or the action (403)."""


class RemoteUnavailable(StorageError):
    """The registry did not answer usefully after retries (timeouts, 5xx, 429, refused)."""


class NotEmpty(StorageError):
    """A repository that rmdir cannot remove: it holds tags, layers, uploads or others below."""


class Busy(StorageError):
    """Someone else (this process or another) is writing the same file."""


class InvalidOffset(StorageError, ValueError):
    """A write or read at an offset the object does not allow (a gap, a negative offset)."""


class InvalidManifest(StorageError, ValueError):
    """A manifest that fails one of the registry's checks; the message names the check."""


class MissingReference(InvalidManifest):
    """A manifest names a blob (`child` false) or, an index, a manifest (`child` true) that
    its repository lacks."""

    def __init__(self, message: str, child: bool) -> None:
        super().__init__(message)
        self.child = child


class CorruptEntry(StorageError):
    """A storage entry that exists but cannot be understood (garbage link, bad startedat)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"corrupt storage entry {path}: {why}")
        self.path = path


class UnsafeEntry(CorruptEntry):
    """An entry the filesystem driver will not go through: a symbolic link anywhere below the
    root, or a hard-linked file opened for writing. Whoever can write a root (another user's
    registry, a shared volume) must not steer the daemon, often root, to a file outside it."""


class RemoteError(StorageError):
    """The registry answered with a status the caller did not expect.

    `status` is the HTTP status, `codes` the distribution error codes of the body
    (`{"errors": [{"code": ...}]}`), e.g. `("BLOB_UPLOAD_INVALID",)`.
    """

    def __init__(self, message: str, *, status: int, codes: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.codes = codes
