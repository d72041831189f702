"""The process layout of one ES step: who evaluates which member on which rows, and where the scores land."""

import pytest
import torch

from trl_es.core import (
    check_population_split,
    distinct_rows,
    member_rows,
    place_scores,
    plan_rounds,
    prompt_group_rows,
    seen_mask,
)


def groups_of(population: int, size: int) -> list[list[int]]:
    return [list(range(start, start + size)) for start in range(0, population, size)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("group_size", [1, 2])
def test_processes_split_the_population_and_every_member_sees_every_row(world, group_size):
    population, rows = 6 * group_size, 5
    rounds = plan_rounds(groups_of(population, group_size), world, rows, ranks_share_members=False)
    evaluated = [member for round_ in rounds for members in round_.members for member in members]
    assert sorted(evaluated) == list(range(population))  # each member exactly once
    for round_ in rounds:
        assert len(round_.members) == world and all(len(m) == group_size for m in round_.members)
        assert all(r == range(rows) for per_process in round_.rows for r in per_process)
        assert round_.block_rows(0) == list(range(rows)) * group_size  # member-major: the same rows per member


@pytest.mark.parametrize("world", [1, 2, 3])
def test_processes_sharing_a_model_split_the_rows_and_act_as_the_same_member(world):
    rows = 6
    rounds = plan_rounds(groups_of(4, 1), world, rows, ranks_share_members=True)
    assert len(rounds) == 4
    for round_ in rounds:
        assert len(set(round_.members)) == 1  # every process evaluates the same member
        covered = [row for p in range(world) for row in round_.block_rows(p)]
        assert covered == list(range(rows))  # the slices tile the batch in order


def _simulate(population, rows, world, share, group_size=1, prompt_groups=1, funcs=2):
    """Run the rounds as the trainer does: process p's block is (its members x their rows), member-major; each
    score encodes (member, row), and the gathered scores are rank-major."""
    rewards = torch.full((population, rows, funcs), float("nan"))
    rounds = plan_rounds(groups_of(population, group_size), world, rows, share, prompt_groups)
    for round_ in rounds:
        blocks = []
        for process in range(world):
            block = round_.block_rows(process)
            assert len(block) == len(round_.members[process]) * round_.share  # equal blocks, one per member
            for offset, member in enumerate(round_.members[process]):
                for row in block[offset * round_.share : (offset + 1) * round_.share]:
                    blocks.append([100.0 * member + row, -(100.0 * member + row)])
        place_scores(rewards, round_, torch.tensor(blocks))
    return rewards, rounds


def _expected(population, rows, prompt_groups=1):
    expected = torch.full((population, rows, 2), float("nan"))
    for member, member_range in enumerate(member_rows(population, rows, prompt_groups)):
        for row in member_range:
            expected[member, row] = torch.tensor([100.0 * member + row, -(100.0 * member + row)])
    return expected


@pytest.mark.parametrize("world,share", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_gathered_scores_land_under_their_member_and_row(world, share):
    population, rows = 6, 6
    rewards, _ = _simulate(population, rows, world, share)
    assert torch.equal(rewards, _expected(population, rows))


def test_prompt_groups_split_rows_and_members_contiguously_and_keep_pairs_together():
    assert prompt_group_rows(12, 3) == [range(0, 4), range(4, 8), range(8, 12)]
    rows = member_rows(8, 12, prompt_groups=2)
    assert rows[:4] == [range(0, 6)] * 4 and rows[4:] == [range(6, 12)] * 4
    # antithetic pairs (2k, 2k + 1) are neighbours, so with an even group size a pair shares its prompts
    assert all(rows[2 * k] == rows[2 * k + 1] for k in range(4))
    mask = seen_mask(8, 12, prompt_groups=2)
    assert mask.sum().item() == 8 * 6 and mask[0, :6].all() and not mask[0, 6:].any() and mask[7, 6:].all()
    assert member_rows(4, 5) == [range(5)] * 4  # one group: every member completes every row


@pytest.mark.parametrize("prompt_groups", [1, 2, 3])
@pytest.mark.parametrize(
    "world,share,group_size",
    [
        (1, False, 1),
        (1, False, 12),
        (2, False, 1),
        (2, False, 6),
        (3, False, 2),
        (3, False, 4),
        (2, True, 1),
        (3, True, 1),
    ],
)
def test_prompt_groups_every_member_sees_exactly_its_group_in_every_layout(prompt_groups, world, share, group_size):
    """World sizes 1-3, with and without processes sharing members, member groups of one or of many (low_rank's
    batched forward, where one block holds members of different prompt groups)."""
    population, rows = 12, 36
    rewards, rounds = _simulate(population, rows, world, share, group_size, prompt_groups)
    assert torch.equal(rewards.isnan(), ~seen_mask(population, rows, prompt_groups)[..., None].expand(-1, -1, 2))
    torch.testing.assert_close(rewards, _expected(population, rows, prompt_groups), equal_nan=True, rtol=0, atol=0)
    # each (member, row) pair is generated exactly once: rollouts per step = population x rows / prompt_groups
    generated = sum(len(round_.block_rows(p)) for round_ in rounds for p in range(world))
    assert generated == population * rows // prompt_groups
    if group_size == population and world == 1:  # low_rank's one forward: one round for the whole population
        (round_,) = rounds
        assert round_.members[0] == tuple(range(population))


def test_prompt_groups_that_do_not_divide_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match="prompt_groups=4 does not divide the step's 6 prompt rows"):
        plan_rounds(groups_of(8, 1), 1, 6, False, prompt_groups=4)
    with pytest.raises(ValueError, match="population_size=6 does not split into prompt_groups=4"):
        plan_rounds(groups_of(6, 1), 1, 8, False, prompt_groups=4)
    with pytest.raises(ValueError, match="prompt group of 3 rows cannot be split evenly over 2 processes"):
        plan_rounds(groups_of(4, 1), 2, 6, True, prompt_groups=2)


def test_uneven_population_split_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match="population_size=6 does not split .* over 4 processes"):
        check_population_split(groups_of(6, 1), world=4, ranks_share_members=False)
    with pytest.raises(ValueError, match="population_size=5"):
        check_population_split([[0, 1], [2, 3], [4]], world=1, ranks_share_members=False)
    check_population_split(groups_of(6, 1), world=4, ranks_share_members=True)  # sharing: any population works
    with pytest.raises(ValueError, match="5 prompt rows cannot be split evenly over 2 processes"):
        plan_rounds(groups_of(2, 1), 2, 5, ranks_share_members=True)


def test_distinct_rows_drops_only_consecutive_repeats():
    rows = [{"prompt": p} for p in "aabbcc"]
    assert [r["prompt"] for r in distinct_rows(rows, 2)] == ["a", "b", "c"]
    shuffled = [{"prompt": p} for p in "abab"]
    assert distinct_rows(shuffled, 2) == shuffled  # not laid out as repeats: kept whole
    # 3 distinct rows cannot be split over 2 processes sharing a model: keep the repeats (6 rows split evenly)
    assert distinct_rows(rows, 2, world=2, ranks_share_members=True) == rows


def test_distinct_rows_compares_every_column_not_just_the_prompt():
    # Same prompt, different answers (or environment-only rows with no prompt at all): not repeats of one row.
    rows = [{"prompt": "a", "answer": x} for x in "1122"]
    assert [r["answer"] for r in distinct_rows(rows, 2)] == ["1", "2"]
    mixed = [{"prompt": "a", "answer": x} for x in "1212"]
    assert distinct_rows(mixed, 2) == mixed
    environments = [{"environment": e} for e in ["x", "x", "y", "y"]]
    assert distinct_rows(environments, 2) == [{"environment": "x"}, {"environment": "y"}]
    # Columns whose values have no single truth value (tensors) cannot be compared: keep the rows.
    tensors = [{"prompt": "a", "ids": torch.tensor([1, 2])} for _ in range(2)]
    assert distinct_rows(tensors, 2) == tensors
