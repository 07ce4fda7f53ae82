import pyarrow as pa
import pytest

from character.store import StageOutput, require_complete, seed_from_id, stable_id


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
