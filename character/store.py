"""Stage outputs on any filesystem pyarrow reaches, written atomically and resumable.

Layout: `<output_dir>/<stage>/part-<key>.parquet` (+ `rejected/part-*.parquet` for set-aside rows,
`stats.json`) and `_SUCCESS` last. Each part is written to a hidden temporary name and renamed into
place, so a killed writer leaves either a whole part or nothing; a stage counts as done only once
`_SUCCESS` exists. A rerun reads the ids already in committed parts and processes only the rest.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SUCCESS = "_SUCCESS"


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

    def path(self, *parts: str) -> str:
        _, root = self._fs()
        return posixpath.join(root, *parts) if parts else root

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
        with fs.open_output_stream(tmp) as sink:
            pq.write_table(table, sink)
        fs.move(tmp, final)
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
        fs, root = self._fs()
        self.ensure()
        tmp = posixpath.join(root, f".tmp-{uuid.uuid4().hex}.json")
        with fs.open_output_stream(tmp) as sink:
            sink.write(json.dumps(payload, indent=2, sort_keys=True, default=str).encode())
        fs.move(tmp, posixpath.join(root, name))

    def read_json(self, name: str) -> Any:
        fs, root = self._fs()
        with fs.open_input_stream(posixpath.join(root, name)) as f:
            return json.loads(f.read().decode())

    def mark_success(self, summary: dict) -> None:
        self.write_json(SUCCESS, {"finished_at": time.time(), **summary})


def require_complete(output: StageOutput, needed_by: str) -> None:
    if not output.complete():
        raise FileNotFoundError(
            f"{needed_by} needs the '{output.stage}' output at {output.uri}, which has no {SUCCESS}: "
            f"run that stage first"
        )
