"""Gaussian noise regenerated from seeds, never stored.

Every noise tensor is a pure function of ``(run seed, step, direction, tensor name)``: an explicit
``torch.Generator`` is seeded from a hash of those four values, so

* two tensors of the same shape never share noise (the tensor name is part of the seed; reusing one generator
  seed for every tensor was a bug of early ES-for-LLM code),
* perturb, update and a resumed run all regenerate exactly the same numbers,
* the global torch RNG is never touched.

With antithetic sampling, members ``2k`` and ``2k + 1`` share direction ``k`` with signs ``+1`` and ``-1``.
"""

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """Hash any tuple of ints/strings into a 63-bit seed (stable across processes, platforms and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class MemberNoise:
    """Maps population members to seeded noise directions.

    Args:
        seed: run seed (``args.seed``).
        population_size: number of members ``N`` in one step.
        antithetic: pair members as ``+eps_k`` / ``-eps_k``; then ``N`` must be even and there are ``N / 2`` directions.
    """

    def __init__(self, seed: int, population_size: int, antithetic: bool = True):
        if population_size < 2:
            raise ValueError(f"population_size must be >= 2, got {population_size}")
        if antithetic and population_size % 2:
            raise ValueError(f"antithetic sampling needs an even population_size, got {population_size}")
        self.seed = seed
        self.population_size = population_size
        self.antithetic = antithetic

    @property
    def num_directions(self) -> int:
        return self.population_size // 2 if self.antithetic else self.population_size

    def direction_and_sign(self, member: int) -> tuple[int, float]:
        if not 0 <= member < self.population_size:
            raise IndexError(f"member {member} outside population of {self.population_size}")
        if self.antithetic:
            return member // 2, 1.0 if member % 2 == 0 else -1.0
        return member, 1.0

    def generator(self, step: int, direction: int, key: str, device: torch.device | str = "cpu") -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(self.seed, "noise", step, direction, key))
        return gen

    def direction(
        self,
        step: int,
        direction: int,
        key: str,
        shape: torch.Size | tuple[int, ...],
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Standard-normal fp32 noise for one (step, direction, tensor)."""
        gen = self.generator(step, direction, key, device)
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    def all_directions(self, step: int, key: str, shape, device: torch.device | str = "cpu") -> torch.Tensor:
        """Noise of every direction for one tensor in one draw, shape ``(num_directions, *shape)``.

        Used where the per-direction tensors are tiny (low-rank factors): one generator instead of one per
        direction. Row ``k`` is direction ``k``'s noise; it is seeded by (run seed, step, tensor) and the
        population size, and shares no stream with ``direction()``.
        """
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(self.seed, "all-directions", step, self.num_directions, key))
        return torch.randn((self.num_directions, *shape), generator=gen, device=device, dtype=torch.float32)

    def member_noise(self, step: int, member: int, key: str, shape, device="cpu") -> torch.Tensor:
        """Signed noise ``eps_i`` of one member for one tensor (fp32)."""
        direction, sign = self.direction_and_sign(member)
        noise = self.direction(step, direction, key, shape, device)
        return noise if sign > 0 else noise.neg_()

    def sampling_seed(self, step: int, member: int) -> int:
        """Seed for the member's token sampling, so sampled completions are reproducible per member."""
        return derive_seed(self.seed, "sampling", step, member)
