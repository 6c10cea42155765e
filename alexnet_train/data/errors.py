"""The data package's error types, in a module that imports nothing of the package.

Usage::

    from alexnet_train.data.errors import BadImageError, DataError

    raise DataError(f"{root}: no image files found")
    raise BadImageError(path, "truncated JPEG")

Any data module (``decode``, ``datasets``, the ``alexnet-data`` ones) can import
these without importing another's code, so none of them import each other for
an exception class.  ``datasets`` re-exports ``DataError`` and ``BadImageError``,
where most callers take them from.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad data layout or labels; carries a one-line message naming the path."""


class BadImageError(RuntimeError):
    """An image file that cannot be decoded; the message names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: unreadable image ({reason})")
        self.path = path
        self.reason = reason


class PublicDataError(RuntimeError):
    """A download, archive or layout problem; the message names the file or URL at fault."""


class UsageError(ValueError):
    """Bad arguments (exit 2): a missing file given on the command line, an unknown size."""
