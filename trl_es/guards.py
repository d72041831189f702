"""Guards that keep the weights right: a non-finite (and overflow) check around every update, and Ctrl-C deferred while
the optimizer writes the weights (an interrupt in the middle of a multi-tensor update would leave some tensors stepped
and others not)."""

import contextlib
import signal
import threading

import torch


class DeferredInterrupt:
    """Hold a SIGINT (Ctrl-C) that arrives inside the block and raise it as ``KeyboardInterrupt`` on exit.

    With ``raise_on_exit=False`` nothing is raised: the owner reads ``received`` and decides when to stop. A second
    Ctrl-C after the block interrupts as usual (the previous handler is back). Only the main thread can install signal
    handlers; elsewhere the block runs unguarded.
    """

    def __init__(self, raise_on_exit: bool = True):
        self.received = False
        self.raise_on_exit = raise_on_exit
        self._previous = None

    def __enter__(self):
        self.received = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        self.received = True

    def __exit__(self, exc_type, exc, traceback):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if self.received and exc_type is None and self.raise_on_exit:
            raise KeyboardInterrupt


def nonfinite(named_tensors) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [name for name, tensor in named_tensors if tensor is not None and not torch.isfinite(tensor).all()]


def overflow_bound(dtype: torch.dtype) -> float:
    """The largest magnitude whose square ``dtype`` still holds (1.8e19 for float32 and bfloat16, 256 for float16).

    A weight beyond it is finite but not usable: its products with activations of its own size overflow, so the
    next forward turns into inf/NaN (sampling then fails inside torch, greedy decoding emits garbage).
    """
    return torch.finfo(dtype).max ** 0.5


def beyond_overflow_bound(named_tensors) -> list[str]:
    """Names of the floating-point tensors holding a value beyond :func:`overflow_bound` of their dtype."""
    return [
        name
        for name, tensor in named_tensors
        if tensor.is_floating_point()
        and tensor.numel()
        and float(tensor.detach().abs().amax()) > overflow_bound(tensor.dtype)
    ]


@contextlib.contextmanager
def sampling_overflow_named(describe):
    """Turn torch's bare ``RuntimeError`` for inf/NaN sampling probabilities (weights or a perturbation so large that
    the forward overflowed) into a ``FloatingPointError`` whose message ``describe()`` gives, called on the way out."""
    try:
        yield
    except RuntimeError as error:
        if "probability tensor contains" not in str(error):
            raise
        raise FloatingPointError(f"{describe()} (torch: {error})") from error
