"""Counter-based Gaussian noise: ``MemberNoise(generator="philox")``.

Element ``e`` of the noise stream with a 64-bit key is a pure function of ``(key, e)``: Philox4x32-10 (Salmon et
al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) of the counter ``e // 4``, whose four 32-bit words make
two Box-Muller pairs, lane ``e % 4``. Unlike a ``torch.Generator`` stream (serial on the CPU, and not seekable), any
slice is computed directly and in parallel, so

* on the CPU, one compiled call (``philox_noise.c``, built on first use like the low-rank kernel) draws a chunk on
  every core, or adds ``scale * eps`` to the weights in the same pass (no noise tensor at all);
* a ZeRO-3 shard computes exactly its slice, and the chunk size does not change the numbers.

The torch ops below compute the same numbers bit for bit on any device (tested against the compiled kernel): both
use only IEEE-exact operations in the same order, our own polynomials for the logarithm and the sine/cosine (libm's
and torch's differ), and these fp32 constants. The torch ops are the fallback where the kernel cannot be built
and the path on other devices; they are slower (about 60 elementwise ops per chunk), not different.

Uniforms take 24 bits: the radius's ``u`` is in ``(0, 1]`` (never 0, so the largest draw is ``sqrt(2 * 24 ln 2)``,
5.8 standard deviations), the angle's in ``[0, 1)``. Each number is within 1e-6 of the exact (float64) Box-Muller
transform of the same uniforms (7.1e-7 at most over 2^20 numbers, tested; fp32's own spacing near 4 is 4.8e-7).
"""

import ctypes
import functools
import math

import torch

from . import cpu_kernel


PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10
MASK32 = 0xFFFFFFFF
SOURCE = cpu_kernel.SOURCE.with_name("philox_noise.c")
#: Elements above which one call splits its range over the OpenMP threads (each element costs ~30 flops).
PARALLEL_ABOVE = 2**13


def _fp32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


#: The fp32 constants both implementations use, in ``philox_noise.c``'s enum order.
CONSTANTS = {
    "LN2": _fp32(math.log(2.0)),
    "SQRT2": _fp32(math.sqrt(2.0)),
    **{f"LOG{i}": _fp32(1.0 / (2 * i + 1)) for i in range(1, 5)},  # atanh series: 1/3, 1/5, 1/7, 1/9
    "HALF_PI": _fp32(math.pi / 2),
    **{f"S{i}": _fp32((-1) ** i / math.factorial(2 * i + 1)) for i in range(1, 7)},  # sin: -1/3!, 1/5!, ...
    **{f"C{i}": _fp32((-1) ** i / math.factorial(2 * i)) for i in range(1, 8)},  # cos: -1/2!, 1/4!, ...
}


def key_of(seed: int) -> tuple[int, int]:
    """The Philox key (two 32-bit words) of a 64-bit seed."""
    return seed & MASK32, (seed >> 32) & MASK32


# ---------------------------------------------------------------------------------------------------- torch ops


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``a * multiplier`` for int64 ``a`` < 2^32, in 16-bit halves (no int64 overflow)."""
    low_part = a * (multiplier & 0xFFFF)
    middle = (low_part >> 16) + a * (multiplier >> 16)
    return middle >> 16, ((middle & 0xFFFF) << 16) | (low_part & 0xFFFF)


def philox4x32_10(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of int64 counters ``(n, 4)`` (words < 2^32) under ``key``: ``(n, 4)`` int64 words."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def _box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two standard normals per pair of 32-bit words, as ``box_muller`` in ``philox_noise.c`` (same op order)."""
    K = CONSTANTS
    bits = ((a >> 8) + 1).to(torch.float32).view(torch.int32)  # k in [1, 2^24], exact; u = k 2^-24
    exponent = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    high = m > K["SQRT2"]
    m = torch.where(high, m * 0.5, m)
    exponent = exponent + high.to(torch.int32)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    series = (((s2 * K["LOG4"] + K["LOG3"]) * s2 + K["LOG2"]) * s2 + K["LOG1"]) * s2 + 1.0
    log_u = (exponent - 24).to(torch.float32) * K["LN2"] + (s * 2.0) * series
    radius = torch.sqrt(
        (log_u * -2.0).double()
    ).float()  # torch's fp32 CPU sqrt is not correctly rounded; via fp64 it is
    j = b >> 8
    quadrant = j >> 22
    x = ((j & 0x3FFFFF).to(torch.float32) * 2.0**-22) * K["HALF_PI"]
    x2 = x * x
    ps = x2 * K["S6"] + K["S5"]
    for name in ("S4", "S3", "S2", "S1"):
        ps = ps * x2 + K[name]
    pc = x2 * K["C7"] + K["C6"]
    for name in ("C5", "C4", "C3", "C2", "C1"):
        pc = pc * x2 + K[name]
    sine, cosine = x + x * (x2 * ps), 1.0 + x2 * pc
    first = torch.where(
        quadrant == 0, cosine, torch.where(quadrant == 1, -sine, torch.where(quadrant == 2, -cosine, sine))
    )
    second = torch.where(
        quadrant == 0, sine, torch.where(quadrant == 1, cosine, torch.where(quadrant == 2, -sine, -cosine))
    )
    return radius * first, radius * second


def normals_torch(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements ``[start, start + count)`` of the stream of ``seed``, fp32, with torch ops (any device)."""
    if count <= 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    first_block, last_block = start // 4, (start + count - 1) // 4
    blocks = torch.arange(first_block, last_block + 1, dtype=torch.int64, device=device)
    zero = torch.zeros_like(blocks)
    words = philox4x32_10(torch.stack((blocks & MASK32, blocks >> 32, zero, zero), dim=-1), key_of(seed))
    z0, z1 = _box_muller(words[:, 0], words[:, 1])
    z2, z3 = _box_muller(words[:, 2], words[:, 3])
    normals = torch.stack((z0, z1, z2, z3), dim=-1).view(-1)
    return normals.narrow(0, start - 4 * first_block, count)


# ---------------------------------------------------------------------------------------------------- compiled


@functools.cache
def _build() -> tuple[object, str]:
    """``(the loaded function or None, how it was built or why not)``; at most once per process. Built without FMA
    contraction (the numbers must be torch's) and with -fno-math-errno (so sqrtf vectorizes; same results)."""
    library, detail = cpu_kernel.compile_library(SOURCE, ("-ffp-contract=off", "-fno-math-errno"))
    if library is None:
        return None, detail
    function = library.philox_normal
    function.argtypes = [
        ctypes.c_void_p,  # out
        ctypes.c_int64,  # count
        ctypes.c_uint64,  # start
        ctypes.c_uint32,  # k0
        ctypes.c_uint32,  # k1
        ctypes.c_void_p,  # constants
        ctypes.c_float,  # scale
        ctypes.c_int32,  # add
        ctypes.c_int64,  # parallel_above
    ]
    function.restype = None
    function.library = library
    function.constants = torch.tensor(list(CONSTANTS.values()), dtype=torch.float32)
    return function, detail


def kernel_status() -> tuple[bool, str]:
    """Whether the compiled noise kernel is available in this process, and how it was built or why not."""
    function, detail = _build()
    return function is not None, detail


def normals(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements ``[start, start + count)`` of the stream of ``seed`` (fp32): the compiled kernel on the CPU where it
    builds, torch ops otherwise (the same numbers)."""
    function = _build()[0] if torch.device(device).type == "cpu" else None
    if function is None:
        return normals_torch(seed, start, count, device)
    out = torch.empty(count, dtype=torch.float32)
    k0, k1 = key_of(seed)
    function(out.data_ptr(), count, start, k0, k1, function.constants.data_ptr(), 0.0, 0, PARALLEL_ABOVE)
    return out


def add_scaled_normals(target: torch.Tensor, seed: int, start: int, scale: float) -> None:
    """``target += scale * eps`` with eps elements ``[start, start + target.numel())`` of the stream of ``seed``, the
    product rounded first (as ``target.add_(eps.mul_(scale))``, bit for bit). ``target``: a 1-D tensor. On the CPU
    for contiguous fp32 one pass with no noise tensor; otherwise the noise is drawn and added with torch ops."""
    fused = target.device.type == "cpu" and target.dtype == torch.float32 and target.is_contiguous()
    function = _build()[0] if fused else None
    if function is None:
        eps = normals(seed, start, target.numel(), target.device)
        target.add_(eps.mul_(scale).to(target.dtype))
        return
    k0, k1 = key_of(seed)
    function(target.data_ptr(), target.numel(), start, k0, k1, function.constants.data_ptr(), scale, 1, PARALLEL_ABOVE)
