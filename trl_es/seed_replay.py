"""Replay: rebuild a run's trained weights from its base model and its seed log (``trl_es.seed_log``), without
generating anything.

Each record's coefficients (or GA winner) are applied through the space and strategy ``trl_es.search`` builds from the
log's ES settings, and the optimizer the log's header describes steps with the recorded learning rates, so the
weights are bit-identical to the run's on the same device type and torch build.
"""

import dataclasses
import importlib
import inspect
import logging
from types import SimpleNamespace

import torch

from . import trl_compat
from .config import ESConfig
from .core import Anchor, StrategyUpdate, UpdateKind, plain_sgd_problem
from .core.apply import GradientStep, apply_update
from .search import build_search
from .seed_log import (
    ES_SETTINGS,
    SeedLog,
    decode_hyperparameters,
    decode_tensor,
    dtype_from_name,
    dtype_name,
    logged_es_settings,
    read_seed_log,
    weights_hash,
)


logger = logging.getLogger(__name__)

REPLAYABLE_STRATEGIES = ("gaussian", "ga", "cma")
REPLAYABLE_SPACES = ("full", "lora", "low_rank", "svd")
# Chunk size that makes every tensor one chunk: the noise of seed logs written before chunks existed.
WHOLE_TENSOR_NOISE = 2**62


def check_replayable(log: SeedLog) -> None:
    """Raise, naming the setting, if this trl_es cannot rebuild the log's steps bit-exactly."""
    es, optimizer = log.header["es"], log.header["optimizer"]
    if es["strategy"] not in REPLAYABLE_STRATEGIES:
        raise ValueError(
            f"{log.path}: cannot replay strategy {es['strategy']!r}; replay rebuilds the steps of "
            f"{list(REPLAYABLE_STRATEGIES)} (seeded noise times recorded coefficients)."
        )
    if es["perturbation"] not in REPLAYABLE_SPACES:
        raise ValueError(
            f"{log.path}: cannot replay perturbation space {es['perturbation']!r}; replay knows "
            f"{list(REPLAYABLE_SPACES)}."
        )
    if es["perturbation"] != "low_rank" and es["perturbation_restore"] != "copy":
        raise ValueError(
            f"{log.path}: the run restored perturbed weights with "
            f"perturbation_restore={es['perturbation_restore']!r}, "
            "which leaves ~1e-7 of rounding drift per member in the trained weights; replay cannot reproduce it "
            "(train with perturbation_restore='copy' for a replayable run)."
        )
    if not optimizer["class"].startswith("torch.optim."):
        raise ValueError(
            f"{log.path}: cannot replay optimizer {optimizer['class']}; replay imports only torch.optim optimizers."
        )
    for record in log.records:
        if record.coefficients is None and record.fitness is None and not record.skip and not record.selection:
            raise ValueError(
                f"{log.path}: step {record.step} has no coefficients and no fitness (strategy {es['strategy']!r} set "
                "the evolved tensors itself, in a trl_es that did not record it), so it cannot be replayed."
            )


def load_base_model(path: str, log: SeedLog, device: str | torch.device | None = None):
    """The model the run started from: ``path`` loaded as the trainer loads it (dtype from the log), with the
    log's adapter for PEFT runs; raises if its weights hash differs from the log's."""
    header = log.header
    device = torch.device(device or header["model"]["device"])
    model = trl_compat.create_model_from_path(path, dtype=header["model"]["dtype"], device_map=None).to(device)
    peft = header.get("peft")
    if peft:
        from peft import PeftConfig, get_peft_model

        model = get_peft_model(model, PeftConfig.from_peft_type(**peft["config"]))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, entry in peft["initial_adapter"].items():
                if name not in params:
                    raise ValueError(
                        f"{log.path}: adapter tensor {name!r} of the log is not in the adapter built from its peft "
                        f"config on {path}"
                    )
                value = decode_tensor(entry["data"], dtype_from_name(entry["dtype"]), entry["shape"])
                if value.dtype != params[name].dtype or value.shape != params[name].shape:
                    raise ValueError(
                        f"{log.path}: adapter tensor {name!r} is {entry['dtype']} {entry['shape']} in the log but "
                        f"{dtype_name(params[name].dtype)} {list(params[name].shape)} on {path}"
                    )
                params[name].copy_(value)
    found, expected = weights_hash(model.named_parameters()), header["base_weights_hash"]
    if found != expected:
        raise ValueError(
            f"{path} is a different base model than the run of {log.path} started from: its weights hash to "
            f"{found}, the log's base to {expected} ({header['model']['dtype']}, trained from "
            f"{header['model'].get('name_or_path')!r}). Pass the model the run was trained from."
        )
    return model


def build_replay_search(model, log: SeedLog):
    """The run's perturbation space and strategy on ``model``, built by ``trl_es.search`` as the trainer builds
    them."""
    es = log.header["es"]
    # ESConfig's defaults for what the log does not record (a strategy's own settings, e.g. ga_elite): the records
    # say what each step did, so those settings only have to build the strategy. A setting a log written before it
    # existed lacks takes the behaviour of the time (logged_es_settings).
    defaults = {f.name: f.default for f in dataclasses.fields(ESConfig) if f.default is not dataclasses.MISSING}
    settings = SimpleNamespace(**defaults)
    logged = logged_es_settings(log.header)
    vars(settings).update({name: logged[name] for name in ES_SETTINGS}, perturbation=es["perturbation"])
    settings.population_batch_size = None  # how members share a forward; replay runs no forward
    # A log without noise_chunk predates chunked noise: each tensor's noise was one draw, i.e. a single chunk.
    settings.noise_chunk = es.get("noise_chunk", WHOLE_TENSOR_NOISE)
    space, strategy = build_search(model, settings)  # one process, no DeepSpeed: the weights are whole here
    names = [name for name, _ in space.named_tensors()]
    if names != log.header["evolved"]:
        recorded = log.header["evolved"]
        first = next((i for i, (a, b) in enumerate(zip(names, recorded)) if a != b), min(len(names), len(recorded)))
        raise ValueError(
            f"{log.path}: the {es['perturbation']} space on this model evolves {len(names)} tensors, the run "
            f"evolved {len(recorded)}; they differ at position {first} "
            f"({names[first] if first < len(names) else None!r} vs "
            f"{recorded[first] if first < len(recorded) else None!r})"
        )
    return space, strategy


def build_replay_optimizer(space, log: SeedLog) -> tuple[torch.optim.Optimizer, list[int]]:
    """The run's torch optimizer over the space's tensors, and which recorded param group each of its groups is
    (groups that held no evolved tensor are left out: nothing in them ever stepped)."""
    spec = log.header["optimizer"]
    module_name, _, class_name = spec["class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"{log.path}: {spec['class']} is not a torch optimizer in this torch")
    tensors = [tensor for _, tensor in space.named_tensors()]
    groups, recorded = [], []
    for number, group in enumerate(spec["groups"]):
        if group["tensors"]:
            params = [tensors[position] for position in group["tensors"]]
            # lr: a placeholder, every step sets the one it recorded
            groups.append({"params": params, **decode_hyperparameters(group["hyperparameters"]), "lr": 0.0})
            recorded.append(number)
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {key: value for key, value in decode_hyperparameters(spec["defaults"]).items() if key in accepted}
    return cls(groups, **defaults), recorded


def replay_steps(model, log: SeedLog) -> int:
    """Apply the log's steps to ``model`` (the run's base, see :func:`load_base_model`); returns how many."""
    check_replayable(log)
    space, strategy = build_replay_search(model, log)
    optimizer, recorded_groups = build_replay_optimizer(space, log)
    gradient = replay_gradient_step(model, space, optimizer, log)
    device = space.named_tensors()[0][1].device
    for record in log.records:
        if record.state is not None:
            strategy.load_state_dict(record.state)
        strategy.ask(record.step)
        if record.skip:
            continue  # no signal that step: the run made no update
        if record.selection:
            update = StrategyUpdate(UpdateKind.SELECTION, winner=record.winner, sigma=strategy.sigma_at(record.step))
        elif record.fitness is not None:  # CMA-ES: told the same fitness, the search moves as it did in the run
            update = strategy.tell(record.step, record.fitness)
        else:
            update = StrategyUpdate(UpdateKind.GRADIENT, coefficients=record.coefficients.to(device))
            for group, number in zip(optimizer.param_groups, recorded_groups):
                group["lr"] = record.lr[number]
        apply_update(space, record.step, update, gradient)  # as ESTrainer applies its strategy's update
    return len(log.records)


def replay_gradient_step(model, space, optimizer, log: SeedLog) -> GradientStep:
    """How the run stepped its pseudo-gradients: the log's optimizer, clipping and anchor. Plain SGD is applied
    straight from the seeds (no p.grad buffer), bit-identical to the optimizer's step, whichever of the two ways the
    run took (ESConfig.inplace_update)."""
    max_grad_norm = log.header["optimizer"]["max_grad_norm"] or 0.0
    # anchor_decay pulls toward the run's initial tensors: the base model's, before the first replayed step.
    anchor_decay = log.header["es"].get("anchor_decay", 0.0)
    tensors = [tensor for _, tensor in space.named_tensors()]
    anchor = Anchor(tensors, anchor_decay) if anchor_decay else None
    if space.supports_apply_update and not max_grad_norm > 0 and anchor is None:
        if plain_sgd_problem(optimizer, tensors) is None:
            return GradientStep(optimizer, in_place=True)
    clip = list(model.parameters()) if space.tensors_are_model_parameters else None
    return GradientStep(optimizer, anchor=anchor, max_grad_norm=max(max_grad_norm, 0.0), clip_parameters=clip)


def replay(model_path: str, seed_log: str, device: str | torch.device | None = None):
    """``(model, log)``: the base model at ``model_path`` with every complete step of ``seed_log`` applied."""
    log = read_seed_log(seed_log)
    check_replayable(log)
    if log.header.get("versions", {}).get("torch") not in (None, torch.__version__):
        logger.warning(
            "%s was written with torch %s, this is torch %s: replay is bit-exact only on the same torch build.",
            seed_log,
            log.header["versions"]["torch"],
            torch.__version__,
        )
    if device is not None and torch.device(device).type != log.header["model"]["device"]:
        logger.warning(
            "%s was trained on %s; replaying on %s draws other noise (device-specific generators), so the weights "
            "will not match the run's.",
            seed_log,
            log.header["model"]["device"],
            device,
        )
    model = load_base_model(model_path, log, device)
    replay_steps(model, log)
    return model, log


__all__ = ["build_replay_search", "check_replayable", "load_base_model", "replay", "replay_steps"]
