"""Atomic writes of a file and of a folder (labeldiff.fs)."""
import pytest

from labeldiff.fs import atomic_folder, atomic_write_text


def test_atomic_write_text_leaves_no_temporary_file(tmp_path):
    atomic_write_text(tmp_path / "a" / "f.txt", "one")
    atomic_write_text(tmp_path / "a" / "f.txt", "two")
    assert (tmp_path / "a" / "f.txt").read_text() == "two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.txt"]


def test_atomic_folder_writes_a_new_folder_and_replaces_an_old_one(tmp_path):
    target = tmp_path / "eval"
    with atomic_folder(target) as tmp:
        assert tmp == tmp_path / "eval.tmp" and not tmp.exists()  # created by the writer, as it likes
        tmp.mkdir()
        (tmp / "metrics.json").write_text("1")
        assert not target.exists()  # nothing at the target until the block ends
    assert (target / "metrics.json").read_text() == "1"
    with atomic_folder(target) as tmp:
        tmp.mkdir()
        (tmp / "other.json").write_text("2")
        assert (target / "metrics.json").is_file()  # the old folder stays whole meanwhile
    assert sorted(p.name for p in target.iterdir()) == ["other.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def test_atomic_folder_keeps_the_old_folder_when_the_writer_fails(tmp_path):
    target = tmp_path / "eval"
    target.mkdir()
    (target / "metrics.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            tmp.mkdir()
            (tmp / "metrics.json").write_text("half")
            raise RuntimeError("killed")
    assert (target / "metrics.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def test_atomic_folder_clears_what_a_killed_writer_left(tmp_path):
    target = tmp_path / "eval"
    for leftover in ("eval.tmp", "eval.old"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "stale").write_text("x")
    with atomic_folder(target) as tmp:
        tmp.mkdir()
        (tmp / "fresh").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    assert sorted(p.name for p in target.iterdir()) == ["fresh"]
