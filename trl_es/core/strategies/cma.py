"""CMA-ES (ESSA's strategy): explicit candidates from a search distribution the library adapts, in a vector space.

Each step asks ``cmaes`` (through :class:`~trl_es.core.cma.CMAESearch`, seeded by (seed, generation) so every
process asks the same candidates) for ``population_size`` points; member ``i`` is evaluated with the space's
evolved tensors set to candidate ``i``; the fitness goes back to the library, and the search mean becomes the
evolved tensors (a ``SET`` update, applied by ``core.apply.apply_update``). No gradient is written, so the
Trainer's optimizer has nothing to step: CMA-ES is its own optimizer.

It needs a space that is a short vector (``get_vector`` / ``set_vector`` / ``split_vector`` / ``perturbed_by``): the
singular values of the ``svd`` space (ESSA), hundreds to a few thousand numbers.
"""

from collections.abc import Sequence

import torch

from ..cma import CMAESearch
from ..fitness import centered_rank
from ..spaces import PerturbationSpace
from .base import Strategy, StrategyUpdate, UpdateKind


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
        super().__init__(space)
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

    def step_size_logs(self) -> dict[str, float]:
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
        return StrategyUpdate(UpdateKind.SET, centered_rank(filled), values=self.search.mean.to(torch.float32))

    def state_dict(self) -> dict:
        return {"search": self.search.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.search.load_state_dict(state["search"])
