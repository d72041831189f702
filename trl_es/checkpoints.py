"""Checkpoints that resume what they claim to: complete folders, the same ES trajectory, the same optimizer.

Three things go wrong silently (or with a bare ``KeyError``) when resuming with the plain ``Trainer``:

- ``resume_from_checkpoint=True`` takes the highest-numbered ``checkpoint-N`` folder whatever is in it. A run killed
  while saving leaves a folder with, say, the weights but no ``trainer_state.json``; resuming from it restarts the
  step count at 0 on already-trained weights. :func:`last_complete_checkpoint` skips such folders, saying why.
- The ES trajectory is defined by settings the checkpoint does not record: the noise of step ``t`` is regenerated from
  ``(seed, step, member)`` for ``population_size`` members of scale ``sigma`` in the chosen perturbation space, and the
  fitness shaping turns rewards into update weights. Resuming with another value continues a different run on the
  same weights and the same step counter. :func:`save_es_settings` writes them to ``es_settings.json`` in each
  checkpoint; :func:`check_es_settings` refuses a resume that changes any of them, naming every field.
- Resuming an AdamW checkpoint with ``optim="sgd"`` loads AdamW's parameter groups into SGD, which then fails at its
  first step with ``KeyError: 'momentum'``. :func:`check_optimizer_state` replays that step on a probe and names both
  optimizers instead.

A folder is complete when ``trainer_state.json`` (the Trainer writes it last) parses, the model weights are there in
one of the forms the Trainer saves (each safetensors file as long as its header says, each shard of an index
present) and hold no NaN or infinity (a file of the right size may: DeepSpeed's own weight folders are not read),
every torch pickle in it (optimizer, scheduler, RNG state) is an intact zip archive, and ``es_settings.json``, when
present, parses. ``es_settings.json`` is written after the Trainer's own files, so a
folder without it is either older than this module or was interrupted after its Trainer state: both resume with a
warning.
"""

import dataclasses
import enum
import json
import logging
import os
import re
import zipfile

import torch

from . import config_fields


logger = logging.getLogger(__name__)

ES_SETTINGS_NAME = "es_settings.json"
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_FORMAT = 1

# Settings that define the ES trajectory (config_fields.FIELD_ROLES): what noise step t draws, how rewards become
# update weights, which optimizer applies the update. Knobs that change memory or logging but not the trajectory under
# greedy decoding are left out so that a resume on smaller hardware stays possible.
TRAJECTORY_FIELDS = config_fields.TRAJECTORY_FIELDS

# Model weights in the forms Trainer.save_model writes (full model, sharded, PEFT adapter).
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# ---------------------------------------------------------------------------------------------- completeness


def _safetensors_problem(path: str) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header with each tensor's byte range, then the data."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            if size < 8 or 8 + header_size > size:
                return f"{os.path.basename(path)} is truncated ({size} bytes, header alone needs {8 + header_size})"
            header = json.loads(file.read(header_size))
    except (OSError, ValueError) as error:
        return f"{os.path.basename(path)} has an unreadable header ({error})"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_size + end > size:
        return f"{os.path.basename(path)} is truncated ({size} of {8 + header_size + end} bytes)"
    return None


def _torch_file_problem(path: str) -> str | None:
    # torch.save writes a zip archive whose central directory comes last: a file cut short has none.
    if not zipfile.is_zipfile(path):
        return f"{os.path.basename(path)} is truncated or not a torch.save archive"
    return None


def _nonfinite_problem(path: str) -> str | None:
    """Which tensors of a weights file hold NaN or infinity: a file of the right size can still hold them (a run that
    diverged before it saved, a bit flip), and resuming from it fails later under a misleading name. Reads one tensor
    at a time (memory-mapped); a file that cannot be read is left to the checks and the load that report it."""
    bad = []
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as file:
                for key in file.keys():
                    tensor = file.get_tensor(key)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        bad.append(key)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            bad = [
                key
                for key, tensor in state.items()
                if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()
            ]
    except Exception as error:
        logger.debug("Weights of %s not checked for NaN: %s", path, error)
        return None
    if bad:
        return f"{os.path.basename(path)} holds NaN or infinite values (in {bad[:5]}{' ...' if len(bad) > 5 else ''})"
    return None


def _weights_file_problem(path: str) -> str | None:
    problem = _safetensors_problem(path) if path.endswith(".safetensors") else None
    return problem or _nonfinite_problem(path)


def _weights_problems(folder: str) -> list[str]:
    found = False
    problems = []
    for name in _WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            found = True
            problem = _weights_file_problem(path)
            problems += [problem] if problem else []
    for name in _WEIGHT_INDEXES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        found = True
        try:
            with open(path) as file:
                shards = sorted(set(json.load(file)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            problems.append(f"{name} is unreadable ({error})")
            continue
        for shard in shards:
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                problems.append(f"shard {shard} listed in {name} is missing")
            elif problem := _weights_file_problem(shard_path):
                problems.append(problem)
    latest = os.path.join(folder, "latest")  # DeepSpeed writes its own weights and optimizer under global_step*/
    if os.path.isfile(latest):
        with open(latest) as file:
            tag = file.read().strip()
        tag_dir = os.path.join(folder, tag)
        if os.path.isdir(tag_dir) and os.listdir(tag_dir):
            found = True
        else:
            problems.append(f"DeepSpeed folder {tag!r} named by 'latest' is missing or empty")
    if not found:
        problems.append(f"no model weights ({', '.join(_WEIGHT_FILES + _WEIGHT_INDEXES)}, or a DeepSpeed folder)")
    return problems


def checkpoint_problems(folder: str) -> list[str]:
    """Why ``folder`` is not a complete checkpoint (an empty list when it is one)."""
    if not os.path.isdir(folder):
        return ["not a folder"]
    problems = []
    state_path = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(state_path):
        problems.append(f"no {TRAINER_STATE_NAME} (the Trainer writes it last, so the save did not finish)")
    else:
        try:
            with open(state_path) as file:
                state = json.load(file)
            if not isinstance(state, dict) or "global_step" not in state:
                problems.append(f"{TRAINER_STATE_NAME} has no global_step")
        except (OSError, ValueError) as error:
            problems.append(f"{TRAINER_STATE_NAME} is unreadable ({error})")
    problems += _weights_problems(folder)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and name.endswith((".pt", ".pth", ".bin")):
            problem = _torch_file_problem(path)
            problems += [problem] if problem else []
    settings_path = os.path.join(folder, ES_SETTINGS_NAME)
    if os.path.isfile(settings_path):
        try:
            with open(settings_path) as file:
                json.load(file)
        except (OSError, ValueError) as error:
            problems.append(f"{ES_SETTINGS_NAME} is unreadable ({error})")
    return problems


def _checkpoints_newest_first(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete ``checkpoint-N`` folder of ``output_dir`` (None if there is none).

    Newer folders that are incomplete (a run killed mid-save) or damaged (weights holding NaN) are skipped with a
    warning that names each one and what is wrong with it.
    """
    for folder in _checkpoints_newest_first(output_dir):
        problems = checkpoint_problems(folder)
        if not problems:
            return folder
        logger.warning("Skipping incomplete or damaged checkpoint %s: %s.", folder, "; ".join(problems))
    return None


# ---------------------------------------------------------------------------------------------- ES settings


def _jsonable(value):
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def es_settings(args, perturbation: str | None = None) -> dict:
    """The trajectory-defining settings of ``args`` (an ``ESConfig``); ``perturbation`` is the space actually built
    (``ESTrainer.perturbation_name``), which resolves ``'auto'``."""
    settings = {name: _jsonable(getattr(args, name)) for name in TRAJECTORY_FIELDS if hasattr(args, name)}
    if perturbation is not None:
        settings["perturbation"] = perturbation
    return settings


def save_es_settings(folder: str, args, perturbation: str | None = None) -> str:
    """Write ``es_settings.json`` into the checkpoint ``folder``; returns its path.

    Written to a temporary file and renamed, so a kill mid-write leaves no half file to misread.
    """
    from . import __version__

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ES_SETTINGS_NAME)
    payload = {"format": _FORMAT, "trl_es_version": __version__, "settings": es_settings(args, perturbation)}
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as file:
        json.dump(payload, file, indent=2, sort_keys=True)
        file.write("\n")
    os.replace(temporary, path)
    return path


def _read_es_settings(folder: str) -> dict | None:
    path = os.path.join(folder, ES_SETTINGS_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as file:
            payload = json.load(file)
        return dict(payload["settings"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"Checkpoint {folder}: {ES_SETTINGS_NAME} is unreadable ({error}).") from error


def check_es_settings(folder: str, args, perturbation: str | None = None, ignore=()) -> None:
    """Refuse to resume from ``folder`` with ES settings that differ from the ones it was trained with.

    Raises ``ValueError`` naming every differing field with the checkpoint's value and the current one. Fields in
    ``ignore`` are not compared. A checkpoint without ``es_settings.json`` (saved before this check existed) resumes
    with a warning. ``perturbation='auto'`` on either side without the resolved space matches any space.
    """
    saved = _read_es_settings(folder)
    if saved is None:
        logger.warning(
            "Checkpoint %s has no %s (saved by an older trl_es, or interrupted after the Trainer's files), so it "
            "cannot be checked that population_size, sigma, seed and the other ES settings match the run being "
            "resumed; make sure they do.",
            folder,
            ES_SETTINGS_NAME,
        )
        return
    current = es_settings(args, perturbation)
    mismatched = []
    for name in TRAJECTORY_FIELDS:
        if name in ignore or name not in saved or name not in current:
            continue
        old, new = saved[name], current[name]
        if name == "perturbation" and "auto" in (old, new):
            continue
        if old != new:
            mismatched.append(f"{name}: checkpoint {old!r}, now {new!r}")
    if mismatched:
        raise ValueError(
            f"Cannot resume from {folder}: these ES settings differ from the ones it was trained with, so the resumed "
            f"run would not continue its trajectory: {'; '.join(mismatched)}. Resume with the checkpoint's values, or "
            "start a new run (new output_dir) with the checkpoint folder as the model to continue from its weights."
        )


# ---------------------------------------------------------------------------------------------- optimizer state


def _training_args_defaults(optim: str):
    """A stand-in for TrainingArguments with every field at its default and ``optim`` set (to build the optimizer)."""
    import types

    from transformers import TrainingArguments
    from transformers.training_args import OptimizerNames

    values = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    values["optim"] = OptimizerNames(optim)
    return types.SimpleNamespace(**values)


def _optimizer_for(optimizer, groups: list[int]):
    """A fresh optimizer of the configured kind over dummy parameters, ``groups[i]`` of them in group ``i``."""
    from transformers import Trainer

    args = optimizer if hasattr(optimizer, "optim") else _training_args_defaults(str(optimizer))
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if "params" in kwargs:  # optimizers that need the model (GaLore, APOLLO, LOMO) cannot be probed
        return None
    params = [{"params": [torch.nn.Parameter(torch.zeros(1)) for _ in range(size)]} for size in groups]
    return optimizer_cls(params, **kwargs)


def _optimizer_label(optimizer) -> str:
    if hasattr(optimizer, "optim"):
        optimizer = optimizer.optim
    return repr(_jsonable(optimizer))


def check_optimizer_state(folder: str, optimizer) -> None:
    """Refuse to resume when ``folder``'s saved optimizer state does not fit the configured optimizer.

    ``optimizer`` is the training arguments (their ``optim``, ``optim_args``, betas...) or an ``optim`` name such as
    ``"sgd"``. The check loads the saved parameter groups (``torch.load(weights_only=True)``, memory-mapped: no pickle
    code runs, the state tensors are not read) into a fresh optimizer of the configured kind over dummy parameters and
    takes one step, as the resumed run would; a missing hyperparameter (``KeyError``) becomes a ``ValueError`` naming
    the checkpoint, the configured optimizer and what the saved one had. Checkpoints without ``optimizer.pt``
    (DeepSpeed, ``save_only_model``) and optimizers that need the model to be built are not checked.
    """
    path = os.path.join(folder, OPTIMIZER_NAME)
    if not os.path.isfile(path):
        if not os.path.isfile(os.path.join(folder, "latest")):
            logger.warning("Checkpoint %s has no %s: the optimizer restarts from scratch.", folder, OPTIMIZER_NAME)
        return
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # checkpoint_problems reports damaged files; the resume itself reports the rest
        logger.debug("Optimizer state of %s not checked: %s cannot be read (%s).", folder, OPTIMIZER_NAME, error)
        return
    saved_groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not saved_groups:
        return
    try:
        probe = _optimizer_for(optimizer, [len(group["params"]) for group in saved_groups])
    except Exception as error:  # an optimizer this machine cannot build (bitsandbytes missing...): not ours to judge
        logger.debug("Optimizer state of %s not checked: cannot build the optimizer (%s).", folder, error)
        return
    if probe is None:
        return
    expected = set(probe.defaults)
    # The saved param groups without their state: replays exactly the first resumed step, minus the tensors.
    probe.load_state_dict({"state": {}, "param_groups": saved_groups})
    for group in probe.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    try:
        probe.step()
    except KeyError as error:
        have = {key for key in saved_groups[0] if key not in ("params", "initial_lr")}
        raise ValueError(
            f"Cannot resume from {folder}: its {OPTIMIZER_NAME} was saved by a different optimizer than "
            f"optim={_optimizer_label(optimizer)} ({type(probe).__name__}), which needs the hyperparameter "
            f"{error.args[0]!r}. The saved parameter groups have {sorted(have - expected)} that "
            f"{type(probe).__name__} does not use and lack {sorted(expected - have)}. Resume with the optim the "
            "checkpoint was trained with, or start a new run (new output_dir) with the checkpoint folder as the model."
        ) from None
    except Exception as error:  # anything else is not a mismatch we can name; the real resume will report it
        logger.debug("Optimizer probe step for %s raised %s: %s", folder, type(error).__name__, error)


# ---------------------------------------------------------------------------------------------- resume


ES_STATE_NAME = "es_state.pt"  # a checkpoint's search state beyond the weights, when there is any


def save_search_state(folder: str, parts: dict) -> None:
    """Save ``{"strategy", "space", "reference", "anchor"}``'s ``state_dict()``s (``anchor``: None without
    anchor_decay) to ``folder/es_state.pt``, when any of them holds something."""
    state = {name: part.state_dict() for name, part in parts.items() if part is not None}
    if any(state.values()):
        torch.save(state, os.path.join(folder, ES_STATE_NAME))


def load_search_state(folder: str, parts: dict, args, perturbation: str) -> None:
    """Load what :func:`save_search_state` wrote into ``parts``; raises, naming what is missing, when the run needs
    state the checkpoint does not hold."""
    path = os.path.join(folder, ES_STATE_NAME)
    anchor = parts.get("anchor")
    if os.path.isfile(path):
        state = torch.load(path, weights_only=True)
        for name in ("space", "strategy", "reference"):
            parts[name].load_state_dict(state.get(name, {}))
        if anchor is not None:
            if "anchor" not in state:
                raise ValueError(
                    f"{folder} holds no anchor (the initial weights anchor_decay pulls toward): it was trained "
                    "without anchor_decay; resume with anchor_decay=0 or start a new run."
                )
            anchor.load_state_dict(state["anchor"])
    elif anchor is not None:
        raise ValueError(
            f"{folder} has no {ES_STATE_NAME} with the anchor (initial weights) that anchor_decay={args.anchor_decay} "
            "pulls toward: it was trained without anchor_decay."
        )
    elif any(parts[name].state_dict() for name in ("strategy", "space", "reference")):
        raise ValueError(
            f"{folder} has no {ES_STATE_NAME}, but strategy={args.strategy!r} with perturbation={perturbation!r} "
            "needs it to resume (the search state is not in the weights)."
        )


def prepare_resume(resume_from_checkpoint, args, perturbation: str | None = None) -> str | None:
    """The checkpoint folder to resume from, checked: what ``ESTrainer.train`` should hand to ``Trainer.train``.

    ``True`` picks :func:`last_complete_checkpoint` of ``args.output_dir`` (instead of the Trainer's newest folder,
    complete or not); a path must be a complete checkpoint. Then the ES settings and the optimizer state are checked
    against ``args``. ``None``/``False`` mean no resume and return None.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        folder = last_complete_checkpoint(args.output_dir)
        if folder is None:
            found = _checkpoints_newest_first(args.output_dir)
            raise ValueError(
                f"resume_from_checkpoint=True, but output_dir {args.output_dir!r} has no complete checkpoint"
                + (f" (incomplete: {[os.path.basename(f) for f in found]}, see the warnings above)." if found else ".")
            )
    else:
        folder = str(resume_from_checkpoint)
        problems = checkpoint_problems(folder)
        if problems:
            complete = last_complete_checkpoint(os.path.dirname(os.path.abspath(folder)))
            hint = f" The newest complete checkpoint next to it is {complete}." if complete else ""
            raise ValueError(f"Cannot resume from {folder}: {'; '.join(problems)}.{hint}")
    check_es_settings(folder, args, perturbation)
    check_optimizer_state(folder, args)
    return folder
