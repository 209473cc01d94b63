"""The one home of atomic writes and input identities (carclf.files)."""

import json

import pytest

from carclf.files.atomic import atomic_output, partial_path, write_json_atomic
from carclf.files.fingerprint import file_fingerprint, files_identity


def test_atomic_output_renames_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_output(target) as partial:
            partial.write_text("half a fil")
            raise RuntimeError("killed half-way")
    assert json.loads(target.read_text()) == {"version": 1}
    assert not partial_path(target).exists()
    write_json_atomic(target, {"version": 2})
    assert json.loads(target.read_text()) == {"version": 2}
    assert not [p.name for p in tmp_path.iterdir() if ".partial" in p.name]


def test_atomic_output_replaces_a_folder(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_output(target) as partial:
        partial.mkdir()
        (partial / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_fingerprint_changes_with_the_file_and_names_missing_files(tmp_path):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"one")
    before = file_fingerprint(photo)
    photo.write_bytes(b"three")
    assert file_fingerprint(photo) != before
    assert file_fingerprint(tmp_path / "gone") != file_fingerprint(photo)
    assert files_identity([photo])[0][1] == 5
    with pytest.raises(FileNotFoundError):
        files_identity([tmp_path / "gone"])
