"""All-or-nothing output: write to temporary files beside the target, rename at the end.

A conversion that fails or is interrupted leaves nothing behind, and a reader never sees a
half-written image under the target's name.
"""

from __future__ import annotations

import os
import tempfile

from .errors import InvalidInputError

__all__ = ["AtomicOutput"]


class AtomicOutput:
    """The files one conversion writes: a main file and, for some formats, companions.

    Use as a context manager: ``commit()`` inside the block makes the files appear; leaving the
    block without it (an error, Ctrl-C) removes every temporary file.
    """

    def __init__(self, target: str, *, sync: bool = True) -> None:
        self.target = os.path.abspath(target)
        #: fsync every file before it is renamed, so a crash never leaves a short image under
        #: the final name. qemu-img convert does not flush (its default cache mode is unsafe).
        self.sync = sync
        self.directory = os.path.dirname(self.target)
        if os.path.isdir(self.target):
            raise InvalidInputError(f"{target}: is a directory")
        if not os.path.isdir(self.directory):
            raise InvalidInputError(
                f"cannot write {target}: folder {self.directory} does not exist"
            )
        self._temps: dict[str, str] = {}  # final path -> temporary path
        self.path = self._temp_for(self.target)
        self._committed = False

    def _temp_for(self, final: str) -> str:
        try:
            fd, tmp = tempfile.mkstemp(
                dir=os.path.dirname(final), prefix=f".{os.path.basename(final)}.", suffix=".part"
            )
        except OSError as exc:
            raise InvalidInputError(f"cannot write {final}: {exc.strerror or exc}") from None
        os.close(fd)
        self._temps[final] = tmp
        return tmp

    def companion(self, filename: str) -> str:
        """A temporary path for a file that will sit beside the target as ``filename``."""
        if os.path.basename(filename) != filename or filename in ("", ".", ".."):
            raise InvalidInputError(f"companion file name {filename!r} must be a plain name")
        final = os.path.join(self.directory, filename)
        if final in self._temps:
            return self._temps[final]
        return self._temp_for(final)

    def commit(self) -> None:
        """Give every file its final name (companions first, so the main file never dangles)."""
        mask = os.umask(0)
        os.umask(mask)
        order = [f for f in self._temps if f != self.target] + [self.target]
        for final in order:
            tmp = self._temps[final]
            if self.sync:
                _fsync_path(tmp)
            os.chmod(tmp, 0o666 & ~mask)
            os.replace(tmp, final)
        self._committed = True
        if not self.sync:
            return
        try:
            dir_fd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass  # some filesystems cannot fsync a directory; the rename already happened
        finally:
            os.close(dir_fd)

    def abort(self) -> None:
        """Remove every temporary file that was not committed."""
        if self._committed:
            return
        for tmp in self._temps.values():
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.abort()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
