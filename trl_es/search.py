"""From a model and an ``ESConfig`` to the search: which perturbation space, which strategy.

The trainer calls :func:`build_search` once, and so does replay; every choice that depends on the model (PEFT
adapters or not, which Linear layers) or on the launch (processes, DeepSpeed ZeRO-3 shards) is made here, so the
training step never branches on them. The inputs are explicit: the model, the settings and a :class:`Launch`.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model

from .core import NOISE_CHUNK, STRATEGIES, InPlaceSpace, LowRankSpace, MemberNoise, PerturbationSpace, Strategy, philox
from .core.svd import SVDSpace, svd_target_modules
from .integrations.deepspeed import ZeRO3Space, check_zero3_trainer


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """How the run is launched, as far as the search cares (the default: one process, no DeepSpeed)."""

    num_processes: int = 1
    #: the DeepSpeed config when DeepSpeed is enabled (ZeRO-3 shards the weights each process perturbs), else None
    deepspeed_config: dict | None = None
    #: returns the DeepSpeed engine, which exists only once ``train()`` has prepared the model
    deepspeed_engine: Callable[[], Any] | None = None

    @classmethod
    def of_trainer(cls, trainer) -> "Launch":
        if not trainer.is_deepspeed_enabled:
            return cls(num_processes=trainer.accelerator.num_processes)
        return cls(
            num_processes=trainer.accelerator.num_processes,
            deepspeed_config=trainer.accelerator.state.deepspeed_plugin.deepspeed_config,
            deepspeed_engine=lambda: trainer.deepspeed,
        )


def build_search(model, args, launch: Launch = Launch()) -> tuple[PerturbationSpace, Strategy]:
    """The perturbation space and strategy for ``model`` under ``args`` (an ``ESConfig``, or any object with its
    fields: replay passes the settings its seed log recorded)."""
    # CMA-ES draws its own candidates: mirrored pairs are a Gaussian-ES device.
    antithetic = args.antithetic and args.strategy != "cma"
    # The chunk size defines the noise of tensors above it; replay passes the one its seed log recorded.
    noise = MemberNoise(
        args.seed,
        args.population_size,
        antithetic,
        getattr(args, "noise_chunk", NOISE_CHUNK),
        generator=getattr(args, "noise_generator", "torch"),
    )
    space = build_space(model, args, noise, launch)
    if noise.counter_based:
        _warn_if_philox_runs_on_torch_ops(model)
    strategy = STRATEGIES[args.strategy].from_config(space, args)
    return space, strategy


def _warn_if_philox_runs_on_torch_ops(model) -> None:
    """Philox noise off the compiled CPU kernel is the same numbers from ~60 elementwise torch ops per chunk: fine for
    a fallback, slow next to torch's own generator (on a GPU, a native counter-based Philox)."""
    device = next(model.parameters()).device
    built, detail = philox.kernel_status() if device.type == "cpu" else (False, f"the weights are on {device}")
    if not built:
        logger.warning(
            "noise_generator='philox' computes its noise with torch ops here (%s): the same numbers as the compiled "
            "CPU kernel, but slower than noise_generator='torch', which is the better choice on GPUs.",
            detail,
        )


def build_space(model, args, noise: MemberNoise, launch: Launch = Launch()) -> PerturbationSpace:
    requested = args.perturbation
    peft = is_peft_model(model)
    if requested != "low_rank" and args.low_rank_kernel != "auto":
        logger.warning(
            "low_rank_kernel=%r is ignored: only perturbation='low_rank' has a compiled CPU kernel (perturbation=%r).",
            args.low_rank_kernel,
            requested,
        )
    if requested == "full" and peft:
        raise ValueError(
            "perturbation='full' evolves every weight, but the model carries PEFT adapters and only their weights "
            "are trainable. Use perturbation='lora' (or 'auto'), or train without peft_config."
        )
    if requested == "lora" and not peft:
        raise ValueError(
            "perturbation='lora' evolves PEFT adapter weights, but the model has none. Pass a `peft_config` "
            "(or a PeftModel), or use perturbation='full'."
        )
    deepspeed = launch.deepspeed_config is not None
    if deepspeed:
        for warning in check_zero3_trainer(launch.deepspeed_config, requested):
            logger.warning(warning)
        if getattr(args, "anchor_decay", 0.0):
            # The anchor is a copy of the whole evolved tensors on every process; ZeRO-3 exists not to hold them.
            raise ValueError(
                f"anchor_decay={args.anchor_decay} needs a copy of the initial weights, which DeepSpeed ZeRO-3 shards "
                "across processes; anchor_decay is not implemented under ZeRO-3. Set anchor_decay=0, or train with "
                "plain DDP."
            )
    if requested == "svd":
        if deepspeed:
            raise ValueError(
                "perturbation='svd' decomposes whole weight matrices; it does not run under DeepSpeed ZeRO-3 (use "
                "plain DDP: the singular values are small enough to live on every process)."
            )
        # Only the singular values evolve: the optimizer is built over them. The model's parameters keep their
        # requires_grad (DDP insists on some), but no gradient ever reaches them.
        targets = svd_target_modules(model, args.perturbation_target_modules)
        return SVDSpace(targets, noise, args.svd_fraction)
    if requested == "low_rank":
        if peft:
            raise ValueError(
                "perturbation='low_rank' evolves the model's own Linear layers; it does not combine with PEFT "
                "adapters. Drop peft_config, or use perturbation='lora'."
            )
        return LowRankSpace(
            low_rank_targets(model, args.perturbation_target_modules),
            noise,
            rank=args.perturbation_rank,
            # default: one batched generate per process, the population split evenly over processes
            members_per_forward=args.population_batch_size or max(1, noise.population_size // launch.num_processes),
            kernel=args.low_rank_kernel,
        )
    if args.population_batch_size is not None:
        logger.warning(
            "population_batch_size=%d is ignored: only perturbation='low_rank' serves several members per forward; "
            "the %s space evaluates one member at a time.",
            args.population_batch_size,
            "lora" if peft else "full",
        )
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not named:
        raise ValueError("The model has no trainable parameters (requires_grad=True) to evolve.")
    if deepspeed:
        # The engine exists only once train() has prepared the model; the space asks for it when it needs it.
        return ZeRO3Space(named, noise, engine=launch.deepspeed_engine, restore=args.perturbation_restore)
    return InPlaceSpace(named, noise, restore=args.perturbation_restore)


def space_name(space: PerturbationSpace, model) -> str:
    if isinstance(space, LowRankSpace):
        return "low_rank"
    if isinstance(space, SVDSpace):
        return "svd"
    return "lora" if is_peft_model(model) else "full"


def low_rank_targets(model, wanted: list[str] | None) -> list[tuple[str, torch.nn.Linear]]:
    """Linear layers to evolve: the ``wanted`` ones (names or name suffixes), or all but the output head (tied to the
    embeddings in many models, where a low-rank output-side update would silently move the input embeddings too)."""
    head = model.get_output_embeddings()
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not module.weight.requires_grad:
            continue
        if wanted is None:
            if module is not head:
                targets.append((name, module))
        elif any(name == w or name.endswith("." + w) for w in wanted):
            targets.append((name, module))
    if not targets:
        linears = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"perturbation_target_modules={wanted} matches no trainable nn.Linear layer of the model; "
            f"Linear layers: {linears}."
        )
    return targets
