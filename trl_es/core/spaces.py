"""Perturbation spaces: where a member's noise lives and how it reaches the model.

The trainer only speaks this interface::

    for members in space.member_groups():          # e.g. [[0], [1], ...] or [[0, 1, ..., N-1]]
        with space.perturbed(step, members):        # model now acts as those members
            ...generate len(members) blocks of rows, member-major...
    space.write_gradients(step, shaped_fitness)     # p.grad <- ES pseudo-gradient

so a space that serves every member in one batched forward (rank-r factors, EGGROLL-style) only has to return a
single group and route each block of rows to its member; the trainer does not assume one in-place copy per member.
"""

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch

from .noise import MemberNoise
from .update import pseudo_gradient_coefficients


class PerturbationSpace(ABC):
    """Common interface of the ``full``, ``lora`` (and later ``low_rank``) spaces."""

    #: How many members one forward pass can serve.
    members_per_forward: int = 1

    def __init__(self, noise: MemberNoise, sigma: float):
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.noise = noise
        self.sigma = sigma

    def member_groups(self) -> list[list[int]]:
        members = list(range(self.noise.population_size))
        size = self.members_per_forward
        return [members[i : i + size] for i in range(0, len(members), size)]

    @abstractmethod
    def perturbed(self, step: int, members: Sequence[int]) -> contextlib.AbstractContextManager[None]:
        """Context in which the model behaves as ``members``; on exit the weights are exactly as before."""

    @abstractmethod
    def write_gradients(self, step: int, shaped_fitness: torch.Tensor) -> dict[str, float]:
        """Write the (negated) ES pseudo-gradient into ``p.grad``; return statistics for logging."""


class InPlaceSpace(PerturbationSpace):
    """Perturb a list of tensors in place, one member at a time (the ``full`` and ``lora`` spaces).

    Args:
        named_params: the tensors to evolve, with stable names (the names seed the noise).
        noise: member -> seeded direction mapping.
        sigma: perturbation scale.
        restore: ``"copy"`` keeps a copy of the perturbed tensors and copies it back (bit-exact, one extra copy of
            the evolved weights while a member is evaluated); ``"subtract"`` regenerates the noise and subtracts it
            (no copy, but float rounding leaves ~1e-7 relative drift per member).
    """

    members_per_forward = 1

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        noise: MemberNoise,
        sigma: float,
        restore: str = "copy",
    ):
        super().__init__(noise, sigma)
        if restore not in ("copy", "subtract"):
            raise ValueError(f"restore must be 'copy' or 'subtract', got {restore!r}")
        names = [name for name, _ in named_params]
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique: they seed the noise")
        if not named_params:
            raise ValueError("no parameters to perturb")
        self.named_params = list(named_params)
        self.restore = restore

    def num_parameters(self) -> int:
        return sum(p.numel() for _, p in self.named_params)

    def _add_noise(self, step: int, member: int, scale: float) -> None:
        for name, param in self.named_params:
            eps = self.noise.member_noise(step, member, name, param.shape, param.device)
            param.add_(eps.mul_(scale).to(param.dtype))

    @contextlib.contextmanager
    def perturbed(self, step: int, members: Sequence[int]) -> Iterator[None]:
        if len(members) != 1:
            raise ValueError(f"InPlaceSpace evaluates one member at a time, got {list(members)}")
        (member,) = members
        with torch.no_grad():
            backup = [param.detach().clone() for _, param in self.named_params] if self.restore == "copy" else None
            try:
                self._add_noise(step, member, self.sigma)
                yield
            finally:
                # Restore even when generation or a reward function raised: the caller's weights must survive.
                if backup is not None:
                    for (_, param), saved in zip(self.named_params, backup, strict=True):
                        param.copy_(saved)
                else:
                    self._add_noise(step, member, -self.sigma)

    def write_gradients(self, step: int, shaped_fitness: torch.Tensor) -> dict[str, float]:
        coefficients = pseudo_gradient_coefficients(shaped_fitness, self.noise, self.sigma).tolist()
        squared_norm = 0.0
        with torch.no_grad():
            for name, param in self.named_params:
                # fp32 accumulation: summing N low-precision noise tensors would round small updates to zero.
                grad = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
                for direction, coefficient in enumerate(coefficients):
                    if coefficient != 0.0:
                        eps = self.noise.direction(step, direction, name, param.shape, param.device)
                        grad.add_(eps, alpha=coefficient)
                squared_norm += float(grad.square().sum())
                param.grad = grad if param.dtype == torch.float32 else grad.to(param.dtype)
        return {"grad_norm": squared_norm**0.5}
