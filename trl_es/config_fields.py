"""What each config field means to trl_es: one table, from which every list of fields is derived.

Two parts:

* ``FIELD_ROLES``: every field that shapes an ES run, with its roles: part of the **trajectory** (a resumed run must
  match the checkpoint's value: ``checkpoints``), recorded in the **seed log** header (``seed_log``; with the value a
  log written before the field existed stands for, ``seed_replay``), must be **finite**, and read by which
  **strategies** only (a value other than the default under another strategy is refused by name). A new field added to
  ``ESConfig`` gets one row here, and every check that concerns it follows.
* The ``GRPOConfig`` fields: honoured under ES, or ignored with a reason (named in one warning when set);
  ``tests/test_config.py`` enumerates ``GRPOConfig``, so a field a new TRL release adds fails a test until sorted.
"""

from dataclasses import dataclass


_NO_DEFAULT = object()


@dataclass(frozen=True)
class FieldRole:
    trajectory: bool = False
    seed_log: bool = False
    finite: bool = False
    #: the strategies that read the field (None: all of them), and why the others cannot
    strategies: tuple[str, ...] | None = None
    why_only: str = ""
    #: what a seed log written before the field existed stands for (fields added after the log format's first version)
    replay_default: object = _NO_DEFAULT


_SEARCH = FieldRole(trajectory=True, seed_log=True)  # what noise step t draws, how fitness becomes an update
_ANCHOR_WHY = "a pull toward the initial weights added to the Gaussian strategy's pseudo-gradient"

FIELD_ROLES: dict[str, FieldRole] = {
    # which noise step t draws: the seeds, the directions, their scale and where they live
    "seed": _SEARCH,
    "population_size": _SEARCH,
    "antithetic": _SEARCH,
    "sigma": FieldRole(trajectory=True, seed_log=True, finite=True),
    "perturbation": FieldRole(trajectory=True),  # the seed log records it resolved ("auto" -> the space built)
    "perturbation_rank": _SEARCH,
    "perturbation_target_modules": _SEARCH,
    "perturbation_restore": FieldRole(seed_log=True),  # memory, not trajectory: a resume may switch it
    "noise_generator": FieldRole(trajectory=True, seed_log=True, replay_default="torch"),
    "prompt_groups": FieldRole(trajectory=True, seed_log=True, replay_default=1),
    "svd_fraction": FieldRole(trajectory=True, seed_log=True, replay_default=0.5),
    # how rewards become an update, and the update
    "strategy": _SEARCH,
    "fitness_shaping": _SEARCH,
    "normalize_per_prompt": _SEARCH,
    "optim": FieldRole(trajectory=True),  # its state in a checkpoint only fits the same optimizer
    "learning_rate": FieldRole(finite=True),  # not trajectory: the restored scheduler sets it
    "weight_decay": FieldRole(finite=True),
    "max_grad_norm": FieldRole(finite=True),
    "temperature": FieldRole(finite=True),
    "sigma_decay": FieldRole(
        trajectory=True,
        seed_log=True,
        finite=True,
        strategies=("gaussian", "ga"),
        why_only="it schedules the scale of seeded Gaussian noise; CMA-ES adapts its own step size",
        replay_default=1.0,
    ),
    "anchor_decay": FieldRole(
        trajectory=True,
        seed_log=True,
        finite=True,
        strategies=("gaussian",),
        why_only=f"it is {_ANCHOR_WHY}; CMA-ES and GA write no gradient",
        replay_default=0.0,
    ),
    # in the seed log since CMA-ES runs replay (2026-12-06); a log from before holds no replayable cma or svd run
    "cma_sigma0": FieldRole(
        trajectory=True, seed_log=True, replay_default=0.1, strategies=("cma",), why_only="CMA-ES's initial step size"
    ),
    "cma_diagonal": FieldRole(
        trajectory=True, seed_log=True, replay_default=False, strategies=("cma",), why_only="CMA-ES's covariance form"
    ),
    "cma_max_full_dim": FieldRole(
        seed_log=True, replay_default=1000, strategies=("cma",), why_only="CMA-ES's covariance form"
    ),
    "ga_elite": FieldRole(trajectory=True, strategies=("ga",), why_only="GA's parent survival"),
    "ga_min_improvement": FieldRole(trajectory=True, finite=True, strategies=("ga",), why_only="GA's parent survival"),
    # the KL penalty on the fitness and how its reference moves
    "beta": FieldRole(trajectory=True, finite=True),
    "sync_ref_model": FieldRole(trajectory=True),
    "ref_model_sync_steps": FieldRole(trajectory=True),
    "ref_model_mixup_alpha": FieldRole(trajectory=True, finite=True),
    # which members are scored: an engine below the model's precision scores each one rounded
    "vllm_dtype": FieldRole(trajectory=True),
}

# ES fields with none of the roles above: they change speed, memory or logging, never what a run computes (the
# in-place update is bit-identical to the p.grad path on the CPU), so a resume or a replay may change them.
NO_ROLE_FIELDS = (
    "population_batch_size", "low_rank_kernel", "log_frac_changed_completions", "log_update_norm", "inplace_update",
    "seed_log",
)  # fmt: skip

TRAJECTORY_FIELDS = tuple(name for name, role in FIELD_ROLES.items() if role.trajectory)
SEED_LOG_FIELDS = tuple(name for name, role in FIELD_ROLES.items() if role.seed_log)
REPLAY_DEFAULTS = {
    name: role.replay_default for name, role in FIELD_ROLES.items() if role.replay_default is not _NO_DEFAULT
}
FINITE_FIELDS = tuple(name for name, role in FIELD_ROLES.items() if role.finite)
STRATEGY_FIELDS = {name: role for name, role in FIELD_ROLES.items() if role.strategies is not None}


def strategy_field_problem(name: str, value, default, strategy: str) -> str | None:
    """Why ``name=value`` cannot go with ``strategy`` (a field only some strategies read), or None."""
    role = STRATEGY_FIELDS.get(name)
    if role is None or strategy in role.strategies or value == default:
        return None
    readers = " and ".join(repr(s) for s in role.strategies)
    return (
        f"{name}={value} is read by strategy {readers} only ({role.why_only}); strategy={strategy!r} would ignore "
        f"it. Leave {name}={default}, or choose strategy {readers}."
    )


# ---------------------------------------------------------------------------------------------- GRPOConfig's fields

HONOURED_GRPO_FIELDS = (
    # model loading and data, through GRPOTrainer's own __init__ and sampler
    "model_init_kwargs", "trust_remote_code", "cast_lm_head_to_fp32", "disable_dropout", "shuffle_dataset",
    # generation, through GRPO's generation backends (transformers, paged / continuous batching, vLLM, tools)
    "num_generations", "num_generations_eval", "max_completion_length", "ds3_gather_for_generation",
    "pad_to_multiple_of", "temperature", "top_p", "top_k", "min_p",
    "generation_kwargs", "chat_template_kwargs", "repetition_penalty", "cache_implementation",
    "use_transformers_continuous_batching", "transformers_continuous_batching_config", "use_transformers_paged",
    "max_tool_calling_iterations", "use_vllm", "vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode",
    "vllm_structured_outputs_regex", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
    "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization", "vllm_max_model_length",
    "vllm_tensor_parallel_size",
    # rewards and steps: K ES steps per generation batch; combination of several reward functions
    "num_iterations", "reward_weights", "multi_objective_aggregation", "router_aux_loss_coef",
    # KL to a reference policy: a fitness penalty (trl_es.reference), the reference synced as in TR-DPO
    "beta", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps",
    # logging
    "log_completions", "log_multimodal", "num_completions_to_print", "log_unique_prompts", "log_completions_hub_repo",
)  # fmt: skip
_LOSS = "shapes GRPO's policy-gradient loss; ES has no loss"
# GRPO reuses one generation for several optimizer steps; ES generates afresh for every member of every step, so each
# ES step takes the rows a GRPO optimizer step trains on (prompts of its own) and the pair follows the accumulation.
GENERATION_REUSE_FIELDS = ("steps_per_generation", "generation_batch_size")
REUSE_REASON = (
    "ES generates afresh every step, so there is no generation to reuse: each ES step takes its own prompts, as each "
    "GRPO optimizer step does (steps_per_generation follows gradient_accumulation_steps)"
)
_IS = "corrects vLLM sampling for a policy-gradient loss; ES scores completions as they are"
IGNORED_GRPO_FIELDS = {
    **dict.fromkeys(GENERATION_REUSE_FIELDS, REUSE_REASON),
    "use_bias_correction_kl": (
        "ES measures each member's KL on the member's own completions (importance ratio 1) and takes no gradient of "
        "it, so the correction changes nothing"
    ),
    **dict.fromkeys(
        (
            "loss_type", "epsilon", "epsilon_high", "delta", "scale_rewards", "importance_sampling_level",
            "mask_truncated_completions", "top_entropy_quantile", "off_policy_mask_threshold", "sapo_temperature_neg",
            "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
            "entropy_coef", "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta",
            "entropy_target",
        ),
        _LOSS,
    ),
    **dict.fromkeys(
        (
            "vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_importance_sampling_cap",
            "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
        ),
        _IS,
    ),
}  # fmt: skip
# Optimisation settings a GRPOConfig carries for a policy gradient: left at GRPO's defaults (AdamW at 1e-6, clipping
# at 1.0, dropout on), they take ES's (SGD at Qiu et al.'s step for the run's sigma, no clipping, dropout off); values
# the user set are kept. Data and decoding fields always keep the script's values: a value set equal to GRPO's default
# (per_device_train_batch_size=8 is common) cannot be told apart from an unset one, and must not change the data.
ES_TAKES_OVER_WHEN_DEFAULT = ("learning_rate", "optim", "max_grad_norm", "disable_dropout")
# Never carried over: ES runs no backward pass, so activation checkpointing (GRPO's default, set through the
# deprecated alias gradient_checkpointing) would only slow generation.
NOT_CONVERTED = ("gradient_checkpointing", "activation_checkpointing")


#: what ``vllm_dtype`` may name (None: the model's own dtype)
VLLM_DTYPES = ("bfloat16", "float16", "float32")


def vllm_dtype_problem(args) -> str | None:
    """Why ``vllm_dtype`` cannot be honoured with these settings, or None."""
    if args.vllm_dtype is None:
        return None
    if args.vllm_dtype not in VLLM_DTYPES:
        return f"vllm_dtype must be None (the model's dtype) or one of {list(VLLM_DTYPES)}, got {args.vllm_dtype!r}."
    if not args.use_vllm:
        return f"vllm_dtype={args.vllm_dtype!r} is the dtype of a vLLM engine, but use_vllm=False: set use_vllm=True."
    if args.vllm_mode != "colocate":
        return (
            f"vllm_dtype={args.vllm_dtype!r} sets the dtype of the engine this trainer builds (vllm_mode='colocate'); "
            f"with vllm_mode={args.vllm_mode!r} the server runs in the dtype it was started with "
            "(`trl vllm-serve --dtype`). Drop vllm_dtype."
        )
    return None


def inplace_update_problem(args) -> str | None:
    """Why ``inplace_update=True`` cannot hold for these settings, as far as the config alone tells (the optimizer
    actually built is checked when training starts), or None."""
    if args.max_grad_norm:
        return (
            f"inplace_update=True applies the update without a gradient, so max_grad_norm={args.max_grad_norm} could "
            "not clip it; set max_grad_norm=0, or inplace_update=None (auto) to write p.grad when clipping."
        )
    if args.anchor_decay:
        return (
            f"inplace_update=True applies the update without a gradient, but anchor_decay={args.anchor_decay} adds "
            "its pull to the gradient; set anchor_decay=0, or inplace_update=None (auto)."
        )
    if str(args.optim) != "sgd":
        return (
            f"inplace_update=True needs optim='sgd' (plain SGD, no optimizer state), got optim={str(args.optim)!r}; "
            "set inplace_update=None (auto) to use the p.grad path with other optimizers."
        )
    return None
