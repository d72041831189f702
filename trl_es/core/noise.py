"""Gaussian noise regenerated from seeds, never stored.

Every noise tensor is a pure function of ``(run seed, step, direction, tensor name)``: an explicit
``torch.Generator`` is seeded from a hash of those four values, so

* two tensors of the same shape never share noise (the tensor name is part of the seed; reusing one generator
  seed for every tensor was a bug of early ES-for-LLM code),
* perturb, update and a resumed run all regenerate exactly the same numbers,
* the global torch RNG is never touched.

Chunks. A tensor's noise is defined on its flattened (C-order) elements cut into chunks of ``chunk_size`` elements
(the last one shorter); chunk ``j`` is its own draw, seeded by (run seed, step, direction, tensor name, ``j``). So
a space can perturb, restore and update a tensor chunk by chunk holding one chunk of noise at a time, and a process
that holds a slice of the tensor (a ZeRO-3 shard) draws only the chunks its slice overlaps. Chunk 0 is seeded
exactly as the whole-tensor noise was before chunks existed, and a tensor of at most ``chunk_size`` elements is one
chunk: its noise is the same numbers as then (a CPU ``randn`` of n numbers is not a prefix of a longer draw, so
every chunk is drawn with its own length, never cut from a longer one).

With antithetic sampling, members ``2k`` and ``2k + 1`` share direction ``k`` with signs ``+1`` and ``-1``.

Generators. ``generator="torch"`` (the default, and the noise of every run before ``"philox"`` existed) is the above:
one seeded ``torch.Generator`` draw per chunk. ``generator="philox"`` is counter-based (``philox.py``): element ``e``
of a (step, direction, tensor)'s noise is a pure function of its seed and ``e``, so the chunk size does not change
the numbers, any slice is computed directly, and on the CPU one compiled call computes a chunk on every core or adds
it to the weights in the same pass. The two are different noise: a run keeps the generator it started with (the seed
log records it).
"""

import hashlib
import math
from typing import NamedTuple

import torch

from . import philox


def derive_seed(*parts: object) -> int:
    """Hash any tuple of ints/strings into a 63-bit seed (stable across processes, platforms and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


#: Elements per noise chunk: 4 MiB of fp32 noise at most in flight per tensor. Every tensor of the shipped
#: quickstart policy (largest 33,152 elements) and of the test models is one chunk, so their noise, the golden test
#: values and the quickstart result are those of the whole-tensor noise; a 7B model's 4096 x 11008 matrix is 43.
NOISE_CHUNK = 2**20
#: Where the numbers come from (see the module docstring).
NOISE_GENERATORS = ("torch", "philox")


class ChunkSpan(NamedTuple):
    """The part of noise chunk ``chunk`` that falls in a slice of a flattened tensor."""

    chunk: int  # chunk index
    chunk_offset: int  # where the part starts in the chunk
    slice_offset: int  # where it starts in the slice
    count: int  # how many elements


class MemberNoise:
    """Maps population members to seeded noise directions.

    Args:
        seed: run seed (``args.seed``).
        population_size: number of members ``N`` in one step.
        antithetic: pair members as ``+eps_k`` / ``-eps_k``; then ``N`` must be even and there are ``N / 2``
            directions.
        chunk_size: elements per noise chunk (see the module docstring). For ``generator="torch"`` it is part of the
            noise's definition: runs with other chunk sizes draw other noise for tensors larger than the smaller of
            the two. For ``"philox"`` it only bounds how much noise is in flight.
        generator: ``"torch"`` (a seeded ``torch.Generator`` per chunk) or ``"philox"`` (counter-based; parallel and
            fused with the weight update on the CPU).
    """

    def __init__(
        self,
        seed: int,
        population_size: int,
        antithetic: bool = True,
        chunk_size: int = NOISE_CHUNK,
        generator: str = "torch",
    ):
        if population_size < 2:
            raise ValueError(f"population_size must be >= 2, got {population_size}")
        if antithetic and population_size % 2:
            raise ValueError(f"antithetic sampling needs an even population_size, got {population_size}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of elements, got {chunk_size!r}")
        if generator not in NOISE_GENERATORS:
            raise ValueError(f"generator must be one of {list(NOISE_GENERATORS)}, got {generator!r}")
        self.generator_kind = generator
        self.seed = seed
        self.population_size = population_size
        self.antithetic = antithetic
        self.chunk_size = chunk_size

    @property
    def num_directions(self) -> int:
        return self.population_size // 2 if self.antithetic else self.population_size

    def direction_and_sign(self, member: int) -> tuple[int, float]:
        if not 0 <= member < self.population_size:
            raise IndexError(f"member {member} outside population of {self.population_size}")
        if self.antithetic:
            return member // 2, 1.0 if member % 2 == 0 else -1.0
        return member, 1.0

    def generator(
        self, step: int, direction: int, key: str, device: torch.device | str = "cpu", chunk: int = 0
    ) -> torch.Generator:
        gen = torch.Generator(device=device)
        # Chunk 0 keeps the seed of the whole-tensor noise that existed before chunks (same numbers for small tensors).
        parts = (self.seed, "noise", step, direction, key) + ((chunk,) if chunk else ())
        gen.manual_seed(derive_seed(*parts))
        return gen

    @property
    def counter_based(self) -> bool:
        return self.generator_kind == "philox"

    def _philox_seed(self, step: int, direction: int, key: str) -> int:
        return derive_seed(self.seed, "philox", step, direction, key)

    def _start(self, span: ChunkSpan) -> int:
        """Where ``span`` starts in the flattened tensor."""
        return span.chunk * self.chunk_size + span.chunk_offset

    def num_chunks(self, numel: int) -> int:
        return -(-numel // self.chunk_size)

    def chunk_spans(self, numel: int, start: int = 0, length: int | None = None) -> list[ChunkSpan]:
        """The chunks that elements ``[start, start + length)`` of a flattened tensor of ``numel`` elements overlap,
        in order, with the overlapping part of each (default: the whole tensor)."""
        length = numel - start if length is None else length
        _check_slice(numel, start, length)
        spans, position, end = [], start, start + length
        while position < end:
            chunk, chunk_offset = divmod(position, self.chunk_size)
            count = min(self.chunk_size - chunk_offset, end - position)
            spans.append(ChunkSpan(chunk, chunk_offset, position - start, count))
            position += count
        return spans

    def direction_chunk(
        self, step: int, direction: int, key: str, numel: int, chunk: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Chunk ``chunk`` of the flattened noise of one (step, direction, tensor of ``numel`` elements), fp32, 1-D."""
        if not 0 <= chunk < self.num_chunks(numel):
            raise IndexError(f"chunk {chunk} outside the {self.num_chunks(numel)} chunks of a {numel}-element tensor")
        length = min(self.chunk_size, numel - chunk * self.chunk_size)
        if self.counter_based:
            return philox.normals(self._philox_seed(step, direction, key), chunk * self.chunk_size, length, device)
        gen = self.generator(step, direction, key, device, chunk)
        return torch.randn(length, generator=gen, device=device, dtype=torch.float32)

    def direction_slice(
        self,
        step: int,
        direction: int,
        key: str,
        numel: int,
        start: int,
        length: int,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Elements ``[start, start + length)`` of the flattened noise, drawn from the chunks they overlap only (what
        a process holding that slice of the tensor, e.g. a ZeRO-3 shard, needs)."""
        if self.counter_based:
            _check_slice(numel, start, length)
            return philox.normals(self._philox_seed(step, direction, key), start, length, device)
        out = torch.empty(length, dtype=torch.float32, device=device)
        for span in self.chunk_spans(numel, start, length):
            chunk = self.direction_chunk(step, direction, key, numel, span.chunk, device)
            out.narrow(0, span.slice_offset, span.count).copy_(chunk.narrow(0, span.chunk_offset, span.count))
        return out

    def direction(
        self,
        step: int,
        direction: int,
        key: str,
        shape: torch.Size | tuple[int, ...],
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Standard-normal fp32 noise for one whole (step, direction, tensor): its chunks, joined."""
        numel = math.prod(shape)
        if self.counter_based:
            return philox.normals(self._philox_seed(step, direction, key), 0, numel, device).view(shape)
        if self.num_chunks(numel) <= 1:  # one draw of the whole tensor: no copy
            gen = self.generator(step, direction, key, device)
            return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        return self.direction_slice(step, direction, key, numel, 0, numel, device).view(shape)

    def all_directions(self, step: int, key: str, shape, device: torch.device | str = "cpu") -> torch.Tensor:
        """Noise of every direction for one tensor in one draw, shape ``(num_directions, *shape)``.

        Used where the per-direction tensors are tiny (low-rank factors): one generator instead of one per
        direction. Row ``k`` is direction ``k``'s noise; it is seeded by (run seed, step, tensor) and the
        population size, and shares no stream with ``direction()``.
        """
        shape = (self.num_directions, *shape)
        if self.counter_based:
            seed = derive_seed(self.seed, "philox-all-directions", step, self.num_directions, key)
            return philox.normals(seed, 0, math.prod(shape), device).view(shape)
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(self.seed, "all-directions", step, self.num_directions, key))
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    def span_noise(self, step: int, direction: int, key: str, numel: int, span: ChunkSpan, device) -> torch.Tensor:
        """The noise of ``span`` (fp32, 1-D): with ``"torch"`` its chunk drawn whole (a draw is not seekable) and cut
        to the part in use, with ``"philox"`` just the part."""
        if self.counter_based:
            return philox.normals(self._philox_seed(step, direction, key), self._start(span), span.count, device)
        eps = self.direction_chunk(step, direction, key, numel, span.chunk, device)
        return eps if span.count == eps.numel() else eps.narrow(0, span.chunk_offset, span.count)

    def add_span(
        self, target: torch.Tensor, step: int, direction: int, key: str, numel: int, span: ChunkSpan, scale: float
    ) -> None:
        """``target += scale * eps`` for the noise of ``span`` (``target``: 1-D, ``span.count`` elements), the product
        rounded to fp32 first and then to ``target``'s dtype. With ``"philox"`` on a contiguous fp32 CPU tensor, one
        compiled pass with no noise tensor (the same numbers)."""
        if self.counter_based:
            philox.add_scaled_normals(target, self._philox_seed(step, direction, key), self._start(span), scale)
            return
        eps = self.span_noise(step, direction, key, numel, span, target.device)
        target.add_(eps.mul_(scale).to(target.dtype))

    def member_noise(self, step: int, member: int, key: str, shape, device="cpu") -> torch.Tensor:
        """Signed noise ``eps_i`` of one member for one tensor (fp32)."""
        direction, sign = self.direction_and_sign(member)
        noise = self.direction(step, direction, key, shape, device)
        return noise if sign > 0 else noise.neg_()

    def sampling_seed(self, step: int, member: int) -> int:
        """Seed for the member's token sampling, so sampled completions are reproducible per member."""
        return derive_seed(self.seed, "sampling", step, member)


def _check_slice(numel: int, start: int, length: int) -> None:
    if start < 0 or length < 0 or start + length > numel:
        raise ValueError(f"slice [{start}, {start + length}) is not inside a tensor of {numel} elements")
