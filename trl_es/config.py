"""``ESConfig``: a ``GRPOConfig`` plus the fields evolution strategies needs.

Every GRPO field keeps its meaning where it has one for ES (model, data, reward functions, generation, logging,
saving, optimizer and scheduler). ``learning_rate`` is the ES step size handed to the torch optimizer. Fields that
only make sense for a policy-gradient loss are ignored, with one warning if they were set.
"""

import dataclasses
import logging
import math
import numbers
import typing
import warnings
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from .config_fields import (
    ES_TAKES_OVER_WHEN_DEFAULT,
    FINITE_FIELDS,
    GENERATION_REUSE_FIELDS,
    HONOURED_GRPO_FIELDS,
    IGNORED_GRPO_FIELDS,
    NOT_CONVERTED,
    REUSE_REASON,
    STRATEGY_FIELDS,
    VLLM_DTYPES,
    inplace_update_problem,
    strategy_field_problem,
    vllm_dtype_problem,
)
from .core import (
    FITNESS_SHAPINGS,
    LOW_RANK_KERNELS,
    NOISE_GENERATORS,
    RESTORE_MODES,
    STRATEGIES,
    qiu_learning_rate,
)
from .recipe_checks import check_recipe_types, load_yaml_strict, type_problem


__all__ = [
    "ESConfig",
    "FINITE_FIELDS",
    "HONOURED_GRPO_FIELDS",
    "IGNORED_GRPO_FIELDS",
    "check_recipe_types",
    "load_yaml_strict",
]


logger = logging.getLogger(__name__)

PERTURBATIONS = ("auto", "full", "lora", "low_rank", "svd")
_GRPO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}


def derived_learning_rate(sigma: float, population_size: int, fitness_shaping: str, optim) -> float:
    """``learning_rate`` when none is set: Qiu et al.'s step for this sigma (``core.update.qiu_learning_rate``).

    Derived from sigma because the pseudo-gradient divides by sigma, so a fixed default would be the right step for
    one sigma only (1e-4, the default until it was derived, was 58 times Qiu's step at sigma 1e-3 and lowered
    accuracy).
    Every optimizer but plain SGD is taken to normalise per weight (Adam, Adafactor, Lion, RMSprop do).
    """
    optim = getattr(optim, "value", optim)  # TrainingArguments turns the name into an OptimizerNames member
    return qiu_learning_rate(sigma, population_size, fitness_shaping, normalizing_optimizer=optim != "sgd")


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


@dataclass
class ESConfig(GRPOConfig):
    r"""
    Configuration for [`ESTrainer`]: all of [`~trl.GRPOConfig`] plus the evolution-strategies fields below.

    One ES step: take the prompts of one generation batch (``generation_batch_size / num_generations`` distinct
    prompts, as in GRPO), let each of ``population_size`` seeded perturbations ``theta + sigma * eps_i`` of the
    weights complete every prompt, score the completions with the reward functions, shape the members' mean rewards
    into fitness, and hand the pseudo-gradient ``-(1 / (N sigma)) sum_i f_i eps_i`` to the configured torch optimizer
    (so ``learning_rate``, ``optim``, ``weight_decay`` and ``lr_scheduler_type`` apply as usual).

    Defaults that differ from GRPOConfig: ``learning_rate`` (derived from ``sigma``: Qiu et al.'s step),
    ``optim="sgd"``, ``max_grad_norm=0.0`` (a clipped ES step is a different algorithm), ``temperature=0.0`` (greedy,
    the published ES setting), ``num_generations=2`` and ``per_device_train_batch_size=64`` (32 distinct prompts per
    step), ``logging_steps=1``, ``gradient_checkpointing=False`` (there is no backward pass).

    Fields that keep GRPO's default but change meaning: ``router_aux_loss_coef`` (Mixture-of-Experts models) weighs a
    fitness penalty, each member's router load-balancing loss, instead of a loss term; ``beta`` weighs a fitness
    penalty, each member's KL estimate to the reference policy on its own completions (``trl_es.reference``), instead
    of a loss term, and ``sync_ref_model`` / ``ref_model_sync_steps`` / ``ref_model_mixup_alpha`` move that reference
    as GRPO's do.
    """

    population_size: int = field(
        default=32,
        metadata={"help": "Number of perturbed members N evaluated per ES step (even when `antithetic`)."},
    )
    sigma: float = field(
        default=1e-3,
        metadata={"help": "Standard deviation of the Gaussian weight perturbation (1e-3 in Qiu et al. 2025)."},
    )
    antithetic: bool = field(
        default=True,
        metadata={"help": "Mirrored sampling: members come in pairs (+eps, -eps), which cancels even-order noise."},
    )
    strategy: str = field(
        default="gaussian",
        metadata={
            "help": "Search strategy: 'gaussian' (seeded Gaussian ES: the fitness-weighted sum of the members' noise "
            "is the pseudo-gradient handed to the optimizer; every space) or 'cma' (CMA-ES via the `cmaes` library: "
            "population_size explicit candidates per step, the search mean becomes the weights, the optimizer and "
            "`sigma` are unused; perturbation='svd' only, as in ESSA) or 'ga' (a Deep-GA-style genetic algorithm: "
            "the weights become the best of population_size seeded mutations theta + sigma * eps_i, no optimizer; "
            "see `ga_elite`; perturbation 'full', 'lora' or 'svd').",
            "choices": list(STRATEGIES),
        },
    )
    fitness_shaping: str = field(
        default="centered_rank",
        metadata={
            "help": "How member rewards become update weights: 'centered_rank' (ranks in [-0.5, 0.5], robust to "
            "reward scale and outliers), 'zscore' (Qiu et al.), or 'none' (mean-centered raw reward).",
            "choices": list(FITNESS_SHAPINGS),
        },
    )
    normalize_per_prompt: bool = field(
        default=False,
        metadata={
            "help": "Z-score each prompt's rewards across members before averaging, so every prompt weighs the "
            "same whatever its difficulty."
        },
    )
    prompt_groups: int = field(
        default=1,
        metadata={
            "help": "Many directions on few prompts each (EGGROLL): split the step's distinct prompts into this many "
            "equal groups and the population (antithetic pairs kept together) into as many equal member groups; "
            "member group g completes only prompt group g. Rollouts per step = population_size x distinct prompts / "
            "prompt_groups, so a population G times larger costs what 1 group did. 1 (default): every member "
            "completes every prompt. Both population_size (in pairs when antithetic) and the distinct prompts per "
            "step must divide by it. Combine with normalize_per_prompt, which then normalises each prompt's rewards "
            "across the members that saw it (within its group, as EGGROLL does)."
        },
    )
    perturbation: str = field(
        default="auto",
        metadata={
            "help": "Which weights are evolved: 'full' (every trainable tensor, perturbed in place, one member per "
            "generate call), 'lora' (only the PEFT adapter weights; needs a PeftModel or `peft_config`), "
            "'low_rank' (rank-r perturbations of the Linear layers, every member in one batched generate call; "
            "EGGROLL-style), 'svd' (ESSA: only the top `svd_fraction` singular values of each LoRA factor, or without "
            "PEFT of each targeted Linear weight, with frozen singular vectors; a search of hundreds of numbers, made "
            "for strategy='cma'), or 'auto' ('lora' for PEFT models, else 'full').",
            "choices": list(PERTURBATIONS),
        },
    )
    svd_fraction: float = field(
        default=0.5,
        metadata={
            "help": "'svd' only: fraction of each matrix's singular values that is evolved (the largest; at least one "
            "per matrix). ESSA finds >= 0.4 enough; 0.5 evolves 2 of a rank-4 LoRA factor's 4."
        },
    )
    cma_sigma0: float = field(
        default=0.1,
        metadata={
            "help": "'cma' only: initial CMA-ES step size, in the units of the evolved values (singular values; the "
            "shipped arithmetic adapter's span 0.09-0.85). CMA-ES adapts it."
        },
    )
    cma_diagonal: bool = field(
        default=False,
        metadata={
            "help": "'cma' only: separable CMA-ES (diagonal covariance, O(d) memory and time) instead of full "
            "covariance; needed above cma_max_full_dim."
        },
    )
    cma_max_full_dim: int = field(
        default=1000,
        metadata={
            "help": "'cma' only: the largest search dimension for full-covariance CMA-ES (O(d^2) memory, O(d^3) per "
            "step; d=1000 at population 32 costs ~1.4 s and 0.6 GB a step on 2 CPU cores)."
        },
    )
    ga_elite: bool = field(
        default=True,
        metadata={
            "help": "'ga' only: elitism. Member 0 is the unperturbed parent, scored on the same prompts as its "
            "population_size - 1 mutated children, and it stays unless a child beats it (so under greedy decoding "
            "on fixed prompts the parent's reward never drops). False: every member is a child and the best one "
            "always replaces the parent."
        },
    )
    ga_min_improvement: float = field(
        default=0.0,
        metadata={
            "help": "'ga' with ga_elite only: a child replaces the parent only if its fitness (mean reward, minus "
            "beta x KL) exceeds the parent's by more than this; >= 0. A margin keeps the parent when a child wins "
            "by the noise of a small prompt batch."
        },
    )
    perturbation_rank: int = field(
        default=1,
        metadata={
            "help": "Rank r of each member's perturbation A B^T / sqrt(r) of a weight matrix ('low_rank' only)."
        },
    )
    perturbation_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "'low_rank' only: names (or name suffixes) of the nn.Linear layers to evolve, e.g. "
            "['q_proj', 'v_proj']. Default: every Linear layer except the output head (lm_head). Embeddings, norms "
            "and biases are not evolved in this space."
        },
    )
    population_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "'low_rank' only (ignored, with a warning, elsewhere): how many members share one batched "
            "generate call (default: the whole population). Lower it when N x prompts rows do not fit in memory. "
            "Under greedy decoding it changes nothing but memory; under sampled decoding the members of one call "
            "draw from one random stream, so a different value gives different (equally valid) samples."
        },
    )
    low_rank_kernel: str = field(
        default="auto",
        metadata={
            "help": "'low_rank' only: how fp32 layers on the CPU add the members' terms. 'auto' compiles a small C "
            "kernel with the system compiler on first use (under a second) and falls back to torch ops if that "
            "fails; 'compiled' raises instead of falling back; 'torch' never compiles. Equal up to float rounding; "
            "GPUs and other dtypes always use torch ops.",
            "choices": list(LOW_RANK_KERNELS),
        },
    )
    noise_generator: str = field(
        default="torch",
        metadata={
            "help": "Where the perturbation noise comes from: 'torch' (a seeded torch.Generator per noise chunk; "
            "serial on the CPU) or 'philox' (counter-based Philox4x32-10: the same numbers on every device and in "
            "any chunking, and on the CPU computed on every core by a small C kernel compiled on first use, fused "
            "with the weight edit; torch ops where it cannot build). Different noise, equally valid: a run keeps "
            "the one it started with.",
            "choices": list(NOISE_GENERATORS),
        },
    )
    perturbation_restore: str = field(
        default="copy",
        metadata={
            "help": "How weights are restored after a member is evaluated: 'copy' (bit-exact, holds one copy of "
            "the evolved weights) or 'subtract' (regenerates and subtracts the noise; no copy, ~1e-7 drift).",
            "choices": list(RESTORE_MODES),
        },
    )
    sigma_decay: float = field(
        default=1.0,
        metadata={
            "help": "Sigma schedule: the perturbation scale of step t is sigma * sigma_decay**t (1.0: constant; e.g. "
            "0.99 halves it in ~69 steps). Set from the step number when the members are drawn, so a resumed run "
            "continues the schedule exactly. In (0, 1]; strategy='gaussian' and 'ga' (its mutation scale); CMA-ES "
            "adapts its own step size."
        },
    )
    anchor_decay: float = field(
        default=0.0,
        metadata={
            "help": "Drift control: add anchor_decay * (theta - theta_0) to the ES pseudo-gradient, pulling the "
            "evolved tensors toward their values at the start of training (an L2 penalty centred on the initial "
            "weights, not on zero as weight_decay is). Costs one copy of the evolved tensors for the whole run, also "
            "saved in checkpoints (es_state.pt). 0 (default) = off. strategy='gaussian' only; not under DeepSpeed "
            "ZeRO-3."
        },
    )
    log_frac_changed_completions: bool = field(
        default=False,
        metadata={
            "help": "Log es/frac_changed_completions: the fraction of the members' greedy completions that differ "
            "from the unperturbed model's on the same prompts, a direct reading of how far sigma moves the policy "
            "(~0: the perturbations change nothing, no signal; ~1: every answer changes). Costs one extra "
            "generation of the step's prompts by the unperturbed model per step (counted as rollouts by the "
            "compare harness). Greedy decoding (temperature 0) only."
        },
    )
    log_update_norm: bool = field(
        default=True,
        metadata={
            "help": "Log the norm of the actual optimizer update (`es/update_norm`, `es/update_to_weight_ratio`). "
            "Holds a copy of the evolved weights during the optimizer step."
        },
    )
    inplace_update: bool | None = field(
        default=None,
        metadata={
            "help": "Apply the ES update straight from the seeds, tensor by tensor (one noise chunk of temporaries "
            "at a time), instead of writing the pseudo-gradient to p.grad for the optimizer: saves one fp32 copy of "
            "the evolved weights. Possible only where the optimizer's step is a function of the gradient alone: "
            "plain torch SGD (momentum 0, any lr schedule, its L2 weight decay) with max_grad_norm=0, the "
            "'full', 'lora' or 'low_rank' space, strategy='gaussian' and anchor_decay=0; the weights are "
            "bit-identical to the p.grad "
            "path on CPU. None (auto): on exactly when possible; True: fail naming what prevents it; False: always "
            "p.grad. The optimizer still steps (it finds no gradient) and the LR schedule advances as usual; "
            "`grad_norm` is then logged from the update itself."
        },
    )
    seed_log: bool = field(
        default=True,
        metadata={
            "help": "Write `es_seed_log.jsonl` to output_dir (and its prefix into each checkpoint): per step the "
            "learning rate and the per-direction update coefficients, ~120 bytes at population 32. "
            "`trl-es replay` rebuilds the trained weights from it and the base model."
        },
    )
    vllm_dtype: str | None = field(
        default=None,
        metadata={
            "help": "use_vllm with vllm_mode='colocate': the dtype the engine generates in. None: the model's own, "
            "so each member scored is exactly the member the update is computed for. 'bfloat16' or 'float16' below "
            "an fp32 model: a faster engine that scores each member rounded once to that dtype (formed from the "
            "trainer's weights and noise), while the weights and the update stay fp32. A server's dtype is its own "
            "(`trl vllm-serve --dtype`).",
            "choices": list(VLLM_DTYPES),
        },
    )

    # GRPOConfig fields whose defaults ES changes.
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "ES step size: the learning rate of the torch optimizer fed with the ES pseudo-gradient. Default "
            "(None): the step of Qiu et al. (2025), alpha = sigma / 2 on z-scored rewards, for this sigma, shaping, "
            "population and optimizer: sigma^2 / (2 * std of the shaped fitness) for optim='sgd' (1.73 sigma^2 with "
            "centered ranks: 1.7e-6 at sigma 1e-3), sigma / (2 * sqrt(population_size)) for optimizers that "
            "normalise per weight (every other optim). Set it to tune the step."
        },
    )
    optim: str = field(
        default="sgd",
        metadata={"help": "Torch optimizer applied to the ES pseudo-gradient (plain SGD is the classic ES update)."},
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={
            "help": "Clip the ES pseudo-gradient to this norm; 0 disables clipping (the default: the ES step size "
            "is already set by `learning_rate` and the fitness shaping)."
        },
    )
    temperature: float = field(
        default=0.0,
        metadata={"help": "Sampling temperature; 0 means greedy decoding (the published ES setting)."},
    )
    num_generations: int = field(
        default=2,
        metadata={
            "help": "Completions per prompt and member (GRPO's grouping). With greedy decoding the repeats are "
            "identical, so each prompt is generated once per member."
        },
    )
    per_device_train_batch_size: int = field(
        default=64,
        metadata={
            "help": "Rows per device per step; distinct prompts per step = generation_batch_size / num_generations."
        },
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every X ES steps."})
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Turn dropout off in the policy (GRPOTrainer does it when True). On by default under ES: dropout "
            "would add noise to the comparison of the members."
        },
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Mixture-of-Experts models: weight of the router load-balancing loss. ES has no loss to add it "
            "to, so each member's balance loss (measured by one no-grad forward over its prompts and completions, "
            "under its perturbation, and logged as `aux_loss`) times this weight is subtracted from its fitness: a "
            "member that routes tokens less evenly is less fit. Not set: the model config's value; 0.0 turns the "
            "term and its forward off. Fails with a model that is not MoE, as in GRPO."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass. ES has no backward pass, so it is off."},
    )

    def __post_init__(self):
        self._check_es_field_types()
        self._check_es_fields()
        if self.learning_rate is None:
            self.learning_rate = derived_learning_rate(
                self.sigma, self.population_size, self.fitness_shaping, self.optim
            )
        if self.fp16 and (self.use_cpu or not _has_accelerator()):
            # accelerate runs fp16 mixed precision only on a GPU-like device; on CPU it quietly keeps fp32 (no
            # autocast, no grad scaler), so the flag would only mislead whoever reads the recipe.
            warnings.warn(
                "fp16=True has no effect on CPU: accelerate applies fp16 mixed precision only on a GPU, so this run "
                "trains in fp32. Set fp16=False.",
                UserWarning,
                stacklevel=3,
            )
        if self.bf16 is None and not torch.cuda.is_available():
            # GRPOConfig turns bf16 on by default, which fails on a CPU-only machine; ES runs in fp32 there.
            self.bf16 = False
        ignored = [
            f"{name}={getattr(self, name)!r}: {reason}"
            for name, reason in IGNORED_GRPO_FIELDS.items()
            if name not in GENERATION_REUSE_FIELDS and getattr(self, name) != _GRPO_DEFAULTS[name]
        ]
        # `beta` and `sync_ref_model` keep their values: ESTrainer honours them with its own reference
        # (trl_es.reference) and hides them from GRPOTrainer while it is built, so GRPO loads no second model.
        # `num_iterations` is kept: GRPO's sampler then hands the same generation batch to that many consecutive ES
        # steps (fresh members each step), so the step count, epochs and LR schedule match a GRPO run with the same
        # settings.
        self.use_liger_kernel = False
        super().__post_init__()
        ignored += self._one_generation_batch_per_step()
        if ignored:
            reasons = "; ".join(ignored)
            warnings.warn(f"ESTrainer ignores these GRPOConfig fields: {reasons}.", UserWarning, stacklevel=3)
        if self.max_grad_norm and self.max_grad_norm > 0:
            logger.warning(
                "max_grad_norm=%s clips the ES pseudo-gradient; set max_grad_norm=0 for the plain ES update.",
                self.max_grad_norm,
            )

    def _one_generation_batch_per_step(self) -> list[str]:
        """``steps_per_generation`` (and ``generation_batch_size`` with it) set to ``gradient_accumulation_steps``
        (``GENERATION_REUSE_FIELDS``); returns the ignored-fields entry naming the values given, if they differed."""
        spg, batch = self.steps_per_generation, self.generation_batch_size
        if spg == self.gradient_accumulation_steps:
            return []
        self.steps_per_generation = self.gradient_accumulation_steps
        self.generation_batch_size = batch // spg * self.steps_per_generation
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"steps_per_generation={spg} is ignored (ES reuses no generation), so an ES step takes "
                f"{self.generation_batch_size} rows (per_device_train_batch_size x processes x "
                f"gradient_accumulation_steps): not whole prompts of num_generations={self.num_generations}."
            )
        return [f"steps_per_generation={spg!r} (generation_batch_size={batch!r}): {REUSE_REASON}"]

    def _check_es_field_types(self):
        """Every field ESConfig declares holds a value of its annotated type, named if not.

        A recipe value reaches the config untyped (``population_size: 4.0`` from YAML, or a list), and would
        otherwise fail far away as a bare TypeError in ``range`` or a torch call.
        """
        hints = typing.get_type_hints(ESConfig)
        for name in ESConfig.__dict__.get("__annotations__", {}):
            value = getattr(self, name)
            problem = type_problem(value, hints[name])
            if problem is not None:
                raise ValueError(f"ESConfig.{name}: {problem}, got {type(value).__name__} {value!r}.")
        for name in FINITE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"ESConfig.{name} must be a number, got {type(value).__name__} {value!r}.")
            if not math.isfinite(value):
                raise ValueError(f"ESConfig.{name} must be finite, got {value}.")

    def _check_es_fields(self):
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}.")
        if self.learning_rate is not None and self.learning_rate < 0:
            raise ValueError(
                f"learning_rate must be >= 0, got {self.learning_rate}: a negative ES step size moves the weights "
                "towards lower reward."
            )
        if self.population_size < 2:
            raise ValueError(f"population_size must be >= 2, got {self.population_size}.")
        if self.antithetic and self.strategy != "cma" and self.population_size % 2:
            raise ValueError(
                f"population_size={self.population_size} is odd, but antithetic=True pairs members as (+eps, -eps); "
                "use an even population_size or antithetic=False."
            )
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}.")
        if self.fitness_shaping not in FITNESS_SHAPINGS:
            raise ValueError(
                f"fitness_shaping={self.fitness_shaping!r} is unknown; choose one of {list(FITNESS_SHAPINGS)}."
            )
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation={self.perturbation!r} is unknown; choose one of {list(PERTURBATIONS)}.")
        if self.perturbation_rank < 1:
            raise ValueError(f"perturbation_rank must be >= 1, got {self.perturbation_rank}.")
        if self.population_batch_size is not None and not 1 <= self.population_batch_size:
            raise ValueError(f"population_batch_size must be >= 1, got {self.population_batch_size}.")
        if self.low_rank_kernel not in LOW_RANK_KERNELS:
            raise ValueError(f"low_rank_kernel must be one of {list(LOW_RANK_KERNELS)}, got {self.low_rank_kernel!r}.")
        if self.noise_generator not in NOISE_GENERATORS:
            raise ValueError(f"noise_generator must be one of {list(NOISE_GENERATORS)}, got {self.noise_generator!r}.")
        if self.perturbation_restore not in RESTORE_MODES:
            raise ValueError(
                f"perturbation_restore must be one of {list(RESTORE_MODES)}, got {self.perturbation_restore!r}."
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; choose one of {list(STRATEGIES)}.")
        if self.strategy == "cma" and self.perturbation != "svd":
            raise ValueError(
                f"strategy='cma' needs perturbation='svd' (a search of hundreds of numbers), got "
                f"perturbation={self.perturbation!r}; use strategy='gaussian' for the other spaces."
            )
        if self.strategy == "ga" and self.perturbation == "low_rank":
            raise ValueError(
                "strategy='ga' scores the unperturbed parent next to its children and sets the weights to the winner; "
                "perturbation='low_rank' serves every member in one batched forward and has no way to make one "
                "member's low-rank term the weights. Use perturbation 'full', 'lora' or 'svd'."
            )
        if self.ga_min_improvement < 0:
            raise ValueError(f"ga_min_improvement must be >= 0, got {self.ga_min_improvement}.")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0 (the weight of the KL penalty on the fitness), got {self.beta}.")
        if self.sync_ref_model and self.beta == 0:
            # A warning, not an error: a GRPOConfig takes this combination, and the run is well defined (no reference).
            warnings.warn(
                "sync_ref_model=True with beta=0.0: the reference is used only for the KL penalty, which beta=0 turns "
                "off, so there is nothing to synchronize; training runs without a reference. Set beta > 0 for a "
                "synced KL penalty, or sync_ref_model=False to silence this.",
                UserWarning,
                stacklevel=4,
            )
        if (
            not isinstance(self.ref_model_sync_steps, numbers.Integral)
            or isinstance(self.ref_model_sync_steps, bool)
            or self.ref_model_sync_steps < 1
        ):
            raise ValueError(f"ref_model_sync_steps must be an integer >= 1, got {self.ref_model_sync_steps!r}.")
        if not 0 <= self.ref_model_mixup_alpha <= 1:
            raise ValueError(
                f"ref_model_mixup_alpha must be in [0, 1] (reference <- alpha * policy + (1 - alpha) * reference), "
                f"got {self.ref_model_mixup_alpha}."
            )
        if not 0 < self.svd_fraction <= 1:
            raise ValueError(f"svd_fraction must be in (0, 1], got {self.svd_fraction}.")
        if not 0 < self.cma_sigma0 < float("inf"):
            raise ValueError(f"cma_sigma0 must be finite and > 0, got {self.cma_sigma0}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        problem = vllm_dtype_problem(self) or (inplace_update_problem(self) if self.inplace_update else None)
        if problem:  # what a config alone can tell; the optimizer actually built is checked when training starts
            raise ValueError(problem)
        self._check_drift_and_group_fields()

    def _check_drift_and_group_fields(self):
        if self.prompt_groups < 1:
            raise ValueError(f"prompt_groups must be >= 1, got {self.prompt_groups}.")
        per_group, remainder = divmod(self.population_size, self.prompt_groups)
        if remainder:
            raise ValueError(
                f"population_size={self.population_size} does not split into prompt_groups={self.prompt_groups} equal "
                "member groups; choose a population_size divisible by prompt_groups."
            )
        if self.antithetic and self.strategy != "cma" and per_group % 2:
            raise ValueError(
                f"population_size={self.population_size} / prompt_groups={self.prompt_groups} = {per_group} members "
                "per group is odd, but antithetic pairs (+eps, -eps) must be evaluated on the same prompts; choose "
                "population_size divisible by 2 x prompt_groups."
            )
        if not 0 < self.sigma_decay <= 1:
            raise ValueError(f"sigma_decay must be in (0, 1] (1 = constant sigma), got {self.sigma_decay}.")
        if not 0 <= self.anchor_decay < float("inf"):
            raise ValueError(f"anchor_decay must be finite and >= 0 (0 = off), got {self.anchor_decay}.")
        # Fields only some strategies read (config_fields.FIELD_ROLES): set for another, they would do nothing.
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in STRATEGY_FIELDS:
            problem = strategy_field_problem(name, getattr(self, name), defaults[name], self.strategy)
            if problem:
                raise ValueError(problem)
        if self.log_frac_changed_completions and self.temperature != 0:
            raise ValueError(
                f"log_frac_changed_completions compares greedy completions, but temperature={self.temperature} "
                "samples (a sampled completion may change by chance alone); set temperature=0 or turn it off."
            )

    @classmethod
    def from_grpo_config(cls, grpo: GRPOConfig) -> "ESConfig":
        """The ``ESConfig`` of a ``GRPOConfig``: every field carried over, ES fields at their defaults.

        The optimisation fields of ``ES_TAKES_OVER_WHEN_DEFAULT`` left at GRPO's defaults take ES's (so the learning
        rate is derived from ``sigma``); a value the user set is kept (clipping is warned about). Data, decoding and
        logging fields keep the script's values, defaults included: the ES run sees the data the GRPO run would.
        """
        es_defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        values = {}
        for f in dataclasses.fields(GRPOConfig):
            if not f.init or f.name in NOT_CONVERTED:  # computed fields; checkpointing (see NOT_CONVERTED)
                continue
            value = getattr(grpo, f.name)
            set_by_user = value != _GRPO_DEFAULTS[f.name]
            # GRPO's own default is passed where ESConfig's differs, so the data stay GRPO's; fields at a default both
            # share are left out (deprecated aliases would warn).
            if set_by_user or (f.name not in ES_TAKES_OVER_WHEN_DEFAULT and es_defaults[f.name] != value):
                values[f.name] = value
        # GRPOConfig.__post_init__ derived generation_batch_size from steps_per_generation; passing both is an error.
        values["generation_batch_size"] = None
        return cls(**values)
