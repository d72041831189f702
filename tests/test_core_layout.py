"""The process layout of one ES step: who evaluates which member on which rows, and where the scores land."""

import pytest
import torch

from trl_es.core import check_population_split, distinct_rows, place_scores, plan_rounds


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
        assert all(r == range(rows) for r in round_.rows)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_processes_sharing_a_model_split_the_rows_and_act_as_the_same_member(world):
    rows = 6
    rounds = plan_rounds(groups_of(4, 1), world, rows, ranks_share_members=True)
    assert len(rounds) == 4
    for round_ in rounds:
        assert len(set(round_.members)) == 1  # every process evaluates the same member
        covered = [row for r in round_.rows for row in r]
        assert covered == list(range(rows))  # the slices tile the batch in order


@pytest.mark.parametrize("world,share", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_gathered_scores_land_under_their_member_and_row(world, share):
    """Simulate the gather: process p's block is (its members x its rows); each score encodes (member, row)."""
    population, rows, funcs = 6, 6, 2
    rewards = torch.full((population, rows, funcs), float("nan"))
    for round_ in plan_rounds(groups_of(population, 1), world, rows, share):
        blocks = []
        for process in range(world):
            for member in round_.members[process]:
                for row in round_.rows[process]:
                    blocks.append([100.0 * member + row, -(100.0 * member + row)])
        place_scores(rewards, round_, torch.tensor(blocks))
    expected = torch.tensor([[[100.0 * m + r, -(100.0 * m + r)] for r in range(rows)] for m in range(population)])
    assert torch.equal(rewards, expected)


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
