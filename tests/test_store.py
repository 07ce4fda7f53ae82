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


def test_a_full_disk_is_one_message_naming_the_file_and_keeps_what_was_written(tmp_path, monkeypatch):
    """The drill raises ENOSPC inside the write; the temporary file goes, the parts already committed stay, and
    the error names the final file and the bytes free."""
    from character.core.space import FULL_DISK_ENV, NoSpaceLeftError

    out = StageOutput(str(tmp_path), "stage")
    out.write_part(pa.table({"id": ["a"]}), key="k1")
    flag = tmp_path / "disk-full"
    monkeypatch.setenv(FULL_DISK_ENV, str(flag))
    flag.touch()
    for write in (lambda: out.write_part(pa.table({"id": ["b"]}), key="k2"), lambda: out.write_text("x.txt", "x"),
                  lambda: out.write_table("t.parquet", pa.table({"id": ["c"]})),
                  lambda: out.replace_part(out.part_files()[0], pa.table({"id": ["z"]}))):
        with pytest.raises(NoSpaceLeftError) as caught:
            write()
        assert caught.value.errno == 28 and " bytes free); free space and rerun: what is written is kept" in str(
            caught.value.strerror)
        assert str(caught.value.strerror).startswith(f"no space left writing {tmp_path}/stage/")
        assert ".tmp-" not in str(caught.value.strerror)
    assert not list(tmp_path.glob("stage/.tmp-*")) and out.ids("id") == {"a"}  # nothing half-written, k1 kept
    flag.unlink()
    out.write_part(pa.table({"id": ["b"]}), key="k2")
    assert out.ids("id") == {"a", "b"}


def test_full_disk_found_in_what_pyarrow_ray_and_sqlite_raise(tmp_path):
    """pyarrow's real ENOSPC (writing /dev/full), our error wrapped as Ray wraps a worker's, and SQLite's
    SQLITE_FULL text are each recognised; another OSError is not."""
    import os
    import stat

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from character.core.space import find_no_space, no_space_error

    if not os.path.exists("/dev/full") or not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("no /dev/full device here to give a real ENOSPC")
    with pytest.raises(OSError) as real:
        with pafs.LocalFileSystem().open_output_stream("/dev/full") as sink:
            pq.write_table(pa.table({"a": list(range(100_000))}), sink)
    assert find_no_space(real.value, str(tmp_path)).startswith(f"no space left writing {tmp_path} (")

    class Wrapped(Exception):  # what a RayTaskError looks like from the driver: `.cause` and a text
        def __init__(self, cause):
            super().__init__(f"ray::MapWorker.submit() ... {cause!r}")
            self.cause = cause

    ours = no_space_error(str(tmp_path / "stage" / "part-k.parquet"), real.value)
    assert find_no_space(Wrapped(ours), "/elsewhere").startswith(f"no space left writing {tmp_path}/stage/part-k")
    try:
        try:
            raise OSError(28, "No space left on device", str(tmp_path / "ckpt" / "model.safetensors"))
        except OSError as inner:
            raise RuntimeError("checkpoint failed") from inner
    except RuntimeError as chained:
        assert f"writing {tmp_path}/ckpt/model.safetensors (" in find_no_space(chained, "/elsewhere")
    as_text = Exception(f'Traceback (most recent call last):\n  File "/work/x/engine.py", line 3, in write\n'
                        f"NoSpaceLeftError: [Errno 28] no space left writing {tmp_path}/m/part-1.parquet (5 bytes "
                        f"free); free space and rerun: what is written is kept")  # a worker's, as Ray tells it
    assert f"writing {tmp_path}/m/part-1.parquet (" in find_no_space(as_text, "/elsewhere")
    sqlite = Exception("(sqlite3.OperationalError) database or disk is full")
    assert find_no_space(sqlite, str(tmp_path / "mlflow")).startswith(f"no space left writing {tmp_path}/mlflow (")
    assert find_no_space(OSError(13, "Permission denied", "/x"), "/y") is None
    assert find_no_space(ValueError("bad"), "/y") is None
