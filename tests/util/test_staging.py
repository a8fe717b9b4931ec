"""Folders written whole or not at all, never over somebody else's files (gf_jax.util.staging)."""

import os

import pytest

from gf_jax.util import staging


def test_a_staged_folder_appears_only_when_complete(tmp_path):
    target = tmp_path / "out"
    with staging.staged_folder(str(target)) as tmp:
        (open(os.path.join(tmp, "a.bin"), "wb")).write(b"x")
        assert not target.exists()  # nothing at the target while it is written
    assert sorted(os.listdir(target)) == sorted(["a.bin", staging.MARKER]) and staging.is_own_output(str(target))
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_an_error_inside_leaves_the_target_and_its_parent_as_they_were(tmp_path):
    target = tmp_path / "out"
    target.mkdir()  # empty: allowed
    with pytest.raises(RuntimeError), staging.staged_folder(str(target)) as tmp:
        open(os.path.join(tmp, "half.bin"), "wb").write(b"x")
        raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(target) == []


def test_a_full_disk_is_one_sentence_naming_the_target(tmp_path):
    with pytest.raises(OSError, match=r"writing .*out failed: the disk is full; .* was left as it was"), \
            staging.staged_folder(str(tmp_path / "out")):
        raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == []


def test_check_target_accepts_new_and_empty_refuses_others_and_needs_overwrite_for_its_own(tmp_path):
    staging.check_target(str(tmp_path / "new"), overwrite=False, what="x")
    staging.check_target(str(tmp_path), overwrite=False, what="x")  # empty
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="already holds files that x did not write"):
            staging.check_target(str(tmp_path), overwrite=overwrite, what="x")
    with pytest.raises(ValueError, match="is a file"):
        staging.check_target(str(tmp_path / "notes.txt"), overwrite=True, what="x")
    with pytest.raises(ValueError, match="writes to a local folder"):
        staging.check_target("gs://b/out", overwrite=True, what="x")
    own = tmp_path / "own"
    with staging.staged_folder(str(own), marker={"kind": "hf export"}) as tmp:
        open(os.path.join(tmp, "old.bin"), "wb").write(b"old")
    with pytest.raises(ValueError, match="holds an earlier hf export output; pass --overwrite"):
        staging.check_target(str(own), overwrite=False, what="x")
    staging.check_target(str(own), overwrite=True, what="x")
    with staging.staged_folder(str(own)) as tmp:
        open(os.path.join(tmp, "new.bin"), "wb").write(b"new")
    assert sorted(os.listdir(own)) == sorted(["new.bin", staging.MARKER])  # replaced whole, nothing mixed


def test_only_partials_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / ".out.partial-999999999-a"
    alive = tmp_path / f".out.partial-{os.getpid()}-b"
    other = tmp_path / ".other.partial-999999999-c"
    for folder in (dead, alive, other):
        folder.mkdir()
    assert staging.remove_stale_partials(str(tmp_path / "out")) == [str(dead)]
    assert alive.exists() and other.exists() and not dead.exists()
