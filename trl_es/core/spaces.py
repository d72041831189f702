"""Perturbation spaces: where a member's noise lives and how it reaches the model.

A strategy (``core.strategies``) speaks to a space through this interface only::

    for members in space.member_groups():          # e.g. [[0], [1], ...] or [[0, 1, ..., N-1]]
        with space.perturbed(step, members):        # the model now acts as those members
            ...generate len(members) blocks of rows, member-major...
    space.write_gradients(step, coefficients)       # t.grad <- sum_k c_k eps_k(t) for every evolved tensor t
    ...the optimizer steps space.named_tensors()...
    space.after_update()                            # push the stepped tensors into the model where they differ

A space that serves every member in one batched forward (rank-r factors, EGGROLL-style) returns a single group and
routes each block of rows to its member; a space whose evolved tensors are not the model's weights (singular values)
rebuilds the weights in ``after_update``. Spaces never look at rewards: turning fitness into coefficients is the
strategy's job.
"""

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch

from .noise import MemberNoise


RESTORE_MODES = ("copy", "subtract")


class PerturbationSpace(ABC):
    """Common interface of every space (``full``, ``lora``, ``low_rank``, ZeRO-3 shards, ...)."""

    #: How many members one forward pass can serve.
    members_per_forward: int = 1
    #: True when one forward needs every process (sharded weights): processes then evaluate the same member together
    #: and split the prompts, instead of splitting the population.
    ranks_share_members: bool = False
    #: True when the space applies the update itself (:meth:`step_optimizer`) instead of the Trainer's optimizer
    #: (DeepSpeed's engine steps its own partitions).
    steps_own_optimizer: bool = False
    #: False when the evolved tensors are the space's own (e.g. singular values) rather than model parameters: the
    #: optimizer is then built over ``named_tensors()``.
    tensors_are_model_parameters: bool = True

    def __init__(self, noise: MemberNoise, sigma: float):
        if not 0 < sigma < float("inf"):
            raise ValueError(f"sigma must be finite and > 0, got {sigma}")
        self.noise = noise
        self.sigma = sigma

    def member_groups(self) -> list[list[int]]:
        members = list(range(self.noise.population_size))
        size = self.members_per_forward
        return [members[i : i + size] for i in range(0, len(members), size)]

    @abstractmethod
    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The evolved tensors, with the names that seed their noise; the optimizer steps exactly these."""

    def local_tensors(self) -> list[torch.Tensor]:
        """What this process holds of the evolved tensors (the tensors themselves, or a shard of each)."""
        return [tensor for _, tensor in self.named_tensors()]

    def sum_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a statistic of ``local_tensors()`` over the processes holding parts of them (none by default)."""
        return value

    def num_parameters(self) -> int:
        """Dimension of the search: how many numbers the ES moves (logged as ``es/search_dim``)."""
        return sum(tensor.numel() for _, tensor in self.named_tensors())

    @abstractmethod
    def perturbed(self, step: int, members: Sequence[int]) -> contextlib.AbstractContextManager[None]:
        """Context in which the model behaves as ``members``; on exit the weights are exactly as before."""

    @abstractmethod
    def write_gradients(self, step: int, coefficients: torch.Tensor) -> None:
        """``t.grad = sum_k coefficients[k] * eps_k(t)`` for every evolved tensor ``t`` (accumulated in fp32)."""

    def apply_member(self, step: int, member: int) -> None:
        """Make ``member``'s perturbation permanent: ``theta += sigma * eps_member`` (selection strategies, GA).

        Spaces that support it compute the sum exactly as :meth:`perturbed` does, so the weights afterwards are
        bit-identical to those the member was evaluated with.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot apply one member's perturbation to its weights")

    def step_optimizer(self) -> None:
        """Apply the gradients written by :meth:`write_gradients` (only for ``steps_own_optimizer`` spaces)."""
        raise NotImplementedError(f"{type(self).__name__} is stepped by the Trainer's optimizer")

    def state_dict(self) -> dict:
        """What a checkpoint must hold beyond the model's weights to resume exactly (nothing by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)}")

    def after_update(self) -> None:  # noqa: B027 (an optional hook)
        """Called after the optimizer stepped ``named_tensors()``; spaces whose tensors are the weights do nothing."""


class InPlaceSpace(PerturbationSpace):
    """Perturb a list of tensors in place, one member at a time (the ``full`` and ``lora`` spaces).

    Subclasses that hold only part of each tensor (ZeRO-3 shards) override :meth:`_local`, :meth:`_store_gradient`
    and :meth:`_before_edit`; perturbation, restore and the pseudo-gradient are then computed by the same code on
    the same noise, so a sharded run matches an unsharded one by construction.

    Args:
        named_params: the tensors to evolve, with stable names (the names seed the noise).
        noise: member -> seeded direction mapping.
        sigma: perturbation scale.
        restore: ``"copy"`` keeps a copy of the perturbed tensors and copies it back (bit-exact, one extra copy of
            the evolved weights while a member is evaluated); ``"subtract"`` regenerates the noise and subtracts it
            (no copy, but float rounding leaves ~1e-7 relative drift per member).
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        noise: MemberNoise,
        sigma: float,
        restore: str = "copy",
    ):
        super().__init__(noise, sigma)
        if restore not in RESTORE_MODES:
            raise ValueError(f"restore must be one of {RESTORE_MODES}, got {restore!r}")
        names = [name for name, _ in named_params]
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique: they seed the noise")
        if not named_params:
            raise ValueError("no parameters to perturb")
        self.named_params = list(named_params)
        self.restore = restore

    # ------------------------------------------------------------------ what this process holds of a tensor

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return self.named_params

    def _local(self, param: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """(the numbers of ``param`` this process edits, their offset in the flattened tensor or None if whole)."""
        return param, None

    def _store_gradient(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Hand the fp32 pseudo-gradient of ``_local(param)`` to the optimizer."""
        param.grad = grad if param.dtype == torch.float32 else grad.to(param.dtype)

    def _before_edit(self) -> None:
        """Called before the local tensors change and again before they are restored."""

    def _full_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """Shape of the whole tensor, whose seeded noise every process draws before cutting its part."""
        return tuple(param.shape)

    def local_tensors(self) -> list[torch.Tensor]:
        return [self._local(param)[0] for _, param in self.named_params]

    def _noise(self, step: int, name: str, param, local: torch.Tensor, offset: int | None, **which) -> torch.Tensor:
        """The full tensor's seeded noise (``member=`` or ``direction=``), cut to what this process holds."""
        shape = self._full_shape(param)
        if "member" in which:
            eps = self.noise.member_noise(step, which["member"], name, shape, local.device)
        else:
            eps = self.noise.direction(step, which["direction"], name, shape, local.device)
        return eps if offset is None else eps.view(-1).narrow(0, offset, local.numel())

    # ------------------------------------------------------------------ PerturbationSpace

    @contextlib.contextmanager
    def perturbed(self, step: int, members: Sequence[int]) -> Iterator[None]:
        if len(members) != 1:
            raise ValueError(f"{type(self).__name__} evaluates one member at a time, got {list(members)}")
        (member,) = members
        with torch.no_grad():
            self._before_edit()
            locals_ = self.local_tensors()
            backup = [local.clone() for local in locals_] if self.restore == "copy" else None
            edited = 0  # how many tensors carry noise: an exception part-way must only undo those
            try:
                for (name, param), local in zip(self.named_params, locals_, strict=True):
                    self._add_member_noise(step, member, name, param, local)
                    edited += 1
                yield
            finally:
                # Restore even when generation or a reward function raised, or a KeyboardInterrupt hit mid-way.
                self._before_edit()
                locals_ = self.local_tensors()
                if backup is not None:
                    for local, saved in zip(locals_, backup, strict=True):
                        local.copy_(saved)
                else:
                    for (name, param), local in list(zip(self.named_params, locals_, strict=True))[:edited]:
                        _, offset = self._local(param)
                        if local.numel():
                            eps = self._noise(step, name, param, local, offset, member=member)
                            local.add_(eps.mul_(-self.sigma).to(local.dtype))

    def _add_member_noise(self, step: int, member: int, name: str, param, local: torch.Tensor) -> None:
        """``local += sigma * eps_member`` in the tensor's dtype: the one expression both perturbing and
        :meth:`apply_member` use, so an applied member is bit-identical to the evaluated one."""
        _, offset = self._local(param)
        if local.numel():
            eps = self._noise(step, name, param, local, offset, member=member)
            local.add_(eps.mul_(self.sigma).to(local.dtype))

    def apply_member(self, step: int, member: int) -> None:
        with torch.no_grad():
            self._before_edit()
            for (name, param), local in zip(self.named_params, self.local_tensors(), strict=True):
                self._add_member_noise(step, member, name, param, local)

    def write_gradients(self, step: int, coefficients: torch.Tensor) -> None:
        coefficients = coefficients.tolist()
        with torch.no_grad():
            for name, param in self.named_params:
                local, offset = self._local(param)
                # fp32 accumulation: summing N low-precision noise tensors would round small updates to zero.
                grad = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
                for direction, coefficient in enumerate(coefficients):
                    if coefficient != 0.0 and local.numel():
                        grad.add_(
                            self._noise(step, name, param, local, offset, direction=direction), alpha=coefficient
                        )
                self._store_gradient(param, grad)
