"""Strategies over a space: the Gaussian ES update by hand, and exact restore when perturbing fails part-way."""

import pytest
import torch

from trl_es.core import STRATEGIES, GaussianES, InPlaceSpace, MemberNoise, UpdateKind, shape_fitness


def make_space(restore="copy", population=4, chunk_size=2**20):
    torch.manual_seed(0)
    params = [(f"t{i}", torch.nn.Parameter(torch.randn(3, 2))) for i in range(4)]
    noise = MemberNoise(5, population, chunk_size=chunk_size)
    return InPlaceSpace(params, noise, restore=restore), params


def test_gaussian_update_is_the_pseudo_gradient_by_hand():
    space, params = make_space()
    strategy = STRATEGIES["gaussian"](space, 0.1, fitness_shaping="centered_rank")
    fitness = torch.tensor([1.0, 0.0, 3.0, 2.0])
    before = [param.detach().clone() for _, param in params]
    update = strategy.tell(0, fitness)
    shaped = shape_fitness(fitness, "centered_rank")
    assert update.kind is UpdateKind.GRADIENT and torch.equal(update.shaped, shaped)
    # tell leaves the weights and their gradients alone: core.apply.apply_update makes the update
    assert all(param.grad is None and torch.equal(param, b) for (_, param), b in zip(params, before))
    space.write_gradients(0, update.coefficients)
    for name, param in params:
        # antithetic: direction k = member 2k with +, member 2k+1 with -; g = -(1 / (N sigma)) sum_i f_i eps_i
        expected = torch.zeros(3, 2)
        for member in range(4):
            expected -= shaped[member] * space.noise.member_noise(0, member, name, (3, 2)) / (4 * 0.1)
        torch.testing.assert_close(param.grad, expected)
    assert strategy.state_dict() == {}


def test_stateless_strategy_refuses_foreign_state():
    space, _ = make_space()
    with pytest.raises(ValueError, match="GaussianES keeps no state"):
        GaussianES(space, 0.1).load_state_dict({"mean": [0.0]})


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt or an out-of-memory error in the middle of perturbing."""


@pytest.mark.parametrize("restore", ["copy", "subtract"])
# one chunk per tensor (a failure before each tensor), and two chunks per tensor (6 = 4 + 2: before each chunk)
@pytest.mark.parametrize("chunk_size, fail_at", [(6, n) for n in range(4)] + [(4, n) for n in range(8)])
def test_failure_at_any_chunk_while_perturbing_leaves_the_weights_as_they_were(
    restore, chunk_size, fail_at, monkeypatch
):
    space, params = make_space(restore, chunk_size=chunk_size)
    before = [p.detach().clone() for _, p in params]
    calls = {"n": 0}
    original = space.noise.direction_chunk

    def failing(*args, **kwargs):
        if calls["n"] == fail_at:
            calls["n"] += 1
            raise Interrupt()
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(space.noise, "direction_chunk", failing)
    with pytest.raises(Interrupt), space.perturbed(0, [1], 0.1):
        pass
    chunks_per_tensor = -(-6 // chunk_size)
    for (name, param), saved in zip(params, before, strict=True):
        # copy: bit-exact; subtract: only the chunks that were perturbed are un-perturbed (rounding ~1e-7)
        torch.testing.assert_close(param.detach(), saved, rtol=0, atol=1e-6, msg=name)
        for chunk in range(chunks_per_tensor):
            if restore == "copy" or int(name[1:]) * chunks_per_tensor + chunk >= fail_at:
                part = slice(chunk * chunk_size, (chunk + 1) * chunk_size)
                assert torch.equal(param.detach().flatten()[part], saved.flatten()[part]), f"{name} not exact"


def test_population_keeps_one_clean_copy_and_retakes_it_when_the_weights_changed():
    space, params = make_space(population=6)
    plain, _ = make_space(population=6)  # the same tensors and noise, no population scope
    with torch.no_grad(), space.population(0):
        seen = []
        for member in range(3):
            with space.perturbed(0, [member], 0.1):
                with plain.perturbed(0, [member], 0.1):
                    for (_, p), (_, q) in zip(params, plain.named_params, strict=True):
                        assert torch.equal(p, q)  # the member sees the same weights either way
            for (_, p), (_, q) in zip(params, plain.named_params, strict=True):
                assert torch.equal(p, q)  # and is restored bit for bit
            seen.append(space._clean.copies)
        assert seen[0] is seen[1] is seen[2]  # one copy for the three members
        params[2][1].add_(1.0)  # something else edits a weight between members
        with space.perturbed(0, [3], 0.1):
            pass
        assert seen[0] is not space._clean.copies  # the stale copy was not used
        assert torch.equal(params[2][1], plain.named_params[2][1] + 1.0)  # restored to the edited weights
        with pytest.raises(Interrupt), space.perturbed(0, [4], 0.1):
            raise Interrupt()  # a failing member is restored from the kept copy too
        assert torch.equal(params[2][1], plain.named_params[2][1] + 1.0)
    assert space._clean is None  # freed before the update


def test_population_does_nothing_for_subtract_restore():
    space, params = make_space(restore="subtract")
    with space.population(0):
        assert space._clean is None
        with space.perturbed(0, [0], 0.1):
            pass
