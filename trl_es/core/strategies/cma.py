"""CMA-ES (ESSA's strategy): explicit candidates from a search distribution the library adapts, in a vector space.

Each step asks ``cmaes`` (through :class:`CMAESearch` below, seeded by (seed, generation) so every
process asks the same candidates) for ``population_size`` points; member ``i`` is evaluated with the space's
evolved tensors set to candidate ``i``; the fitness goes back to the library, and the search mean becomes the
evolved tensors (a ``SET`` update, applied by ``core.apply.apply_update``). No gradient is written, so the
Trainer's optimizer has nothing to step: CMA-ES is its own optimizer.

It needs a space that is a short vector (``get_vector`` / ``set_vector`` / ``split_vector`` / ``perturbed_by``): the
singular values of the ``svd`` space (ESSA), hundreds to a few thousand numbers.

The search itself, :class:`CMAESearch`: CMA-ES over an explicit parameter vector, a thin adapter around the
``cmaes`` library.

Why ``cmaes`` (CyberAgent, MIT, numpy only) rather than ``cma`` (pycma, BSD-3, numpy only), both maintained:

* seeding: ``cmaes`` keeps its own ``numpy.random.RandomState`` per optimizer (``seed=``, ``reseed_rng``); pycma
  draws from numpy's *global* RNG (``np.random.seed(opts['seed'])``) unless its ``randn`` option is replaced, so any
  other numpy user in the process (datasets shuffling, a reward function) would change the candidates and break
  "every process asks the same candidates".
* separable CMA-ES: ``cmaes.SepCMA`` is a class of its own with the same ask/tell interface; pycma has it as the
  ``CMA_diagonal`` option of its one large class.
* state: both pickle. ``cmaes`` state is a flat dict of numpy arrays and floats, which this module turns into
  tensors and plain numbers, so ``torch.load(weights_only=True)`` reads a checkpoint and no pickle is executed on
  resume. (Its own ``__getstate__`` stores only the upper triangle of the covariance, which is not always exactly
  symmetric, so a resume through it drifts by ~1e-13; this module copies the attributes as they are.)
* size: ``cmaes`` is ~250 kB of readable code; pycma is ~1.3 MB with plotting, logging and options we do not use.

Higher fitness is better here (the libraries minimise: the adapter negates). Every ``ask`` of a generation reseeds
the library's RNG from ``(seed, generation)``, so the candidates are a pure function of the seed and the state:
every process asks the same ones, asking twice gives the same ones, and a resumed search needs no RNG state.
"""

from collections.abc import Sequence

import cmaes
import numpy as np
import torch

from ..fitness import centered_rank
from ..noise import derive_seed
from ..spaces import PerturbationSpace
from .base import Strategy, StrategyUpdate, UpdateKind


# Full covariance costs O(d^2) memory and an O(d^3) eigendecomposition per generation; cmaes's rank-mu update also
# builds a (population, d, d) float64 temporary. Measured with cmaes 0.13 on 2 CPU cores, population 32: d = 1000
# takes 1.4 s and 0.6 GB per generation, d = 2000 takes 11 s and 2.2 GB. Above this, ask for it explicitly.
DEFAULT_MAX_FULL_DIM = 1000


class CMAESearch:
    """Ask/tell CMA-ES that maximises a fitness, deterministic given ``seed`` and the history of ``tell`` calls.

    Args:
        mean: the starting point (1-D; e.g. ``SVDSpace.get_vector()``).
        sigma0: initial step size, in the units of ``mean``.
        population_size: candidates per generation (ESSA: 24-96; 8 underperforms).
        seed: run seed; candidates of generation ``g`` come from a generator seeded by ``(seed, g)``.
        diagonal: separable CMA-ES (sep-CMA: diagonal covariance, O(d) memory and time) instead of the full one.
        max_full_dim: refuse full covariance above this dimension (see ``DEFAULT_MAX_FULL_DIM``).
    """

    def __init__(
        self,
        mean: torch.Tensor,
        sigma0: float,
        population_size: int,
        seed: int,
        diagonal: bool = False,
        max_full_dim: int = DEFAULT_MAX_FULL_DIM,
    ):
        mean = torch.as_tensor(mean).detach().to("cpu", torch.float64)
        if mean.ndim != 1 or mean.numel() == 0:
            raise ValueError(f"CMA-ES mean must be a non-empty 1-D vector, got shape {tuple(mean.shape)}")
        if not torch.isfinite(mean).all():
            raise ValueError("CMA-ES mean has non-finite entries")
        if not sigma0 > 0:
            raise ValueError(f"CMA-ES sigma0 must be > 0, got {sigma0}")
        if population_size < 2:
            raise ValueError(f"CMA-ES population_size must be >= 2, got {population_size}")
        dim = mean.numel()
        if diagonal and dim < 2:
            raise ValueError("diagonal (separable) CMA-ES needs a search dimension >= 2; use diagonal=False")
        if not diagonal and dim > max_full_dim:
            gigabytes = population_size * dim * dim * 8 / 1e9
            raise ValueError(
                f"full-covariance CMA-ES over {dim} dimensions exceeds max_full_dim={max_full_dim}: it needs O(d^2) "
                f"memory (~{gigabytes:.1f} GB of temporaries at population {population_size}) and an O(d^3) "
                "eigendecomposition per generation. Use diagonal=True (sep-CMA-ES, O(d)), the gaussian ES strategy, "
                "a smaller search space (lower svd_fraction or fewer target modules), or raise max_full_dim."
            )
        self.seed = seed
        self.diagonal = diagonal
        self._config = {"dim": dim, "population_size": population_size, "seed": seed, "diagonal": diagonal}
        cls = cmaes.SepCMA if diagonal else cmaes.CMA
        # .copy(): SepCMA keeps the array it is given and updates it in place.
        self._optimizer = cls(mean=mean.numpy().copy(), sigma=float(sigma0), population_size=population_size, seed=0)

    @property
    def dim(self) -> int:
        return self._optimizer.dim

    @property
    def population_size(self) -> int:
        return self._optimizer.population_size

    @property
    def generation(self) -> int:
        """Number of ``tell`` calls so far."""
        return self._optimizer.generation

    @property
    def mean(self) -> torch.Tensor:
        """The current mean of the search distribution (float64 copy): the point to deploy."""
        return torch.from_numpy(np.array(self._optimizer.mean, dtype=np.float64, copy=True))

    @property
    def sigma(self) -> float:
        """The current global step size (for logging)."""
        return float(self._optimizer._sigma)

    def ask(self) -> torch.Tensor:
        """This generation's candidates, ``(population_size, dim)`` float64; the same on every call and process."""
        self._optimizer.reseed_rng(derive_seed(self.seed, "cma", self.generation) % 2**32)
        return torch.from_numpy(np.stack([self._optimizer.ask() for _ in range(self.population_size)]))

    def tell(self, candidates: torch.Tensor, fitness: torch.Tensor | Sequence[float]) -> None:
        """Update the distribution from this generation's ``candidates`` and their ``fitness`` (higher is better)."""
        candidates = torch.as_tensor(candidates).detach().to("cpu", torch.float64)
        fitness = torch.as_tensor(fitness, dtype=torch.float64).detach().cpu()
        expected = (self.population_size, self.dim)
        if candidates.shape != expected:
            raise ValueError(f"expected candidates of shape {expected}, got {tuple(candidates.shape)}")
        if fitness.shape != (self.population_size,):
            raise ValueError(f"expected {self.population_size} fitness values, got shape {tuple(fitness.shape)}")
        bad = torch.nonzero(~torch.isfinite(fitness)).flatten().tolist()
        if bad:
            raise ValueError(f"fitness of candidates {bad} is not finite: {fitness[bad].tolist()}")
        if not torch.isfinite(candidates).all():
            raise ValueError("candidates have non-finite entries")
        xs = candidates.numpy()
        # cmaes minimises: negate so that higher fitness wins.
        self._optimizer.tell([(xs[i].copy(), -float(fitness[i])) for i in range(self.population_size)])

    def state_dict(self) -> dict:
        """Everything a resumed search needs, as tensors and plain numbers (``torch.load(weights_only=True)`` reads
        it)."""
        arrays, numpy_scalars, plain = {}, {}, {}
        for name, value in vars(self._optimizer).items():
            if name == "_rng":  # reseeded from (seed, generation) at every ask
                continue
            if isinstance(value, np.ndarray):
                arrays[name] = torch.from_numpy(value.copy())
            elif isinstance(value, np.generic):
                numpy_scalars[name] = torch.from_numpy(np.asarray(value).copy())
            elif value is None or isinstance(value, (bool, int, float)):
                plain[name] = value
            else:
                raise TypeError(f"cannot save cmaes attribute {name!r} of type {type(value).__name__}")
        return {
            "config": dict(self._config),
            "cmaes_version": cmaes.__version__,
            "arrays": arrays,
            "numpy_scalars": numpy_scalars,
            "plain": plain,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` into a search constructed with the same dim, population, seed and diagonal."""
        if state["config"] != self._config:
            raise ValueError(f"CMA-ES state was saved for {state['config']}, this search is {self._config}")
        saved = set(state["arrays"]) | set(state["numpy_scalars"]) | set(state["plain"])
        current = set(vars(self._optimizer)) - {"_rng"}
        if saved != current:
            raise ValueError(
                f"CMA-ES state saved with cmaes {state['cmaes_version']} does not match the installed cmaes "
                f"{cmaes.__version__} (attributes differ: {sorted(saved ^ current)})"
            )
        restored = {name: tensor.numpy().copy() for name, tensor in state["arrays"].items()}
        restored.update({name: tensor.numpy()[()] for name, tensor in state["numpy_scalars"].items()})
        restored.update(state["plain"])
        vars(self._optimizer).update(restored)


VECTOR_METHODS = ("get_vector", "set_vector", "split_vector", "perturbed_by")


class CMAStrategy(Strategy):
    """Args:
    space: a vector space (``perturbation='svd'``).
    seed: run seed; candidates are a function of (seed, generation).
    sigma0: initial step size, in the units of the evolved values.
    diagonal: separable CMA-ES (diagonal covariance), for dimensions above ``max_full_dim``.
    max_full_dim: largest dimension for full-covariance CMA-ES (O(d^2) memory).
    """

    def __init__(
        self,
        space: PerturbationSpace,
        seed: int,
        sigma0: float,
        diagonal: bool = False,
        max_full_dim: int = 1000,
    ):
        # sigma0 is only CMA-ES's starting step size: it adapts it every generation (``sigma_at``), on no schedule.
        super().__init__(space, sigma0)
        missing = [name for name in VECTOR_METHODS if not hasattr(space, name)]
        if missing:
            raise ValueError(
                f"strategy='cma' needs a space of a few thousand numbers with {list(VECTOR_METHODS)}; "
                f"{type(space).__name__} has no {missing}. Use perturbation='svd' (ESSA), or strategy='gaussian'."
            )
        if space.members_per_forward != 1:
            raise ValueError("strategy='cma' evaluates one candidate per forward; the space serves several")
        self.search = CMAESearch(
            space.get_vector(),
            sigma0,
            self.population_size,
            seed=seed,
            diagonal=diagonal,
            max_full_dim=max_full_dim,
        )
        self._candidates: torch.Tensor | None = None

    update_kind = UpdateKind.SET

    def sigma_at(self, step: int) -> float:
        return self.search.sigma

    def step_size_logs(self, step: int) -> dict[str, float]:
        return {"cma_sigma": self.search.sigma}  # CMA-ES adapts it every generation, starting from sigma0

    @classmethod
    def from_config(cls, space: PerturbationSpace, args) -> "CMAStrategy":
        return cls(space, args.seed, args.cma_sigma0, args.cma_diagonal, args.cma_max_full_dim)

    def ask(self, step: int) -> None:
        self._candidates = self.search.ask()

    def perturbed(self, step: int, members: Sequence[int]):
        (member,) = members
        current = self.space.get_vector()
        offset = self._candidates[member].to(current.dtype) - current
        return self.space.perturbed_by(self.space.split_vector(offset))

    def tell(self, step: int, fitness: torch.Tensor) -> StrategyUpdate:
        # A member with no scorable completion ranks below every scored one (CMA-ES needs a value for each).
        valid = ~torch.isnan(fitness)
        floor = float(fitness[valid].min()) - 1.0 if valid.any() else 0.0
        filled = torch.where(valid, fitness, torch.full_like(fitness, floor))
        self.search.tell(self._candidates, filled)
        told = fitness.detach().cpu().clone()
        return StrategyUpdate(
            UpdateKind.SET, centered_rank(filled), values=self.search.mean.to(torch.float32), fitness=told
        )

    def state_dict(self) -> dict:
        return {"search": self.search.state_dict()}

    def seed_log_state(self) -> dict:
        # The step records imply it: replay rebuilds the search from its start by telling it each step's recorded
        # fitness again. A copy would be O(dim^2) numbers a step (the covariance and its running mean: ~20 MB of JSON
        # at ESSA's 960 singular values on SmolLM2). Checkpoints keep it (state_dict) to resume the search.
        return {}

    def load_state_dict(self, state: dict) -> None:
        self.search.load_state_dict(state["search"])
