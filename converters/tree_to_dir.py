"""Write a file tree (a flattened image, or one layer) into a directory on the host, safely.

The tree is untrusted: an image can hold ``a -> /etc`` followed by ``a/passwd``, a symlink
``x -> ../../..``, a hardlink to a host file, device nodes. The rules that keep every write
inside ``out``:

* paths are normalised by the readers (``..`` that climbs above the root never gets here);
* every path is reached from a file descriptor of ``out``, one component at a time, each
  directory opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent (``dir_fd``).
  A parent that is a symlink (or not a directory) refuses the entry: a symlink is never
  followed while writing, whatever its target;
* a symlink is created as data, target verbatim (absolute or escaping targets included:
  nothing here ever follows it, and a runtime resolves it inside its own root);
* a file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so it can never open something
  that already exists, such as a symlink planted by an earlier entry;
* a hardlink may point only at a non-directory this extraction created itself (tracked by
  path, dropped when the path is replaced), and is made with ``follow_symlinks=False``;
* ``out`` must be empty (or absent), so everything below it is ours.

What the host cannot reproduce is skipped and reported, not fatal: ownership when not root,
device nodes when not root, set-id bits the kernel drops, xattrs the filesystem refuses
(``trusted.*`` / ``security.*`` without privilege, any xattr on a filesystem without them).

References: opencontainers/image-spec ``layer.md``; openat(2), O_NOFOLLOW in open(2),
linkat(2), mknodat(2).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from imgbridge.errors import InvalidInputError
from imgbridge.model.tree import Entry, EntryType

__all__ = ["ExtractReport", "extract_tree"]

_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class ExtractReport:
    """What ``extract`` wrote and what it could not reproduce, path by path.

    ``refused`` holds entries skipped because writing them would have left ``out`` or followed
    a symlink (``(path, reason)``); the others are host limitations: ``devices`` (device nodes
    and sockets not created), ``owners`` (ownership not set: not root), ``modes`` (permission
    bits the kernel changed, such as a setgid bit for a group we are not in), ``xattrs``
    (``(path, name)`` pairs the filesystem refused), ``whiteouts`` (deletions in a single
    layer, which have nothing to delete in an empty directory).
    """

    written: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    xattrs: list[tuple[str, str]] = field(default_factory=list)
    whiteouts: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every entry was reproduced exactly."""
        return not (self.refused or self.devices or self.owners or self.modes or self.xattrs
                    or self.whiteouts)

    def summary(self) -> list[str]:
        """One line per kind of shortfall (empty when complete), naming the first few paths."""
        def few(paths: list[str]) -> str:
            shown = ", ".join("/" + p for p in paths[:3])
            return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")

        lines = []
        if self.refused:
            shown = "; ".join(f"/{p}: {why}" for p, why in self.refused[:3])
            more = f" and {len(self.refused) - 3} more" if len(self.refused) > 3 else ""
            lines.append(f"refused {len(self.refused)} unsafe entries: {shown}{more}")
        if self.devices:
            lines.append(f"skipped {len(self.devices)} device nodes/sockets (creating them "
                         f"needs root): {few(self.devices)}")
        if self.owners:
            lines.append(f"ownership not kept for {len(self.owners)} entries (not root): "
                         f"{few(self.owners)}")
        if self.modes:
            lines.append(f"permission bits changed by the host for {len(self.modes)} entries: "
                         f"{few(self.modes)}")
        if self.xattrs:
            names = sorted({name for _, name in self.xattrs})
            lines.append(f"{len(self.xattrs)} xattrs refused by the host filesystem "
                         f"({', '.join(names[:5])}): {few([p for p, _ in self.xattrs])}")
        if self.whiteouts:
            lines.append(f"skipped {len(self.whiteouts)} whiteouts (a single layer's deletions):"
                         f" {few(self.whiteouts)}")
        return lines


class _Refused(Exception):
    """An entry that cannot be written without leaving ``out``; it is skipped and reported."""


def _remove_tree(parent: int, name: str) -> None:
    """Remove the directory ``name`` below ``parent`` and everything in it, by file
    descriptors only and never following a symlink (``shutil.rmtree`` takes ``dir_fd`` only
    from Python 3.11). Iterative: an image may nest deeper than the recursion limit."""
    stack = [(parent, name, os.open(name, _DIR_FLAGS, dir_fd=parent))]
    try:
        while stack:
            _, _, fd = stack[-1]
            with os.scandir(fd) as it:
                sub = None
                for item in it:
                    if item.is_dir(follow_symlinks=False):
                        sub = item.name
                        break
                    os.unlink(item.name, dir_fd=fd)
            if sub is not None:
                stack.append((fd, sub, os.open(sub, _DIR_FLAGS, dir_fd=fd)))
                continue
            up, done, _ = stack.pop()
            os.close(fd)
            os.rmdir(done, dir_fd=up)
    finally:
        for _, _, fd in stack:
            os.close(fd)


def _times(entry: Entry) -> tuple[int, int]:
    """(atime, mtime) in ns for os.utime; a source without atimes gets the mtime, as tar does."""
    return (entry.atime if entry.atime is not None else entry.mtime, entry.mtime)


class _Writer:
    def __init__(self, out: str, report: ExtractReport) -> None:
        self.report = report
        self.root = os.open(out, _DIR_FLAGS)
        self.root_user = os.geteuid() == 0
        self.me = (os.geteuid(), os.getegid())
        #: Non-directories this run created, by path: the only valid hardlink targets.
        self.made: set[str] = set()
        #: Directory metadata is applied last: children change a directory's mtime, and a
        #: read-only mode would stop us creating them.
        self.dirs: dict[str, Entry] = {}
        self._cache: tuple[str, int] | None = None  # the last parent opened: (path, fd)

    def close(self) -> None:
        self._drop_cache()
        os.close(self.root)

    def _drop_cache(self) -> None:
        if self._cache is not None:
            os.close(self._cache[1])
            self._cache = None

    def _parent(self, path: str) -> tuple[int, str]:
        """An fd of ``path``'s parent directory (creating missing ones) and the base name.

        Each component is opened relative to the previous one with O_NOFOLLOW, so a symlink
        anywhere on the way refuses the entry instead of being followed. The fd is owned by
        the cache; callers must not close it.
        """
        parent, _, name = path.rpartition("/")
        if not parent:
            return self.root, name
        if self._cache is not None and self._cache[0] == parent:
            return self._cache[1], name
        self._drop_cache()
        fd = os.dup(self.root)
        try:
            done: list[str] = []
            for part in parent.split("/"):
                done.append(part)
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    # A parent no entry described (or described later): 0o755, as flatten's
                    # implicit directories; a later DIR entry sets its real metadata.
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        # Linux says ENOTDIR for a symlink opened with O_DIRECTORY|O_NOFOLLOW;
                        # lstat tells the two apart for the message.
                        st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                        what = ("a symbolic link" if stat.S_ISLNK(st.st_mode)
                                else "not a directory")
                        raise _Refused(f"its parent /{'/'.join(done)} is {what}") from None
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        self._cache = (parent, fd)
        return fd, name

    def _clear(self, fd: int, name: str, path: str, keep_dir: bool) -> bool:
        """Make room for ``name`` (a later tar member for the same path wins).

        Returns True when an existing directory is kept (DIR over DIR merges). Nothing is
        followed: lstat semantics, and rmtree's fd-based walk never leaves the tree.
        """
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._drop_cache()  # the cached parent may lie below the tree being removed
            _remove_tree(fd, name)
            prefix = path + "/"
            self.made = {p for p in self.made if not p.startswith(prefix)}
            self.dirs = {p: e for p, e in self.dirs.items() if not p.startswith(prefix)}
        else:
            os.unlink(name, dir_fd=fd)
        self.made.discard(path)
        return False

    def write(self, entry: Entry) -> None:
        kind = entry.type
        if kind in (EntryType.WHITEOUT, EntryType.OPAQUE):
            self.report.whiteouts.append(entry.path)
            return
        if entry.path == "":
            self.dirs[""] = entry
            return
        if kind is EntryType.SOCKET or (kind in (EntryType.CHAR, EntryType.BLOCK)
                                        and not self.root_user):
            self.report.devices.append(entry.path)
            return
        # Checked before anything at the path is removed, so a refused link changes nothing.
        if kind is EntryType.HARDLINK and entry.link_target not in self.made:
            raise _Refused(f"hardlink to /{entry.link_target}, which is not a file this "
                           "extraction created")
        fd, name = self._parent(entry.path)
        kept = self._clear(fd, name, entry.path, keep_dir=kind is EntryType.DIR)
        fd, name = self._parent(entry.path)  # _clear may have dropped the cached fd
        if kind is EntryType.FILE:
            self._file(fd, name, entry)
        elif kind is EntryType.DIR:
            if not kept:
                os.mkdir(name, 0o700, dir_fd=fd)
            self.dirs[entry.path] = entry
            # Owner and xattrs now (mode and times at the end, see ``dirs``).
            dfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            try:
                self._owner(dfd, None, entry)
                self._xattrs(dfd, entry)
            finally:
                os.close(dfd)
        elif kind is EntryType.HARDLINK:
            tfd, tname = self._parent(entry.link_target)
            tfd = os.dup(tfd)  # the cache may switch back to the link's own parent below
            try:
                fd, name = self._parent(entry.path)
                os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(tfd)
            self.made.add(entry.path)
        else:
            if kind is EntryType.SYMLINK:
                os.symlink(entry.link_target, name, dir_fd=fd)
            elif kind is EntryType.FIFO:
                os.mkfifo(name, 0o600, dir_fd=fd)
            else:  # CHAR / BLOCK as root
                dev_type = stat.S_IFCHR if kind is EntryType.CHAR else stat.S_IFBLK
                os.mknod(name, 0o600 | dev_type, os.makedev(entry.devmajor, entry.devminor),
                         dir_fd=fd)
            self._special_metadata(fd, name, entry)
            self.made.add(entry.path)
        self.report.written += 1

    def _file(self, fd: int, name: str, entry: Entry) -> None:
        out = os.open(name, _FILE_FLAGS, 0o600, dir_fd=fd)
        try:
            with entry.open() as src:  # streamed: memory stays at one chunk
                while True:
                    chunk = src.read(_CHUNK)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
            # chown before chmod: chown clears set-id bits.
            self._owner(out, None, entry)
            self._xattrs(out, entry)
            self._mode(out, entry)
            os.utime(out, ns=_times(entry))
        finally:
            os.close(out)
        self.made.add(entry.path)

    def _special_metadata(self, fd: int, name: str, entry: Entry) -> None:
        """Owner, mode, xattrs, times for what cannot be opened safely (symlinks, fifos,
        devices: opening a fifo would block), all by name relative to the parent's fd."""
        self._owner(None, (fd, name), entry)
        if entry.type is not EntryType.SYMLINK:  # Linux has no symlink permission bits
            os.chmod(name, entry.mode, dir_fd=fd)
            if stat.S_IMODE(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode) \
                    != entry.mode:
                self.report.modes.append(entry.path)
        if entry.xattrs:
            # setxattr has no dir_fd form; /proc/self/fd/N is our parent directory itself,
            # and follow_symlinks=False keeps the last component from being followed.
            where = f"/proc/self/fd/{fd}/{name}"
            for key, value in entry.xattrs:
                try:
                    os.setxattr(where, key, value, follow_symlinks=False)
                except OSError:
                    self.report.xattrs.append((entry.path, key))
        os.utime(name, ns=_times(entry), dir_fd=fd, follow_symlinks=False)

    def _owner(self, target: int | None, named: tuple[int, str] | None, entry: Entry) -> None:
        if not self.root_user:
            if (entry.uid, entry.gid) != self.me:
                self.report.owners.append(entry.path)
            return
        if target is not None:
            os.fchown(target, entry.uid, entry.gid)
        else:
            assert named is not None
            os.chown(named[1], entry.uid, entry.gid, dir_fd=named[0], follow_symlinks=False)

    def _mode(self, fd: int, entry: Entry) -> None:
        os.fchmod(fd, entry.mode)
        if stat.S_IMODE(os.fstat(fd).st_mode) != entry.mode:
            self.report.modes.append(entry.path)  # e.g. setgid for a group we are not in

    def _xattrs(self, fd: int, entry: Entry) -> None:
        for key, value in entry.xattrs:
            try:
                os.setxattr(fd, key, value)
            except OSError:
                self.report.xattrs.append((entry.path, key))

    def finish(self) -> None:
        """Directory modes and times, deepest first, so setting a parent's mtime comes after
        every change inside it."""
        for path in sorted(self.dirs, key=lambda p: (-p.count("/"), p) if p else (1, "")):
            entry = self.dirs[path]
            if path == "":
                dfd = os.dup(self.root)
            else:
                try:
                    fd, name = self._parent(path)
                    dfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except (_Refused, FileNotFoundError, NotADirectoryError):
                    continue  # replaced since; the replacement carries its own metadata
            try:
                if path == "":
                    self._owner(dfd, None, entry)
                    self._xattrs(dfd, entry)
                self._mode(dfd, entry)
                os.utime(dfd, ns=_times(entry))
            finally:
                os.close(dfd)


def prepare_out(out: str) -> None:
    """Create ``out`` or accept it if it is an empty directory; refuse anything else.

    A non-empty directory is refused (as ``umoci unpack`` refuses an existing bundle): its
    contents, symlinks included, would mix with the image's, and a stale symlink there is
    exactly what a hostile image would want.
    """
    try:
        os.mkdir(out, 0o755)
        return
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise InvalidInputError(f"{out}: its parent directory does not exist") from None
    if os.path.islink(out) or not os.path.isdir(out):
        raise InvalidInputError(f"{out}: exists and is not a directory")
    if os.listdir(out):
        raise InvalidInputError(f"{out}: directory is not empty",
                                hint="extract into a new or empty directory")


def extract_tree(entries: Iterable[Entry], out: str | os.PathLike[str]) -> ExtractReport:
    """Write ``entries`` (parents before children, as ``flatten`` and tar order give them)
    into the directory ``out``, which must be empty or absent. Nothing is ever written
    outside ``out``; see the module docstring for how, and ``ExtractReport`` for what is
    reported instead of written."""
    path = os.fspath(out)
    prepare_out(path)
    report = ExtractReport()
    writer = _Writer(path, report)
    try:
        for entry in entries:
            try:
                writer.write(entry)
            except _Refused as exc:
                report.refused.append((entry.path, str(exc)))
        writer.finish()
    finally:
        writer.close()
    return report
