"""Preference-model training throughput: plain PyTorch vs Ray Train + DeepSpeed ZeRO (1 and 2 workers).

What it measures: pairs/s = (timed steps x global batch of pairs) / seconds of the timed steps, in the
steady state (after --warmup untimed steps; the timed window is closed by a barrier on every rank). One
step = forward of the chosen and of the rejected sequences (two forwards, as the train-pm stage does),
`character.training.losses.bradley_terry_loss` with soft labels, backward, gradient clipping at 1.0 and an AdamW
step (lr 5e-4, the PMConfig default). Same model, same data, same global batch, same step counts:

  torch   AutoModelForSequenceClassification(num_labels=1) + torch.optim.AdamW + clip_grad_norm_ in ONE
          fresh subprocess per repetition, `torch.set_num_threads(2)`.
  ds1-z2  Ray Train TorchTrainer, 1 worker x 2 CPUs, DeepSpeed ZeRO-2 (micro-batch = global batch).
  ds2-z2  2 workers x 1 CPU each, ZeRO-2 (micro-batch = global batch / 2 per worker), gloo.
  ds2-z3  2 workers x 1 CPU each, ZeRO-3 (the model is partitioned at creation via build_under_zero).

The Ray Train loop is written here but reuses character.training.deepspeed_setup (setup_distributed,
build_under_zero, deepspeed_config on configs/deepspeed/zero{2,3}.json, which sets
train_micro_batch_size_per_gpu / gradient_accumulation_steps (1) / train_batch_size and keeps the
shipped gradient_clipping 1.0) and deepspeed.initialize(model, optimizer=torch.optim.AdamW(...)); each
worker calls torch.set_num_threads(its CPUs); rank 0's timings come back via ray.train.report and
result.metrics (Ray Train 2.60 returns only metrics attached to a checkpoint, so rank 0 adds a tiny one
after the timed window). A local Ray (`ray.init(num_cpus=4, object_store_memory=512 MB)`) is started ONCE before
the repetitions (not timed); each Ray repetition is a fresh fit() with fresh worker processes.
Start-up is reported apart and never enters pairs/s: "setup" = in the process, imports + model +
optimizer/engine creation; "wall" = seen from the driver (subprocess or whole fit(), incl. Ray Train's
controller and worker start-up).

Data: synthetic pairs of fixed-length random token sequences (no special tokens, so the reward head
reads the last position; attention mask all ones), soft labels uniform in [0, 1], generated from
(seed, step): every contender sees exactly the same batches. Model: the built-in random-llama-25m
(20.0M parameters as a sequence classifier; built and cached on first use).

Contenders are interleaved (the order rotates per repetition); a table per repetition, then medians,
ratios vs plain PyTorch and the check "ds1-z2 >= 0.8x torch" (PASS/FAIL), plus the load average at start
and end. Quote MEDIANS with the load printed at start and end: on a 2-core box anything else running
(a test suite) skews absolute figures; the interleaved ratios are more robust. The PASS/FAIL line says
so when the load average at start was above half the CPU count. The full run is estimated at roughly
10-15 minutes on a quiet 2-core box (each Ray fit() adds ~30-60 s of start-up).

Run (from the repository root):
  .venv/bin/python benchmarks/pm_training.py           # full: 25m model, 16 pairs x 128 tokens, 2+6 steps, 3 reps
  .venv/bin/python benchmarks/pm_training.py --contenders torch,ds1-z2 --reps 5     # the 0.8x check only
  .venv/bin/python benchmarks/pm_training.py --model tiny-llama --steps 3 --warmup 1 --reps 1   # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ != "benchmarks":  # run as `python benchmarks/pm_training.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (ROOT, add_model, argument_parser, choose, emit_result, fmt,  # noqa: E402
                                 load_line, rotation, run_worker, script_command)

# name -> (workers, CPUs per worker, ZeRO stage); "torch" is plain PyTorch in one process.
CONTENDERS = {"torch": (1, 2, None), "ds1-z2": (1, 2, 2), "ds2-z2": (2, 1, 2), "ds2-z3": (2, 1, 3)}
TARGET = 0.8  # ds1-z2 / torch, pairs/s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    add_model(p, "random-llama-25m")
    p.add_argument("--steps", type=int, default=6, help="timed steps per contender and repetition")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--batch", type=int, default=16, help="global batch (pairs per optimizer step)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (chosen and rejected alike)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list out of {','.join(CONTENDERS)}")
    p.add_argument("--ray-logs", action="store_true", help="forward Ray worker logs to the driver")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # plain PyTorch subprocess mode
    return p.parse_args(argv)


def allowed_ids(model: str):
    import numpy as np

    from character.models.loading import load_tokenizer

    tok = load_tokenizer(model)
    return np.setdiff1d(np.arange(len(tok)), tok.all_special_ids), tok.pad_token_id


def global_batch(step: int, cfg: dict, allowed):
    """(chosen ids, rejected ids, soft labels) of one global batch; a pure function of (seed, step)."""
    import numpy as np
    import torch

    rng = np.random.default_rng([cfg["seed"], step])
    ids = allowed[rng.integers(0, len(allowed), size=(2, cfg["batch"], cfg["seq_len"]))]
    return torch.from_numpy(ids[0]), torch.from_numpy(ids[1]), torch.from_numpy(rng.random(cfg["batch"], np.float32))


def load_model(model: str, pad_id: int, seed: int = 0):
    import torch
    from transformers import AutoModelForSequenceClassification

    from character.models.loading import resolve_model

    torch.manual_seed(seed)  # the score head is new (randomly initialised): the same init everywhere
    return AutoModelForSequenceClassification.from_pretrained(resolve_model(model), num_labels=1,
                                                              pad_token_id=pad_id, dtype=torch.float32)


def run_steps(step_fn, cfg: dict, barrier=lambda: None) -> dict:
    """Warm-up steps, then the timed window (closed by a barrier on every rank)."""
    t0 = time.perf_counter()
    for s in range(cfg["warmup"]):
        step_fn(s)
    barrier()
    t1 = time.perf_counter()
    losses = [step_fn(s) for s in range(cfg["warmup"], cfg["warmup"] + cfg["steps"])]
    barrier()
    t2 = time.perf_counter()
    return {"warmup_s": t1 - t0, "train_s": t2 - t1, "loss_last": losses[-1] if losses else float("nan")}


def worker_torch(cfg: dict) -> None:
    """Fresh process: plain PyTorch, one process, two threads."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(2)
    from character.training.losses import bradley_terry_loss

    allowed, pad = allowed_ids(cfg["model"])
    model = load_model(cfg["model"], pad, cfg["seed"]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    setup = time.perf_counter() - t0

    def step(s: int) -> float:
        c, r, p = global_batch(s, cfg, allowed)
        mask = torch.ones_like(c)
        rc = model(input_ids=c, attention_mask=mask).logits.squeeze(-1)
        rr = model(input_ids=r, attention_mask=mask).logits.squeeze(-1)
        loss = bradley_terry_loss(rc, rr, p)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    emit_result({"setup_s": setup, "threads": torch.get_num_threads(), **run_steps(step, cfg)})


def ds_loop(cfg: dict) -> None:
    """Ray Train worker: a DeepSpeed ZeRO engine over this rank's slice of each global batch."""
    t0 = time.perf_counter()
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from character.core.config import TrainConfig
    from character.training.losses import bradley_terry_loss
    from character.training.deepspeed_setup import build_under_zero, deepspeed_config, setup_distributed

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg["threads"])
    setup_distributed(False)
    micro = cfg["batch"] // world
    ds = deepspeed_config(TrainConfig(deepspeed_config=cfg["ds_json"]), micro, 1, world)
    allowed, pad = allowed_ids(cfg["model"])
    model = build_under_zero(lambda: load_model(cfg["model"], pad, cfg["seed"]), ds)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    setup = time.perf_counter() - t0
    mine = slice(rank * micro, (rank + 1) * micro)

    def step(s: int) -> float:
        c, r, p = (x[mine] for x in global_batch(s, cfg, allowed))
        mask = torch.ones_like(c)
        rc = engine(input_ids=c, attention_mask=mask).logits.squeeze(-1)
        rr = engine(input_ids=r, attention_mask=mask).logits.squeeze(-1)
        loss = bradley_terry_loss(rc, rr, p)
        engine.backward(loss)
        engine.step()
        return float(loss)

    timing = run_steps(step, cfg, barrier=dist.barrier)
    metrics = {"setup_s": setup, "threads": torch.get_num_threads(), "world": world,
               "zero_stage": ds["zero_optimization"]["stage"], "micro": micro, **timing}
    # Ray Train 2.60 (v2) hands back only metrics attached to a checkpoint: rank 0 adds a tiny one.
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)


def run_torch(args, cfg: dict) -> dict:
    cmd = script_command(__file__, "--worker", "--model", args.model, "--steps", str(args.steps), "--warmup",
                         str(args.warmup), "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--lr",
                         str(args.lr), "--seed", str(args.seed))
    return run_worker(cmd, what="torch worker", wall_key="wall_s")


def run_ray(name: str, cfg: dict, storage: str, rep: int) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers, cpus, stage = CONTENDERS[name]
    loop_cfg = {**cfg, "threads": cpus, "ds_json": str(ROOT / "configs" / "deepspeed" / f"zero{stage}.json")}
    trainer = TorchTrainer(
        ds_loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=f"{name}-rep{rep}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=0)),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    return {**result.metrics, "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = {"model": args.model, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
           "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed}
    if args.worker:
        return worker_torch(cfg)
    contenders = choose(args.contenders, list(CONTENDERS))
    if args.batch % 2 and any(CONTENDERS[c][0] == 2 for c in contenders):
        sys.exit("--batch must be even for the 2-worker contenders")
    from character.models.loading import resolve_model

    resolve_model(args.model)  # build/cache a built-in model once, outside every timing
    allowed, pad = allowed_ids(args.model)
    params = sum(p.numel() for p in load_model(args.model, pad).parameters())
    print(f"model {args.model} as a sequence classifier: {params / 1e6:.1f}M parameters, fp32; global batch "
          f"{args.batch} pairs x {args.seq_len} tokens (x2: chosen and rejected); {args.warmup} warm-up + "
          f"{args.steps} timed steps per run; AdamW lr {args.lr}, clip 1.0; reps {args.reps}")
    print(load_line("start"))
    busy = os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    storage = tempfile.mkdtemp(prefix="character-bench-pm-")
    if any(c != "torch" for c in contenders):
        import ray

        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        t0 = time.perf_counter()
        ray.init(num_cpus=4, object_store_memory=512 * 1024 * 1024, log_to_driver=args.ray_logs)
        print(f"Ray: local ray.init(num_cpus=4, object_store_memory=512 MB) started ONCE in "
              f"{time.perf_counter() - t0:.1f}s (not timed); each Ray run is a fresh fit() with fresh workers")
    print(flush=True)

    per: dict[str, list[float]] = {c: [] for c in contenders}
    rep_ratio: dict[str, list[float]] = {c: [] for c in contenders if c != "torch"}
    try:
        for rep in range(args.reps):
            order = rotation(contenders, rep)
            print(f"--- repetition {rep + 1}/{args.reps}, order {' -> '.join(order)}, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
            print(f"  {'contender':<9}{'pairs/s':>9}{'s/step':>8}{'setup':>8}{'warmup':>8}{'wall':>8}  detail")
            rates = {}
            for name in order:
                r = run_torch(args, cfg) if name == "torch" else run_ray(name, cfg, storage, rep)
                rates[name] = args.steps * args.batch / r["train_s"]
                per[name].append(rates[name])
                _, cpus, stage = CONTENDERS[name]
                how = ("1 process" if stage is None else
                       f"{r['world']} worker(s) x {cpus} CPU, ZeRO-{r['zero_stage']}, micro {r['micro']}")
                print(f"  {name:<9}{fmt(rates[name]):>9}{r['train_s'] / args.steps:>8.2f}{r['setup_s']:>7.1f}s"
                      f"{r['warmup_s']:>7.1f}s{r['wall_s']:>7.1f}s  {how}, {r['threads']} thread(s), "
                      f"last loss {r['loss_last']:.4f}", flush=True)
            for name in rep_ratio:
                if "torch" in rates:
                    rep_ratio[name].append(rates[name] / rates["torch"])
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if any(c != "torch" for c in contenders):
            import ray

            ray.shutdown()  # first, so that our own Ray processes are not counted as "other" below
            time.sleep(2)

    print(f"\n=== medians over {args.reps} repetition(s) (pairs/s, steady state only; quote these, with the load "
          f"below; start-up is the setup/wall columns above)")
    med = {c: statistics.median(v) for c, v in per.items()}
    for name, values in per.items():
        print(f"  {name:<9}{fmt(med[name]):>9}   runs: {', '.join(fmt(v) for v in values)}")
    if "torch" in med:
        print("  ratios vs plain PyTorch (ratio of medians; per-repetition ratios in brackets; < 1: slower):")
        for name, values in rep_ratio.items():
            print(f"    {name + '/torch':<14}{med[name] / med['torch']:>7.2f}x   [{', '.join(f'{x:.2f}' for x in values)}]")
        if "ds1-z2" in med:
            got = med["ds1-z2"] / med["torch"]
            print(f"  target ds1-z2 >= {TARGET:.1f}x torch: {got:.2f}x -> {'PASS' if got >= TARGET else 'FAIL'}"
                  + ("  (the machine was busy at start: rerun on a quiet machine before quoting)" if busy else ""))
    print(load_line("end") + " (the load average includes this benchmark's own work)")


if __name__ == "__main__":
    main()
