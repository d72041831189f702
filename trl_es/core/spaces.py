"""Perturbation spaces: where a member's noise lives and how it reaches the model.

A strategy (``core.strategies``) speaks to a space through this interface only::

    for members in space.member_groups():          # e.g. [[0], [1], ...] or [[0, 1, ..., N-1]]
        with space.perturbed(step, members, sigma): # the model now acts as those members (sigma: the strategy's)
            ...generate len(members) blocks of rows, member-major...
    space.write_gradients(step, coefficients)       # t.grad <- sum_k c_k eps_k(t) for every evolved tensor t
    ...the optimizer steps space.named_tensors()...
    space.after_update()                            # push the stepped tensors into the model where they differ

or, for plain SGD (no optimizer state), with no ``t.grad`` at all::

    space.apply_update(step, coefficients, lr, weight_decay)   # t -= lr * (sum_k c_k eps_k(t) + weight_decay * t)

A space that serves every member in one batched forward (rank-r factors, EGGROLL-style) returns a single group and
routes each block of rows to its member; a space whose evolved tensors are not the model's weights (singular values)
rebuilds the weights in ``after_update``. Spaces never look at rewards: turning fitness into coefficients is the
strategy's job.
"""

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch

from .noise import ChunkSpan, MemberNoise


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
    #: True when :meth:`apply_update` can take the place of ``write_gradients`` + a plain-SGD optimizer step.
    supports_apply_update: bool = False
    #: True when :meth:`apply_member` can make one member's perturbation permanent (what selection strategies need).
    applies_members: bool = False

    def __init__(self, noise: MemberNoise):
        # No sigma here: the strategy owns the perturbation scale and its schedule, and passes the step's scale to
        # every call that perturbs (evosax's split: the space knows where noise goes, the strategy how much).
        self.noise = noise

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
    def perturbed(self, step: int, members: Sequence[int], sigma: float) -> contextlib.AbstractContextManager[None]:
        """Context in which the model behaves as ``members`` (``theta + sigma * eps_member``); on exit the weights
        are exactly as before."""

    @contextlib.contextmanager
    def population(self, step: int) -> Iterator[None]:
        """Context around evaluating the members of one step (every ``perturbed`` of the step), closed before the
        update. A space may keep what members share in it (``InPlaceSpace``: one clean copy of the weights);
        ``perturbed`` works the same with or without it."""
        yield

    @abstractmethod
    def write_gradients(self, step: int, coefficients: torch.Tensor) -> None:
        """``t.grad = sum_k coefficients[k] * eps_k(t)`` for every evolved tensor ``t`` (accumulated in fp32)."""

    def apply_member(self, step: int, member: int, sigma: float) -> None:
        """Make ``member``'s perturbation permanent: ``theta += sigma * eps_member`` (selection strategies, GA).

        Spaces that support it compute the sum exactly as :meth:`perturbed` does, so the weights afterwards are
        bit-identical to those the member was evaluated with.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot apply one member's perturbation to its weights")

    def apply_update(
        self,
        step: int,
        coefficients: torch.Tensor,
        lr: float | Sequence[float],
        weight_decay: float | Sequence[float] = 0.0,
    ) -> float:
        """Do what ``write_gradients`` followed by a ``torch.optim.SGD`` step (momentum 0) does, without ``t.grad``:
        ``t -= lr * (g + weight_decay * t)`` with ``g = sum_k c_k eps_k(t)``, in SGD's order and dtypes, one tensor
        (or one noise chunk) at a time. ``lr`` and ``weight_decay``: one value, or one per tensor of
        ``named_tensors()`` (the optimizer's param group of each). Returns the squared norm of ``g`` over what this
        process holds (what the gradient-norm metric reads). Only for ``supports_apply_update`` spaces."""
        raise NotImplementedError(f"{type(self).__name__} has no in-place update; write gradients for the optimizer")

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

    Noise reaches a tensor one chunk at a time (``MemberNoise.chunk_spans``): perturb, subtract-restore, the
    pseudo-gradient and :meth:`apply_update` never hold more than one chunk of noise. Subclasses that hold only part
    of each tensor (ZeRO-3 shards) override :meth:`_local`, :meth:`_store_gradient` and :meth:`_before_edit`; they
    draw only the chunks their part overlaps, and perturbation, restore and the pseudo-gradient are computed by the
    same code on the same noise, so a sharded run matches an unsharded one by construction.

    Args:
        named_params: the tensors to evolve, with stable names (the names seed the noise).
        noise: member -> seeded direction mapping.
        restore: ``"copy"`` keeps a copy of the perturbed tensors and copies it back (bit-exact, one extra copy of
            the evolved weights while a member is evaluated); ``"subtract"`` regenerates the noise and subtracts it
            (no copy, but float rounding leaves ~1e-7 relative drift per member).

    Inside :meth:`population` the ``"copy"`` restore takes the clean copy once, when the first member is perturbed,
    and keeps it for the step's other members (the weights are the same between them), taking it again only if a
    tensor changed in between (its storage or in-place version moved). Per member that leaves the noise and one copy
    back instead of a clone and a copy back; the copy is held between members too and freed when the context closes.
    """

    supports_apply_update = True
    applies_members = True

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        noise: MemberNoise,
        restore: str = "copy",
    ):
        super().__init__(noise)
        if restore not in RESTORE_MODES:
            raise ValueError(f"restore must be one of {RESTORE_MODES}, got {restore!r}")
        names = [name for name, _ in named_params]
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique: they seed the noise")
        if not named_params:
            raise ValueError("no parameters to perturb")
        self.named_params = list(named_params)
        self.restore = restore
        self._clean: _CleanCopy | None = None  # set inside population() with restore="copy"

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
        """Shape of the whole tensor, whose seeded noise chunks every process cuts its part from."""
        return tuple(param.shape)

    def local_tensors(self) -> list[torch.Tensor]:
        return [self._local(param)[0] for _, param in self.named_params]

    def _pieces(self, param) -> tuple[torch.Tensor, int, list[ChunkSpan]]:
        """(this process's part of ``param``, the whole tensor's numel, the noise chunks that part overlaps)."""
        local, offset = self._local(param)
        numel = math.prod(self._full_shape(param))
        return local, numel, self.noise.chunk_spans(numel, offset or 0, local.numel())

    def _draw(self, step: int, direction: int, name: str, numel: int, span: ChunkSpan, device) -> torch.Tensor:
        """The noise of ``span`` (``MemberNoise.span_noise``)."""
        return self.noise.span_noise(step, direction, name, numel, span, device)

    def _add_noise(self, step: int, member: int, scale: float, progress: list[int], limit: int | None = None):
        """``local += scale * eps_member`` chunk by chunk over every tensor; ``progress[0]`` counts the chunks done
        (so an exception part-way tells what to undo), and at most ``limit`` chunks are edited."""
        direction, sign = self.noise.direction_and_sign(member)
        scale = sign * scale  # (-eps) * s == eps * (-s) exactly: the same numbers as negating the noise first
        for name, param in self.named_params:
            local, numel, spans = self._pieces(param)
            with _flat(local) as flat:
                for span in spans:
                    if limit is not None and progress[0] >= limit:
                        return
                    # one chunk of noise alive at a time (none with philox on the CPU: fused with the add)
                    self.noise.add_span(
                        flat.narrow(0, span.slice_offset, span.count), step, direction, name, numel, span, scale
                    )
                    progress[0] += 1

    def _pseudo_gradient(self, grad: torch.Tensor, step, name, numel, span, coefficients) -> torch.Tensor:
        """Add ``sum_k c_k eps_k`` over one span into ``grad`` (fp32 zeros: low precision would round small updates
        to zero), direction by direction in order."""
        for direction, coefficient in enumerate(coefficients):
            if coefficient != 0.0:
                eps = self._draw(step, direction, name, numel, span, grad.device)
                grad.add_(eps, alpha=coefficient)
                del eps
        return grad

    # ------------------------------------------------------------------ PerturbationSpace

    @contextlib.contextmanager
    def perturbed(self, step: int, members: Sequence[int], sigma: float) -> Iterator[None]:
        if len(members) != 1:
            raise ValueError(f"{type(self).__name__} evaluates one member at a time, got {list(members)}")
        (member,) = members
        with torch.no_grad():
            self._before_edit()
            backup = self._backup() if self.restore == "copy" else None
            edited = [0]  # how many chunks carry noise: an exception part-way must only undo those
            try:
                self._add_noise(step, member, sigma, edited)
                yield
            finally:
                # Restore even when generation or a reward function raised, or a KeyboardInterrupt hit mid-way.
                self._before_edit()
                if backup is not None:
                    restored = self.local_tensors()
                    for local, saved in zip(restored, backup, strict=True):
                        local.copy_(saved)
                    if self._clean is not None:
                        self._clean.mark(restored)
                else:
                    self._add_noise(step, member, -sigma, [0], limit=edited[0])

    @contextlib.contextmanager
    def population(self, step: int) -> Iterator[None]:
        if self.restore != "copy" or self._clean is not None:  # nothing to share, or already open
            yield
            return
        self._clean = _CleanCopy()
        try:
            yield
        finally:
            self._clean = None  # before the update: the copy must not outlive the members

    def _backup(self) -> list[torch.Tensor]:
        """The clean tensors a member's restore copies back: the population's kept copy if it still matches the
        tensors, else a fresh clone (kept, inside a population)."""
        tensors = self.local_tensors()
        if self._clean is None:
            return [tensor.clone() for tensor in tensors]
        return self._clean.of(tensors)

    def apply_member(self, step: int, member: int, sigma: float) -> None:
        # The same chunked addition as perturbing, so the weights are bit-identical to the evaluated member's.
        with torch.no_grad():
            self._before_edit()
            self._add_noise(step, member, sigma, [0])

    def write_gradients(self, step: int, coefficients: torch.Tensor) -> None:
        coefficients = coefficients.tolist()
        with torch.no_grad():
            for name, param in self.named_params:
                local, numel, spans = self._pieces(param)
                grad = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
                flat = grad.view(-1)
                for span in spans:
                    self._pseudo_gradient(
                        flat.narrow(0, span.slice_offset, span.count), step, name, numel, span, coefficients
                    )
                self._store_gradient(param, grad)

    def apply_update(self, step, coefficients, lr, weight_decay=0.0) -> float:
        lrs = per_tensor_values(lr, len(self.named_params), "lr")
        decays = per_tensor_values(weight_decay, len(self.named_params), "weight_decay")
        coefficients = coefficients.tolist()
        grad_sq = 0.0
        with torch.no_grad():
            self._before_edit()
            for (name, param), lr_, decay in zip(self.named_params, lrs, decays, strict=True):
                local, numel, spans = self._pieces(param)
                with _flat(local) as flat:
                    for span in spans:
                        grad = torch.zeros(span.count, dtype=torch.float32, device=local.device)
                        self._pseudo_gradient(grad, step, name, numel, span, coefficients)
                        check_finite_gradient(grad, name, coefficients)
                        if local.dtype != torch.float32:
                            grad = grad.to(local.dtype)  # what _store_gradient hands the optimizer
                        # fp32 norm (as Trainer's grad_norm): a float64 one would copy the chunk at twice its size
                        grad_sq += float(torch.linalg.vector_norm(grad, dtype=torch.float32)) ** 2
                        target = flat.narrow(0, span.slice_offset, span.count)
                        sgd_step(target, grad, lr_, decay)
                        del grad
        return grad_sq


class _CleanCopy:
    """One copy of the evolved tensors, valid while the tensors are exactly as when it was taken or last restored
    from: same storage, shape and in-place version counter (views share their base's counter, so a ZeRO-3 shard view
    made anew each time still matches). An in-place edit through ``.data`` between members would not be seen (that
    alias has a counter of its own); nothing in the trainer edits the weights between members (the reference swap
    of ``reference.py`` happens inside a member and is undone there)."""

    def __init__(self):
        self.copies: list[torch.Tensor] | None = None
        self.marks: list[tuple] | None = None

    @staticmethod
    def _marks(tensors) -> list[tuple]:
        return [(tensor.data_ptr(), tuple(tensor.shape), tensor._version) for tensor in tensors]

    def of(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.copies is None or self.marks != self._marks(tensors):
            self.copies = [tensor.clone() for tensor in tensors]
        return self.copies

    def mark(self, tensors: list[torch.Tensor]) -> None:
        """The tensors were just restored from the copy: it matches them as they are now."""
        self.marks = self._marks(tensors)


def sgd_step(param: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float) -> None:
    """``torch.optim.SGD``'s update with momentum 0 (``_single_tensor_sgd``), same ops in the same order and dtype,
    so the result is bit-identical: ``grad = grad + weight_decay * param`` (L2, coupled), ``param -= lr * grad``.
    ``grad`` is a temporary and is overwritten."""
    if weight_decay != 0:
        grad.add_(param, alpha=weight_decay)  # SGD: grad = grad.add(param, alpha=weight_decay)
    param.add_(grad, alpha=-lr)


def check_finite_gradient(grad: torch.Tensor, name: str, coefficients) -> None:
    """Refuse a non-finite pseudo-gradient before it reaches the weights (what the trainer checks in p.grad)."""
    if not bool(torch.isfinite(grad).all()):
        raise FloatingPointError(
            f"the pseudo-gradient of {name!r} is NaN or infinite (coefficients {list(coefficients)}); it was not "
            "applied"
        )


def per_tensor_values(value, count: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{what}: {len(values)} values for {count} evolved tensors (one per tensor, or one for all)")
    return values


@contextlib.contextmanager
def _flat(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """A 1-D view of ``tensor`` in C order to edit chunk by chunk; a strided (non-contiguous) tensor is edited
    through a flat copy that is written back, also when the edit stops part-way."""
    if tensor.is_contiguous():
        yield tensor.view(-1)
        return
    flat = tensor.reshape(-1).clone()
    try:
        yield flat
    finally:
        tensor.copy_(flat.view(tensor.shape))
