"""A genetic algorithm in the style of Deep GA (Such et al. 2017, "Deep Neuroevolution"): selection, not a gradient.

Every step mutates the current parent ``theta`` into ``population_size`` seeded children ``theta + sigma * eps_i``
(the space's noise, so member ``i`` is the seed ``(step, i)``), scores them on the step's prompts and keeps the best:
truncation selection with a truncation size of one. The weights become the winner, ``theta += sigma * eps_winner``
(a ``SELECTION`` update, which ``core.apply.apply_update`` makes through the space with the same expression it
perturbed with, so the new parent is bit-identical to the child that was scored). No gradient is written: the
Trainer's optimizer has nothing to step (``learning_rate``, ``optim`` and ``weight_decay`` are unused).

Elitism (``elite=True``, the default): member 0 is the parent itself, evaluated with zero perturbation on the same
prompts as its children, and it survives unless a child beats it by more than ``min_improvement``. Under greedy
decoding on a fixed prompt set the parent's fitness therefore never decreases. Without elitism member 0 is a child
like the others and the best child always replaces the parent (a comma strategy, which can step downhill).

The genome, as in Deep GA, is the list of ``(step, member)`` seeds of the mutations that won, applied in order to the
run's initial weights; it is the strategy's checkpoint state. The seed log records each step's winner, from which
``trl-es replay`` rebuilds the weights.

Deep GA keeps the top ``T`` individuals as parents of the next generation; here ``T = 1``: the model holds one set
of weights, and a second parent would have to be rebuilt from its genome for every child it has.
"""

import contextlib
from collections.abc import Sequence

import torch

from ..fitness import centered_rank
from ..spaces import PerturbationSpace
from .base import Strategy, StrategyUpdate, UpdateKind


PARENT = 0  # with elitism, the member that is the unperturbed parent


class GeneticAlgorithm(Strategy):
    """Args:
    space: where the children's seeded mutations live; it must be able to make one member permanent
        (``apply_member``: the ``full``, ``lora`` and ``svd`` spaces) and evaluate one member per forward.
    sigma: the mutation scale: child ``i`` is ``theta + sigma * eps_i``.
    elite: member 0 is the unperturbed parent, which survives unless a child beats it.
    min_improvement: how much a child's fitness must exceed the parent's to replace it (``elite`` only); ties always
        keep the parent.
    sigma_decay: the mutation scale of step t is ``sigma * sigma_decay ** t`` (annealed mutations; 1.0: constant).
        The winner is added with the scale it was scored at, so replay needs the schedule: the seed log records it.
    """

    update_kind = UpdateKind.SELECTION

    def __init__(
        self,
        space: PerturbationSpace,
        sigma: float,
        elite: bool = True,
        min_improvement: float = 0.0,
        sigma_decay: float = 1.0,
    ):
        super().__init__(space, sigma, sigma_decay)
        if not space.applies_members:
            raise ValueError(
                f"strategy='ga' sets the weights to the winning member, which {type(space).__name__} cannot do (no "
                "`apply_member`); use perturbation='full', 'lora' or 'svd'."
            )
        if space.members_per_forward != 1:
            raise ValueError(
                f"strategy='ga' evaluates the parent unperturbed next to its children, one member per forward; "
                f"{type(space).__name__} serves {space.members_per_forward} members in one forward."
            )
        if space.steps_own_optimizer:
            raise ValueError(
                f"strategy='ga' sets the weights itself; {type(space).__name__} applies updates through its own "
                "(DeepSpeed) engine. Launch without DeepSpeed, or use strategy='gaussian'."
            )
        if not 0 <= min_improvement < float("inf"):
            raise ValueError(f"min_improvement must be finite and >= 0, got {min_improvement}")
        self.elite = elite
        self.min_improvement = float(min_improvement)
        self.genome: list[tuple[int, int]] = []

    @classmethod
    def from_config(cls, space: PerturbationSpace, args) -> "GeneticAlgorithm":
        return cls(space, args.sigma, args.ga_elite, args.ga_min_improvement, getattr(args, "sigma_decay", 1.0))

    def perturbed(self, step: int, members: Sequence[int]):
        if self.elite and list(members) == [PARENT]:
            return contextlib.nullcontext()  # the parent is scored as it is
        if self.elite and PARENT in members:
            raise ValueError(f"the parent (member {PARENT}) must be evaluated on its own, got members {list(members)}")
        return self.space.perturbed(step, members, self.sigma_at(step))

    def select(self, fitness: torch.Tensor) -> int | None:
        """The member whose mutation wins this step, or ``None`` when the parent survives."""
        scores = torch.nan_to_num(fitness.float(), nan=-float("inf"))
        if self.elite:
            children = scores.clone()
            children[PARENT] = -float("inf")
            best = int(torch.argmax(children))  # the first of equal bests: a stable choice on every process
            beaten = scores[best] > scores[PARENT] + self.min_improvement
            return best if bool(beaten) and torch.isfinite(scores[best]) else None
        best = int(torch.argmax(scores))
        return best if torch.isfinite(scores[best]) else None

    def step_size_logs(self, step: int) -> dict[str, float]:
        return {"ga_sigma": self.sigma_at(step)}  # the mutation scale (sigma_decay moves it)

    def generations_parent_kept(self, step: int) -> int:
        """How many generations in a row, up to and including ``step``, kept the parent (0 if ``step`` had a winner).
        Read off the genome, so a resumed run counts as an uninterrupted one."""
        last_win = self.genome[-1][0] if self.genome else -1
        return step - last_win

    def tell(self, step: int, fitness: torch.Tensor) -> StrategyUpdate:
        if fitness.shape != (self.population_size,):
            raise ValueError(f"expected {self.population_size} fitness values, got shape {tuple(fitness.shape)}")
        winner = self.select(fitness)
        if winner is not None:
            self.genome.append((step, winner))
        # The shaped fitness only feeds logging (the completion table's advantage column).
        return StrategyUpdate(UpdateKind.SELECTION, centered_rank(fitness), winner=winner, sigma=self.sigma_at(step))

    def state_dict(self) -> dict:
        return {"genome": [list(gene) for gene in self.genome]}

    def seed_log_state(self) -> dict:
        return {}  # the log's winners are the genome

    def load_state_dict(self, state: dict) -> None:
        genome = state.get("genome")
        if not isinstance(genome, list) or not all(
            isinstance(gene, (list, tuple)) and len(gene) == 2 and all(isinstance(x, int) for x in gene)
            for gene in genome
        ):
            raise ValueError(f"GeneticAlgorithm state needs 'genome', a list of [step, member] pairs; got {state!r}")
        self.genome = [(int(step), int(member)) for step, member in genome]
