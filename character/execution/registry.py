"""The stages, declared once. Everything that names a stage reads it from here: the CLI's commands and
`character run`'s order (character/pipeline/cli.py), `python -m rayjobs <stage>`, the messages that name the
stage writing an output, the progress estimate, the checks run before a stage, and the stage table of the docs
(a test compares them).

A stage is the module `character/stages/<name with _>.py` with `run(config, force) -> StageResult`, plus one
`StageSpec` below, in the order `character run` goes through them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa

from character.core import schemas
from character.core.config import Config
from character.execution import work
from character.training.estimators import uses_critic


def _always(config: Config) -> bool:
    return True


@dataclass(frozen=True)
class StageSpec:
    name: str  # the command: `character <name>`, `python -m rayjobs <name>`
    output: str  # its folder under run.output_dir
    summary: str  # one line: the CLI's help and the docs' stage table
    reads: Callable[[Config], tuple[str, ...]]  # the stages whose complete output it needs
    schema: pa.Schema | None  # the rows it writes as part files (None: a model folder or a page)
    work: Callable[[Config, work.RunSize], float]  # estimated token passes (character/execution/work.py)
    models: tuple[str, ...] = ()  # config fields naming models it loads: checked before it starts
    trains: bool = False  # a Ray Train + DeepSpeed stage: DeepSpeed, LoRA and worker-count checks
    in_run: Callable[[Config], bool] = field(default=_always)  # whether `character run` goes through it
    starts_ray: bool = True
    module: str = ""  # the stage module: character.stages.<name with _> unless given

    def __post_init__(self):
        if not self.module:
            object.__setattr__(self, "module", f"character.stages.{self.name.replace('-', '_')}")

    @property
    def rayjob(self) -> str:
        return f"python -m rayjobs {self.name}"


def _ppo(config: Config) -> bool:
    return config.policy.method == "ppo"


def _sft(config: Config) -> tuple[str, ...]:
    """train-sft, for the stages that start from its model (policy.sft)."""
    return ("train-sft",) if config.policy.sft else ()


def _sft_reads(config: Config) -> tuple[str, ...]:
    return ("respond",) if config.sft.source == "all" else ("respond", "rank")


def _ppo_reads(config: Config) -> tuple[str, ...]:
    ppo = config.ppo
    needs_pm = ppo.reward == "pm" or (uses_critic(ppo) and ppo.critic_init == "pm")
    return ("synthesize", *_sft(config), *(("train-pm",) if needs_pm else ()))


def _evaluate_reads(config: Config) -> tuple[str, ...]:
    trained = ("train-pm", "train-ppo") if _ppo(config) else ("train-dpo",)
    return ("synthesize", *_sft(config), *trained)


SPECS = (
    StageSpec("synthesize", "messages", "the model writes human messages per trait; deduplicated, filtered, split",
              lambda c: (), schemas.MESSAGES, work.synthesize, models=("model.name",)),
    StageSpec("respond", "responses", "candidate responses per training message, in character",
              lambda c: ("synthesize",), schemas.RESPONSES, work.respond, models=("model.name",)),
    StageSpec("rank", "preferences", "the model ranks its own candidates against the trait: soft-labelled pairs",
              lambda c: ("respond",), schemas.PREFERENCES, work.rank, models=("model.name", "judge.model")),
    StageSpec("train-sft", "sft", "supervised fine-tuning on the model's own in-character answers, shown without "
              "the trait (context distillation: best-of-K, every candidate, or CAI critique-and-revision)",
              _sft_reads, None, work.train_sft, models=("model.name", "sft.revision.model"), trains=True,
              in_run=lambda c: c.policy.sft),
    StageSpec("train-pm", "pm", "a preference model on the pairs (Ray Train + DeepSpeed)",
              lambda c: ("rank", *_sft(c)), None, work.train_pm, models=("model.name", "pm.base_model"), trains=True,
              in_run=_ppo),
    StageSpec("train-ppo", "policy", "the policy against the preference model: PPO, GRPO or RLOO, KL to the reference",
              _ppo_reads, None, work.train_ppo, models=("model.name", "pm.base_model"), trains=True, in_run=_ppo),
    StageSpec("train-dpo", "dpo", "the policy on the pairs directly (DPO), instead of train-pm and train-ppo",
              lambda c: ("rank", *_sft(c)), None, work.train_dpo, models=("model.name",), trains=True,
              in_run=lambda c: not _ppo(c)),
    StageSpec("evaluate", "eval", "base vs trained on held-out and adversarial messages, per trait",
              _evaluate_reads, schemas.EVAL, work.evaluate, models=("model.name", "evaluate.judge.model")),
    StageSpec("report", "report", "one HTML page: figures and examples per trait",
              lambda c: ("evaluate",), None, work.nothing, starts_ray=False),
)
STAGES: dict[str, StageSpec] = {s.name: s for s in SPECS}
WRITER: dict[str, str] = {s.output: s.name for s in SPECS}  # output folder -> the stage that writes it


def run_order(config: Config) -> list[str]:
    """The stages `character run` goes through, in order."""
    return [s.name for s in SPECS if s.in_run(config)]


def writer(output: str) -> str:
    """The stage that writes an output folder (for messages that name it), or the folder's own name."""
    return WRITER.get(output, output)


def stage_work(config: Config, n_traits: int, n_seed_questions: int) -> dict[str, float]:
    """Estimated token passes of every stage (the progress estimate of `character run`)."""
    size = work.RunSize(n_traits, n_seed_questions)
    return {s.name: s.work(config, size) for s in SPECS}


def spec_of(module: str) -> StageSpec:
    """The StageSpec of a stage module, from its `__name__` (character.stages.train_pm -> train-pm): a stage
    module never writes its own name or output folder."""
    name = module.rsplit(".", 1)[-1].replace("_", "-")
    if name not in STAGES:
        raise KeyError(f"{module} is not a registered stage (character/execution/registry.py SPECS)")
    return STAGES[name]
