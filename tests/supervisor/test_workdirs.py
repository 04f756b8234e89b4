"""Attempt work directories: fresh and empty for every attempt; only pristine ones are reused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from liberty.jobs.supervisor.containment import Containment
from liberty.jobs.supervisor.processes import supervisor_tag
from liberty.jobs.supervisor.workdirs import PREFIX, Workdirs


@pytest.fixture
def workdirs(tmp_path: Path) -> Workdirs:
    return Workdirs(str(tmp_path))


def _is_fresh(path: str, parent: str) -> bool:
    st = os.lstat(path)
    return (
        str(Path(path).parent) == parent
        and Path(path).name.startswith(PREFIX)
        and stat.S_ISDIR(st.st_mode)
        and stat.S_IMODE(st.st_mode) == 0o700
        and st.st_uid == os.geteuid()
        and not os.listdir(path)
    )


def test_take_gives_an_empty_private_directory_of_ours_in_this_supervisors_own(workdirs: Workdirs, tmp_path: Path) -> None:
    taken = workdirs.take()
    assert _is_fresh(taken, str(workdirs.parent))
    parent = Path(taken).parent
    assert parent.parent == tmp_path and parent.name.startswith(f"nomaflow-{supervisor_tag()}-")
    assert stat.S_IMODE(os.stat(parent).st_mode) == 0o711 and os.stat(parent).st_uid == os.geteuid()


def test_a_pristine_directory_leaves_its_path_and_comes_back_under_a_new_name(workdirs: Workdirs, tmp_path: Path) -> None:
    used = workdirs.take()
    inode = os.lstat(used).st_ino
    workdirs.give_back(used)
    assert not os.path.lexists(used)
    again = workdirs.take()
    assert again != used and _is_fresh(again, str(workdirs.parent))
    assert os.lstat(again).st_ino == inode  # the same directory: no new inode


def test_a_directory_with_something_left_in_it_is_removed_not_reused(workdirs: Workdirs, tmp_path: Path) -> None:
    used = workdirs.take()
    Path(used, "left.txt").write_text("from the last attempt")
    workdirs.give_back(used)
    assert not os.path.lexists(used)
    assert os.listdir(workdirs.parent) == []


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
    assert os.listdir(workdirs.parent) == []


def test_reuse_keeps_a_pristine_directory_and_leaves_any_other_where_it_is(workdirs: Workdirs) -> None:
    pristine, used = workdirs.take(), workdirs.take()
    Path(used, "left.txt").write_text("from the last attempt")
    assert workdirs.reuse(pristine) and not os.path.lexists(pristine)
    assert not workdirs.reuse(used) and Path(used, "left.txt").exists()
    assert workdirs.take() not in (pristine, used)


def test_no_more_than_keep_directories_are_kept(tmp_path: Path) -> None:
    workdirs = Workdirs(str(tmp_path), keep=2)
    taken = [workdirs.take() for _ in range(3)]
    for path in taken:
        workdirs.give_back(path)
    assert len(os.listdir(workdirs.parent)) == 2


def test_close_removes_every_kept_directory_and_its_own(workdirs: Workdirs, tmp_path: Path) -> None:
    for path in [workdirs.take() for _ in range(3)]:
        workdirs.give_back(path)
    workdirs.close()
    assert list(tmp_path.iterdir()) == []


def _left_by(tmp_path: Path, tag: str) -> Path:
    left = tmp_path / f"nomaflow-{tag}" / "step-abc"
    left.mkdir(parents=True)
    (left / "out.txt").write_text("from an attempt of a killed supervisor")
    return left.parent


def test_cleanup_stale_removes_what_a_dead_supervisor_left_and_spares_a_live_one(tmp_path: Path) -> None:
    dead = _left_by(tmp_path, "sup-999999999-1-a1b2")  # no such pid
    reused = _left_by(tmp_path, f"sup-{os.getpid()}-1-c3d4")  # our pid, another start time: a dead one's
    live = _left_by(tmp_path, f"{supervisor_tag(os.getppid())}-e5f6")
    other = tmp_path / "nomaflow-demo"
    other.mkdir()
    workdirs = Workdirs(str(tmp_path))
    assert sorted(workdirs.cleanup_stale()) == sorted([str(dead), str(reused)])
    assert sorted(tmp_path.iterdir()) == sorted([live, other])


@pytest.mark.trio
async def test_a_work_dir_whose_attempt_had_no_emptied_cgroup_is_removed_not_reused(tmp_path: Path) -> None:
    containment = Containment(plugins=tmp_path)
    containment.workdirs = workdirs = Workdirs(str(tmp_path))
    used = workdirs.take()
    done = containment.discard(None, used)  # no cgroup: a process may have escaped the tree kill
    await containment._clean_leftovers()  # what the janitor does
    assert done.is_set() and os.listdir(workdirs.parent) == []
    await containment.close()
