"""Attempt work directories: a fresh, empty one for every attempt, without a new inode each time.

Making and removing a directory per attempt was the costliest file-system work
of an attempt on these machines (the supervisor's top system call in a
profile): their /tmp is ext4 without a journal, whose inode allocator then
skips every inode freed in the last minutes, so each mkdir gets slower the
more attempts ran lately.  A directory that its attempt left exactly as it was
made (empty, mode 0700, our owner, no extended attributes, which is where ACLs
live) is renamed to a new random name and handed to a later attempt; anything
else is removed as before.  Only directories of attempts whose cgroup was
emptied and removed come back here (`Containment`): no process of theirs is
left to write into them.

A supervisor's work directories live in one directory of its own,
`<tmp>/nomaflow-sup-<pid>-<start time>-<random>/` (made like any `mkdtemp`, so
no other user can have made it first), so that a supervisor that starts after
one was killed removes what that one left (`cleanup_stale`).
"""

from __future__ import annotations

import collections
import os
import secrets
import shutil
import stat
import tempfile

from .processes import supervisor_alive, supervisor_tag

PREFIX = "step-"
KEEP = 128  # empty directories kept for reuse; more are removed
_OWN = "nomaflow-"


class Workdirs:
    """`take()` and `reuse()` on the supervisor's thread, `give_back()` on the janitor's: deque ends are thread-safe."""

    def __init__(self, root: str | None = None, keep: int = KEEP) -> None:
        self.root = root or tempfile.gettempdir()
        self.parent: str | None = None  # made on the first `take()`
        self.keep = keep
        self._free: collections.deque[str] = collections.deque()

    def take(self) -> str:
        """A new, empty directory of ours, under a name no attempt had before."""
        try:
            return self._free.popleft()
        except IndexError:
            pass
        if self.parent is None:
            parent = tempfile.mkdtemp(prefix=f"{_OWN}{supervisor_tag()}-", dir=self.root)
            os.chmod(parent, 0o711)  # attempts (of any uid) reach their own directory, list no other
            self.parent = parent
        return tempfile.mkdtemp(prefix=PREFIX, dir=self.parent)

    def give_back(self, path: str) -> None:
        """An ended attempt's directory: gone from its path either way; kept, renamed, if pristine."""
        if not self.reuse(path):
            shutil.rmtree(path, ignore_errors=True)

    def reuse(self, path: str) -> bool:
        """Keep an ended attempt's directory for a later one, renamed, if it is pristine and there
        is room; False leaves it where it is (for `give_back` to remove).  A few system calls."""
        if self.parent is None or len(self._free) >= self.keep or not _pristine(path):
            return False
        fresh = os.path.join(self.parent, PREFIX + secrets.token_hex(6))
        try:
            if os.path.lexists(fresh):  # rename() would replace an empty directory there
                return False
            os.rename(path, fresh)
        except OSError:
            return False
        self._free.append(fresh)
        return True

    def close(self) -> None:
        """Remove every directory kept for reuse, then ours (unless an attempt's is left in it)."""
        while self._free:
            shutil.rmtree(self._free.popleft(), ignore_errors=True)
        if self.parent is not None:
            try:
                os.rmdir(self.parent)
            except OSError:
                pass  # an attempt's directory is still in it (its process escaped a kill): a later start removes it

    def cleanup_stale(self) -> list[str]:
        """Remove the directories of supervisors that died without cleaning up; the paths removed."""
        removed = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return removed
        for entry in entries:
            tag = entry.name[len(_OWN) :]  # sup-<pid>-<start time>-<random>
            if not entry.name.startswith(_OWN + "sup-") or entry.path == self.parent or supervisor_alive(tag):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():  # never another user's
                shutil.rmtree(entry.path, ignore_errors=True)
                if not os.path.lexists(entry.path):
                    removed.append(entry.path)
        return removed


def _pristine(path: str) -> bool:
    """As `mkdtemp` makes a directory: empty, 0700, ours, no extended attributes."""
    try:
        st = os.lstat(path)
        return (
            stat.S_ISDIR(st.st_mode)
            and stat.S_IMODE(st.st_mode) == 0o700
            and st.st_uid == os.geteuid()
            and st.st_gid == os.getegid()
            and st.st_nlink == 2
            and not os.listdir(path)
            and not os.listxattr(path, follow_symlinks=False)
        )
    except OSError:
        return False


__all__ = ["PREFIX", "Workdirs"]
