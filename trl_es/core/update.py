"""From shaped fitness to the ES pseudo-gradient.

The ES estimate of the gradient of ``E[reward(theta + sigma * eps)]`` is ``(1 / (N sigma)) sum_i f_i eps_i``. Torch
optimizers descend, so the trainer writes its negation to ``p.grad``. With antithetic pairs
``eps_{2k} = -eps_{2k+1}`` the sum folds into one coefficient per direction, ``f_{2k} - f_{2k+1}``, which halves the
number of noise tensors to regenerate.
"""

import torch

from .noise import MemberNoise


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
