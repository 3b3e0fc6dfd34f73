"""All-or-nothing output: write to temporary files beside the target, rename at the end.

A conversion that fails or is interrupted leaves nothing behind, and a reader never sees a
half-written image under the target's name.
"""

from __future__ import annotations

import builtins
import os
import shutil
import tempfile
from typing import BinaryIO

from .errors import InvalidInputError, UnsupportedFeatureError

__all__ = ["AtomicOutput", "Output", "StreamOutput"]


class AtomicOutput:
    """The files one conversion writes: a main file and, for some formats, companions.

    Use as a context manager: ``commit()`` inside the block makes the files appear; leaving the
    block without it (an error, Ctrl-C) removes every temporary file.
    """

    def __init__(self, target: str, *, sync: bool = True, directory: bool = False) -> None:
        self.target = os.path.abspath(target)
        #: fsync every file before it is renamed, so a crash never leaves a short image under
        #: the final name. qemu-img convert does not flush (its default cache mode is unsafe).
        self.sync = sync
        self.directory = os.path.dirname(self.target)
        #: The target is a folder (an OCI layout): ``path`` is then a temporary folder beside
        #: it, renamed as a whole at commit, so a reader never sees a half-written layout.
        self.is_directory = directory
        if directory:
            if os.path.lexists(self.target) and not (
                    os.path.isdir(self.target) and not os.path.islink(self.target)
                    and not os.listdir(self.target)):
                # rename() replaces only an empty folder; refusing anything else also keeps
                # a conversion from silently merging into (or destroying) an existing image.
                raise InvalidInputError(f"{target}: already exists",
                                        hint="remove it or choose another name")
        elif os.path.isdir(self.target):
            raise InvalidInputError(f"{target}: is a directory")
        if not os.path.isdir(self.directory):
            raise InvalidInputError(
                f"cannot write {target}: folder {self.directory} does not exist"
            )
        self._temps: dict[str, str] = {}  # final path -> temporary path
        self.path = self._temp_dir_for(self.target) if directory else self._temp_for(self.target)
        self._committed = False

    def _temp_dir_for(self, final: str) -> str:
        try:
            tmp = tempfile.mkdtemp(dir=os.path.dirname(final),
                                   prefix=f".{os.path.basename(final)}.", suffix=".part")
        except OSError as exc:
            raise InvalidInputError(f"cannot write {final}: {exc.strerror or exc}") from None
        self._temps[final] = tmp
        return tmp

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

    def open_sequential(self) -> BinaryIO:
        """A write-only stream over the main file, for writers that never seek back.

        Formats with the ``sequential-write`` capability write through this alone, so the same
        writer can send its output to a pipe (see ``StreamOutput``).
        """
        return builtins.open(self.path, "wb")

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
            if os.path.isdir(tmp):
                if self.sync:
                    _fsync_tree(tmp)
                os.chmod(tmp, 0o777 & ~mask)
            else:
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
                if os.path.isdir(tmp) and not os.path.islink(tmp):
                    shutil.rmtree(tmp)
                else:
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


def _fsync_tree(root: str) -> None:
    """fsync every file and folder under ``root`` (a directory output), folders last."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        try:
            _fsync_path(dirpath)
        except OSError:
            pass  # some filesystems cannot fsync a directory


class StreamOutput:
    """Output to an already open stream (``-`` as DST: standard output), for formats with the
    ``sequential-write`` capability. There is nothing to rename: the stream is the result.
    """

    def __init__(self, stream: BinaryIO, name: str = "<stdout>") -> None:
        self._stream = stream
        self.target = name
        self.sync = False

    @property
    def path(self) -> str:
        raise UnsupportedFeatureError(
            "this output format needs a seekable file; it cannot be written to a pipe"
        )

    def open_sequential(self) -> BinaryIO:
        return _Unclosable(self._stream)  # type: ignore[return-value]

    def companion(self, filename: str) -> str:
        raise UnsupportedFeatureError(
            "this output is made of several files; it cannot be written to a pipe"
        )

    def commit(self) -> None:
        self._stream.flush()

    def abort(self) -> None:
        """Nothing to remove: what reached the pipe is gone; the reader sees a short stream."""

    def __enter__(self) -> StreamOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class _Unclosable:
    """Lets a writer close 'its' stream (``with out.open_sequential() as f``) without closing
    standard output under the CLI."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        return self._stream.write(data)

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()

    def __enter__(self) -> _Unclosable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: What a writer is given: files to create atomically, or a pipe for sequential formats.
Output = AtomicOutput | StreamOutput
