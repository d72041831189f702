"""The strategy interface, in the ``ask`` / ``tell`` shape of evosax (which minimises; we maximise fitness)."""

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..spaces import PerturbationSpace


@dataclass
class StrategyUpdate:
    """What a strategy did with one step's fitness, for logging and for the seed log.

    Attributes:
        shaped: the weight each member received, ``(population,)``.
        coefficients: the per-direction coefficients written as ``t.grad = sum_k c_k eps_k(t)`` for the optimizer
            to step (or, with ``update_in_place``, left for ``space.apply_update``); ``None`` when the strategy set
            the evolved tensors itself.
        winner: for strategies that select (``Strategy.selects_a_member``, e.g. GA): the member whose perturbation
            was added to the evolved tensors (``theta += sigma * eps_winner``), or ``None`` when the parent was kept.
    """

    shaped: torch.Tensor
    coefficients: torch.Tensor | None
    winner: int | None = None


class Strategy(ABC):
    """Decides the members of a step and how their fitness moves the evolved tensors of a space.

    One ES step calls, in order: ``ask(step)``; for every group of ``member_groups()``, ``perturbed(step, group)``
    around the group's generation; ``tell(step, fitness)`` with one raw fitness per member (higher is better, NaN
    for a member with no scorable completion). Then the Trainer's optimizer steps ``space.named_tensors()`` from the
    gradients ``tell`` wrote, and ``space.after_update()`` runs.
    """

    #: True for strategies whose update is one member's perturbation made permanent (``StrategyUpdate.winner``);
    #: the seed log then records the winner of every step, and replay applies it through the space.
    selects_a_member: bool = False
    #: True when ``tell`` can leave ``t.grad`` alone and return coefficients for ``space.apply_update`` instead.
    supports_update_in_place: bool = False
    #: False for strategies that set the evolved tensors themselves (CMA-ES, GA): the Trainer's optimizer, learning
    #: rate and schedule then do nothing, and the logs show :meth:`step_size_logs` instead of ``learning_rate``.
    uses_optimizer: bool = True

    def __init__(self, space: PerturbationSpace, sigma_decay: float = 1.0):
        if not 0 < sigma_decay <= 1:
            raise ValueError(f"sigma_decay must be in (0, 1], got {sigma_decay}")
        self.space = space
        #: The perturbation scale's schedule, ``sigma_t = sigma * sigma_decay ** t``: set in ``ask(t)`` from the step
        #: number alone, so a resumed run and a replay use the scale the uninterrupted run used at that step.
        self.initial_sigma = space.sigma
        self.sigma_decay = sigma_decay
        #: Set by the trainer when plain SGD lets the space apply the update itself (``ESConfig.inplace_update``):
        #: ``tell`` then writes no gradient and whoever steps applies ``coefficients`` with ``space.apply_update``.
        self.update_in_place = False

    @property
    def population_size(self) -> int:
        return self.space.noise.population_size

    def member_groups(self) -> list[list[int]]:
        return self.space.member_groups()

    def sigma_at(self, step: int) -> float:
        return self.initial_sigma * self.sigma_decay**step

    def ask(self, step: int) -> None:
        """Prepare the members of ``step``: the space perturbs by ``sigma_at(step)`` (seeded strategies have
        nothing else to prepare)."""
        if self.sigma_decay != 1.0:
            self.space.sigma = self.sigma_at(step)

    def perturbed(self, step: int, members: Sequence[int]) -> contextlib.AbstractContextManager[None]:
        """Context in which the model acts as ``members``; the weights are exactly restored on exit."""
        return self.space.perturbed(step, members)

    @abstractmethod
    def tell(self, step: int, fitness: torch.Tensor) -> StrategyUpdate:
        """Turn one raw fitness per member into an update of the space's tensors."""

    @classmethod
    @abstractmethod
    def from_config(cls, space: PerturbationSpace, args) -> "Strategy":
        """Build from an ``ESConfig`` (read as plain attributes: the core imports no config class)."""

    def step_size_logs(self) -> dict[str, float]:
        """The step size the strategy really moves by, for the logs of a strategy that uses no optimizer."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume the search exactly (nothing for stateless strategies)."""
        return {}

    def seed_log_state(self) -> dict:
        """What the seed log records whenever it changes (default: all of :meth:`state_dict`). A strategy whose state
        the step records already imply returns less, so that the log does not grow with a copy of it every step."""
        return self.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)}")
