"""Strategies over a space: the Gaussian ES update by hand, and exact restore when perturbing fails part-way."""

import pytest
import torch

from trl_es.core import STRATEGIES, GaussianES, InPlaceSpace, MemberNoise, shape_fitness


def make_space(restore="copy", population=4):
    torch.manual_seed(0)
    params = [(f"t{i}", torch.nn.Parameter(torch.randn(3, 2))) for i in range(4)]
    return InPlaceSpace(params, MemberNoise(5, population), sigma=0.1, restore=restore), params


def test_gaussian_tell_writes_the_pseudo_gradient_by_hand():
    space, params = make_space()
    strategy = STRATEGIES["gaussian"](space, fitness_shaping="centered_rank")
    fitness = torch.tensor([1.0, 0.0, 3.0, 2.0])
    update = strategy.tell(0, fitness)
    shaped = shape_fitness(fitness, "centered_rank")
    assert torch.equal(update.shaped, shaped)
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
        GaussianES(space).load_state_dict({"mean": [0.0]})


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt or an out-of-memory error in the middle of perturbing."""


@pytest.mark.parametrize("restore", ["copy", "subtract"])
@pytest.mark.parametrize("fail_at", range(4))
def test_failure_at_any_tensor_while_perturbing_leaves_the_weights_as_they_were(restore, fail_at, monkeypatch):
    space, params = make_space(restore)
    before = [p.detach().clone() for _, p in params]
    calls = {"n": 0}
    original = space.noise.member_noise

    def failing(step, member, name, shape, device="cpu"):
        if calls["n"] == fail_at:
            calls["n"] += 1
            raise Interrupt()
        calls["n"] += 1
        return original(step, member, name, shape, device)

    monkeypatch.setattr(space.noise, "member_noise", failing)
    with pytest.raises(Interrupt), space.perturbed(0, [1]):
        pass
    for (name, param), saved in zip(params, before, strict=True):
        # copy: bit-exact; subtract: only the tensors that were perturbed are un-perturbed (rounding ~1e-7)
        torch.testing.assert_close(param.detach(), saved, rtol=0, atol=1e-6, msg=name)
        if restore == "copy" or int(name[1:]) >= fail_at:
            assert torch.equal(param.detach(), saved), f"{name} not restored exactly"
