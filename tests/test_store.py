import pyarrow as pa
import pytest

from character.core.store import StageOutput, require_complete, seed_from_id, stable_id


def test_stable_id_and_seed_are_deterministic():
    assert stable_id("curiosity", "hello") == stable_id("curiosity", "hello")
    assert stable_id("curiosity", "hello") != stable_id("curiosityh", "ello")  # separator matters
    assert len(stable_id("a")) == 16
    assert seed_from_id(stable_id("a"), 0) == seed_from_id(stable_id("a"), 0)
    assert seed_from_id(stable_id("a"), 0) != seed_from_id(stable_id("a"), 1)


def test_parts_are_atomic_idempotent_and_marked(tmp_path):
    out = StageOutput(str(tmp_path), "stage")
    table = pa.table({"id": ["a", "b"]})
    out.write_part(table, key="k1")
    out.write_part(table, key="k1")  # a retried batch overwrites its own part
    out.write_part(pa.table({"id": ["c"]}), "rejected", key="k2")
    assert [p.rsplit("/", 1)[1] for p in out.part_files()] == ["part-k1.parquet"]
    assert out.ids("id") == {"a", "b"} and out.ids("id", "rejected") == {"c"}
    assert not list(tmp_path.glob("stage/.tmp-*"))
    assert not out.complete()
    with pytest.raises(FileNotFoundError, match="no _SUCCESS"):
        require_complete(out, "next")
    out.mark_success({"rows": 2})
    assert out.complete() and out.success_info()["rows"] == 2
    out.reset()
    assert not out.complete() and out.part_files() == []


def test_ignores_stray_temp_files(tmp_path):
    out = StageOutput(str(tmp_path), "s")
    out.ensure()
    (tmp_path / "s" / ".tmp-dead.parquet").write_bytes(b"half a file")
    assert out.part_files() == [] and out.ids("id") == set()


def test_an_unreadable_part_is_quarantined_with_its_batch_and_named_upstream(tmp_path):
    """A part cut short (and every part of its batch, which were written together) moves to _quarantine/
    with the reason logged; other parts stay. As an upstream input, the same part is a clear error that
    names the file, not pyarrow's raw ArrowInvalid."""
    from character.core.store import StageInputError

    out = StageOutput(str(tmp_path), "stage")
    out.write_part(pa.table({"id": ["a", "b"]}), key="k1")
    out.write_part(pa.table({"id": ["x"]}), "rejected", key="k1")
    out.write_part(pa.table({"id": ["c"]}), key="k2")
    bad = tmp_path / "stage" / "part-k1.parquet"
    bad.write_bytes(bad.read_bytes()[:-20])  # a copy or disk that cut the file short
    out.mark_success({})
    with pytest.raises(StageInputError, match=r"next: .*part-k1.parquet cannot be read .*rerun the stage"):
        require_complete(out, "next")
    moved = out.quarantine_unreadable()
    assert [m["file"] for m in moved] == ["part-k1.parquet", "rejected/part-k1.parquet"]
    assert "Parquet" in moved[0]["reason"] or "magic" in moved[0]["reason"].lower()
    assert moved[1]["reason"] == "written with an unreadable part of the same batch"
    assert out.ids("id") == {"c"} and out.part_files("rejected") == []
    assert (tmp_path / "stage" / "_quarantine" / "part-k1.parquet").is_file()
    assert (tmp_path / "stage" / "_quarantine" / "rejected" / "part-k1.parquet").is_file()
    assert len(out.read_text("_quarantine/log.jsonl").splitlines()) == 2
    assert out.all_part_files() == [str(tmp_path / "stage" / "part-k2.parquet")]  # quarantine is not read
    require_complete(out, "next")
    assert out.quarantine_unreadable() == []
