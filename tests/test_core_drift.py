"""Drift control and prompt groups in the pure-torch core: the anchor pull, the sigma schedule, and fitness when each
member saw only its prompt group."""

import pytest
import torch

from trl_es.core import Anchor, GaussianES, InPlaceSpace, MemberNoise, member_fitness, seen_mask


def test_anchor_adds_decay_times_drift_to_the_gradient_and_reports_the_distance():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    anchor = Anchor([weight], decay=0.5)
    with torch.no_grad():
        weight += torch.tensor([3.0, -4.0])  # drift (3, -4): distance 5
    weight.grad = torch.tensor([0.1, 0.1])
    assert anchor.add_pull([("w", weight)]) == pytest.approx(5.0)
    torch.testing.assert_close(weight.grad, torch.tensor([0.1 + 1.5, 0.1 - 2.0]))
    weight.grad = None  # a tensor the strategy left without gradient still gets the pull
    anchor.add_pull([("w", weight)])
    torch.testing.assert_close(weight.grad, torch.tensor([1.5, -2.0]))


def test_anchor_state_round_trips_and_a_mismatch_is_named():
    weight = torch.nn.Parameter(torch.zeros(3))
    saved = Anchor([torch.ones(3)], decay=1.0).state_dict()
    anchor = Anchor([weight], decay=1.0)
    anchor.load_state_dict(saved)
    anchor.add_pull([("w", weight)])
    torch.testing.assert_close(weight.grad, -torch.ones(3))
    with pytest.raises(ValueError, match="does not match the evolved tensors"):
        Anchor([torch.zeros(2)], decay=1.0).load_state_dict(saved)
    with pytest.raises(ValueError, match="anchor_decay must be finite and > 0"):
        Anchor([weight], decay=0.0)


def test_sigma_decay_sets_the_steps_sigma_from_the_step_number_alone():
    weight = torch.nn.Parameter(torch.zeros(4))
    space = InPlaceSpace([("w", weight)], MemberNoise(0, 4))
    strategy = GaussianES(space, 0.1, sigma_decay=0.5)
    assert strategy.sigma_at(3) == pytest.approx(0.1 * 0.5**3)
    assert strategy.sigma_at(0) == pytest.approx(0.1)  # a resumed run asks for its own step: no history is involved
    assert not hasattr(space, "sigma"), "the strategy owns the scale; the space is handed it with each perturbation"
    with torch.no_grad(), strategy.perturbed(3, [0]):  # the member is perturbed at its step's scale
        torch.testing.assert_close(weight.detach(), 0.1 * 0.5**3 * space.noise.member_noise(3, 0, "w", (4,)))
    constant = GaussianES(InPlaceSpace([("w", weight)], MemberNoise(0, 4)), 0.1)
    assert constant.sigma_at(7) == 0.1
    with pytest.raises(ValueError, match=r"sigma_decay must be in \(0, 1\]"):
        GaussianES(space, 0.1, sigma_decay=1.5)
    for sigma in (0.0, -0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="sigma must be finite and > 0"):
            GaussianES(space, sigma)


def test_the_pseudo_gradient_scales_with_the_steps_sigma():
    weight = torch.nn.Parameter(torch.zeros(4))
    space = InPlaceSpace([("w", weight)], MemberNoise(0, 4))
    strategy = GaussianES(space, 0.1, sigma_decay=0.5)
    fitness = torch.tensor([1.0, 0.0, 0.0, 1.0])
    strategy.ask(0)
    first = strategy.tell(0, fitness).coefficients
    strategy.ask(1)
    second = strategy.tell(1, fitness).coefficients
    torch.testing.assert_close(second, 2 * first)  # -f / (N sigma_t): half the sigma, twice the coefficient


def test_per_prompt_normalisation_with_prompt_groups_normalises_within_each_group():
    """Members 0-1 saw rows 0-1, members 2-3 rows 2-3; unseen entries are NaN. Each prompt is z-scored across the
    members that saw it, which is normalising each group on its own."""
    rewards = torch.tensor([[1.0, 0.0, 0, 0], [0.0, 0.0, 0, 0], [0, 0, 5.0, 2.0], [0, 0, 1.0, 4.0]])
    rewards[~seen_mask(4, 4, prompt_groups=2)] = float("nan")
    grouped = member_fitness(rewards, normalize_per_prompt=True)
    first = member_fitness(rewards[:2, :2], normalize_per_prompt=True)
    second = member_fitness(rewards[2:, 2:], normalize_per_prompt=True)
    torch.testing.assert_close(grouped, torch.cat([first, second]))
    torch.testing.assert_close(grouped, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # without normalisation each member's fitness is the mean over the rows it saw
    torch.testing.assert_close(member_fitness(rewards), torch.tensor([0.5, 0.0, 3.5, 2.5]))
