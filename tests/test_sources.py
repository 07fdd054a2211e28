"""Local mail sources: files, directories, Maildirs, mboxes, index.csv, stdin."""

import io

import pytest

from atlas_milter.errors import SourceError
from atlas_milter.sources import iter_source, source_kind

MSG = b"Subject: %d\n\nbody %d\n"


def test_single_file_with_mbox_from_line_is_one_message(tmp_path):
    f = tmp_path / "one.eml"
    f.write_bytes(b"From a@b Mon Jan 1 00:00:00 2002\n" + MSG % (1, 1))
    assert [i.key for i in iter_source(str(f))] == [str(f)]


def test_mbox_gives_one_item_per_message(tmp_path):
    f = tmp_path / "box.mbox"
    f.write_bytes(b"".join(b"From a@b Mon Jan 1 00:00:00 2002\n" + MSG % (i, i) + b"\n" for i in range(3)))
    items = list(iter_source(str(f)))
    assert [i.key for i in items] == [f"{f}:0", f"{f}:1", f"{f}:2"]
    assert b"body 2" in items[2].raw


def test_maildir_reads_cur_and_new(tmp_path):
    for sub in ("cur", "new", "tmp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "cur" / "1:2,S").write_bytes(MSG % (1, 1))
    (tmp_path / "new" / "2").write_bytes(MSG % (2, 2))
    (tmp_path / "tmp" / "3").write_bytes(MSG % (3, 3))
    assert source_kind(str(tmp_path)) == "maildir"
    assert len(list(iter_source(str(tmp_path)))) == 2


def test_directory_is_walked_recursively(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "1.eml").write_bytes(MSG % (1, 1))
    (tmp_path / "a" / "b" / "2.eml").write_bytes(MSG % (2, 2))
    assert len(list(iter_source(str(tmp_path)))) == 2


def test_index_with_split(tmp_path):
    (tmp_path / "x").write_bytes(MSG % (1, 1))
    (tmp_path / "y").write_bytes(MSG % (2, 2))
    index = tmp_path / "index.csv"
    index.write_text("path,label,group,split,bytes\nx,ham,g,train,1\ny,spam,g,test,1\n")
    items = list(iter_source(str(index), split="test"))
    assert [(i.label, i.raw) for i in items] == [("spam", MSG % (2, 2))]


def test_stdin():
    items = list(iter_source("-", stdin=io.BytesIO(MSG % (5, 5))))
    assert items[0].key == "-" and items[0].raw == MSG % (5, 5)


def test_missing_source_is_a_one_line_error(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        list(iter_source(str(tmp_path / "nope")))


def test_unreadable_file_is_reported_not_raised(tmp_path):
    f = tmp_path / "locked.eml"
    f.write_bytes(MSG % (1, 1))
    f.chmod(0)
    errors = []
    items = list(iter_source(str(tmp_path), on_error=errors.append))
    import os
    if os.geteuid() == 0:
        assert len(items) == 1  # root reads anything
    else:
        assert items == [] and "locked.eml" in errors[0]
