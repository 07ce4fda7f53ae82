"""Ray Train + DeepSpeed plumbing shared by the training stages (train-pm, train-ppo, train-dpo)."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from character.config import Config, TrainConfig
from character.store import join_uri, split_uri

CKPT_TAG = "ckpt"


class NonFiniteError(RuntimeError):
    pass


class NonFiniteGuard:
    """Counts skipped steps (non-finite loss, or a non-finite gradient norm that DeepSpeed skipped) and
    stops the run after `max_in_row` consecutive ones, naming the step."""

    def __init__(self, max_in_row: int, in_row: int = 0, total: int = 0):
        self.max_in_row, self.in_row, self.total = max_in_row, in_row, total

    def update(self, ok: bool, step: int, what: str) -> bool:
        if ok:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            raise NonFiniteError(f"step {step}: {what} was not finite for {self.in_row} steps in a row "
                                 f"({self.total} skipped in all); stopping (limit {self.max_in_row})")
        return False


def read_deepspeed_json(path: str) -> dict:
    from character.config import ConfigError

    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the DeepSpeed config (field 'train.deepspeed_config'): {exc}") from None
    stage = ds.get("zero_optimization", {}).get("stage", 0) if isinstance(ds, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: field 'zero_optimization.stage' must be 0-3, got {stage!r}")
    return ds


def deepspeed_config(train: TrainConfig, micro: int, accum: int, world: int, dtype: str = "float32") -> dict:
    """The JSON's settings plus the batch sizes and the precision section matching the training dtype
    (DeepSpeed keeps fp32 master weights for bf16/fp16; a JSON's own bf16/fp16 section is overridden,
    so the models' dtype and DeepSpeed's can never disagree)."""
    ds = read_deepspeed_json(train.deepspeed_config)
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * world
    if zero_stage(ds) in (1, 2):
        # Optimizer partitions saved so that a group of another size can load them (elastic resize).
        ds["zero_optimization"]["elastic_checkpoint"] = True
    ds.pop("bf16", None)
    ds.pop("fp16", None)
    if dtype == "bfloat16":
        ds["bf16"] = {"enabled": True}
    elif dtype == "float16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


def adamw(params, **kwargs):
    """torch's AdamW as DeepSpeed's elastic ZeRO-1/2 checkpoints need it: they save and restore a `step` in
    the param groups (DeepSpeed's own Adam keeps it there; torch's keeps it per parameter, in its state,
    which the checkpoint carries anyway), and refuse to load without one. The group entry is a constant
    that torch never reads."""
    import torch

    optimizer = torch.optim.AdamW(params, **kwargs)
    for group in optimizer.param_groups:
        group["step"] = 0
    return optimizer


def frozen_engine(model, ds: dict):
    """A frozen model (PPO's reference and reward) as a DeepSpeed inference engine: ZeRO-3 when training
    uses it, else stage 0 (stages 1 and 2 need an optimizer)."""
    import deepspeed

    frozen = {k: v for k, v in ds.items() if k != "zero_optimization"}
    frozen["zero_optimization"] = {"stage": 3 if zero_stage(ds) == 3 else 0}
    engine, *_ = deepspeed.initialize(model=model, config=frozen)
    engine.eval()
    return engine


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def setup_distributed(use_gpu: bool) -> None:
    import deepspeed

    if not use_gpu:
        # Every init_distributed would JIT-compile the shm comm op (~80 s) that ZeRO over gloo never uses.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # reuses Ray Train's group


def build_under_zero(factory, ds: dict):
    """Construct a HF model so that ZeRO-3 partitions it at creation. The HfDeepSpeedConfig object must
    stay alive while the model is built (a bare deepspeed.zero.Init() fails on HF models here)."""
    if zero_stage(ds) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds)
        model = factory()
        model._character_hf_ds_config = keep_alive
        return model
    return factory()


def all_agree(flag: bool) -> bool:
    """True only if every rank says True (a skipped step must be skipped everywhere)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def is_finite(x) -> bool:
    return math.isfinite(float(x.detach()) if hasattr(x, "detach") else float(x))


@contextmanager
def eval_mode(*engines):
    """Scoring forwards without dropout (LoRA dropout included), back to training mode afterwards."""
    for engine in engines:
        engine.eval()
    try:
        yield
    finally:
        for engine in engines:
            engine.train()


def accumulation_step(engines: list, micro_losses, accum: int) -> tuple[list[list[float]], bool]:
    """One optimizer step of every engine over `accum` micro-batches; `micro_losses(m)` returns micro-batch
    m's loss for each engine. Returns the per-micro-batch losses and whether the step was applied.

    Every micro-batch is backpropagated, always: DeepSpeed finds the accumulation boundary by counting
    micro-steps, and under ZeRO the backward passes are collectives, so stopping early (as a `break` would)
    leaves the counter and the gradients of the next step inconsistent. Once any loss on any rank is not
    finite, that and every later loss of the step is multiplied by NaN: the gradients at the boundary are
    then non-finite on every rank, and DeepSpeed's overflow check skips the whole step, leaving parameters
    and optimizer state exactly as they were (tests/test_accumulation.py)."""
    before = [e.skipped_steps for e in engines]
    poisoned, kept = False, []
    for m in range(accum):
        losses = micro_losses(m)
        if not all_agree(all(is_finite(x) for x in losses)):
            poisoned = True
        if poisoned:
            losses = [x * float("nan") for x in losses]
        else:
            kept.append([float(x) for x in losses])
        for engine, loss in zip(engines, losses):
            engine.backward(loss)
            engine.step()
    skipped = [e.skipped_steps > b for e, b in zip(engines, before)]
    if poisoned and not all(skipped):
        raise NonFiniteError("a non-finite loss reached an optimizer step that DeepSpeed did not skip (its overflow "
                             "check is off for this configuration): the parameters are no longer finite")
    return kept, not any(skipped)


def save_and_report(engines: dict, client_state: dict, metrics: dict) -> None:
    """Each rank writes its DeepSpeed shards to a local temp dir; Ray Train merges them into one checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    tmp = tempfile.mkdtemp(prefix="character-ckpt-")
    try:
        for name, engine in engines.items():
            save_engine(engine, os.path.join(tmp, name), client_state)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(engines: dict) -> dict | None:
    """Load the latest Ray Train checkpoint into the engines; returns its client state (None: fresh run)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    import torch.distributed as dist

    state = None
    with checkpoint.as_directory() as folder:
        for name, engine in engines.items():
            saved = saved_world_size(os.path.join(folder, name, CKPT_TAG))
            resized = saved not in (None, dist.get_world_size())
            if resized and zero_stage(engine.config) == 3:
                raise RuntimeError(f"the checkpoint was written by {saved} workers, this group has "
                                   f"{dist.get_world_size()}: ZeRO-3 checkpoints load on the same count only")
            # DeepSpeed 0.19.8 refuses to re-partition optimizer state for another number of workers (even from
            # elastic checkpoints); its elastic load still merges and re-partitions the fp32 master weights.
            # So a resized group resumes the exact weights, data position, RNG and counters, and restarts
            # Adam's moments (a warning says so).
            client = load_engine(engine, os.path.join(folder, name), load_optimizer_states=not resized)
            if resized:
                print(f"[resume] '{name}': checkpoint of {saved} workers loaded on {dist.get_world_size()}: "
                      f"weights resumed exactly, optimizer moments restarted", file=sys.__stdout__, flush=True)
            state = client if state is None else state
            state["resized_from"] = saved if resized else None
    return state


def rng_states() -> list:
    """Every rank's torch RNG state, gathered (a collective: every rank calls). DeepSpeed keeps the client
    state of rank 0 only, so a state saved per rank would come back as rank 0's on every rank, and the
    dropout masks of a resumed run would differ from an uninterrupted one's."""
    import torch
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, torch.get_rng_state())
    return gathered


def restore_rng(state: dict) -> None:
    """This rank's saved RNG state (a resized group: rank r takes saved state r mod the saved count)."""
    import torch
    import torch.distributed as dist

    saved = state.get("rng")
    if saved is None:
        return
    if isinstance(saved, list):
        saved = saved[dist.get_rank() % len(saved)]
    torch.set_rng_state(saved)


def save_engine(engine, folder: str, client_state: dict) -> None:
    """DeepSpeed's checkpoint of one engine. A LoRA model's frozen base is left out (it is rebuilt from the
    model name on resume): the adapters, the trained heads and their optimizer state only."""
    engine.save_checkpoint(folder, tag=CKPT_TAG, client_state=client_state,
                           exclude_frozen_parameters=has_frozen(engine))


def load_engine(engine, folder: str, load_optimizer_states: bool = True) -> dict:
    """Load `save_engine`'s checkpoint; returns its client state. Without frozen parameters every key must
    match; with them (LoRA) the frozen ones are absent by design (tests/test_accumulation.py checks that every
    trained one is restored)."""
    _, client = engine.load_checkpoint(folder, tag=CKPT_TAG, load_optimizer_states=load_optimizer_states,
                                       load_module_strict=not has_frozen(engine))
    return client


def has_frozen(engine) -> bool:
    """A model with frozen parameters (a LoRA base): its checkpoints hold the trained ones only."""
    return any(not p.requires_grad for p in engine.module.parameters())


def saved_world_size(folder: str) -> int | None:
    """Workers that wrote a DeepSpeed checkpoint folder: one optimizer-state file each."""
    if not os.path.isdir(folder):
        return None
    return sum(1 for f in os.listdir(folder) if f.endswith("optim_states.pt")) or None


def full_state_dict(engine, keep: bool = True, copy: bool = True) -> dict | None:
    """Full fp32 weights (gathering ZeRO-3 partitions: a collective, call it on every rank). `keep=False`
    returns None (a rank that only takes part in the gather); `copy=False` returns views of the live
    parameters where ZeRO does not partition them (valid until the next optimizer step)."""
    import deepspeed

    model = engine.module
    if zero_stage(engine.config) == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            # The gathered storage is freed on leaving the context: copy what is kept.
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if keep else None
    if not keep:
        return None
    return {k: (v.detach().cpu().clone() if copy else v.detach().cpu()) for k, v in model.state_dict().items()}


def plain_model_construction() -> None:
    """End ZeRO-3's construct-time partitioning (HfDeepSpeedConfig): a model built afterwards, e.g. on
    rank 0 alone for export, must not enter DeepSpeed's collectives."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def trainer_for(config: Config, train_loop, loop_config: dict, name: str):
    """A TorchTrainer whose RunConfig(name, storage_path) makes a rerun resume from its latest checkpoint. The
    loop config carries the stage's tracking handle (`loop_config["tracking"]`, None if untracked)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from character import tracking

    train = config.train
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        train_loop_config={**loop_config, "tracking": tracking.current()},
        scaling_config=ScalingConfig(num_workers=train.num_workers if isinstance(train.num_workers, int)
                                     else tuple(train.num_workers), use_gpu=train.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=train_storage(config),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
        ),
    )


# The settings a checkpoint depends on, per training stage: resuming it under others would silently mix two
# runs (a reported failure of other RL frameworks). Worker counts are absent on purpose: both stages resume
# on another number of workers (the data position counts examples).
RESUME_SETTINGS = {
    "pm": ("model.name", "pm.base_model", "run.seed", "pm.micro_batch_size", "pm.grad_accum", "pm.lr",
           "pm.weight_decay", "pm.max_length", "pm.margin", "pm.eval_fraction", "train.dtype",
           "train.deepspeed_config", "train.lora"),
    "policy": ("model.name", "run.seed", "ppo.reward", "ppo.advantage", "ppo.samples_per_prompt", "ppo.group_std",
               "ppo.kl_penalty", "ppo.critic_init", "ppo.prompts_per_iteration",
               "ppo.minibatch_size", "ppo.ppo_epochs", "ppo.lr", "ppo.critic_lr", "ppo.kl_coef", "ppo.kl_target",
               "ppo.kl_estimator", "ppo.sampling", "ppo.max_prompt_tokens", "ppo.eval_fraction", "train.dtype",
               "train.deepspeed_config", "train.lora"),
    "dpo": ("model.name", "run.seed", "dpo.micro_batch_size", "dpo.grad_accum", "dpo.lr", "dpo.weight_decay",
            "dpo.max_length", "dpo.eval_fraction", "dpo.beta", "dpo.soft_labels", "dpo.nll_coef",
            "dpo.precompute_reference", "train.dtype", "train.deepspeed_config", "train.lora"),
}
SETTINGS_FILE = "resume_settings.json"


def resume_settings(config: Config, stage: str) -> dict:
    tree = config.model_dump(mode="json")
    values = {}
    for dotted in RESUME_SETTINGS[stage]:
        node = tree
        for key in dotted.split("."):
            node = node[key]
        values[dotted] = node
    return values


def check_resume_settings(config: Config, stage: str, data: dict | None = None) -> None:
    """Before any training: checkpoints under `_train/<stage>` made with other settings than the config's
    are refused, naming each difference; with no checkpoint yet, the config's settings are recorded. `data`:
    settings of the training data beside the config's (what a review set aside), "none" when absent."""
    from character.config import ConfigError
    from character.store import StageOutput

    state = StageOutput(config.run.output_dir, f"_train/{stage}")
    current = {**resume_settings(config, stage), **(data or {})}
    fs, root = split_uri(state.uri)
    import pyarrow.fs as pafs

    listing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    has_checkpoint = any(i.base_name.startswith("checkpoint_") for i in listing)
    if has_checkpoint and state.exists(SETTINGS_FILE):
        # A setting newer than the checkpoint (e.g. train.lora) was at its default when the checkpoint was made.
        saved = {**resume_settings(Config(), stage), **{k: "none" for k in data or {}}, **state.read_json(SETTINGS_FILE)}
        diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} in the config"
                for k, v in current.items() if saved.get(k) != v]
        if diff:
            raise ConfigError(f"{config.source or '<config>'}: {state.uri} holds checkpoints made with other "
                              f"settings, which would be resumed as if they were this run's:\n  " + "\n  ".join(diff)
                              + f"\nrestore those settings, or rerun with --force to start '{stage}' afresh")
        return
    state.write_json(SETTINGS_FILE, current)


def train_storage(config: Config) -> str:
    uri = join_uri(config.run.output_dir, "_train")
    return uri if "://" in uri else split_uri(uri)[1]


def maybe_inject_fault(config: Config, step: int) -> None:
    """Fault drills and tests: a file `<run>/_train/inject_fault.json` holding {"step": N} makes rank 0
    kill its own process (os._exit, as a crash would) on reaching step N; the file is consumed first so
    the fault fires once. Checked only for local run directories."""
    if "://" in config.run.output_dir:
        return
    path = Path(config.run.output_dir) / "_train" / "inject_fault.json"
    if not path.is_file():
        return
    import ray.train

    if ray.train.get_context().get_world_rank() == 0 and json.loads(path.read_text()).get("step") == step:
        path.unlink()
        # Ray Train V2's controller registers a reported checkpoint when it next polls the workers; a crash
        # before that loses the registration and resume falls back one checkpoint. Waiting until every report
        # so far is committed (the controller has saved its snapshot) makes the drill deterministic, however
        # slow the controller's poll.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        os._exit(1)


class StepClock:
    """Progress lines of a training loop on rank 0: step n of N, seconds per step, an estimate of the time
    left (from the steps timed in this process: a resumed run's estimate starts afresh). One line after the
    first step and one at each tenth of the total: the workers' output is a log, not a terminal."""

    def __init__(self, label: str, first: int, total: int, enabled: bool):
        self.label, self.first, self.total, self.enabled = label, first, total, enabled
        self.start = time.monotonic()
        self.tenth = -1

    def tick(self, done: int, extra: str = "") -> None:
        if not self.enabled or done <= self.first:
            return
        tenth = 10 * done // max(self.total, 1)
        if done > self.first + 1 and tenth == self.tenth:
            return
        self.tenth = tenth
        per_step = (time.monotonic() - self.start) / (done - self.first)
        left = per_step * (self.total - done)
        # sys.__stdout__: Ray Train 2.60 patches print() in its workers to tee stdout into its logger, and
        # both reach the driver, so every line showed twice; the worker's own stdout reaches it once.
        print(f"[{self.label}] {done}/{self.total}, {per_step:.1f} s each, about {left:.0f} s left"
              + (f"; {extra}" if extra else ""), file=sys.__stdout__, flush=True)
