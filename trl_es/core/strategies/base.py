"""The strategy interface, in the ``ask`` / ``tell`` shape of evosax (which minimises; we maximise fitness)."""

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from ..spaces import PerturbationSpace


class UpdateKind(str, Enum):
    """How a strategy's result moves the evolved tensors; ``trl_es.core.apply.apply_update`` is the one place that
    acts on it, for the trainer and for replay alike."""

    #: ``coefficients`` c_k of the seeded directions: an optimizer steps the pseudo-gradient ``sum_k c_k eps_k``
    #: (or, with plain SGD, the space applies that step straight from the seeds). Gaussian ES.
    GRADIENT = "gradient"
    #: ``winner``: one member's perturbation is made permanent, ``theta += sigma * eps_winner`` (None: the parent
    #: stays). The genetic algorithm.
    SELECTION = "selection"
    #: ``values``: the evolved tensors become this vector (``space.set_vector``). CMA-ES's mean.
    SET = "set"


@dataclass
class StrategyUpdate:
    """What a strategy made of one step's fitness: the update to apply, and what the logs and the seed log show.

    Attributes:
        kind: which of the fields below carries the update (see :class:`UpdateKind`).
        shaped: the weight each member received, ``(population,)`` (None in an update rebuilt from a seed log).
        coefficients: ``GRADIENT``: the per-direction coefficients of ``t.grad = sum_k c_k eps_k(t)``.
        winner: ``SELECTION``: the member whose perturbation becomes permanent, or ``None`` when the parent is kept.
        sigma: ``SELECTION``: the scale the winner was evaluated at (``strategy.sigma_at(step)``), made permanent.
        values: ``SET``: the new values of the evolved vector.
        fitness: ``SET``: the raw fitness the strategy was told; the seed log records it, and replay tells the
            strategy again (its state after each step follows from its start, its seed and these).
    """

    kind: UpdateKind
    shaped: torch.Tensor | None = None
    coefficients: torch.Tensor | None = None
    winner: int | None = None
    sigma: float | None = None
    values: torch.Tensor | None = None
    fitness: torch.Tensor | None = None


class Strategy(ABC):
    """Decides the members of a step and what their fitness does to the evolved tensors of a space.

    One ES step calls, in order: ``ask(step)``; for every group of ``member_groups()``, ``perturbed(step, group)``
    around the group's generation; ``tell(step, fitness)`` with one raw fitness per member (higher is better, NaN
    for a member with no scorable completion), which returns a :class:`StrategyUpdate` and leaves the weights alone.
    ``trl_es.core.apply.apply_update`` then applies it (the trainer and replay both call it).
    """

    #: What ``tell`` returns (see :class:`UpdateKind`). Only ``GRADIENT`` strategies use the Trainer's optimizer,
    #: learning rate and schedule; the others log :meth:`step_size_logs` instead of ``learning_rate``.
    update_kind: UpdateKind = UpdateKind.GRADIENT

    def __init__(self, space: PerturbationSpace, sigma: float, sigma_decay: float = 1.0):
        if not 0 < sigma < float("inf"):
            raise ValueError(f"sigma must be finite and > 0, got {sigma}")
        if not 0 < sigma_decay <= 1:
            raise ValueError(f"sigma_decay must be in (0, 1], got {sigma_decay}")
        self.space = space
        #: The perturbation scale and its schedule, ``sigma_t = sigma * sigma_decay ** t`` (:meth:`sigma_at`): a
        #: function of the step number alone, so a resumed run and a replay use the scale the uninterrupted run used.
        #: The strategy owns it and hands it to the space with every perturbation; the space keeps no scale.
        self.sigma = sigma
        self.sigma_decay = sigma_decay
        #: Members per step. The noise is drawn for this many members (antithetic pairs share a direction, and the
        #: number of directions is part of the noise's seed), so the space's noise is built with it.
        self.population_size: int = space.noise.population_size

    def member_groups(self) -> list[list[int]]:
        return self.space.member_groups()

    def sigma_at(self, step: int) -> float:
        """The perturbation scale of ``step``."""
        return self.sigma * self.sigma_decay**step

    def ask(self, step: int) -> None:  # noqa: B027 (a hook: only stateful strategies override it)
        """Prepare the members of ``step`` (seeded strategies have nothing to prepare: a member is its seed)."""

    def perturbed(self, step: int, members: Sequence[int]) -> contextlib.AbstractContextManager[None]:
        """Context in which the model acts as ``members`` at ``sigma_at(step)``; the weights are exactly restored on
        exit."""
        return self.space.perturbed(step, members, self.sigma_at(step))

    @abstractmethod
    def tell(self, step: int, fitness: torch.Tensor) -> StrategyUpdate:
        """Turn one raw fitness per member into the step's update (applied by ``core.apply.apply_update``)."""

    @classmethod
    @abstractmethod
    def from_config(cls, space: PerturbationSpace, args) -> "Strategy":
        """Build from an ``ESConfig`` (read as plain attributes: the core imports no config class)."""

    def step_size_logs(self, step: int) -> dict[str, float]:
        """The step size the strategy moved by at ``step``, for the logs of a strategy that is not ``GRADIENT``."""
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
