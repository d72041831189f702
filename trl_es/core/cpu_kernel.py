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
#: all of it, since waking the pool costs more than the work (a decoding step of the 0.6M quickstart policy is ~2^16).
PARALLEL_ABOVE = 2**16
#: Tried in order: the first that compiles is used (no -march=native or OpenMP where the compiler lacks them).
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-fopenmp"), ("-O3",))
LOW_RANK_KERNELS = ("auto", "compiled", "torch")


class KernelUnavailable(RuntimeError):
    """The compiled kernel was required (``kernel="compiled"``) but could not be built."""


@functools.cache
def _build() -> tuple[object, str]:
    """``(the loaded function or None, how it was built or why not)``; built at most once per process."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, "no C compiler found (set CC or install gcc)"
    failures = []
    with tempfile.TemporaryDirectory(prefix="trl_es_kernel_", ignore_cleanup_errors=True) as directory:
        library_path = os.path.join(directory, "member_terms.so")
        for flags in FLAG_SETS:
            command = [*shlex.split(compiler), *flags, "-shared", "-fPIC", "-o", library_path, str(SOURCE)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as error:
                failures.append(f"`{shlex.join(command)}`: {error}")
                continue
            if done.returncode == 0:
                library = ctypes.CDLL(library_path)
                function = library.add_member_terms
                function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 6
                function.restype = None
                function.library = library  # keep the library loaded as long as the function is referenced
                return function, shlex.join(command)
            message = (done.stderr.strip().splitlines() or ["no output"])[-1]
            failures.append(f"`{shlex.join(command)}` exited with {done.returncode}: {message}")
    return None, "; ".join(failures)


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


def add_member_terms_(function, out: torch.Tensor, x: torch.Tensor, b_t: torch.Tensor, a_t: torch.Tensor) -> None:
    """``out[g] += (x[g] b_t[g]^T) a_t[g]`` for the ``G`` equal row blocks of ``x`` / ``out``, in place.

    ``x`` (..., in) and ``out`` (..., out_features): fp32 CPU, ``out`` contiguous (a fresh ``F.linear`` output);
    ``b_t`` (G, r, in) and ``a_t`` (G, r, out_features): fp32 contiguous. The caller has checked that the rows split
    into ``G`` blocks."""
    if not x.is_contiguous():
        x = x.contiguous()
    members, rank, in_features = b_t.shape
    rows = x.numel() // in_features
    function(
        x.data_ptr(),
        b_t.data_ptr(),
        a_t.data_ptr(),
        out.data_ptr(),
        rows,
        rows // members,
        in_features,
        a_t.shape[2],
        rank,
        PARALLEL_ABOVE,
    )
