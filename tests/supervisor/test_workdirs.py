"""Attempt work directories: fresh and empty for every attempt; only pristine ones are reused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from liberty.jobs.supervisor.containment import Containment
from liberty.jobs.supervisor.workdirs import PREFIX, Workdirs


@pytest.fixture
def workdirs(tmp_path: Path) -> Workdirs:
    return Workdirs(str(tmp_path))


def _is_fresh(path: str, parent: Path) -> bool:
    st = os.lstat(path)
    return (
        Path(path).parent == parent
        and Path(path).name.startswith(PREFIX)
        and stat.S_ISDIR(st.st_mode)
        and stat.S_IMODE(st.st_mode) == 0o700
        and st.st_uid == os.geteuid()
        and not os.listdir(path)
    )


def test_take_gives_an_empty_private_directory_of_ours(workdirs: Workdirs, tmp_path: Path) -> None:
    assert _is_fresh(workdirs.take(), tmp_path)


def test_a_pristine_directory_leaves_its_path_and_comes_back_under_a_new_name(workdirs: Workdirs, tmp_path: Path) -> None:
    used = workdirs.take()
    inode = os.lstat(used).st_ino
    workdirs.give_back(used)
    assert not os.path.lexists(used)
    again = workdirs.take()
    assert again != used and _is_fresh(again, tmp_path)
    assert os.lstat(again).st_ino == inode  # the same directory: no new inode


def test_a_directory_with_something_left_in_it_is_removed_not_reused(workdirs: Workdirs, tmp_path: Path) -> None:
    used = workdirs.take()
    Path(used, "left.txt").write_text("from the last attempt")
    workdirs.give_back(used)
    assert not os.path.lexists(used)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda p: os.chmod(p, 0o755),
        lambda p: os.setxattr(p, "user.left", b"by the last attempt"),
        lambda p: os.chmod(p, 0o2700),
    ],
    ids=["mode", "xattr", "setgid"],
)
def test_a_directory_the_attempt_changed_is_removed_not_reused(workdirs: Workdirs, tmp_path: Path, change) -> None:  # type: ignore[no-untyped-def]
    used = workdirs.take()
    change(used)
    workdirs.give_back(used)
    assert list(tmp_path.iterdir()) == []


def test_no_more_than_keep_directories_are_kept(tmp_path: Path) -> None:
    workdirs = Workdirs(str(tmp_path), keep=2)
    taken = [workdirs.take() for _ in range(3)]
    for path in taken:
        workdirs.give_back(path)
    assert len(list(tmp_path.iterdir())) == 2


def test_close_removes_every_kept_directory(workdirs: Workdirs, tmp_path: Path) -> None:
    for path in [workdirs.take() for _ in range(3)]:
        workdirs.give_back(path)
    workdirs.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.trio
async def test_a_work_dir_whose_attempt_had_no_emptied_cgroup_is_removed_not_reused(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    containment = Containment(plugins=tmp_path)
    containment.workdirs = Workdirs(str(tmp_path / "work"))
    used = containment.workdirs.take()
    done = containment.discard(None, used)  # no cgroup: a process may have escaped the tree kill
    await containment._clean_leftovers()  # what the janitor does
    assert done.is_set() and list((tmp_path / "work").iterdir()) == []
    await containment.close()
