"""Ray Train around the training loops: the trainer (resuming from its latest checkpoint), DeepSpeed checkpoints reported through ray.train.report and restored with their RNG, the settings a checkpoint depends on, and the fault drills of the tests."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from character.core.config import Config, ConfigError
from character.core.store import StageOutput, join_uri, split_uri
from character.tracking import runs as tracking
from character.training.deepspeed_setup import zero_stage

CKPT_TAG = "ckpt"


def save_and_report(engines: dict, client_state: dict, metrics: dict, files: dict[str, bytes] | None = None) -> None:
    """Each rank writes its DeepSpeed shards to a local temp dir; Ray Train merges them into one checkpoint.
    `files`: name -> bytes written beside them (one rank passes them, e.g. train-ppo's rollouts in flight)."""
    import ray.train
    from ray.train import Checkpoint

    tmp = tempfile.mkdtemp(prefix="character-ckpt-")
    try:
        for name, engine in engines.items():
            save_engine(engine, os.path.join(tmp, name), client_state)
        for name, data in (files or {}).items():
            Path(tmp, name).write_bytes(data)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(engines: dict, files: tuple[str, ...] = ()) -> dict | None:
    """Load the latest Ray Train checkpoint into the engines; returns its client state (None: fresh run), with
    `state["files"]`: name -> bytes of those of `files` that the checkpoint holds (save_and_report's)."""
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
        state["files"] = {name: Path(folder, name).read_bytes() for name in files if Path(folder, name).is_file()}
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


def trainer_for(config: Config, train_loop, loop_config: dict, name: str):
    """A TorchTrainer whose RunConfig(name, storage_path) makes a rerun resume from its latest checkpoint. The
    loop config carries the stage's tracking handle (`loop_config["tracking"]`, None if untracked)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
# on another number of workers (the data position counts examples). policy.sft: the model a stage starts from.
RESUME_SETTINGS = {
    "pm": ("model.name", "pm.base_model", "run.seed", "pm.micro_batch_size", "pm.grad_accum", "pm.lr",
           "pm.weight_decay", "pm.max_length", "pm.margin", "pm.eval_fraction", "train.dtype",
           "train.deepspeed_config", "train.lora", "policy.sft"),
    "policy": ("model.name", "policy.sft", "run.seed", "ppo.reward", "ppo.advantage", "ppo.policy_loss",
               "ppo.samples_per_prompt", "ppo.group_std", "ppo.kl_penalty", "ppo.critic_init", "ppo.prompts_per_iteration",
               "ppo.minibatch_size", "ppo.ppo_epochs", "ppo.lr", "ppo.critic_lr", "ppo.kl_coef", "ppo.kl_target",
               "ppo.kl_estimator", "ppo.sampling", "ppo.max_prompt_tokens", "ppo.eval_fraction", "train.dtype",
               "train.deepspeed_config", "train.lora"),
    "dpo": ("model.name", "policy.sft", "run.seed", "dpo.micro_batch_size", "dpo.grad_accum", "dpo.lr",
            "dpo.weight_decay", "dpo.max_length", "dpo.eval_fraction", "dpo.beta", "dpo.soft_labels", "dpo.nll_coef",
            "dpo.precompute_reference", "train.dtype", "train.deepspeed_config", "train.lora"),
    "sft": ("model.name", "run.seed", "sft.source", "sft.system_prompt", "sft.revision", "sft.micro_batch_size",
            "sft.grad_accum", "sft.lr", "sft.weight_decay", "sft.max_length", "sft.eval_fraction", "train.dtype",
            "train.deepspeed_config", "train.lora"),
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
    the fault fires once. Holding {"hold": [N, ...]} instead makes rank 0 pause on reaching each step N: it
    writes `_train/held-N` and waits for `_train/release-N` (a test acts, e.g. stops a server, while training
    is at a known step). Checked only for local run directories."""
    if "://" in config.run.output_dir:
        return
    folder = Path(config.run.output_dir) / "_train"
    path = folder / "inject_fault.json"
    if not path.is_file():
        return
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        return
    drill = json.loads(path.read_text())
    if step in drill.get("hold", []):
        (folder / f"held-{step}").touch()
        while not (folder / f"release-{step}").exists():
            time.sleep(0.05)
    if drill.get("step") == step:
        path.unlink()
        # Ray Train V2's controller registers a reported checkpoint when it next polls the workers; a crash
        # before that loses the registration and resume falls back one checkpoint. Waiting until every report
        # so far is committed (the controller has saved its snapshot) makes the drill deterministic, however
        # slow the controller's poll.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        os._exit(1)
