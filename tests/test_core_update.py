"""The pseudo-gradient: antithetic cancellation, fp32 accumulation, and the direction of the true gradient."""

import pytest
import torch

from trl_es.core import (
    InPlaceSpace,
    MemberNoise,
    member_fitness,
    pseudo_gradient_coefficients,
    qiu_learning_rate,
    shape_fitness,
)


def test_antithetic_pairs_with_equal_fitness_cancel():
    noise = MemberNoise(0, 6, antithetic=True)
    coefficients = pseudo_gradient_coefficients(torch.tensor([0.3, 0.3, -0.1, -0.1, 0.5, 0.5]), noise, sigma=0.1)
    assert torch.equal(coefficients, torch.zeros(3))

    param = torch.nn.Parameter(torch.randn(8))
    space = InPlaceSpace([("w", param)], noise)
    space.write_gradients(
        0, pseudo_gradient_coefficients(torch.tensor([0.3, 0.3, -0.1, -0.1, 0.5, 0.5]), space.noise, 0.1)
    )
    assert torch.equal(param.grad, torch.zeros(8))


def test_coefficients_match_the_formula():
    noise = MemberNoise(0, 4, antithetic=True)
    shaped = torch.tensor([0.5, -0.5, 0.25, -0.25])
    # -(f_{2k} - f_{2k+1}) / (N sigma)
    torch.testing.assert_close(
        pseudo_gradient_coefficients(shaped, noise, 0.5), torch.tensor([-1.0 / 2.0, -0.5 / 2.0])
    )
    plain = MemberNoise(0, 4, antithetic=False)
    torch.testing.assert_close(pseudo_gradient_coefficients(shaped, plain, 0.5), -shaped / 2.0)


def _es_gradient(theta, reward, population, sigma, step=0, shaping="zscore"):
    param = torch.nn.Parameter(theta.clone())
    space = InPlaceSpace([("theta", param)], MemberNoise(123, population))
    fitness = torch.empty(population)
    for member in range(population):
        with space.perturbed(step, [member], sigma):
            fitness[member] = reward(param.detach())
    space.write_gradients(
        step,
        pseudo_gradient_coefficients(shape_fitness(member_fitness(fitness[:, None]), shaping), space.noise, sigma),
    )
    return param.grad


def test_pseudo_gradient_points_along_the_analytic_gradient_of_a_quadratic():
    torch.manual_seed(0)
    target = torch.randn(20)
    theta = torch.zeros(20)

    def reward(x):  # maximised at target; gradient of the reward is 2 (target - x)
        return -((x - target) ** 2).sum()

    grad = _es_gradient(theta, reward, population=400, sigma=0.01, shaping="none")
    analytic_descent = -2 * (target - theta)  # torch optimizers descend: p.grad = -d reward / d theta
    cosine = torch.nn.functional.cosine_similarity(grad, analytic_descent, dim=0)
    assert cosine > 0.9
    # With no shaping the estimator is unbiased, so its scale matches too (to within sampling error).
    ratio = grad.norm() / analytic_descent.norm()
    assert 0.7 < ratio < 1.3

    # Rank shaping keeps the direction (scale is then set by the learning rate).
    ranked = _es_gradient(theta, reward, population=400, sigma=0.01, shaping="centered_rank")
    assert torch.nn.functional.cosine_similarity(ranked, analytic_descent, dim=0) > 0.9


def test_sgd_on_the_es_gradient_climbs_the_reward():
    torch.manual_seed(1)
    target = torch.randn(10)
    param = torch.nn.Parameter(torch.zeros(10))
    space = InPlaceSpace([("theta", param)], MemberNoise(0, 20))
    optimizer = torch.optim.SGD([param], lr=0.05)

    def reward(x):
        return float(-((x - target) ** 2).sum())

    start = reward(param.detach())
    for step in range(60):
        fitness = torch.empty(20)
        for member in range(20):
            with space.perturbed(step, [member], 0.05):
                fitness[member] = reward(param.detach())
        space.write_gradients(
            step, pseudo_gradient_coefficients(shape_fitness(fitness, "centered_rank"), space.noise, 0.05)
        )
        optimizer.step()
    assert reward(param.detach()) > 0.2 * start  # distance to the optimum shrank at least 5x (start is negative)


def test_low_precision_weights_get_an_fp32_accumulated_update():
    param = torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))
    space = InPlaceSpace([("w", param)], MemberNoise(0, 64))
    shaped = torch.linspace(-0.5, 0.5, 64)
    space.write_gradients(0, pseudo_gradient_coefficients(shaped, space.noise, 1e-3))
    assert param.grad.dtype == torch.bfloat16
    assert param.grad.abs().sum() > 0


@pytest.mark.parametrize("shaping", ["centered_rank", "zscore"])
def test_qiu_learning_rate_gives_sgd_the_step_of_qiu_et_al(shaping):
    """Plain SGD on the pseudo-gradient with the derived learning rate moves the weights as far as Qiu et al.'s
    ``theta += (sigma / 2N) sum_i z_i eps_i`` on the same rewards (z-scored) and noise."""
    generator = torch.Generator().manual_seed(0)
    population, dimension, sigma = 32, 50_000, 1e-3
    noise = MemberNoise(seed=0, population_size=population, antithetic=False)
    eps = torch.randn(population, dimension, generator=generator)
    rewards = torch.rand(population, generator=generator)
    shaped = shape_fitness(rewards, shaping)
    lr = qiu_learning_rate(sigma, population, shaping, normalizing_optimizer=False)
    ours = -lr * (pseudo_gradient_coefficients(shaped, noise, sigma) @ eps)
    z = (rewards - rewards.mean()) / rewards.std()
    qiu = sigma / 2 / population * (z @ eps)
    assert torch.linalg.vector_norm(ours) / torch.linalg.vector_norm(qiu) == pytest.approx(1.0, rel=0.1)
    assert torch.nn.functional.cosine_similarity(ours, qiu, dim=0) > 0.95


def test_qiu_learning_rate_for_a_normalising_optimizer_is_qiu_step_per_weight():
    generator = torch.Generator().manual_seed(1)
    population, sigma = 64, 1e-3
    eps = torch.randn(population, 100_000, generator=generator)
    z = torch.randn(population, generator=generator)
    z = (z - z.mean()) / z.std()
    per_weight = (sigma / 2 / population * (z @ eps)).abs().mean() * (torch.pi / 2) ** 0.5  # mean |x| -> std
    assert qiu_learning_rate(sigma, population, "centered_rank", normalizing_optimizer=True) == pytest.approx(
        float(per_weight), rel=0.05
    )
