"""Bradley-Terry loss with soft labels and margin against hand-computed values."""
import math

import pytest
import torch

from character.training.losses import bradley_terry_loss


def ls(x):  # log sigmoid by hand
    return -math.log1p(math.exp(-x))


def test_hard_label_is_the_usual_bt_loss():
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0]))
    assert float(loss) == pytest.approx(-ls(1.0)) == pytest.approx(0.313261687518)


def test_soft_labels_mix_both_directions():
    rc, rr, p = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]), torch.tensor([0.75, 0.6])
    expected = (-(0.75 * ls(1.0) + 0.25 * ls(-1.0)) - (0.6 * ls(-0.5) + 0.4 * ls(0.5))) / 2
    assert float(bradley_terry_loss(rc, rr, p)) == pytest.approx(expected, rel=1e-6)


def test_half_label_is_minimised_at_equal_rewards():
    r = torch.tensor([0.3], requires_grad=True)
    loss = bradley_terry_loss(r, torch.tensor([0.3]), torch.tensor([0.5]))
    loss.backward()
    assert float(loss) == pytest.approx(math.log(2)) and float(r.grad) == pytest.approx(0.0, abs=1e-7)


def test_margin_asks_each_side_to_win_by_m():
    rc, rr, p = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.8])
    expected = -(0.8 * ls(1.0 - 0.5) + 0.2 * ls(-1.0 - 0.5))
    assert float(bradley_terry_loss(rc, rr, p, margin=0.5)) == pytest.approx(expected, rel=1e-6)
    assert float(bradley_terry_loss(rc, rr, p, margin=0.5)) > float(bradley_terry_loss(rc, rr, p))


from character.training.losses import (AdaptiveKLController, clipped_policy_loss, clipped_value_loss, explained_variance,
                              gae, kl_per_token, whiten)


def test_gae_and_returns_by_hand():
    # one sequence of 3 tokens, gamma=0.9, lambda=0.8; values after the end are 0
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    m = torch.ones(1, 3)
    d2 = 1.0 - 0.7
    d1 = 0.0 + 0.9 * 0.7 - 0.6
    d0 = 0.0 + 0.9 * 0.6 - 0.5
    a2 = d2
    a1 = d1 + 0.9 * 0.8 * a2
    a0 = d0 + 0.9 * 0.8 * a1
    adv, ret = gae(r, v, m, 0.9, 0.8)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7])


def test_gae_stops_at_padding():
    r = torch.tensor([[0.0, 2.0, 5.0]])
    v = torch.tensor([[1.0, 1.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])  # last position is padding
    adv, ret = gae(r, v, m, 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([2.0 - 1.0, 2.0 - 1.0, 0.0])
    assert ret[0, 2] == 0.0


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_per_token(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    assert kl_per_token(logp, ref, "k3").tolist() == pytest.approx(k3)
    assert all(x >= 0 for x in kl_per_token(logp, ref, "k3").tolist())
    assert kl_per_token(logp, ref, "k2").tolist() == pytest.approx([0.5 * 0.5**2, 0.5 * 1.0**2])
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_per_token(logp, ref, "k4")


def test_the_kl_estimator_is_honoured_in_the_loss_and_defaults_as_verl_does():
    """ppo.kl: an explicit kl_estimator is used wherever the KL enters (the policy loss included, where k3 was once
    used whatever it said); unset, k1 in the reward and k3 in the loss."""
    from character.core.config_training import PPOConfig

    assert PPOConfig().kl == "k1" and PPOConfig(kl_penalty="loss").kl == "k3"
    assert PPOConfig(kl_penalty="loss", kl_estimator="k1").kl == "k1"
    assert PPOConfig(kl_penalty="loss", kl_estimator="k2").kl == "k2"
    assert PPOConfig(kl_penalty="reward", kl_estimator="k3").kl == "k3"


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    m = torch.ones(1, 3)
    loss, frac = clipped_policy_loss(logp, old, adv, m, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); token 2: max(-2.2, -2.2)
    assert float(loss) == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert float(frac) == pytest.approx(2 / 3)


def test_clipped_value_loss_by_hand():
    v, old, ret, m = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.1]]), torch.tensor([[3.0, 0.0]]), torch.ones(1, 2)
    # token 0: max((2-3)^2, (1.2-3)^2) = 3.24; token 1: max(0, (0.0-0)^2) = 0
    assert float(clipped_value_loss(v, old, ret, m, clip=0.2)) == pytest.approx(0.5 * (3.24 + 0.0) / 2)


def test_whiten_and_explained_variance():
    x, m = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, m)
    assert float((w * m).sum()) == pytest.approx(0.0, abs=1e-6) and float(w[0, 3]) == 0.0
    # mean 2, Bessel-corrected variance ((1 + 0 + 1) / (3 - 1)) = 1, as TRL's and verl's masked_whiten
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert whiten(torch.tensor([[5.0, 7.0]]), torch.tensor([[1.0, 0.0]])).tolist() == [[0.0, 0.0]]  # one entry
    assert explained_variance(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]), torch.ones(1, 2)) == 1.0


def test_adaptive_kl_moves_towards_target():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(kl=3.0, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    assert AdaptiveKLController(0.1, None, 100).update(5.0, 10) == 0.1


# --- DPO -------------------------------------------------------------------------------------------------------
# log pi(chosen) = -10, log pi(rejected) = -12, reference -11 for both, beta 0.1:
# h = 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2; log sigma(0.2) = -0.5981388693, log sigma(-0.2) = -0.7981388693.
DPO_ARGS = (torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))


def test_dpo_loss_with_a_hard_label_by_hand():
    from character.training.losses import dpo_loss

    loss, r_chosen, r_rejected = dpo_loss(*DPO_ARGS, torch.tensor([1.0]), beta=0.1)
    assert float(loss) == pytest.approx(0.5981388693, rel=1e-6)
    assert float(r_chosen) == pytest.approx(0.1) and float(r_rejected) == pytest.approx(-0.1)


def test_dpo_soft_label_is_conservative_dpo_label_smoothing():
    from character.training.losses import dpo_loss

    loss, _, _ = dpo_loss(*DPO_ARGS, torch.tensor([0.8]), beta=0.1)
    # cDPO with eps = 1 - p = 0.2: 0.8 * 0.5981388693 + 0.2 * 0.7981388693
    assert float(loss) == pytest.approx(0.6381388693, rel=1e-6)
    # beta scales h: beta 1.0 gives h = 2.0, log sigma(2) = -0.1269280110
    loss, _, _ = dpo_loss(*DPO_ARGS, torch.tensor([1.0]), beta=1.0)
    assert float(loss) == pytest.approx(0.1269280110, rel=1e-6)


def test_dpo_nll_term_is_the_mean_per_token_nll_of_chosen():
    from character.training.losses import chosen_nll

    # -(-10 / 5) = 2 and -(-3 / 1) = 3: mean 2.5, whatever the lengths
    assert float(chosen_nll(torch.tensor([-10.0, -3.0]), torch.tensor([5.0, 1.0]))) == pytest.approx(2.5)


# --- critic-free advantages ---------------------------------------------------------------------------------------
# One group [1, 2, 3, 6]: mean 3, centred [-2, -1, 0, 3], unbiased std sqrt(14 / 3) = 2.1602468995.
GROUP = torch.tensor([[1.0, 2.0, 3.0, 6.0]])


def test_grpo_divides_by_the_group_std_and_dr_grpo_does_not():
    from character.training.estimators import group_advantages

    grpo = group_advantages(GROUP, "grpo", eps=0.0)
    assert grpo[0].tolist() == pytest.approx([-0.9258200998, -0.4629100499, 0.0, 1.3887301497], rel=1e-6)
    assert group_advantages(GROUP, "grpo", scale_by_std=False)[0].tolist() == pytest.approx([-2.0, -1.0, 0.0, 3.0])


def test_rloo_is_each_reward_minus_the_mean_of_the_others():
    from character.training.estimators import group_advantages

    # 1 - (2+3+6)/3, 2 - (1+3+6)/3, 3 - (1+2+6)/3, 6 - (1+2+3)/3
    expected = [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]
    assert group_advantages(GROUP, "rloo")[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_a_group_that_scores_the_same_gets_zero_advantage_and_is_counted():
    from character.training.estimators import group_advantages
    from character.training.losses import zero_variance_groups

    scores = torch.tensor([[5.0, 5.0, 5.0], [0.0, 1.0, 0.0]])
    for method in ("grpo", "rloo"):
        assert group_advantages(scores, method)[0].tolist() == [0.0, 0.0, 0.0]
    assert zero_variance_groups(scores).tolist() == [True, False]
    with pytest.raises(ValueError, match=">= 2 samples"):
        group_advantages(torch.tensor([[1.0], [2.0]]), "grpo")


def test_group_token_advantages_put_the_kl_shaped_return_on_every_response_token():
    from character.training.estimators import group_token_advantages

    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])  # two groups of two; the second is padding (mask 0)
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    kl = torch.tensor([[9.0, 0.5, 0.5], [0.25, 0.25, 9.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    # returns 1 - 2 * (0.5 + 0.5) = -1 and 3 - 2 * 0.5 = 2 (masked KL only); RLOO: -3 and 3
    adv = group_token_advantages(scores, kl, mask, 2, "rloo", True, kl_coef=2.0)
    assert adv.tolist() == [[0.0, -3.0, -3.0], [3.0, 3.0, 0.0], [0.0] * 3, [0.0] * 3]
    # KL as a loss term (kl_coef 0 here): the raw scores 1 and 3, RLOO -2 and 2
    assert group_token_advantages(scores, kl, mask, 2, "rloo", True, 0.0)[0].tolist() == [0.0, -2.0, -2.0]


# --- the registries ------------------------------------------------------------------------------------------------
def test_registered_policy_loss_is_the_clipped_surrogate_and_an_unknown_name_fails_before_compute(repo):
    """ppo.policy_loss picks a registered loss; `clip` gives the clipped surrogate's hand values above."""
    from character.core.config import ConfigError, load_config
    from character.execution.checks import check_config
    from character.training.estimators import POLICY_LOSSES, policy_loss

    logp, old = torch.tensor([[0.0, 0.5]]), torch.tensor([[0.0, 0.0]])
    adv, m = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    config = load_config(repo / "configs/tiny.yaml")
    assert set(POLICY_LOSSES) >= {"clip"} and config.ppo.policy_loss == "clip"
    loss, frac = policy_loss("clip").fn(logp, old, adv, m, config.ppo)
    expected, expected_frac = clipped_policy_loss(logp, old, adv, m, clip=config.ppo.clip)
    assert float(loss) == pytest.approx(float(expected)) and float(frac) == pytest.approx(float(expected_frac))
    with pytest.raises(ConfigError, match=r"ppo.policy_loss.*'nope'.*registered: clip"):
        check_config(load_config(repo / "configs/tiny.yaml", ["ppo.policy_loss=nope"]))
    with pytest.raises(ConfigError, match=r"ppo.advantage.*'vtrace'.*registered: gae, grpo, rloo"):
        check_config(load_config(repo / "configs/tiny.yaml", ["ppo.advantage=vtrace"]))


def test_a_new_estimator_is_one_registered_function(repo):
    """Registering an estimator is all it takes: the config check, the critic decision and the dispatch see it."""
    from character.core.config import ConfigError, load_config
    from character.execution.checks import check_config
    from character.training import estimators

    @estimators.register_advantage("test_mean_baseline", min_samples_per_prompt=3)
    def mean_baseline(x):
        """Minus the group mean (a test estimator)."""
        returns = x.scores.view(-1, x.samples_per_prompt)
        return (returns - returns.mean(-1, keepdim=True)).reshape(-1)[:, None] * x.mask, None

    try:
        config = load_config(repo / "configs/tiny.yaml", ["ppo.advantage=test_mean_baseline", "ppo.samples_per_prompt=3"])
        check_config(config)
        assert not estimators.uses_critic(config.ppo)
        assert estimators.group_advantages(torch.tensor([[1.0, 2.0, 6.0]]), "test_mean_baseline").tolist() == [[-2.0, -1.0, 3.0]]
        with pytest.raises(ConfigError, match="samples_per_prompt >= 3"):
            check_config(load_config(repo / "configs/tiny.yaml", ["ppo.advantage=test_mean_baseline",
                                                                  "ppo.samples_per_prompt=2"]))
        with pytest.raises(ValueError, match="registered twice"):
            estimators.register_advantage("test_mean_baseline")(mean_baseline)
    finally:
        del estimators.ADVANTAGE_ESTIMATORS["test_mean_baseline"]
