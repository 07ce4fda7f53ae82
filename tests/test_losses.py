"""Bradley-Terry loss with soft labels and margin against hand-computed values."""
import math

import pytest
import torch

from character.losses import bradley_terry_loss


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
