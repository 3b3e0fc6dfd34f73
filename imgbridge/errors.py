"""The error taxonomy shared by the library and the CLI.

Every error the library raises on purpose is an ``ImgBridgeError``. The CLI maps each one to a
single line on stderr and an exit code; anything else is a bug and is reported as such.
"""

from __future__ import annotations


class ImgBridgeError(Exception):
    """Base of every error imgbridge raises on purpose.

    ``hint`` is an optional sentence telling the user what to do about it.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InvalidInputError(ImgBridgeError):
    """The caller asked for something that cannot be done (bad option, missing file, ...)."""


class InvalidImageError(ImgBridgeError):
    """The input image is corrupt or truncated.

    ``format``, ``path`` and ``offset`` locate the damage when they are known.
    """

    def __init__(
        self,
        message: str,
        *,
        format: str | None = None,
        path: str | None = None,
        offset: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.format = format
        self.path = path
        self.offset = offset

    def __str__(self) -> str:
        where = []
        if self.path:
            where.append(self.path)
        if self.format:
            where.append(self.format)
        if self.offset is not None:
            where.append(f"offset {self.offset:#x}")
        prefix = f"{': '.join(where)}: " if where else ""
        return f"{prefix}{self.message}"


class UnsupportedFeatureError(ImgBridgeError):
    """The input is valid but uses a feature imgbridge does not implement; the message names it."""


class MissingCompanionError(ImgBridgeError):
    """A file the image refers to (backing file, extent, data file) is missing or not allowed."""


class InternalError(ImgBridgeError):
    """A bug in imgbridge: an invariant did not hold."""
