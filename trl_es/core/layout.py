"""Who evaluates which member on which prompts: the process layout of one ES step, as pure functions.

Every process holds the step's whole pooled prompt batch (``num_rows`` rows, the same on every process). With
``prompt_groups = G`` the rows are cut into ``G`` equal contiguous prompt groups and the population into ``G`` equal
contiguous member groups (members ``2k, 2k + 1`` of an antithetic pair are neighbours, so a pair stays in one group);
member group ``g`` completes only prompt group ``g`` (EGGROLL's many directions on few prompts each). ``G = 1`` is the
classic layout: every member completes every row.

Members are evaluated in *rounds*; in one round process ``p`` evaluates the member group ``Round.members[p]``, member
``Round.members[p][j]`` on the rows ``Round.rows[p][j]``. The block a process generates is member-major: one
equal-sized block of rows per member, in member order; a batched space (low_rank) serves all of them in one forward
even when the blocks hold different prompts. Every process makes the same collective calls (GRPO's generation and
reward code gather), so all member groups of a round have the same size and all row ranges the same length.

* Processes that each hold the whole model split the population: round ``r`` gives process ``p`` the group
  ``world * r + p``, and each member completes every row of its prompt group.
* Processes that hold shards of one model (ZeRO-3: a forward gathers every shard) must act as the same member at the
  same time, so they split each member's rows instead: every round is one group, and process ``p`` completes the
  ``p``-th of ``world`` equal slices of each member's rows.

After a round, the gathered scores are rank-major ``(world, members of the group, rows per member, reward
functions)``; :func:`place_scores` files them under ``(member, row)``. A member never sees the rows of other prompt
groups: their entries stay NaN, which ``core.fitness`` ignores.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Round:
    """One collective round: process ``p`` evaluates member ``members[p][j]`` on the rows ``rows[p][j]`` (a ``range``).

    Every row range of a round has the same length, :attr:`share`.
    """

    members: tuple[tuple[int, ...], ...]
    rows: tuple[tuple[range, ...], ...]

    @property
    def share(self) -> int:
        """Rows per member in this round (the same for every member and process)."""
        return len(self.rows[0][0])

    def block_rows(self, process: int) -> list[int]:
        """The row indices of ``process``'s generation block, member-major (member ``j``'s rows are block ``j``)."""
        return [row for rows in self.rows[process] for row in rows]


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


def prompt_group_rows(num_rows: int, prompt_groups: int) -> list[range]:
    """The rows of each prompt group: ``prompt_groups`` equal contiguous slices of the step's rows."""
    if prompt_groups < 1:
        raise ValueError(f"prompt_groups must be >= 1, got {prompt_groups}")
    if num_rows % prompt_groups:
        raise ValueError(
            f"prompt_groups={prompt_groups} does not divide the step's {num_rows} prompt rows into equal groups; "
            "choose a number of distinct prompts per step (generation_batch_size / num_generations under greedy "
            "decoding) divisible by prompt_groups."
        )
    size = num_rows // prompt_groups
    return [range(g * size, (g + 1) * size) for g in range(prompt_groups)]


def member_rows(population: int, num_rows: int, prompt_groups: int = 1) -> list[range]:
    """``member_rows(...)[m]``: the rows member ``m`` completes (its prompt group's)."""
    if population % prompt_groups:
        raise ValueError(
            f"population_size={population} does not split into prompt_groups={prompt_groups} equal member groups"
        )
    groups = prompt_group_rows(num_rows, prompt_groups)
    per_group = population // prompt_groups
    return [groups[member // per_group] for member in range(population)]


def seen_mask(population: int, num_rows: int, prompt_groups: int = 1) -> torch.Tensor:
    """``(population, num_rows)`` booleans: which member completes which row."""
    mask = torch.zeros((population, num_rows), dtype=torch.bool)
    for member, rows in enumerate(member_rows(population, num_rows, prompt_groups)):
        mask[member, rows.start : rows.stop] = True
    return mask


def plan_rounds(
    groups: list[list[int]], world: int, num_rows: int, ranks_share_members: bool, prompt_groups: int = 1
) -> list[Round]:
    """The rounds of one step, identical on every process (each process then reads its own index)."""
    check_population_split(groups, world, ranks_share_members)
    population = sum(len(group) for group in groups)
    rows_of = member_rows(population, num_rows, prompt_groups)
    if ranks_share_members:
        per_member = len(rows_of[0])
        if per_member % world:
            where = f"prompt group of {per_member} rows" if prompt_groups > 1 else f"{num_rows} prompt rows"
            raise ValueError(
                f"the {where} cannot be split evenly over {world} processes sharing a model"
                + (f" (prompt_groups={prompt_groups})" if prompt_groups > 1 else "")
            )
        share = per_member // world

        def slice_of(member: int, process: int) -> range:
            start = rows_of[member].start + process * share
            return range(start, start + share)

        return [
            Round(
                members=(tuple(group),) * world,
                rows=tuple(tuple(slice_of(member, p) for member in group) for p in range(world)),
            )
            for group in groups
        ]
    rounds = []
    for start in range(0, len(groups), world):
        members = tuple(tuple(group) for group in groups[start : start + world])
        rounds.append(
            Round(members=members, rows=tuple(tuple(rows_of[member] for member in group) for group in members))
        )
    return rounds


def place_scores(rewards_per_func: torch.Tensor, round_: Round, scores: torch.Tensor) -> None:
    """File the gathered scores of one round into ``rewards_per_func[member, row, reward function]``.

    ``scores`` is ``(world * group size * rows per member, reward functions)``, rank-major then member-major, as the
    gathered rows of one round come out of GRPO's reward code.
    """
    world, group, share = len(round_.members), len(round_.members[0]), round_.share
    blocks = scores.view(world, group, share, scores.shape[-1])
    for process in range(world):
        for offset, (member, rows) in enumerate(zip(round_.members[process], round_.rows[process], strict=True)):
            rewards_per_func[member, rows.start : rows.stop] = blocks[process, offset]


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
