"""The genetic algorithm (Deep GA, truncation size 1, elitism): selection by hand, the winner applied bit-identically
to the member that was scored, a monotone climb on a toy objective, its genome state, and what it refuses."""

import pytest
import torch
from torch import nn

from trl_es.core import STRATEGIES, InPlaceSpace, LowRankSpace, MemberNoise, UpdateKind
from trl_es.core.apply import apply_update
from trl_es.core.strategies import GeneticAlgorithm
from trl_es.core.svd import SVDSpace


def make_space(population=6, antithetic=True):
    torch.manual_seed(0)
    params = [(f"t{i}", nn.Parameter(torch.randn(3, 2))) for i in range(3)]
    return InPlaceSpace(params, MemberNoise(5, population, antithetic)), params


def weights(params):
    return [p.detach().clone() for _, p in params]


def test_ga_is_registered_and_built_from_config():
    space, _ = make_space()
    args = type("Args", (), {"sigma": 0.1, "ga_elite": False, "ga_min_improvement": 0.5})()
    strategy = STRATEGIES["ga"].from_config(space, args)
    assert isinstance(strategy, GeneticAlgorithm) and (strategy.elite, strategy.min_improvement) == (False, 0.5)


@pytest.mark.parametrize(
    "fitness, elite, margin, winner",
    [
        ([1.0, 0.5, 2.0, 2.0, 0.0, 1.5], True, 0.0, 2),  # the first of two equal best children
        ([3.0, 0.5, 2.0, 2.0, 0.0, 1.5], True, 0.0, None),  # the parent is best: it survives
        ([2.0, 0.5, 2.0, 1.0, 0.0, 1.5], True, 0.0, None),  # a tie keeps the parent
        ([1.0, 0.5, 1.2, 1.0, 0.0, 1.1], True, 0.25, None),  # beaten by less than the margin
        ([1.0, 0.5, 1.3, 1.0, 0.0, 1.1], True, 0.25, 2),  # beaten by more
        ([float("nan"), 0.5, float("nan"), 1.0, 0.0, 0.9], True, 0.0, 3),  # an unscorable parent loses
        ([1.0, float("nan")] + [float("nan")] * 4, True, 0.0, None),  # no scorable child
        ([3.0, 0.5, 2.0, 2.0, 0.0, 1.5], False, 0.0, 0),  # no elitism: member 0 is a child like the others
    ],
)
def test_selection_by_hand(fitness, elite, margin, winner):
    space, _ = make_space()
    strategy = GeneticAlgorithm(space, 0.1, elite=elite, min_improvement=margin)
    assert strategy.select(torch.tensor(fitness)) == winner


def test_the_winner_becomes_the_weights_bit_identically_and_joins_the_genome():
    space, params = make_space()
    strategy = GeneticAlgorithm(space, 0.1)
    with strategy.perturbed(4, [3]):
        scored = weights(params)
    parent = weights(params)
    with strategy.perturbed(4, [0]):  # the parent is scored as it is
        assert all(torch.equal(a, b) for a, b in zip(weights(params), parent))
    unchanged = weights(params)
    update = strategy.tell(4, torch.tensor([0.0, 0.1, 0.2, 0.9, 0.3, 0.4]))
    assert update.kind is UpdateKind.SELECTION and update.winner == 3 and update.coefficients is None
    assert update.shaped.shape == (6,)
    assert all(torch.equal(a, b) for a, b in zip(weights(params), unchanged)), "tell leaves the weights alone"
    apply_update(space, 4, update)
    assert all(torch.equal(a, b) for a, b in zip(weights(params), scored)), "not the weights member 3 was scored with"
    assert not any(torch.equal(a, b) for a, b in zip(weights(params), parent))
    assert strategy.genome == [(4, 3)]
    # the parent kept: nothing moves, the genome does not grow
    before = weights(params)
    kept = strategy.tell(5, torch.tensor([1.0, 0.1, 0.2, 0.9, 0.3, 0.4]))
    assert kept.winner is None
    apply_update(space, 5, kept)
    assert all(torch.equal(a, b) for a, b in zip(weights(params), before)) and strategy.genome == [(4, 3)]


def test_elitism_climbs_a_toy_objective_monotonically():
    space, params = make_space(population=8)
    strategy = GeneticAlgorithm(space, 0.05)
    targets = [torch.ones(3, 2) * 0.5 for _ in params]

    def objective():
        return -sum(float((p.detach() - t).square().sum()) for (_, p), t in zip(params, targets))

    start, parents = objective(), []
    for step in range(30):
        fitness = torch.zeros(8)
        for member in range(8):
            with strategy.perturbed(step, [member]):
                fitness[member] = objective()
        parents.append(float(fitness[0]))
        apply_update(space, step, strategy.tell(step, fitness))
    assert all(b >= a for a, b in zip(parents, parents[1:])), "elitism: the parent never gets worse"
    assert objective() > start + 1.0 and len(strategy.genome) > 10


def test_genome_state_round_trips_and_bad_state_is_named():
    space, _ = make_space()
    strategy = GeneticAlgorithm(space, 0.1)
    strategy.tell(0, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    strategy.tell(1, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0]))
    state = strategy.state_dict()
    assert state == {"genome": [[0, 1], [1, 5]]} and strategy.seed_log_state() == {}
    other = GeneticAlgorithm(make_space()[0], 0.1)
    other.load_state_dict(state)
    assert other.genome == [(0, 1), (1, 5)]
    with pytest.raises(ValueError, match=r"needs 'genome', a list of \[step, member\] pairs"):
        other.load_state_dict({"genome": [[0, "1"]]})


def test_singular_value_space_applies_the_scored_member_bit_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    space = SVDSpace([("0", model[0]), ("2", model[2])], MemberNoise(1, 4), svd_fraction=1.0)
    strategy = GeneticAlgorithm(space, 0.1)
    with strategy.perturbed(2, [1]):
        scored = [p.detach().clone() for p in model.parameters()]
    apply_update(space, 2, strategy.tell(2, torch.tensor([0.0, 1.0, 0.5, 0.2])))
    assert all(torch.equal(a, b.detach()) for a, b in zip(scored, model.parameters()))


def test_what_ga_cannot_run_on_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    low_rank = LowRankSpace([("0", model[0])], MemberNoise(1, 4))
    with pytest.raises(ValueError, match=r"strategy='ga' sets the weights to the winning member, which LowRankSpace"):
        GeneticAlgorithm(low_rank, 0.1)
    space, _ = make_space()
    with pytest.raises(ValueError, match=r"min_improvement must be finite and >= 0, got -1"):
        GeneticAlgorithm(space, 0.1, min_improvement=-1)
    strategy = GeneticAlgorithm(space, 0.1)
    with pytest.raises(ValueError, match=r"the parent \(member 0\) must be evaluated on its own"):
        strategy.perturbed(0, [0, 1])
