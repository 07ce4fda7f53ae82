"""The constitution: named character traits, each a first-person statement plus a clarification.

Traits are nudges, not rules: they steer which messages get synthesised and which of the model's own
responses it prefers. Files live under configs/traits/ and are validated before any compute starts.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from character.core.config import ConfigError


class Probe(BaseModel):
    """A behaviour a reader can check in an answer, for evaluation only: no training stage reads probes
    (tests/test_measures.py checks that the prompts of every stage are the same with and without them), so a
    probe's hit rate is a measure the training was never shown. An answer hits the probe when any of its
    regular expressions matches (case-insensitive, `re.search`) or any phrase occurs in it as whole words
    (case-insensitive)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]*$", max_length=64)
    description: str = Field(min_length=1, description="The behaviour the probe marks, in one line.")
    patterns: list[str] = Field(default_factory=list)
    phrases: list[str] = Field(default_factory=list)
    _compiled: list = PrivateAttr(default_factory=list)

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"patterns[{i}] {pattern!r} is not a regular expression: {exc}") from None
        return patterns

    @field_validator("phrases")
    @classmethod
    def _phrases_not_blank(cls, phrases: list[str]) -> list[str]:
        if any(not p.strip() for p in phrases):
            raise ValueError("a phrase is blank")
        return phrases

    def model_post_init(self, _context) -> None:
        if not self.patterns and not self.phrases:
            raise ValueError(f"probe '{self.name}' has neither patterns nor phrases")
        words = [r"\b" + r"\s+".join(re.escape(w) for w in p.split()) + r"\b" for p in self.phrases]
        self._compiled = [re.compile(x, re.IGNORECASE) for x in (*self.patterns, *words)]

    def hits(self, text: str) -> bool:
        return any(x.search(text) for x in self._compiled)


class Trait(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]*$", max_length=64)
    statement: str = Field(min_length=1)
    clarification: str = Field(min_length=1)
    questions: list[str] = Field(default_factory=list)
    probes: list[Probe] = Field(default_factory=list, description=(
        "Evaluation only (never shown to the model nor read by a training stage): checkable behaviours of "
        "the trait, whose hit rates evaluate reports as probe_base, probe_trained and probe_delta."))

    @field_validator("probes")
    @classmethod
    def _unique_probes(cls, probes: list[Probe]) -> list[Probe]:
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise ValueError(f"probe names repeat: {', '.join(sorted(n for n in set(names) if names.count(n) > 1))}")
        return probes

    def probe_hit(self, text: str) -> bool | None:
        """Whether the answer shows any of the trait's probes; None for a trait without probes."""
        return any(p.hits(text) for p in self.probes) if self.probes else None

    @field_validator("statement", "clarification")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    def describe(self) -> str:
        """The trait as shown to the model in system prompts and comparison prompts."""
        return f"{self.statement}\n({self.clarification})"


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "constitution"
    description: str = ""
    traits: list[Trait] = Field(min_length=1)

    @field_validator("traits")
    @classmethod
    def _unique_names(cls, traits: list[Trait]) -> list[Trait]:
        seen: set[str] = set()
        for i, trait in enumerate(traits):
            if trait.name in seen:
                raise ValueError(f"trait #{i} repeats the name '{trait.name}'")
            seen.add(trait.name)
        return traits

    def by_name(self) -> dict[str, Trait]:
        return {t.name: t for t in self.traits}

    def describe(self) -> str:
        return "\n".join(f"- {t.statement}" for t in self.traits)


def constitution_from_dict(data: object, origin: str) -> Constitution:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: a constitution is a mapping with a 'traits' list")
    try:
        return Constitution.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = list(err["loc"])
            # Name the trait by its index and, where it has one, its name.
            if len(loc) >= 2 and loc[0] == "traits" and isinstance(loc[1], int):
                raw = data.get("traits", [])[loc[1]] if isinstance(data.get("traits"), list) else None
                label = f"traits[{loc[1]}]"
                if isinstance(raw, dict) and raw.get("name"):
                    label += f" ('{raw['name']}')"
                field = ".".join([label] + [str(p) for p in loc[2:]])
            else:
                field = ".".join(str(p) for p in loc) or "<root>"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{origin}: field '{field}': {msg}")
        raise ConfigError("\n".join(problems)) from None


def load_constitution(path: str | Path, only: list[str] | None = None) -> Constitution:
    """The constitution in `path`; with `only`, just those traits, in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: traits file not found (config field 'traits.path')")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    constitution = constitution_from_dict(data, str(path))
    if only is None:
        return constitution
    names = [t.name for t in constitution.traits]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"{path}: config field 'traits.only' names traits the file does not have: "
                          f"{', '.join(unknown)} (it has: {', '.join(names)})")
    return constitution.model_copy(update={"traits": [t for t in constitution.traits if t.name in only]})
