"""``ESConfig``: a ``GRPOConfig`` plus the fields evolution strategies needs.

Every GRPO field keeps its meaning where it has one for ES (model, data, reward functions, generation, logging,
saving, optimizer and scheduler). ``learning_rate`` is the ES step size handed to the torch optimizer. Fields that
only make sense for a policy-gradient loss are ignored, with one warning if they were set.
"""

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from .core import FITNESS_SHAPINGS, RESTORE_MODES, STRATEGIES


logger = logging.getLogger(__name__)

PERTURBATIONS = ("auto", "full", "lora", "low_rank")
# Fields read only by GRPO's policy-gradient loss; ES has no loss to apply them to.
POLICY_GRADIENT_FIELDS = (
    "beta",
    "loss_type",
    "epsilon",
    "epsilon_high",
    "delta",
    "num_iterations",
    "scale_rewards",
    "importance_sampling_level",
    "mask_truncated_completions",
    "top_entropy_quantile",
    "off_policy_mask_threshold",
    "sync_ref_model",
    "use_liger_kernel",
)
_GRPO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}


@dataclass
class ESConfig(GRPOConfig):
    r"""
    Configuration for [`ESTrainer`]: all of [`~trl.GRPOConfig`] plus the evolution-strategies fields below.

    One ES step: take the prompts of one generation batch (``generation_batch_size / num_generations`` distinct
    prompts, as in GRPO), let each of ``population_size`` seeded perturbations ``theta + sigma * eps_i`` of the
    weights complete every prompt, score the completions with the reward functions, shape the members' mean rewards
    into fitness, and hand the pseudo-gradient ``-(1 / (N sigma)) sum_i f_i eps_i`` to the configured torch optimizer
    (so ``learning_rate``, ``optim``, ``weight_decay`` and ``lr_scheduler_type`` apply as usual).

    Defaults that differ from GRPOConfig: ``learning_rate``, ``optim="sgd"``, ``max_grad_norm=0.0`` (a clipped ES
    step is a different algorithm), ``temperature=0.0`` (greedy, the published ES setting), ``num_generations=2``
    and ``per_device_train_batch_size=64`` (32 distinct prompts per step), ``logging_steps=1``,
    ``gradient_checkpointing=False`` (there is no backward pass).
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
            "is the pseudo-gradient handed to the optimizer).",
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
    perturbation: str = field(
        default="auto",
        metadata={
            "help": "Which weights are evolved: 'full' (every trainable tensor, perturbed in place, one member per "
            "generate call), 'lora' (only the PEFT adapter weights; needs a PeftModel or `peft_config`), "
            "'low_rank' (rank-r perturbations of the Linear layers, every member in one batched generate call; "
            "EGGROLL-style), or 'auto' ('lora' for PEFT models, else 'full').",
            "choices": list(PERTURBATIONS),
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
            "help": "'low_rank' only: how many members share one batched generate call (default: the whole "
            "population). Lower it when N x prompts rows do not fit in memory."
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
    log_update_norm: bool = field(
        default=True,
        metadata={
            "help": "Log the norm of the actual optimizer update (`es/update_norm`, `es/update_to_weight_ratio`). "
            "Holds a copy of the evolved weights during the optimizer step."
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

    # GRPOConfig fields whose defaults ES changes.
    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "ES step size: the learning rate of the torch optimizer fed with the ES pseudo-gradient."},
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
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass. ES has no backward pass, so it is off."},
    )

    def __post_init__(self):
        self._check_es_fields()
        if self.bf16 is None and not torch.cuda.is_available():
            # GRPOConfig turns bf16 on by default, which fails on a CPU-only machine; ES runs in fp32 there.
            self.bf16 = False
        ignored = {
            name: getattr(self, name) for name in POLICY_GRADIENT_FIELDS if getattr(self, name) != _GRPO_DEFAULTS[name]
        }
        if ignored:
            warnings.warn(
                f"ES has no policy-gradient loss, so these fields are ignored: {ignored}.", UserWarning, stacklevel=3
            )
        # Reset them to values that make GRPOTrainer build no reference model and reuse no generations.
        self.beta, self.num_iterations, self.sync_ref_model, self.use_liger_kernel = 0.0, 1, False, False
        super().__post_init__()
        if self.max_grad_norm and self.max_grad_norm > 0:
            logger.warning(
                "max_grad_norm=%s clips the ES pseudo-gradient; set max_grad_norm=0 for the plain ES update.",
                self.max_grad_norm,
            )

    def _check_es_fields(self):
        if self.population_size < 2:
            raise ValueError(f"population_size must be >= 2, got {self.population_size}.")
        if self.antithetic and self.population_size % 2:
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
        if self.perturbation_restore not in RESTORE_MODES:
            raise ValueError(
                f"perturbation_restore must be one of {list(RESTORE_MODES)}, got {self.perturbation_restore!r}."
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; choose one of {list(STRATEGIES)}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")

    @classmethod
    def from_grpo_config(cls, grpo: GRPOConfig) -> "ESConfig":
        """Carry every field of a ``GRPOConfig`` over; ES fields take their defaults.

        GRPO's ``max_grad_norm`` default (1.0) is dropped so the ES update is not clipped silently; a value the user
        set explicitly is kept (and warned about).
        """
        # Pass what the user set, plus GRPO's own value wherever ESConfig changed the default, so the run uses
        # the same settings the GRPO script had. Fields left at their defaults are skipped (deprecated aliases
        # would otherwise warn).
        es_defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        values = {}
        for f in dataclasses.fields(GRPOConfig):
            value = getattr(grpo, f.name)
            if f.init and (value != _GRPO_DEFAULTS[f.name] or es_defaults[f.name] != _GRPO_DEFAULTS[f.name]):
                values[f.name] = value
        # GRPOConfig.__post_init__ derived generation_batch_size from steps_per_generation; passing both is an error.
        values["generation_batch_size"] = None
        if values["max_grad_norm"] == _GRPO_DEFAULTS["max_grad_norm"]:
            values["max_grad_norm"] = 0.0
        return cls(**values)
