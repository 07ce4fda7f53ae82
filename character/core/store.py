"""Stage outputs on any filesystem pyarrow reaches, written atomically and resumable.

Layout: `<output_dir>/<stage>/part-<key>.parquet` (+ `rejected/part-*.parquet` for set-aside rows,
`stats.json`) and `_SUCCESS` last. Each part is written to a hidden temporary name and renamed into
place, so a killed writer leaves either a whole part or nothing; a stage counts as done only once
`_SUCCESS` exists. A rerun reads the ids already in committed parts and processes only the rest; a part
that cannot be read (a disk or copy that cut it short) is first moved to `<stage>/_quarantine/`, with the
other parts of its batch, so its rows are made again instead of blocking every rerun.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from character.core.space import check_full_disk_drill, is_no_space, no_space_error

SUCCESS = "_SUCCESS"
QUARANTINE = "_quarantine"


class StageInputError(ValueError):
    """A stage's input cannot give it anything to do (missing, unreadable, empty or too small): the message
    names the stage, the input and its upstream cause; raised before the stage writes `_SUCCESS`. The command
    line prints it as one line, without a traceback (character/pipeline/cli.py)."""


class MissingUpstreamError(StageInputError, FileNotFoundError):
    """An upstream output a stage reads is not complete: run that stage first."""


def stable_id(*parts: str) -> str:
    """Stable row key: a hash of the fields that define the row (e.g. trait + text)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return digest[:16]


def seed_from_id(row_id: str, base_seed: int) -> int:
    """Per-row sampling seed: reproducible whatever the batching, ordering or number of actors."""
    return (int(row_id[:12], 16) ^ (base_seed * 0x9E3779B1)) % (2**31 - 1)


def split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def join_uri(base: str, *parts: str) -> str:
    if "://" in base:
        return base.rstrip("/") + "/" + "/".join(parts)
    return os.path.join(base, *parts)


def atomic_write(fs: pafs.FileSystem, tmp: str, final: str, write) -> None:
    """`write(sink)` into `tmp`, then rename it to `final`: readers see the whole file or none. Any failure
    removes `tmp`; a full disk or spent quota is raised as a NoSpaceLeftError naming `final`
    (character/core/space.py), so the command line can say it in one line."""
    try:
        with fs.open_output_stream(tmp) as sink:
            check_full_disk_drill(final)
            write(sink)
        fs.move(tmp, final)
    except BaseException as exc:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass  # never created, or already moved
        if isinstance(exc, Exception) and is_no_space(exc):
            raise no_space_error(final, exc) from exc
        raise


@dataclass(frozen=True)
class StageOutput:
    """A stage's output folder. Picklable: Ray tasks rebuild the filesystem from the URI."""

    output_dir: str
    stage: str

    @property
    def uri(self) -> str:
        return join_uri(self.output_dir, self.stage)

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        return split_uri(self.uri)

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem the part files live on (for readers such as `ray.data.read_parquet`)."""
        return self._fs()[0]

    @property
    def root(self) -> str:
        """This output's folder within its filesystem (no scheme)."""
        return self._fs()[1]

    def path(self, *parts: str) -> str:
        """The URI of a file or folder of this output (scheme kept: `s3://...` stays remote; hand it to
        `fetch_folder` before local-only code such as `from_pretrained` or vLLM)."""
        return join_uri(self.uri, *parts) if parts else self.uri

    def exists(self, name: str) -> bool:
        fs, root = self._fs()
        return fs.get_file_info(posixpath.join(root, name)).type != pafs.FileType.NotFound

    def complete(self) -> bool:
        fs, root = self._fs()
        return fs.get_file_info(posixpath.join(root, SUCCESS)).type == pafs.FileType.File

    def success_info(self) -> dict:
        fs, root = self._fs()
        with fs.open_input_stream(posixpath.join(root, SUCCESS)) as f:
            return json.loads(f.read().decode() or "{}")

    def reset(self) -> None:
        """Delete everything (used by --force)."""
        fs, root = self._fs()
        if fs.get_file_info(root).type != pafs.FileType.NotFound:
            fs.delete_dir(root)

    def ensure(self, *sub: str) -> str:
        fs, root = self._fs()
        target = posixpath.join(root, *sub)
        fs.create_dir(target, recursive=True)
        return target

    def part_files(self, *sub: str) -> list[str]:
        fs, root = self._fs()
        folder = posixpath.join(root, *sub)
        if fs.get_file_info(folder).type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
        return sorted(
            i.path for i in infos
            if i.type == pafs.FileType.File and i.base_name.startswith("part-") and i.base_name.endswith(".parquet")
        )

    def prune_parts(self, keep_keys: set[str], *sub: str) -> int:
        """Delete parts whose key is not in keep_keys (left by a batch killed before its commit record)."""
        fs, _ = self._fs()
        pruned = 0
        for path in self.part_files(*sub):
            if posixpath.basename(path)[len("part-"):-len(".parquet")] not in keep_keys:
                fs.delete_file(path)
                pruned += 1
        return pruned

    def part_keys(self, *sub: str) -> set[str]:
        return {posixpath.basename(p)[len("part-"):-len(".parquet")] for p in self.part_files(*sub)}

    def all_part_files(self) -> list[str]:
        """Every part under this output, sub-folders included, except quarantined ones."""
        fs, root = self._fs()
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith("part-")
                      and i.base_name.endswith(".parquet") and not i.path[len(root):].lstrip("/").startswith(QUARANTINE))

    def part_problem(self, path: str, footer_only: bool = False, columns: list[str] | None = None) -> str | None:
        """Why a part cannot be read (None: it can). Whole parts are read batch by batch (memory stays
        bounded); `footer_only` reads just the metadata, which a truncated file has lost; `columns` must all
        be in the part's schema (a part written by an older version may lack one)."""
        fs, _ = self._fs()
        try:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                missing = [c for c in columns or [] if c not in parquet.schema_arrow.names]
                if missing:
                    return f"no column {', '.join(missing)} (written by an older version of character?)"
                if not footer_only:
                    for _ in parquet.iter_batches(batch_size=65536):
                        pass
        except (pa.ArrowException, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def quarantine_unreadable(self) -> list[dict]:
        """Move parts that cannot be read, and every part written under the same batch key (a batch's kept
        rows, set-aside rows and commit record go together), to `_quarantine/` (same relative path), log why
        in `_quarantine/log.jsonl`, and return what moved. The ids in them are then missing, so the stage's
        resume makes those rows again."""
        parts = self.all_part_files()
        bad = {p: why for p in parts if (why := self.part_problem(p))}
        if not bad:
            return []
        fs, root = self._fs()
        keys = {posixpath.basename(p) for p in bad}
        moved = []
        for path in parts:
            if posixpath.basename(path) not in keys:
                continue
            rel = path[len(root):].lstrip("/")
            dest = posixpath.join(root, QUARANTINE, rel)
            if fs.get_file_info(dest).type != pafs.FileType.NotFound:
                dest = f"{dest[:-len('.parquet')]}.{uuid.uuid4().hex[:8]}.parquet"
            fs.create_dir(posixpath.dirname(dest), recursive=True)
            fs.move(path, dest)
            moved.append({"file": rel, "moved_to": dest[len(root):].lstrip("/"), "at": time.time(),
                          "reason": bad.get(path, "written with an unreadable part of the same batch")})
        log_name = posixpath.join(QUARANTINE, "log.jsonl")
        earlier = self.read_text(log_name) if self.exists(log_name) else ""
        self.write_text(log_name, earlier + "".join(json.dumps(m) + "\n" for m in moved))
        return moved

    def replace_part(self, path: str, table: pa.Table) -> None:
        """Rewrite a committed part in place (atomically); an empty table deletes it."""
        fs, _ = self._fs()
        if not table.num_rows:
            fs.delete_file(path)
            return
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}.parquet")
        atomic_write(fs, tmp, path, lambda sink: pq.write_table(table, sink))

    def clear(self, *sub: str) -> None:
        fs, _ = self._fs()
        for path in self.part_files(*sub):
            fs.delete_file(path)

    def write_part(self, table: pa.Table, *sub: str, key: str | None = None) -> str:
        """Write one part atomically: hidden temp name, then rename."""
        fs, _ = self._fs()
        folder = self.ensure(*sub)
        key = key or uuid.uuid4().hex[:16]
        final = posixpath.join(folder, f"part-{key}.parquet")
        tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}.parquet")
        atomic_write(fs, tmp, final, lambda sink: pq.write_table(table, sink))
        return final

    def read(self, *sub: str, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
        fs, _ = self._fs()
        files = self.part_files(*sub)
        if not files:
            if schema is None:
                raise FileNotFoundError(f"{self.uri}: no parts under {'/'.join(sub) or '.'}")
            return schema.empty_table().select(columns) if columns else schema.empty_table()
        tables = [pq.read_table(f, filesystem=fs, columns=columns, schema=schema) for f in files]
        return pa.concat_tables(tables)

    def ids(self, column: str, *sub: str) -> set[str]:
        """Ids already committed (for resume)."""
        if not self.part_files(*sub):
            return set()
        return set(self.read(*sub, columns=[column]).column(column).to_pylist())

    def write_json(self, name: str, payload: Any) -> None:
        self.write_text(name, json.dumps(payload, indent=2, sort_keys=True, default=str))

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_text(name))

    def write_text(self, name: str, text: str) -> None:
        """Whole-file write, atomic on a local disk (temp + rename) and on object stores (one PUT)."""
        fs, root = self._fs()
        folder, base = posixpath.split(name)
        target = self.ensure(*([folder] if folder else []))
        tmp = posixpath.join(target, f".tmp-{uuid.uuid4().hex}-{base}")
        atomic_write(fs, tmp, posixpath.join(target, base), lambda sink: sink.write(text.encode("utf-8")))

    def write_table(self, name: str, table: pa.Table) -> None:
        """One whole Parquet file (not a part), atomic like write_text."""
        fs, root = self._fs()
        target = self.ensure()
        tmp = posixpath.join(target, f".tmp-{uuid.uuid4().hex}-{name}")
        atomic_write(fs, tmp, posixpath.join(target, name), lambda sink: pq.write_table(table, sink))

    def read_table(self, name: str, schema: pa.Schema | None = None) -> pa.Table:
        fs, root = self._fs()
        return pq.read_table(posixpath.join(root, name), filesystem=fs, schema=schema)

    def read_text(self, name: str) -> str:
        fs, root = self._fs()
        with fs.open_input_stream(posixpath.join(root, name)) as f:
            return f.read().decode("utf-8")

    def mark_success(self, summary: dict) -> None:
        self.write_json(SUCCESS, {"finished_at": time.time(), **summary})


def require_complete(output: StageOutput, needed_by: str, schema: pa.Schema | None = None) -> None:
    """The upstream output is complete and each of its top-level parts has a readable footer (a cheap
    check; a part cut short loses its footer) with `schema`'s columns, else an error naming the file and
    the way out."""
    if not output.complete():
        raise MissingUpstreamError(
            f"{needed_by} needs the '{output.stage}' output at {output.uri}, which has no {SUCCESS}: "
            f"run that stage first"
        )
    root = output.root.rstrip("/")
    for path in output.all_part_files():
        columns = schema.names if schema is not None and posixpath.dirname(path).rstrip("/") == root else None
        if (why := output.part_problem(path, footer_only=True, columns=columns)) is None:
            continue
        if why.startswith("no column"):
            raise StageInputError(f"{needed_by}: {path} has {why}: redo the stage that writes '{output.stage}' "
                                  f"with --force (and the stages after it)")
        raise StageInputError(
            f"{needed_by}: {path} cannot be read ({why}). Delete {output.path(SUCCESS)} and rerun the stage "
            f"that writes '{output.stage}': it moves the part to {output.path(QUARANTINE)}/ and makes its rows "
            f"again")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def publish_folder(local_dir: str, uri: str) -> None:
    """Put a finished local folder's files at `uri` (a model export). Local: files are renamed into place
    one by one (others already there, e.g. the PPO metrics, stay); remote: uploaded with pyarrow, each
    object appearing whole. Either way the stage's `_SUCCESS`, written afterwards, is the commit."""
    fs, root = split_uri(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(local_dir):
            target = os.path.join(root, name)
            if os.path.isdir(target) and os.path.isdir(os.path.join(local_dir, name)):
                shutil.rmtree(target)  # a sub-folder of an earlier export (an adapter/): replaced whole
            os.replace(os.path.join(local_dir, name), target)
        return
    fs.create_dir(root, recursive=True)
    pafs.copy_files(local_dir, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def fetch_folder(uri: str, cache: str) -> str:
    """A local copy of a (remote) folder for code that reads local files only (`from_pretrained`, vLLM).
    Cached under `cache`, keyed by the URI and the listing (names, sizes, modification times): a re-exported
    model is fetched again. The copy is published atomically (temp + rename), so concurrent fetchers on
    one node never see half a folder. A local path is returned as it is."""
    if not is_remote(uri):
        return split_uri(uri)[1]
    fs, root = split_uri(uri)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
             if i.type == pafs.FileType.File]
    if not infos:
        raise FileNotFoundError(f"{uri}: no files there")
    listing = sorted((i.path[len(root):], i.size, str(i.mtime)) for i in infos)
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:16]
    final = os.path.join(cache, f"{posixpath.basename(root.rstrip('/')) or 'folder'}-{key}")
    if os.path.isdir(final):
        return final
    os.makedirs(cache, exist_ok=True)
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    pafs.copy_files(root, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    try:
        os.rename(tmp, final)
    except OSError:  # another fetcher published first
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final
