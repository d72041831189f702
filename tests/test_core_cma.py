"""CMA-ES adapter: maximises, deterministic per seed, resumes bit-identically, refuses a full covariance too large."""

import io

import pytest
import torch
from torch import nn

from trl_es.core.noise import MemberNoise
from trl_es.core.strategies.cma import CMAESearch
from trl_es.core.svd import SVDSpace, svd_target_modules


TARGET = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64)


def fitness(candidates):
    """Higher is better: an ill-conditioned negative quadratic peaked at TARGET."""
    scale = torch.arange(1, candidates.shape[1] + 1, dtype=torch.float64)
    return -(((candidates - TARGET[: candidates.shape[1]]) ** 2) * scale).sum(dim=1)


def run(search, generations, record):
    for _ in range(generations):
        candidates = search.ask()
        record.append(candidates)
        search.tell(candidates, fitness(candidates))


@pytest.mark.parametrize("diagonal", [False, True])
def test_climbs_a_toy_objective(diagonal):
    search = CMAESearch(torch.zeros(12), sigma0=0.5, population_size=12, seed=0, diagonal=diagonal)
    start = float(fitness(search.mean[None])[0])
    run(search, 80, [])
    assert float(fitness(search.mean[None])[0]) > 1e-3 * start  # -> 0 from below: the maximum, not the minimum
    assert search.generation == 80 and search.sigma < 0.5


def test_candidates_depend_only_on_seed_and_history():
    a, b = (CMAESearch(torch.zeros(5), 0.3, 6, seed=7) for _ in range(2))
    first = a.ask()
    assert first.shape == (6, 5) and first.dtype == torch.float64
    assert torch.equal(first, a.ask())  # asking twice in a generation gives the same candidates
    assert torch.equal(first, b.ask())  # every process asks the same candidates
    assert not torch.equal(first, CMAESearch(torch.zeros(5), 0.3, 6, seed=8).ask())
    state = torch.get_rng_state()
    a.tell(first, fitness(first))
    assert not torch.equal(a.ask(), first)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("diagonal", [False, True])
def test_resume_is_bit_identical(diagonal):
    def make():
        return CMAESearch(torch.zeros(12), sigma0=0.5, population_size=8, seed=3, diagonal=diagonal)

    straight = []
    run(make(), 5, straight)

    resumed = []
    first = make()
    run(first, 2, resumed)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = make()
    second.load_state_dict(torch.load(buffer, weights_only=True))  # a checkpoint needs no pickle to resume
    assert second.generation == 2
    run(second, 3, resumed)
    for generation, (x, y) in enumerate(zip(straight, resumed, strict=True)):
        assert torch.equal(x, y), f"generation {generation} differs"
    with pytest.raises(ValueError, match="saved for .*'seed': 3.*this search is .*'seed': 4"):
        CMAESearch(torch.zeros(12), 0.5, 8, seed=4, diagonal=diagonal).load_state_dict(first.state_dict())


def test_full_covariance_above_the_limit_points_to_sep_cma():
    with pytest.raises(ValueError, match=r"1001 dimensions exceeds max_full_dim=1000.*diagonal=True.*gaussian"):
        CMAESearch(torch.zeros(1001), 0.1, 8, seed=0)
    assert CMAESearch(torch.zeros(1001), 0.1, 8, seed=0, diagonal=True).ask().shape == (8, 1001)
    assert CMAESearch(torch.zeros(20), 0.1, 4, seed=0, max_full_dim=20).dim == 20


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="1-D"):
        CMAESearch(torch.zeros(2, 3), 0.1, 4, seed=0)
    with pytest.raises(ValueError, match="sigma0 must be > 0"):
        CMAESearch(torch.zeros(3), 0.0, 4, seed=0)
    with pytest.raises(ValueError, match="population_size must be >= 2"):
        CMAESearch(torch.zeros(3), 0.1, 1, seed=0)
    with pytest.raises(ValueError, match="dimension >= 2"):
        CMAESearch(torch.zeros(1), 0.1, 4, seed=0, diagonal=True)
    search = CMAESearch(torch.zeros(3), 0.1, 4, seed=0)
    candidates = search.ask()
    with pytest.raises(ValueError, match=r"candidates of shape \(4, 3\)"):
        search.tell(candidates[:3], torch.zeros(3))
    with pytest.raises(ValueError, match="expected 4 fitness values"):
        search.tell(candidates, torch.zeros(5))
    with pytest.raises(ValueError, match=r"candidates \[1, 3\] is not finite"):
        search.tell(candidates, torch.tensor([0.0, float("nan"), 1.0, float("inf")]))
    assert search.generation == 0  # nothing was told


def test_cma_over_singular_values_fits_a_target_model():
    """The loop the trainer will run: candidates are explicit vectors, scored inside ``perturbed_by``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))
    space = SVDSpace(svd_target_modules(model), MemberNoise(0, 2), svd_fraction=1.0)
    start = space.get_vector()
    # A target reachable in this space: the same singular vectors with other singular values.
    space.set_vector(start * torch.linspace(0.5, 1.5, space.search_dim))
    x = torch.randn(32, 6)
    with torch.no_grad():
        wanted = model(x)
    space.set_vector(start)

    def reward():
        with torch.no_grad():
            return -float(((model(x) - wanted) ** 2).mean())

    initial = reward()
    search = CMAESearch(space.get_vector(), sigma0=0.2, population_size=10, seed=0)
    for _ in range(80):
        candidates = search.ask()
        rewards = []
        for candidate in candidates:
            with space.perturbed_by(space.split_vector(candidate.float() - space.get_vector())):
                rewards.append(reward())
        search.tell(candidates, torch.tensor(rewards))
        space.set_vector(search.mean.float())
    assert reward() > 0.01 * initial
