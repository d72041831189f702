"""The low-rank space's member terms as one compiled CPU call (``member_terms.c``), built on first use.

On the CPU, adding every member's rank-r term to a layer's output with torch ops takes a batched matmul, a
multiply-add and the views between them; on a small model their per-call overhead costs about as much as the layer's
own GEMM (``benchmarks/population_throughput.py``). The C kernel does the same arithmetic in one pass over the rows
and one call.

It is compiled once per process with the system C compiler (``$CC``, else ``cc``/``gcc``) into a temporary directory
that is deleted as soon as the library is loaded (the mapping outlives the file), so there is no cache to go stale
when a home directory is shared by machines with different CPUs. Without a compiler, or when compiling fails, the
space falls back to torch ops (``LowRankSpace(kernel="auto")``, the default) or raises
(``kernel="compiled"``) with the compiler's message. Loaded through ctypes: no torch headers, no ninja, well under a
second to build. The result differs from the torch ops only by float rounding (the dot products are summed in
another order) and does not depend on the thread count.
"""

import ctypes
import functools
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("member_terms.c")
#: ``rows x (in + out) x rank`` above which a call splits its rows over the OpenMP threads; below it one thread does
#: all of it. Split early: the layer's own GEMM wrote half of ``out`` from each core, and one thread reading the other
#: core's half cost more than waking the pool (measured on the 0.6M quickstart policy, whose decoding steps are
#: 2^15.6 to 2^16.6: 9-10 ms of kernel time per 256-row generate split at 2^14, 12-13 ms at 2^16, 15-16 ms serial).
PARALLEL_ABOVE = 2**14
#: Tried in order: the first that compiles is used (no -march=native or OpenMP where the compiler lacks them).
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-fopenmp"), ("-O3",))
LOW_RANK_KERNELS = ("auto", "compiled", "torch")


class KernelUnavailable(RuntimeError):
    """The compiled kernel was required (``kernel="compiled"``) but could not be built."""


def compile_library(source: Path, extra_flags: tuple[str, ...] = ()) -> tuple[ctypes.CDLL | None, str]:
    """Compile ``source`` into a shared library and load it: ``(the library or None, the command or why not)``. The
    first of ``FLAG_SETS`` that compiles is used, each with ``extra_flags``; the file is deleted once loaded."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, "no C compiler found (set CC or install gcc)"
    failures = []
    with tempfile.TemporaryDirectory(prefix="trl_es_kernel_", ignore_cleanup_errors=True) as directory:
        library_path = os.path.join(directory, source.with_suffix(".so").name)
        for flags in FLAG_SETS:
            command = [
                *shlex.split(compiler),
                *flags,
                *extra_flags,
                "-shared",
                "-fPIC",
                "-o",
                library_path,
                str(source),
            ]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as error:
                failures.append(f"`{shlex.join(command)}`: {error}")
                continue
            if done.returncode == 0:
                return ctypes.CDLL(library_path), shlex.join(command)
            message = (done.stderr.strip().splitlines() or ["no output"])[-1]
            failures.append(f"`{shlex.join(command)}` exited with {done.returncode}: {message}")
    return None, "; ".join(failures)


@functools.cache
def _build() -> tuple[object, str]:
    """``(the loaded function or None, how it was built or why not)``; built at most once per process."""
    library, detail = compile_library(SOURCE)
    if library is None:
        return None, detail
    function = library.add_member_terms
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(MemberTerms)]
    function.restype = None
    function.library = library  # keep the library loaded as long as the function is referenced
    return function, detail


def kernel_status() -> tuple[bool, str]:
    """Whether the compiled kernel is available in this process, and the command that built it or why it failed."""
    function, detail = _build()
    return function is not None, detail


def resolve_kernel(kernel: str):
    """The compiled function for ``kernel`` ("auto", "compiled", "torch"), or None where torch ops are to be used."""
    if kernel not in LOW_RANK_KERNELS:
        raise ValueError(f"kernel must be one of {list(LOW_RANK_KERNELS)}, got {kernel!r}")
    if kernel == "torch":
        return None
    function, detail = _build()
    if function is None and kernel == "compiled":
        raise KernelUnavailable(
            f"kernel='compiled' needs the low-rank CPU kernel, which could not be built: {detail}. Install a C "
            "compiler (gcc), or use kernel='auto' (falls back to torch ops) or 'torch'."
        )
    if function is None:
        _log_fallback_once(detail)
    return function


@functools.cache
def _log_fallback_once(detail: str) -> None:
    logger.info("low-rank space: the compiled CPU kernel is unavailable (%s); using torch ops", detail)


def supports(weight: torch.Tensor) -> bool:
    """Whether a layer with this weight can use the kernel: fp32 on the CPU (anything else uses torch ops)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32


class MemberTerms(ctypes.Structure):
    """What one patched layer's calls share (``member_terms`` in ``member_terms.c``)."""

    _fields_ = [
        ("factors", ctypes.c_void_p),
        ("direction", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("members", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("out_features", ctypes.c_int64),
        ("rank", ctypes.c_int64),
        ("parallel_above", ctypes.c_int64),
    ]


class BoundMembers:
    """The kernel bound to the members of one forward: member ``g`` (row block ``g``) uses direction
    ``directions[g]`` of each layer's drawn factors, scaled by ``scales[g]`` (sign * sigma / sqrt(r))."""

    def __init__(self, function, directions: torch.Tensor, scales: torch.Tensor, num_directions: int):
        self.function = function
        self.directions = directions.to(torch.int64).contiguous()
        self.scales = scales.to(torch.float32).contiguous()
        if len(self.directions) != len(self.scales) or not len(self.directions):
            raise ValueError(f"{len(self.directions)} directions for {len(self.scales)} scales")
        if not 0 <= int(self.directions.min()) <= int(self.directions.max()) < num_directions:
            raise IndexError(f"directions {self.directions.tolist()} outside the {num_directions} drawn")

    def layer(self, factors: torch.Tensor, in_features: int):
        """``add(x, out)`` for one layer: adds member ``g``'s ``scale_g (x B_d) A_d^T`` to row block ``g`` of ``out``
        in place, reading ``A_d`` and ``B_d`` from ``factors`` as drawn, ``(directions, out + in, rank)`` (no
        per-member copy). ``x`` (..., in) fp32; ``out`` (..., out) the contiguous fp32 output of the layer's
        ``F.linear``; the caller has checked that the rows split into the member blocks."""
        if not (factors.dim() == 3 and factors.dtype == torch.float32 and factors.is_contiguous()):
            raise ValueError(f"factors must be contiguous fp32 (directions, out + in, rank), got {factors.shape}")
        params = MemberTerms(
            factors.data_ptr(),
            self.directions.data_ptr(),
            self.scales.data_ptr(),
            len(self.directions),
            in_features,
            factors.shape[1] - in_features,
            factors.shape[2],
            PARALLEL_ABOVE,
        )
        pointer, function = ctypes.pointer(params), self.function

        def add(x: torch.Tensor, out: torch.Tensor) -> None:
            if not x.is_contiguous():
                x = x.contiguous()
            function(x.data_ptr(), out.data_ptr(), x.numel() // in_features, pointer)

        add.alive = (factors, self)  # the struct holds raw pointers into these tensors
        return add
