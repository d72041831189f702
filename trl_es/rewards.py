"""Reward-function guard rails and lookup by name.

GRPOTrainer already checks how many values a reward function returns. ES evaluates every function once per
population member, so a bad function fails many times over and, without care, mid-perturbation; the wrappers
here name the function in every error (what it raised, or which value is not a number) and keep the original's
name and sync/async nature so GRPO's reward code treats them exactly like the originals.
"""

import functools
import importlib
import inspect
import math
import numbers

import torch
from torch import nn
from trl.trainer.utils import is_async_callable


class RewardFunctionError(ValueError):
    """A reward function raised, or returned something other than one number (or None) per completion."""


def _check_output(name: str, output, expected: int) -> list:
    if isinstance(output, torch.Tensor):
        output = output.tolist()
    try:
        values = list(output)
    except TypeError:
        raise RewardFunctionError(
            f"Reward function {name!r} returned {type(output).__name__}; it must return a list with one float (or "
            f"None) per completion ({expected} here)."
        ) from None
    if len(values) != expected:
        raise RewardFunctionError(
            f"Reward function {name!r} returned {len(values)} values for {expected} completions; it must return "
            "exactly one float (or None) per completion."
        )
    for index, value in enumerate(values):
        if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, bool)):
            raise RewardFunctionError(
                f"Reward function {name!r} returned {value!r} ({type(value).__name__}) for completion {index}; "
                "rewards must be floats or None."
            )
        if value is not None and math.isinf(value):
            raise RewardFunctionError(f"Reward function {name!r} returned {value} for completion {index}.")
    return values


def _checked(func, name: str):
    if is_async_callable(func):

        @functools.wraps(func)
        async def checked_async(*args, **kwargs):
            try:
                output = await func(*args, **kwargs)
            except Exception as error:
                raise RewardFunctionError(
                    f"Reward function {name!r} raised {type(error).__name__}: {error}"
                ) from error
            return _check_output(name, output, len(kwargs["prompts"]))

        return checked_async

    @functools.wraps(func)
    def checked(*args, **kwargs):
        try:
            output = func(*args, **kwargs)
        except Exception as error:
            raise RewardFunctionError(f"Reward function {name!r} raised {type(error).__name__}: {error}") from error
        return _check_output(name, output, len(kwargs["prompts"]))

    return checked


def wrap_reward_funcs(reward_funcs: list, names: list[str]) -> list:
    """Wrap every callable reward function; reward models (``nn.Module``) are left as they are."""
    return [func if isinstance(func, nn.Module) else _checked(func, name) for func, name in zip(reward_funcs, names)]


def resolve_reward_func(spec: str):
    """A reward function from a name: ``trl.rewards`` (``accuracy_reward``), ``trl_es`` (``arithmetic_accuracy``),
    or a dotted path ``package.module.function``. Anything else (a reward-model id or path) is returned as is."""
    if "." in spec and not spec.startswith((".", "/")):
        module_name, _, attr = spec.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        if module is not None:
            if not hasattr(module, attr):
                raise ValueError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr!r}")
            return getattr(module, attr)
    import trl.rewards

    from . import tasks

    for namespace in (tasks, trl.rewards):
        func = getattr(namespace, spec, None)
        if func is not None and (inspect.isfunction(func) or callable(func)):
            return func
    return spec
