"""Configuration that documents itself: every setting of `Config` with its type, default and description
(the `Field(description=...)` of the models in character/core/config_sections.py and config_training.py),
and, given a config file, the value it resolves to.

    .venv/bin/python -m character.pipeline.config_help [--config FILE] [SECTION] [key.sub=value ...]
    .venv/bin/python -m character.pipeline.config_help --write docs/config.md
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from character.core.config import Config, ConfigError, config_from_dict, load_config

WRITE_COMMAND = ".venv/bin/python -m character.pipeline.config_help --write docs/config.md"
REQUIRED = "(required)"


@dataclass
class Setting:
    """One field of the config tree. `path` is the attribute path of its value in a `Config` (None for the
    fields of list items, such as rank.few_shot[].message); `section` is True for a nested model."""

    name: str
    type: str
    default: str
    description: str
    path: tuple[str, ...] | None
    section: bool


def _model_class(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model class, whether it is a list of them) when the annotation is a model or a list of models."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, True
    return None, False


def format_type(annotation: Any) -> str:
    """A readable type: `int | None`, `list[str]`, `"gae" | "grpo" | "rloo"`, `section` for a nested model."""
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "Any"
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(f'"{v}"' if isinstance(v, str) else repr(v) for v in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(format_type(a) for a in typing.get_args(annotation))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(format_type(a) for a in typing.get_args(annotation))}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = {annotated_types.Gt: ("gt", ">"), annotated_types.Ge: ("ge", ">="), annotated_types.Lt: ("lt", "<"),
           annotated_types.Le: ("le", "<=")}


def _constraints(field: FieldInfo) -> list[str]:
    out = []
    for item in field.metadata:
        if type(item) in _BOUNDS:
            attr, sign = _BOUNDS[type(item)]
            out.append(f"{sign} {getattr(item, attr)}")
        elif isinstance(item, annotated_types.MinLen):
            out.append(f"length >= {item.min_length}")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def format_value(value: Any) -> str:
    """A value as it is written in YAML or in a key.sub=value override (None is null)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=1 << 30, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


def _walk(model: type[BaseModel], defaults: BaseModel | None, prefix: str,
          path: tuple[str, ...] | None) -> list[Setting]:
    """The settings of `model` and of its nested models, depth first. `defaults` is the parent's default
    instance (a section's defaults may differ from its model's own, e.g. each stage's sampling)."""
    rows = []
    for name, field in model.model_fields.items():
        if defaults is not None:
            default = format_value(getattr(defaults, name))
        else:
            default = REQUIRED if field.is_required() else format_value(field.get_default(call_default_factory=True))
        nested, is_list = _model_class(field.annotation)
        key = field.alias or name  # as YAML and overrides spell it (ppo.async: the field async_)
        dotted, here = prefix + key, None if path is None else (*path, name)
        kind = ", ".join([format_type(field.annotation), *_constraints(field)])
        section = nested is not None and not is_list
        rows.append(Setting(dotted, kind, "" if section else default, field.description or "", here, section))
        if section:
            value = getattr(defaults, name) if defaults is not None else field.get_default(call_default_factory=True)
            rows += _walk(nested, value, dotted + ".", here)
        elif nested is not None:
            rows += _walk(nested, None, dotted + "[].", None)
    return rows


def settings() -> list[Setting]:
    """Every field reachable from `Config`, with dotted names, in declaration order."""
    return _walk(Config, None, "", ())


def _select(rows: list[Setting], section: str) -> list[Setting]:
    names = {r.name for r in rows}
    if section not in names:
        parent = section.rpartition(".")[0]
        if parent in names:
            known = [r.name for r in rows if r.section and r.name.rpartition(".")[0] == parent]
            where = f"sections of {parent}"
        else:
            known = [r.name for r in rows if r.section and "." not in r.name]
            where = "known sections"
        raise ConfigError(f"unknown section '{section}'; {where}: {', '.join(known) or 'none'}")
    return [r for r in rows if r.name == section or r.name.startswith((section + ".", section + "[]."))]


def _resolved(config: Config, path: tuple[str, ...]) -> Any:
    value: Any = config
    for key in path:
        value = getattr(value, key)
    return value


def describe_settings(config_path: str | None = None, section: str | None = None,
                      overrides: list[str] | None = None) -> str:
    """Each setting (optionally of one section, e.g. `ppo` or `engine.actors`, or one field) as a block: its
    dotted name and type, its default, its value in `config_path` with `overrides` (loaded with
    `load_config`; without a file, the overrides apply to the defaults), and its description."""
    rows = settings()
    if section:
        rows = _select(rows, section)
    config = None
    lines = []
    if config_path is not None:
        config = load_config(config_path, overrides)
        lines.append(f"Settings of {config_path}" + (f" with {' '.join(overrides)}" if overrides else "") + "\n")
    elif overrides:
        config = config_from_dict({}, origin="<defaults>", overrides=overrides)
        lines.append(f"Settings: the defaults with {' '.join(overrides)}\n")
    for row in rows:
        block = [f"{row.name} ({row.type})"]
        if not row.section:
            block.append(f"  default: {row.default}")
            if config is not None and row.path is not None:
                block.append(f"  value:   {format_value(_resolved(config, row.path))}")
        block += textwrap.wrap(row.description, 100, initial_indent="  ", subsequent_indent="  ")
        lines.append("\n".join(block) + "\n")
    return "\n".join(lines)


def _cell(text: str, code: bool = False) -> str:
    text = text.replace("|", "\\|")
    if code:
        return f"`{text}`" if text else ""
    return text.replace("*", "\\*").replace("<", "\\<")


def _table(rows: list[Setting]) -> list[str]:
    out = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for row in rows:
        out.append(f"| {_cell(row.name, True)} | {_cell(row.type, True)} | {_cell(row.default, True)} | "
                   f"{_cell(row.description)} |")
    return out


def config_markdown() -> str:
    """The text of docs/config.md: one table per section of `Config`."""
    rows = settings()
    sections = [r for r in rows if r.section and "." not in r.name]
    others = [r for r in rows if "." not in r.name and not r.section]
    lines = [
        "# Configuration reference",
        "",
        f"Generated by `{WRITE_COMMAND}`",
        "from the `Field(description=...)` of the config models (`character/core/config.py`, `config_sections.py`,",
        "`config_training.py`): edit those and regenerate; `tests/test_config_docs.py` fails when this file is out",
        "of date.",
        "",
        "Every setting of `character <stage> --config FILE [key.sub=value ...]`, by section. Defaults are written",
        "as in YAML (`null` is None); `section` rows group the dotted fields below them, and `[]` marks the",
        "fields of each item of a list. `python -m character.pipeline.config_help --config FILE [SECTION]`",
        "shows the values a config file resolves to.",
        "",
        "Sections: " + ", ".join(f"[`{r.name}`](#{r.name})" for r in sections) + ".",
    ]
    for sec in sections:
        lines += ["", f"## {sec.name}", "", _cell(sec.description), ""]
        lines += _table([r for r in rows if r.name.startswith(sec.name + ".")])
    if others:
        lines += ["", "## Other fields", ""] + _table(others)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m character.pipeline.config_help",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help="write the markdown reference (docs/config.md) to PATH")
    parser.add_argument("--config", help="YAML config file whose resolved values to show")
    parser.add_argument("args", nargs="*", help="a section (e.g. ppo, engine.actors) and/or key.sub=value overrides")
    ns = parser.parse_args(argv)
    if ns.write:
        if ns.config or ns.args:
            parser.error("--write takes no --config, section or overrides")
        Path(ns.write).write_text(config_markdown())
        print(f"wrote {ns.write}")
        return 0
    overrides = [a for a in ns.args if "=" in a]
    sections = [a for a in ns.args if "=" not in a]
    if len(sections) > 1:
        parser.error(f"one section at most, got {', '.join(sections)}")
    try:
        print(describe_settings(ns.config, sections[0] if sections else None, overrides or None), end="")
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
