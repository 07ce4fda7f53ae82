"""PPO's multi-worker invariants without Ray: prompts spread and padded over ranks, never dropped; one
adaptive KL coefficient on every rank (two real gloo processes)."""
import os
import socket

import pytest
import torch.multiprocessing as mp

from character.training.ppo.loop import iteration_prompts, rank_share


@pytest.mark.parametrize("n, world", [(15, 2), (16, 2), (5, 4), (3, 4), (7, 1)])
def test_every_prompt_used_once_per_iteration_whatever_the_world_size(n, world):
    shares = [rank_share(n, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # the same number of rows (and so of steps) on every rank
    real = sorted(k for s in shares for k, pad in s if not pad)
    assert real == list(range(n))  # every prompt once; padding rows are flagged, never counted
    picked = iteration_prompts(40, 3, n, seed=0)
    assert len(picked) == n and len(set(picked)) == n


def test_iterations_cover_each_epoch_exactly_across_its_end():
    n, per = 10, 4  # iterations 0..4 consume 20 prompts: two epochs, one iteration straddling the boundary
    used = [k for it in range(5) for k in iteration_prompts(n, it, per, seed=3)]
    assert sorted(used[:10]) == list(range(10)) and sorted(used[10:]) == list(range(10))


def _rank(rank: int, world: int, port: int, local_kls: list[float], out):
    import torch.distributed as dist

    from character.training.losses import AdaptiveKLController
    from character.training.ppo.loop import adapt_kl_coef

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    kl = adapt_kl_coef(ctl, local_kls[rank], weight=1.0, n_steps=10)
    out.put((rank, kl, ctl.beta))
    dist.destroy_process_group()


def test_the_kl_coefficient_moves_on_the_kl_of_all_ranks():
    """Local KLs 0.9 and 1.1 around the target 1.0 (inside the controller's clip): updated on each rank's
    own KL, the betas would be 0.099 and 0.101; on the all-reduced KL both stay 0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, [0.9, 1.1], out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [kl for _, kl, _ in results] == pytest.approx([1.0, 1.0])
    assert [beta for _, _, beta in results] == pytest.approx([0.1, 0.1], abs=1e-12)
