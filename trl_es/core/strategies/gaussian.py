"""Seeded Gaussian ES (OpenAI-ES / Qiu et al. / EGGROLL): the pseudo-gradient of the shaped fitness.

``g = -(1 / (N sigma)) sum_i f_i eps_i`` is written to ``t.grad``, so the configured torch optimizer, learning-rate
schedule and weight decay act on it as on any gradient. Each member is a seed: nothing but the shaped fitness is
needed to rebuild the step.

``sigma_decay`` shrinks the perturbation scale geometrically, ``sigma_t = sigma * sigma_decay ** t`` (the base
strategy's schedule, set in ``ask(t)``); the coefficients ``tell`` returns already carry ``1 / sigma_t``.
"""

import torch

from ..fitness import shape_fitness
from ..spaces import PerturbationSpace
from ..update import pseudo_gradient_coefficients
from .base import Strategy, StrategyUpdate


class GaussianES(Strategy):
    """Args:
    space: where the members' seeded noise lives.
    fitness_shaping: a name of ``core.fitness.FITNESS_SHAPINGS``.
    sigma_decay: per-step multiplicative factor of the space's ``sigma`` (1.0: constant).
    """

    supports_update_in_place = True

    def __init__(self, space: PerturbationSpace, fitness_shaping: str = "centered_rank", sigma_decay: float = 1.0):
        super().__init__(space, sigma_decay)
        self.fitness_shaping = fitness_shaping

    @classmethod
    def from_config(cls, space: PerturbationSpace, args) -> "GaussianES":
        return cls(space, args.fitness_shaping, getattr(args, "sigma_decay", 1.0))

    def tell(self, step: int, fitness: torch.Tensor) -> StrategyUpdate:
        shaped = shape_fitness(fitness, self.fitness_shaping)
        coefficients = pseudo_gradient_coefficients(shaped, self.space.noise, self.space.sigma)
        if not self.update_in_place:  # else the trainer applies them at the optimizer step: no t.grad at all
            self.space.write_gradients(step, coefficients)
        return StrategyUpdate(shaped=shaped, coefficients=coefficients)
