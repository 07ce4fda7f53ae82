"""The configuration documents itself: every field has a description, docs/config.md is generated from them
and current, and `describe_settings` shows a config file's resolved values (fast: no Ray)."""
from __future__ import annotations

import typing

import pytest
from pydantic import BaseModel

from character.core.config import Config, ConfigError
from character.pipeline.config_help import WRITE_COMMAND, config_markdown, describe_settings


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _reachable_models() -> list[type[BaseModel]]:
    seen, todo = [], [Config]
    while todo:
        model = todo.pop()
        if model not in seen:
            seen.append(model)
            todo += [m for field in model.model_fields.values() for m in _models_in(field.annotation)]
    return seen


def test_every_field_has_a_description():
    models = _reachable_models()
    assert len(models) > 15  # the sections, their nested models (sampling, actors, rule, lora, few-shot items)
    missing = [f"{model.__name__}.{name}" for model in models for name, field in model.model_fields.items()
               if not (field.description or "").strip()]
    assert not missing, f"fields without Field(description=...): {', '.join(missing)}"


def test_docs_config_md_is_current(repo):
    path = repo / "docs" / "config.md"
    assert path.is_file() and path.read_text() == config_markdown(), (
        f"docs/config.md is out of date with the config models: regenerate it with `{WRITE_COMMAND}`")


def _block(text: str, name: str) -> str:
    blocks = [b for b in text.split("\n\n") if b.startswith(name + " (")]
    assert len(blocks) == 1, f"{name} listed {len(blocks)} times in:\n{text}"
    return blocks[0]


def test_describe_settings_shows_resolved_values(repo):
    text = describe_settings(str(repo / "configs/tiny.yaml"), "ppo")
    kl = _block(text, "ppo.kl_coef")
    assert "default: 0.05" in kl and "value:   0.05" in kl  # configs/tiny.yaml: kl_coef: 0.05
    description = Config.model_fields["ppo"].annotation.model_fields["kl_coef"].description
    assert description in " ".join(kl.split())  # wrapped, in full
    assert "value:   6" in _block(text, "ppo.iterations") and "default: 20" in _block(text, "ppo.iterations")
    assert "value:   32" in _block(text, "ppo.sampling.max_tokens")
    names = [b.split()[0] for b in text.split("\n\n") if b.strip() and not b.startswith("Settings of")]
    assert names[0] == "ppo" and all(n.startswith("ppo.") for n in names[1:]), names  # the ppo section only

    changed = describe_settings(str(repo / "configs/tiny.yaml"), "ppo.kl_coef", ["ppo.kl_coef=0.2"])
    assert "value:   0.2" in _block(changed, "ppo.kl_coef")


def test_unknown_section_names_the_known_ones(repo):
    with pytest.raises(ConfigError, match="unknown section 'pppo'") as err:
        describe_settings(str(repo / "configs/tiny.yaml"), "pppo")
    assert all(name in str(err.value) for name in ("ppo", "engine", "synthesize", "tracking"))
    with pytest.raises(ConfigError, match="ppo.sampling"):
        describe_settings(None, "ppo.samplng")
