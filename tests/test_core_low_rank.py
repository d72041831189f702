"""Low-rank batched members: each block of rows sees exactly W + sigma A_i B_i^T / sqrt(r); the update is one
matmul."""

import math

import pytest
import torch
from torch import nn

from trl_es.core import LowRankSpace, MemberNoise, pseudo_gradient_coefficients


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))


def explicit_member_model(model, space, step, member, sigma=0.1):
    """A copy of the model whose weights are explicitly W + sigma * E_member."""
    copy = mlp()
    copy.load_state_dict(model.state_dict())
    direction, sign = space.noise.direction_and_sign(member)
    for (name, _module), (_, target) in zip(
        space.named_linears, [(n, m) for n, m in copy.named_children() if isinstance(m, nn.Linear)]
    ):
        a, b = space.factors(step, direction, name)
        with torch.no_grad():
            target.weight += sign * sigma * (a @ b.T) / math.sqrt(space.rank)
    return copy


@pytest.mark.parametrize("rank", [1, 3])
def test_batched_rows_equal_explicitly_perturbed_models(rank):
    model = mlp()
    linears = [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]
    space = LowRankSpace(linears, MemberNoise(0, 6, antithetic=True), rank=rank)
    x = torch.randn(4, 3, 6)  # 4 rows per member, 3 tokens
    members = list(range(6))  # three mirrored pairs: both signs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with space.perturbed(step=2, members=members, sigma=0.1):
        batched = model(x.repeat(len(members), 1, 1))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # weights never touched
    for g, member in enumerate(members):
        expected = explicit_member_model(model, space, 2, member)(x)
        got = batched[g * 4 : (g + 1) * 4]
        assert ((got - expected).norm() / expected.norm()) < 1e-5
    # outside the context the model is the plain one again
    torch.testing.assert_close(model(x), mlp()(x))


def test_subset_of_members_and_bad_batch():
    model = mlp()
    linears = [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]
    space = LowRankSpace(linears, MemberNoise(0, 4), members_per_forward=2)
    assert space.member_groups() == [[0, 1], [2, 3]]
    x = torch.randn(2, 6)
    with space.perturbed(0, [3, 2], 0.1):
        out = model(x.repeat(2, 1))
    torch.testing.assert_close(out[:2], explicit_member_model(model, space, 0, 3)(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="member-major"):
        with space.perturbed(0, [0, 1], 0.1):
            model(torch.randn(3, 6))


def test_update_equals_the_sum_of_rank_r_terms():
    model = mlp()
    linears = [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]
    noise = MemberNoise(1, 4, antithetic=True)
    space = LowRankSpace(linears, noise, rank=2)
    shaped = torch.tensor([0.5, -0.5, -1 / 6, 1 / 6])
    space.write_gradients(3, pseudo_gradient_coefficients(shaped, space.noise, 0.05))
    name, module = linears[0]
    expected = torch.zeros_like(module.weight)
    for member in range(4):
        direction, sign = noise.direction_and_sign(member)
        a, b = space.factors(3, direction, name)
        expected += shaped[member] * sign * (a @ b.T) / math.sqrt(2)
    expected *= -1 / (4 * 0.05)
    torch.testing.assert_close(module.weight.grad, expected, rtol=1e-5, atol=1e-6)
    assert linears[0][1].bias.grad is None  # biases are not evolved in the low-rank space
    # the update of rank-2 terms from 2 directions has rank up to 4, above the per-member rank
    assert torch.linalg.matrix_rank(module.weight.grad) > 2


def test_low_rank_es_climbs_a_quadratic():
    torch.manual_seed(0)
    layer = nn.Linear(5, 4, bias=False)
    target = torch.randn(4, 5)
    space = LowRankSpace([("w", layer)], MemberNoise(0, 32), rank=1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.02)
    eye = torch.eye(5)

    def member_rewards():
        with space.perturbed(step, list(range(32)), 0.05):
            out = layer(eye.repeat(32, 1)).view(32, 5, 4)  # row block g = member g's W^T
        return -((out.transpose(1, 2) - target) ** 2).sum(dim=(1, 2))

    start = float(-((layer.weight.detach() - target) ** 2).sum())
    for step in range(150):
        rewards = member_rewards()
        ranks = rewards.argsort().argsort().float() / 31 - 0.5
        space.write_gradients(step, pseudo_gradient_coefficients(ranks, space.noise, 0.05))
        optimizer.step()
    assert float(-((layer.weight.detach() - target) ** 2).sum()) > 0.3 * start


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_apply_update_is_bit_identical_to_gradients_and_torch_sgd(weight_decay):
    coefficients = torch.tensor([0.7, -1.3])
    spaces = []
    for _ in range(2):
        model = mlp()
        linears = [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]
        spaces.append((model, LowRankSpace(linears, MemberNoise(1, 4), rank=2)))
    (grad_model, grad_space), (model, space) = spaces
    grad_space.write_gradients(3, coefficients)
    expected_sq = sum(float(m.weight.grad.double().square().sum()) for _, m in grad_space.named_linears)
    torch.optim.SGD([m.weight for _, m in grad_space.named_linears], lr=0.05, weight_decay=weight_decay).step()
    grad_sq = space.apply_update(3, coefficients, lr=0.05, weight_decay=weight_decay)
    for (name, p), (_, q) in zip(model.named_parameters(), grad_model.named_parameters(), strict=True):
        assert p.grad is None
        assert torch.equal(p.detach(), q.detach()), name  # biases untouched in both
    assert grad_sq == pytest.approx(expected_sq, rel=1e-6)
    assert not space._factor_cache  # the step's factors are dropped after the update, as after write_gradients


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(6, 4),
            nn.Linear(6, 4),
            nn.Linear(6, 8),
            nn.Linear(8, 6),
        )


def test_layers_sharing_an_input_compute_x_b_once(monkeypatch):
    block = Attention()
    linears = [(name, m) for name, m in block.named_children()]
    shared = LowRankSpace(linears, MemberNoise(0, 4), rank=2, share_inputs=True)
    alone = LowRankSpace(linears, MemberNoise(0, 4), rank=2)
    assert [[n for n, _ in group] for group in shared.input_groups] == [["q_proj", "k_proj", "v_proj"], ["o_proj"]]
    x, y = torch.randn(4 * 3, 6), torch.randn(4 * 3, 6)
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or bmm(*a))
    with torch.no_grad(), shared.perturbed(1, [0, 1, 2, 3], 0.1):
        got = [block.q_proj(x), block.k_proj(x), block.v_proj(x)]
        assert len(calls) == 1  # one x [B_q | B_k | B_v] for the three
        got.append(block.k_proj(y))  # another input: its own product, still right
        x.mul_(2.0)  # changed in place: the kept product is stale and must be recomputed
        got.append(block.v_proj(x))
        assert len(calls) == 3
    with torch.no_grad(), alone.perturbed(1, [0, 1, 2, 3], 0.1):
        x.div_(2.0)
        expected = [block.q_proj(x), block.k_proj(x), block.v_proj(x), block.k_proj(y), block.v_proj(x * 2.0)]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
