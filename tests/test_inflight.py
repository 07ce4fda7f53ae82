"""Asynchronous rollouts without Ray: the truncated importance weights against hand values, the schedule of
batches in flight and its staleness bound, the engine's idle time, the saved batches across a change of the
number of workers, the behaviour log-probs' alignment and the `ppo.async` setting as YAML spells it."""
import math
from types import SimpleNamespace

import pytest
import torch

from character.training.losses import clipped_policy_loss, truncated_importance_weights
from character.training.ppo import inflight
from character.training.ppo.loop import rank_share
from character.training.ppo.rollouts import build_rollouts

NAN = float("nan")


def test_tis_caps_a_constructed_batch_as_computed_by_hand():
    # Row 0: engine and trainer disagree both ways, one token above the cap; row 1: an unknown engine log-prob
    # (weight 1) and a masked position (it counts in no mean).
    old = torch.tensor([[-1.0, -2.0, -0.2], [-0.7, -0.3, -5.0]])
    behaviour = torch.tensor([[-1.5, -1.0, -1.5], [NAN, -0.3, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    weights, clipped = truncated_importance_weights(old, behaviour, mask, cap=2.0)
    # exp(0.5) = 1.64872, exp(-1) = 0.36788, exp(1.3) = 3.6693 -> 2; NaN -> 1; exp(0) = 1; exp(-4) but masked.
    expected = torch.tensor([[1.6487213, 0.3678794, 2.0], [1.0, 1.0, math.exp(-4.0)]])
    assert torch.allclose(weights, expected, atol=1e-6)
    assert float(clipped) == pytest.approx(1 / 5)  # one of the five response tokens above the cap

    # The weights multiply each token's clipped-surrogate loss before the mean over response tokens.
    logp = torch.tensor([[-0.9, -2.1, -0.1], [-0.7, -0.2, -5.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0], [0.5, 1.0, 3.0]])
    loss, _ = clipped_policy_loss(logp, old, adv, mask, clip=0.2, weights=weights)
    ratio = [[math.exp(0.1), math.exp(-0.1), math.exp(0.1)], [1.0, math.exp(0.1)]]
    hand = [-1.0 * ratio[0][0] * 1.6487213,  # A > 0, ratio 1.105 < 1.2: unclipped
            1.0 * ratio[0][1] * 0.3678794,  # A < 0: -A * r = r
            -2.0 * ratio[0][2] * 2.0,
            -0.5 * 1.0 * 1.0,
            -1.0 * ratio[1][1] * 1.0]
    assert float(loss) == pytest.approx(sum(hand) / 5, rel=1e-6)

    uncapped, none_clipped = truncated_importance_weights(old, behaviour, mask, cap=None)
    assert torch.equal(uncapped, torch.ones_like(old)) and float(none_clipped) == 0.0


def test_batches_due_keeps_at_most_max_staleness_batches_ahead():
    assert inflight.batches_due(0, 0, 5, {}) == [0]
    assert inflight.batches_due(0, 1, 5, {}) == [0, 1]
    assert inflight.batches_due(1, 1, 5, {1: None}) == [2]
    assert inflight.batches_due(4, 2, 5, {}) == [4]  # never past the run's last iteration
    assert inflight.staleness_problem(3, [2, 3], 1) is None
    problem = inflight.staleness_problem(3, [1, 3], 1)
    assert "iteration 4" in problem and "version 1" in problem and "max_staleness 1" in problem


class FakeEngine:
    """An engine that answers in submission order with the version it holds, as a Ray actor runs calls."""

    def __init__(self):
        self.version, self.clock, self.calls = 0, 0.0, []

    def generate(self, iteration):
        self.calls.append((iteration, self.version))
        self.clock += 1.0
        return {"samples": [{"version": self.version}], "started": self.clock - 1.0,
                "finished": self.clock}


def _simulate(max_staleness: int, iterations: int = 6) -> tuple[list[int], list[tuple[int, int]]]:
    """The loop's use of the queue: fill, take, (train), settle, sync. Returns each trained batch's staleness."""
    engine = FakeEngine()
    submitted = []

    def submit(j):
        submitted.append(j)
        return inflight.RolloutBatch(j, [(0, False)], [{}], [[1]], future=lambda: engine.generate(j))

    queue = inflight.RolloutQueue(submit, max_staleness, iterations, get=lambda future: future())
    staleness = []
    for i in range(iterations):
        queue.fill(i)
        batch, _ = queue.take(i)
        staleness.append(i - batch.samples[0]["version"])
        queue.settle()
        engine.version = i + 1  # the sync: lands after every request in flight
    return staleness, engine.calls


def test_the_schedule_bounds_staleness_and_zero_is_the_synchronous_loop():
    staleness, calls = _simulate(0)
    assert staleness == [0] * 6
    assert calls == [(i, i) for i in range(6)]  # batch i by version i: the synchronous loop
    staleness, calls = _simulate(1)
    assert staleness == [0, 1, 1, 1, 1, 1]
    assert calls == [(0, 0), (1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
    staleness, _ = _simulate(2)
    assert staleness == [0, 1, 2, 2, 2, 2]


def test_engine_idle_is_the_window_minus_its_generation():
    assert inflight.busy_seconds([(0.0, 2.0), (5.0, 9.0)], 1.0, 6.0) == pytest.approx(2.0)
    queue = inflight.RolloutQueue(None, 1, 3, get=None, generated=[(0.0, 2.0), (5.0, 9.0)])
    assert queue.engine_idle(1.0, 6.0) == pytest.approx(3.0)
    assert queue.engine_idle(10.0, 12.0) == pytest.approx(2.0)
    assert queue.generated == []  # intervals that ended before a window are dropped


def _batch(iteration: int, share, k: int, version: int) -> inflight.RolloutBatch:
    rows = [{"message_id": f"m{p}"} for p, _ in share]
    samples = [{"token_ids": [p, s, iteration], "logprobs": [-0.5 * s, -1.0], "text": f"{p}.{s}",
                "finish_reason": "stop", "version": version} for p, _ in share for s in range(k)]
    return inflight.RolloutBatch(iteration, share, rows, [[p] for p, _ in share],
                                 result={"samples": samples, "started": 0.0, "finished": 1.0})


@pytest.mark.parametrize("new_world", [1, 2, 3])
def test_saved_batches_come_back_as_any_number_of_workers_shares(new_world):
    n, k = 5, 2  # 5 prompts, 2 samples each, saved by 2 workers (one padding row on rank 1)
    saved = [_batch(4, rank_share(n, rank, 2), k, version=3) for rank in range(2)]
    table = inflight.to_table(inflight.to_rows(saved))
    assert table.num_rows == n * k  # padding rows are not saved
    for rank in range(new_world):
        share = rank_share(n, rank, new_world)

        def plan(j, share=share):
            return inflight.RolloutBatch(j, share, [{"message_id": f"m{p}"} for p, _ in share], [[p] for p, _ in share])

        [batch] = inflight.from_table(table, plan)
        assert [s["token_ids"][0] for s in batch.samples] == [p for p, _ in share for _ in range(k)]
        assert [s["logprobs"][0] for s in batch.samples] == [-0.5 * s for _ in share for s in range(k)]
        assert {s["version"] for s in batch.samples} == {3}

    def other_prompts(j):
        return inflight.RolloutBatch(j, [(0, False)], [{"message_id": "another"}], [[0]])

    assert inflight.from_table(table, other_prompts) == []  # not this plan's prompts: generated again


def test_restore_keeps_only_batches_still_to_train_within_the_bound():
    queue = inflight.RolloutQueue(None, 1, 10, get=None)
    kept = queue.restore([_batch(2, [(0, False)], 1, version=1), _batch(3, [(0, False)], 1, version=1),
                          _batch(1, [(0, False)], 1, version=1)], start=2)
    assert kept == [2]  # 3 lags by 2 versions; 1 is trained already


def test_behaviour_logprobs_sit_on_the_response_positions():
    roll = build_rollouts([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0, behaviour=[[-0.1, -0.2], [-0.3]])
    b = roll.behaviour_logp
    assert b.shape == roll.mask.shape
    assert torch.allclose(b[0, 2:4], torch.tensor([-0.1, -0.2]))
    assert torch.isnan(b[0, :2]).all()
    assert torch.isnan(b[1]).all()  # a list that does not match the response (3 tokens, 1 log-prob): unknown
    assert build_rollouts([[1]], [[2]], 0).behaviour_logp is None


def test_sampled_logprobs_read_the_sampled_token_of_each_position():
    from character.inference.rollout import sampled_logprobs

    lp = SimpleNamespace
    completion = SimpleNamespace(token_ids=[7, 3], logprobs=[{7: lp(logprob=-0.25), 1: lp(logprob=-0.1)},
                                                             {3: lp(logprob=-2.0)}])
    assert sampled_logprobs(completion) == [-0.25, -2.0]
    assert sampled_logprobs(SimpleNamespace(token_ids=[1], logprobs=None)) == []


def test_ppo_async_is_spelled_as_yaml_spells_it(tmp_path):
    from character.core.config import ConfigError, Config, dump_config, load_config
    from character.pipeline.config_help import settings

    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  async:\n    enabled: true\n    max_staleness: 2\n")
    config = load_config(path, ["ppo.tis_cap=null"])
    assert config.ppo.async_.enabled and config.ppo.async_.max_staleness == 2 and config.ppo.tis_cap is None
    assert "  async:\n    enabled: true\n    max_staleness: 2\n" in dump_config(config)
    assert Config.model_validate(config.model_dump(mode="json")).ppo.async_ == config.ppo.async_
    assert {"ppo.async.enabled", "ppo.async.max_staleness", "ppo.tis_cap"} <= {s.name for s in settings()}
    with pytest.raises(ConfigError, match=r"field 'ppo.async.max_staleness'.*greater than or equal to 0"):
        load_config(path, ["ppo.async.max_staleness=-1"])
    with pytest.raises(ConfigError, match=r"field 'ppo.tis_cap'"):
        load_config(path, ["ppo.tis_cap=0.5"])


def test_the_benchmarks_paper_estimate_against_hand_values():
    from benchmarks.async_rollouts import gpu_speedup, overlap_estimate

    assert overlap_estimate(100.0, 80.0, 30.0, 70.0) == pytest.approx(20 / 30)  # hid 20 s of the 30 s overlappable
    assert gpu_speedup(0.5, 1.0) == pytest.approx(2.0)  # max(G, R) = half of G + R
    assert gpu_speedup(0.9, 1.0) == pytest.approx(1 / 0.9)  # only the 10 % of training can hide
    assert gpu_speedup(0.7, 0.5) == pytest.approx(1 / (1 - 0.5 * 0.3))
    assert gpu_speedup(0.7, -0.2) == 1.0  # an overlap that lost time is no gain on paper


def test_the_reports_time_figure_stacks_the_trainers_wait_not_overlapped_generation():
    from character.reporting.figures import ppo_time_figure

    records = [{"iteration": 1, "time_generation": 5.0, "trainer_idle_s": 1.0, "time_scoring": 2.0,
                "time_training": 3.0, "time_sync": 0.5}]
    (ax,) = ppo_time_figure(records).axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["waiting for rollouts", "scoring", "training",
                                                                    "sync"]
    assert max(p.get_y() + p.get_height() for p in ax.patches) == pytest.approx(6.5)  # the iteration, not 10.5
    (old,) = ppo_time_figure([{k: v for k, v in records[0].items() if k != "trainer_idle_s"}]).axes
    assert [t.get_text() for t in old.get_legend().get_texts()][0] == "generation"  # a run from before
