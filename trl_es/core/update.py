"""From shaped fitness to the ES pseudo-gradient.

The ES estimate of the gradient of ``E[reward(theta + sigma * eps)]`` is ``(1 / (N sigma)) sum_i f_i eps_i``. Torch
optimizers descend, so the trainer writes its negation to ``p.grad``. With antithetic pairs
``eps_{2k} = -eps_{2k+1}`` the sum folds into one coefficient per direction, ``f_{2k} - f_{2k+1}``, which halves the
number of noise tensors to regenerate.

With plain SGD the optimizer's step is a pure function of ``p.grad``, ``p``, the learning rate and weight decay, so a
space can apply it straight from the seeds (``space.apply_update``) and no ``p.grad`` is ever held:
:func:`plain_sgd_problem` says whether an optimizer is such an SGD, :func:`sgd_hyperparameters` reads what it would
step each tensor with.
"""

import math

import torch

from .noise import MemberNoise


#: Standard deviation of the shaped fitness of a population (centered ranks are spread evenly over [-0.5, 0.5]);
#: ``none`` keeps the rewards' own scale, taken as 1 like z-scores.
SHAPED_FITNESS_STD = {"centered_rank": 12**-0.5, "zscore": 1.0, "none": 1.0}


def qiu_learning_rate(sigma: float, population_size: int, fitness_shaping: str, normalizing_optimizer: bool) -> float:
    """The learning rate at which the optimizer moves the weights as far per step as Qiu et al. (2025) do:
    ``theta += (alpha / N) sum_i z_i eps_i`` with z-scored rewards ``z`` and ``alpha = sigma / 2``.

    Plain SGD on the pseudo-gradient ``-(1 / (N sigma)) sum_i f_i eps_i`` with ``f ~ s z`` (``s``: the shaping's std)
    steps ``(lr s / (N sigma)) sum_i z_i eps_i``, Qiu's step when ``lr = alpha sigma / s = sigma^2 / (2 s)``: the
    learning rate scales with sigma squared, because the estimate divides by sigma. An optimizer that normalises per
    weight (Adam, Adafactor) moves a weight ~``lr`` a step; Qiu's step moves it ~``alpha / sqrt(N)`` (``N`` unit
    normals weighted by z-scores sum to std ``sqrt(N)``), so there ``lr = sigma / (2 sqrt(N))``.
    """
    alpha = sigma / 2
    if normalizing_optimizer:
        return alpha / math.sqrt(population_size)
    return alpha * sigma / SHAPED_FITNESS_STD[fitness_shaping]


def pseudo_gradient_coefficients(shaped: torch.Tensor, noise: MemberNoise, sigma: float) -> torch.Tensor:
    """Per-direction weights ``c_k`` such that ``p.grad = sum_k c_k * direction_k`` (already negated, fp32)."""
    if shaped.shape != (noise.population_size,):
        raise ValueError(f"expected {noise.population_size} fitness values, got shape {tuple(shaped.shape)}")
    shaped = shaped.float()
    if noise.antithetic:
        per_direction = shaped[0::2] - shaped[1::2]
    else:
        per_direction = shaped
    return -per_direction / (noise.population_size * sigma)


def plain_sgd_problem(optimizer: torch.optim.Optimizer, tensors) -> str | None:
    """Why ``optimizer``'s step over ``tensors`` is not ``t -= lr * (t.grad + weight_decay * t)`` (torch's SGD with no
    momentum), or None when it is, so ``space.apply_update`` can do it instead without ``t.grad``."""
    if type(optimizer) is not torch.optim.SGD:  # a subclass may step differently
        cls = type(optimizer)
        return (
            f"the optimizer is {cls.__module__}.{cls.__qualname__}, not torch.optim.SGD (it keeps state or steps "
            "differently)"
        )
    for number, group in enumerate(optimizer.param_groups):
        if group.get("momentum", 0) != 0:
            return f"SGD param group {number} has momentum={group['momentum']} (momentum buffers need p.grad)"
        for flag in ("maximize", "fused", "differentiable"):
            if group.get(flag):
                return f"SGD param group {number} has {flag}=True"
        for key in ("lr", "weight_decay"):
            if isinstance(group.get(key), torch.Tensor):
                return f"SGD param group {number} has a tensor {key}"
    groups = _groups_of(optimizer, tensors)
    missing = [position for position, group in enumerate(groups) if group is None]
    if missing:
        return f"evolved tensors at positions {missing[:5]} are in no param group of the optimizer"
    return None


def sgd_hyperparameters(optimizer: torch.optim.Optimizer, tensors) -> tuple[list[float], list[float]]:
    """``(lr, weight_decay)`` of each tensor's param group, as the optimizer would step it now."""
    groups = _groups_of(optimizer, tensors)
    if any(group is None for group in groups):
        raise ValueError("an evolved tensor is in no param group of the optimizer")
    return [float(group["lr"]) for group in groups], [float(group["weight_decay"]) for group in groups]


def _groups_of(optimizer: torch.optim.Optimizer, tensors) -> list[dict | None]:
    owner = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    return [owner.get(id(tensor)) for tensor in tensors]
