"""A trained model written as an ordinary Hugging Face folder (safetensors), locally or on object storage,
published whole: readers never see half an export."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from character.core.store import is_remote, publish_folder, split_uri


def export_model(model_class, model_config, weights: dict, tokenizer, uri: str, files: dict | None = None) -> None:
    """A trained model as an ordinary HF folder at `uri` (local or object storage): a clean model built from
    `model_config` takes `weights` strictly (a missing or unexpected key is an error, not a silently
    untrained tensor), saved with `save_pretrained` (safetensors) with the tokenizer and `files` (name ->
    JSON-able payload), in the weights' own dtype."""
    dtype = next(iter(weights.values())).dtype
    model = model_class.from_config(model_config, dtype=dtype)
    model.load_state_dict(weights, strict=True)

    def write(folder: str) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    write_folder(uri, write, files)


def write_folder(uri: str, write, files: dict | None = None) -> None:
    """`write(folder)` fills a temporary folder (plus `files`: name -> JSON-able payload), which is then
    published at `uri` (local or object storage): readers never see half an export."""
    local_parent = None if is_remote(uri) else os.path.dirname(split_uri(uri)[1])
    if local_parent:
        os.makedirs(local_parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=local_parent)  # same disk as the target: renames are atomic
    try:
        write(tmp)
        for name, payload in (files or {}).items():
            Path(tmp, name).write_text(json.dumps(payload, indent=2, sort_keys=True))
        publish_folder(tmp, uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
