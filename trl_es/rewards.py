"""Reward-function guard rails and lookup by name.

GRPOTrainer already checks how many values a reward function returns. ES evaluates every function once per
population member, so a bad function fails many times over and, without care, mid-perturbation; the wrappers
here name the function in every error (what it raised, or which value is not a number) and keep the original's
name, signature and sync/async nature so GRPO's reward code treats them exactly like the originals.

What a reward function may return (the same as ``GRPOTrainer`` accepts), one value per completion:

- a list or tuple (or any ordered iterable) of Python floats, ints or bools (``True`` -> 1.0, ``False`` -> 0.0),
  numpy scalars, 0-d arrays or 0-d tensors, and ``None`` ("no reward for this completion");
- a 1-D numpy array or torch tensor (any real or bool dtype, any device).

The wrapper hands GRPO a plain ``list`` of ``float`` or ``None``, so downstream code sees one type. Rejected, with an
error naming the function (and the completion index where there is one): a dict (iterating it would read its keys
as the rewards), a set (no order), text, nested sequences or arrays of more than one dimension, a count different
from the number of completions, infinities, and numbers beyond the float32 range the trainer stores rewards in
(``10**400``, ``1e39``).

NaN is an error too, naming the function and the completion. GRPO turns ``None`` into NaN internally and then reads
every NaN as "no reward", so a NaN computed by accident (0/0, the mean of an empty list, a failed parse turned into
``float("nan")``) would silently drop completions from the update and hide the bug. ``None`` is the one way to say
"no reward for this completion".
"""

import functools
import importlib
import inspect
import logging
import math
import numbers
import os
from collections.abc import Mapping, Set

import numpy as np
import torch
from torch import nn

from .trl_compat import is_async_callable


logger = logging.getLogger(__name__)

# GRPO's _calculate_rewards stores every reward in a float32 tensor: a finite float64 beyond this becomes inf there.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class RewardFunctionError(ValueError):
    """A reward function raised, or returned something other than one number (or None) per completion."""


def _reward_value(name: str, index: int, value) -> float | None:
    """One completion's reward as a Python float (or None), or a RewardFunctionError naming function and index."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 0:
            raise RewardFunctionError(
                f"Reward function {name!r} returned a {type(value).__name__} of shape {tuple(value.shape)} for "
                f"completion {index}; each completion's reward must be a single number (or None)."
            )
        value = value.item()  # 0-d: its Python value (a 0-d object array may hold None)
    if value is None:
        return None
    where = f"Reward function {name!r} returned {value!r} ({type(value).__name__}) for completion {index}"
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (str, bytes)):
        raise RewardFunctionError(f"{where}; rewards must be floats or None, not text.")
    if isinstance(value, (list, tuple, Mapping, Set)):
        raise RewardFunctionError(f"{where}; rewards must be one float (or None) per completion, not nested.")
    if not isinstance(value, numbers.Real):
        raise RewardFunctionError(f"{where}; rewards must be floats or None.")
    try:
        number = float(value)
    except OverflowError:
        raise RewardFunctionError(f"{where}: too large for a float.") from None
    if math.isnan(number):
        raise RewardFunctionError(
            f"Reward function {name!r} returned NaN for completion {index}. NaN is treated as a bug, not as a "
            "missing reward: return None for a completion that cannot be scored."
        )
    if math.isinf(number):
        raise RewardFunctionError(f"Reward function {name!r} returned {number} for completion {index}.")
    if abs(number) > _FLOAT32_MAX:
        raise RewardFunctionError(
            f"{where}: beyond the float32 range (+-{_FLOAT32_MAX:.3g}) the trainer stores rewards in, where it "
            "would become inf. Rescale the reward."
        )
    return number


def _check_output(name: str, output, expected: int | None) -> list[float | None]:
    """The rewards as a plain list of float-or-None; ``expected`` is the completion count (None: not checked)."""
    needed = f"one float (or None) per completion{f' ({expected} here)' if expected is not None else ''}"
    if output is None or isinstance(output, (str, bytes, numbers.Number)):
        raise RewardFunctionError(
            f"Reward function {name!r} returned {output!r} ({type(output).__name__}); it must return a list with "
            f"{needed}."
        )
    if isinstance(output, Mapping):
        raise RewardFunctionError(
            f"Reward function {name!r} returned a {type(output).__name__} (keys {list(output)[:5]}); it must return a "
            f"list with {needed}, not a mapping (its keys would be read as the rewards)."
        )
    if isinstance(output, Set):
        raise RewardFunctionError(
            f"Reward function {name!r} returned a {type(output).__name__}, which has no order; it must return a list "
            f"with {needed}, in the order of the completions."
        )
    if isinstance(output, (torch.Tensor, np.ndarray)):
        if output.ndim != 1:
            raise RewardFunctionError(
                f"Reward function {name!r} returned a {type(output).__name__} of shape {tuple(output.shape)}; it must "
                f"be 1-D with {needed}."
            )
        if isinstance(output, torch.Tensor):
            output = output.detach().cpu()
        values = output.tolist()
    else:
        try:
            values = list(output)
        except TypeError:
            raise RewardFunctionError(
                f"Reward function {name!r} returned {type(output).__name__}; it must return a list with {needed}."
            ) from None
    if expected is not None and len(values) != expected:
        raise RewardFunctionError(
            f"Reward function {name!r} returned {len(values)} values for {expected} completions; it must return "
            "exactly one float (or None) per completion."
        )
    return [_reward_value(name, index, value) for index, value in enumerate(values)]


def _expected_count(func, args: tuple, kwargs: dict) -> int | None:
    """How many completions the call scores: ``len(completions)``, else ``len(prompts)``, else unknown (None).

    GRPO passes both by keyword, but environment-owned rewards and direct calls may pass only ``completions``, or
    pass them positionally; the wrapper must not demand an argument its function does not.
    """
    named = dict(kwargs)
    if args:
        try:
            bound = inspect.signature(func).bind_partial(*args, **kwargs)
        except (TypeError, ValueError):  # no signature (some builtins) or one the call did not match
            bound = None
        if bound is not None:
            for param_name, value in bound.arguments.items():
                param = bound.signature.parameters[param_name]
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    named.update(value)
                elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
                    named[param_name] = value
    for key in ("completions", "prompts"):
        try:
            return len(named[key])
        except (KeyError, TypeError):
            continue
    return None


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
            return _check_output(name, output, _expected_count(func, args, kwargs))

        return checked_async

    @functools.wraps(func)
    def checked(*args, **kwargs):
        try:
            output = func(*args, **kwargs)
        except Exception as error:
            raise RewardFunctionError(f"Reward function {name!r} raised {type(error).__name__}: {error}") from error
        return _check_output(name, output, _expected_count(func, args, kwargs))

    return checked


def wrap_reward_funcs(reward_funcs: list, names: list[str]) -> list:
    """Wrap every callable reward function; reward models (``nn.Module``) are left as they are."""
    return [func if isinstance(func, nn.Module) else _checked(func, name) for func, name in zip(reward_funcs, names)]


# ---------------------------------------------------------------------------------------------- lookup by name

_SPEC_FORMS = (
    "a built-in name (see above), a dotted path 'package.module.function', a local reward-model folder, or a "
    "hub reward-model id 'org/name'"
)


def _is_reward_function(obj) -> bool:
    """A public callable that can be called the GRPO way: it takes ``completions`` (or ``**kwargs``)."""
    if inspect.ismodule(obj) or inspect.isclass(obj) or not callable(obj):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "completions" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _namespaces() -> list:
    import trl.rewards

    from . import tasks

    return [tasks, trl.rewards]


def available_reward_functions() -> dict[str, str]:
    """``{name: module}`` of the reward functions a bare name can refer to (``trl_es.tasks``, then ``trl.rewards``)."""
    found = {}
    for namespace in _namespaces():
        names = getattr(namespace, "__all__", None) or [n for n in dir(namespace) if not n.startswith("_")]
        for attr in names:
            if attr not in found and _is_reward_function(getattr(namespace, attr, None)):
                found[attr] = namespace.__name__
    return found


def _import_dotted(spec: str):
    """``package.module.attr`` (the attribute may itself be nested: ``module.Class.method``)."""
    parts = spec.split(".")
    if not all(part.isidentifier() for part in parts):
        raise ValueError(
            f"reward function {spec!r} is not a valid dotted path 'package.module.function' (every part must be a "
            f"Python identifier); the accepted forms are {_SPEC_FORMS}."
        )
    error = None
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as missing:
            # Only "this prefix is not a module" moves on to a shorter prefix; a missing import *inside* the user's
            # module is their bug and is reported as such.
            if missing.name is not None and not (module_name + ".").startswith(missing.name + "."):
                raise ImportError(
                    f"reward function {spec!r}: importing module {module_name!r} failed: {missing}"
                ) from missing
            error = error or missing
            continue
        except Exception as failure:
            raise ImportError(
                f"reward function {spec!r}: importing module {module_name!r} raised "
                f"{type(failure).__name__}: {failure}"
            ) from failure
        obj = module
        for depth, attr in enumerate(parts[split:]):
            if not hasattr(obj, attr):
                owner = ".".join(parts[: split + depth])
                kind = "module " if inspect.ismodule(obj) else ""
                raise ValueError(f"reward function {spec!r}: {kind}{owner!r} has no attribute {attr!r}.")
            obj = getattr(obj, attr)
        if not callable(obj):
            raise ValueError(f"reward function {spec!r} is a {type(obj).__name__}, not a callable.")
        return obj
    raise ImportError(
        f"reward function {spec!r}: cannot import it ({error}). A dotted path must name an importable module (the "
        f"working directory is on the path for `trl-es train`); the accepted forms are {_SPEC_FORMS}."
    ) from error


def resolve_reward_func(spec):
    """A reward function (or reward-model id/path) from a recipe entry.

    In this order:

    - a callable or ``nn.Module`` is returned as it is (Python callers may mix them with names);
    - a string naming an existing local folder is a reward-model path, returned as it is;
    - a dotted path ``package.module.function`` is imported (an error names the missing module or attribute);
    - a bare name is looked up in ``trl_es.tasks`` then ``trl.rewards`` (``arithmetic_accuracy``, ``accuracy_reward``);
    - a string ``org/name`` that is a valid hub id is a hub reward-model id, returned as it is;
    - anything else raises ``ValueError`` naming the entry, the available reward functions and the accepted forms.
    """
    if callable(spec) and not isinstance(spec, str):
        return spec
    if not isinstance(spec, str):
        raise ValueError(
            f"reward function {spec!r} is a {type(spec).__name__}; every reward_funcs entry must be a string "
            f"({_SPEC_FORMS})."
        )
    available = available_reward_functions()
    if not spec.strip():
        raise ValueError(f"reward function {spec!r} is empty; available: {sorted(available)}.")
    if os.path.isdir(os.path.expanduser(spec)):
        if spec in available:
            logger.warning(
                "reward function %r: a local folder of that name exists, so it is loaded as a reward model, not as "
                "%s.%s. Write './%s' to make the folder explicit, or rename it.",
                spec,
                available[spec],
                spec,
                spec,
            )
        return spec
    if "/" not in spec and "\\" not in spec and "." in spec:
        return _import_dotted(spec)
    if spec.isidentifier():
        if spec in available:
            return getattr(importlib.import_module(available[spec]), spec)
        not_reward = [ns.__name__ for ns in _namespaces() if callable(getattr(ns, spec, None))]
        if not_reward:
            raise ValueError(
                f"reward function {spec!r}: {not_reward[0]}.{spec} exists but is not a reward function (it takes no "
                "`completions`; factories such as get_cosine_scaled_reward must be called in Python and passed via "
                f"a dotted path to the result). Available reward functions: {sorted(available)}."
            )
        raise ValueError(
            f"unknown reward function {spec!r}. Available reward functions: {sorted(available)}. Accepted forms: "
            f"{_SPEC_FORMS}."
        )
    if "/" in spec:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(spec)
        except HFValidationError:
            raise ValueError(
                f"reward function {spec!r} looks like a path, but no such folder exists (and it is not a valid hub "
                f"id 'org/name'). Accepted forms: {_SPEC_FORMS}."
            ) from None
        return spec
    raise ValueError(
        f"reward function {spec!r} is not a known name, dotted path, folder or hub id. Available reward functions: "
        f"{sorted(available)}. Accepted forms: {_SPEC_FORMS}."
    )


def resolve_reward_funcs(specs) -> list:
    """``resolve_reward_func`` over the ``reward_funcs`` field of a recipe: a list, a single string (a YAML scalar
    ``reward_funcs: arithmetic_accuracy``), or None (empty). Errors name the field and the entry's index."""
    if specs is None:
        return []
    if isinstance(specs, str) or (callable(specs) and not isinstance(specs, (list, tuple))):
        specs = [specs]
    elif not isinstance(specs, (list, tuple)):
        raise ValueError(
            f"reward_funcs must be a list of reward-function names (or one name), got {type(specs).__name__} "
            f"{specs!r}."
        )
    resolved = []
    for index, spec in enumerate(specs):
        try:
            resolved.append(resolve_reward_func(spec))
        except (ValueError, ImportError) as error:
            raise type(error)(f"reward_funcs[{index}]: {error}") from error
    return resolved
