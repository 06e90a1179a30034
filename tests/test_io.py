"""fmlm.io: atomic file writes and directory installs."""

import pytest

from fmlm.io import replace_dir, write_text


def _dir(path, text):
    path.mkdir()
    write_text(path / "f.txt", text)
    return path


def test_replace_dir_installs_and_replaces_leaving_no_temporaries(tmp_path):
    final = tmp_path / "entry"
    assert replace_dir(_dir(tmp_path / ".tmp-1", "one"), final)
    assert replace_dir(_dir(tmp_path / ".tmp-2", "two"), final)
    assert (final / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_a_failed_replace_keeps_the_previous_copy(tmp_path):
    final = _dir(tmp_path / "entry", "old")
    missing = tmp_path / ".tmp-gone"  # the rename fails: nothing to move
    assert replace_dir(missing, final, keep_theirs=True) is False
    with pytest.raises(OSError):
        replace_dir(missing, final)
    assert (final / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
