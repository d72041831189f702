"""Who evaluates which member on which prompts: the process layout of one ES step, as pure functions.

Every process holds the step's whole pooled prompt batch (``num_rows`` rows, the same on every process). Members are
evaluated in *rounds*; in one round process ``p`` evaluates the member group ``Round.members[p]`` on the rows
``Round.rows[p]`` and every process makes the same collective calls (GRPO's generation and reward code gather), so
all groups of a round have the same size and all row slices the same length.

* Processes that each hold the whole model split the population: round ``r`` gives process ``p`` the group
  ``world * r + p``, and every process completes every row (all members see the same prompts).
* Processes that hold shards of one model (ZeRO-3: a forward gathers every shard) must act as the same member at the
  same time, so they split the rows instead: every round is one group, and process ``p`` completes rows
  ``[p * share, (p + 1) * share)``.

After a round, the gathered scores are rank-major ``(world, members of the group, rows of the slice, reward
functions)``; :func:`place_scores` files them under ``(member, row)``.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Round:
    """One collective round: process ``p`` evaluates ``members[p]`` on the rows ``rows[p]`` (a ``range``)."""

    members: tuple[tuple[int, ...], ...]
    rows: tuple[range, ...]


def check_population_split(groups: list[list[int]], world: int, ranks_share_members: bool) -> None:
    """Raise unless every process gets whole member groups, the same number and size on every process."""
    sizes = {len(group) for group in groups}
    processes = 1 if ranks_share_members else world
    if len(sizes) != 1 or len(groups) % processes:
        population = sum(len(group) for group in groups)
        raise ValueError(
            f"population_size={population} does not split into equal member groups of {max(sizes)} "
            f"(population_batch_size) over {processes} processes; choose a population_size divisible by "
            "processes x population_batch_size."
        )


def plan_rounds(groups: list[list[int]], world: int, num_rows: int, ranks_share_members: bool) -> list[Round]:
    """The rounds of one step, identical on every process (each process then reads its own index)."""
    check_population_split(groups, world, ranks_share_members)
    if ranks_share_members:
        if num_rows % world:
            raise ValueError(f"{num_rows} prompt rows cannot be split evenly over {world} processes sharing a model")
        share = num_rows // world
        slices = tuple(range(p * share, (p + 1) * share) for p in range(world))
        return [Round(members=(tuple(group),) * world, rows=slices) for group in groups]
    every_row = (range(num_rows),) * world
    return [
        Round(members=tuple(tuple(group) for group in groups[start : start + world]), rows=every_row)
        for start in range(0, len(groups), world)
    ]


def place_scores(rewards_per_func: torch.Tensor, round_: Round, scores: torch.Tensor) -> None:
    """File the gathered scores of one round into ``rewards_per_func[member, row, reward function]``.

    ``scores`` is ``(world * group size * rows per process, reward functions)``, rank-major then member-major, as the
    gathered rows of one round come out of GRPO's reward code.
    """
    world, group, share = len(round_.members), len(round_.members[0]), len(round_.rows[0])
    blocks = scores.view(world, group, share, scores.shape[-1])
    for process in range(world):
        rows = round_.rows[process]
        members = list(round_.members[process])
        rewards_per_func[members, rows.start : rows.stop] = blocks[process]


def distinct_rows(rows: list[dict], group: int, world: int = 1, ranks_share_members: bool = False) -> list[dict]:
    """Drop the ``group``-fold row repeats GRPO's sampler lays next to each other (identical under greedy decoding
    when a rollout depends on its row alone).

    A repeat must equal its first row in every column, not just the prompt: reward functions read the other
    columns. Rows that are not laid out as consecutive repeats are kept whole; so are the repeats when the distinct
    rows could not be split evenly over processes that share a model.
    """
    if group <= 1 or len(rows) % group:
        return rows
    firsts = rows[::group]
    for index, row in enumerate(rows):
        if not _same_row(row, firsts[index // group]):
            return rows
    if ranks_share_members and len(firsts) % world:
        return rows
    return firsts


def _same_row(row: dict, other: dict) -> bool:
    if row is other:
        return True
    try:
        return bool(row == other)
    except (RuntimeError, ValueError):  # tensors / arrays in a column have no single truth value: keep both rows
        return False
