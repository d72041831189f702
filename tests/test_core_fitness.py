"""Fitness shaping against hand-computed values; NaN safety; per-prompt normalisation."""

import math

import pytest
import torch

from trl_es.core import k3_kl_per_completion, member_fitness, penalize_kl, shape_fitness


def test_centered_rank_values_and_ties():
    shaped = shape_fitness(torch.tensor([3.0, 1.0, 2.0, 10.0, 0.0]), "centered_rank")
    # ranks 3, 1, 2, 4, 0 -> rank / 4 - 0.5
    torch.testing.assert_close(shaped, torch.tensor([0.25, -0.25, 0.0, 0.5, -0.5]))
    tied = shape_fitness(torch.tensor([1.0, 1.0, 2.0, 0.0]), "centered_rank")
    # ranks 1.5, 1.5, 3, 0 -> / 3 - 0.5
    torch.testing.assert_close(tied, torch.tensor([0.0, 0.0, 0.5, -0.5]))
    assert math.isclose(float(tied.sum()), 0.0, abs_tol=1e-7)


def test_zscore_and_none():
    values = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mean, std = 3.0, math.sqrt((4 + 1 + 0 + 9) / 4)
    torch.testing.assert_close(shape_fitness(values, "zscore"), (values - mean) / std)
    torch.testing.assert_close(shape_fitness(values, "none"), values - mean)


@pytest.mark.parametrize("method", ["centered_rank", "zscore", "none"])
def test_all_equal_gives_zeros_not_nan(method):
    shaped = shape_fitness(torch.full((6,), 0.7), method)
    assert torch.equal(shaped, torch.zeros(6))


@pytest.mark.parametrize("method", ["centered_rank", "zscore", "none"])
def test_nan_members_get_zero_and_do_not_poison_others(method):
    shaped = shape_fitness(torch.tensor([1.0, float("nan"), 3.0, 2.0]), method)
    assert not torch.isnan(shaped).any()
    assert shaped[1] == 0
    assert shaped[2] > shaped[3] > shaped[0]


def test_unknown_shaping_is_named():
    with pytest.raises(ValueError, match="unknown fitness_shaping 'rankz'"):
        shape_fitness(torch.zeros(2), "rankz")


def test_member_fitness_ignores_unscorable_completions():
    rewards = torch.tensor([[1.0, float("nan"), 0.0], [float("nan")] * 3, [1.0, 1.0, 1.0]])
    fitness = member_fitness(rewards)
    assert fitness[0] == 0.5 and torch.isnan(fitness[1]) and fitness[2] == 1.0


def test_member_fitness_per_prompt_normalisation_equalises_prompts():
    # Prompt 0 has a large reward scale, prompt 1 a small one, prompt 2 gives every member the same reward.
    rewards = torch.tensor([[100.0, 0.0, 5.0], [0.0, 1.0, 5.0]])
    plain = member_fitness(rewards)
    assert plain[0] > plain[1]  # dominated by prompt 0
    normalized = member_fitness(rewards, normalize_per_prompt=True)
    # each informative prompt now contributes +-1, the constant one 0: the members tie
    torch.testing.assert_close(normalized, torch.zeros(2))
    assert not torch.isnan(normalized).any()


def test_combine_reward_functions_sum_and_normalize_then_sum_by_hand():
    from trl_es.core import combine_reward_functions

    nan = float("nan")
    # 2 members x 2 completion slots x 2 functions; function 1 has a 100x larger scale
    per_func = torch.tensor([[[1.0, 100.0], [0.0, nan]], [[0.0, 300.0], [nan, nan]]])
    weights = torch.tensor([1.0, 0.5])
    summed = combine_reward_functions(per_func, weights, "sum_then_normalize")
    torch.testing.assert_close(summed, torch.tensor([[51.0, 0.0], [150.0, nan]]), equal_nan=True)
    # normalise each function across members per slot: slot 0 -> f0 (+1, -1), f1 (-1, +1) (std 0.5 and 100)
    normalized = combine_reward_functions(per_func, weights, "normalize_then_sum")
    e0, e1 = 0.5 / (0.5 + 1e-4), 100.0 / (100.0 + 1e-4)
    expected = torch.tensor([[e0 - 0.5 * e1, 0.0], [-e0 + 0.5 * e1, nan]])
    torch.testing.assert_close(normalized, expected, equal_nan=True)
    with pytest.raises(ValueError, match="multi_objective_aggregation='mean'"):
        combine_reward_functions(per_func, weights, "mean")


def test_k3_kl_per_completion_by_hand():
    member = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-0.1, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # padding and tool results are 0

    def k3(r):
        return math.exp(r) - r - 1

    # completion 0: tokens 0 and 1 count (r = -0.5, +1.0); completion 1: token 0 only (r = 0 -> 0)
    expected = torch.tensor([(k3(-0.5) + k3(1.0)) / 2, 0.0])
    torch.testing.assert_close(k3_kl_per_completion(member, ref, mask), expected)
    # >= 0 everywhere, 0 only where the two agree
    assert (k3_kl_per_completion(member, ref, torch.ones(2, 3)) > 0).all()
    # no counted token: no estimate
    assert torch.isnan(k3_kl_per_completion(member, ref, torch.zeros(2, 3))).all()
    with pytest.raises(ValueError, match=r"must have one shape"):
        k3_kl_per_completion(member, ref[:, :2], mask)


def test_penalize_kl_by_hand():
    fitness = torch.tensor([1.0, 0.5, float("nan"), 2.0])
    kl = torch.tensor([0.2, float("nan"), 0.1, 1.0])
    # fitness - beta * kl; no estimate keeps the fitness; an unscorable member stays unscorable
    penalized = penalize_kl(fitness, kl, beta=0.5)
    torch.testing.assert_close(penalized, torch.tensor([0.9, 0.5, float("nan"), 1.5]), equal_nan=True)
    assert torch.equal(penalize_kl(fitness, kl, beta=0.0)[[0, 1, 3]], fitness[[0, 1, 3]])
    with pytest.raises(ValueError, match=r"fitness \(4,\) and kl \(3,\)"):
        penalize_kl(fitness, kl[:3], beta=0.1)
    with pytest.raises(ValueError, match=r"beta must be finite and >= 0, got -1"):
        penalize_kl(fitness, kl, beta=-1)
