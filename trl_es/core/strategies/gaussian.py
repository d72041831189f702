"""Seeded Gaussian ES (OpenAI-ES / Qiu et al. / EGGROLL): the pseudo-gradient of the shaped fitness.

``g = -(1 / (N sigma)) sum_i f_i eps_i``, as one coefficient per seeded direction (a ``GRADIENT`` update):
``core.apply.apply_update`` writes it to ``t.grad`` for the configured torch optimizer, learning-rate schedule and
weight decay to act on as on any gradient (or, with plain SGD, applies SGD's step straight from the seeds). Each
member is a seed: nothing but the shaped fitness is needed to rebuild the step.

``sigma_decay`` shrinks the perturbation scale geometrically, ``sigma_t = sigma * sigma_decay ** t`` (the base
strategy's schedule, set in ``ask(t)``); the coefficients ``tell`` returns already carry ``1 / sigma_t``.
"""

import torch

from ..fitness import shape_fitness
from ..spaces import PerturbationSpace
from ..update import pseudo_gradient_coefficients
from .base import Strategy, StrategyUpdate, UpdateKind


class GaussianES(Strategy):
    """Args:
    space: where the members' seeded noise lives.
    fitness_shaping: a name of ``core.fitness.FITNESS_SHAPINGS``.
    sigma: the perturbation scale.
    sigma_decay: per-step multiplicative factor of ``sigma`` (1.0: constant).
    """

    def __init__(
        self,
        space: PerturbationSpace,
        sigma: float,
        fitness_shaping: str = "centered_rank",
        sigma_decay: float = 1.0,
    ):
        super().__init__(space, sigma, sigma_decay)
        self.fitness_shaping = fitness_shaping

    @classmethod
    def from_config(cls, space: PerturbationSpace, args) -> "GaussianES":
        return cls(space, args.sigma, args.fitness_shaping, getattr(args, "sigma_decay", 1.0))

    def tell(self, step: int, fitness: torch.Tensor) -> StrategyUpdate:
        shaped = shape_fitness(fitness, self.fitness_shaping)
        coefficients = pseudo_gradient_coefficients(shaped, self.space.noise, self.sigma_at(step))
        return StrategyUpdate(UpdateKind.GRADIENT, shaped, coefficients=coefficients)
