"""``ESTrainer``: ``GRPOTrainer`` with the policy-gradient step replaced by an evolution-strategies step.

Everything around the step is GRPO's: model loading, PEFT wrapping, the prompt sampler, generation (tools and
environments included) and reward computation (reached only through ``trl_compat``), logging, saving and
checkpointing. Only ``training_step`` (one ES step) and ``prediction_step`` (scoring the unperturbed model) are ES's
own.

Data path of one step (``_es_step``)::

    prompts of the generation batch, pooled over processes        _step_prompts
      -> population members (strategy.ask; core.layout rounds)     _evaluate_members
         (with prompt_groups > 1, member group g completes only prompt group g)
      -> completions (GRPO's generation, one seeded call per member group, weights restored after each)
      -> rewards (GRPO's reward code)           shape (members, prompts, reward functions)
      -> fitness (core.fitness)                 one value per member
      -> strategy.tell: shaped fitness -> pseudo-gradient in t.grad (core.strategies)
      -> + anchor_decay * (theta - theta_0) in t.grad (core.anchor; when anchor_decay > 0)
      -> the Trainer's optimizer and LR scheduler step, then space.after_update()

With plain SGD (``ESConfig.inplace_update``) no t.grad is written: at the optimizer step the space applies SGD's
update straight from the seeds (``space.apply_update``), the optimizer finds no gradient and steps nothing, and the
LR scheduler advances as usual. What runs around the optimizer step (that, the guards that keep the weights right,
the update metrics) is ``update_step.UpdateStepMixin``.
"""

import contextlib
import logging
import math
import os
import pickle
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather_object, is_peft_model
from tqdm.auto import tqdm
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from . import trl_compat
from .builtin_models import resolve_model
from .checkpoints import prepare_resume, save_es_settings
from .config import ESConfig
from .core import (
    Anchor,
    combine_reward_functions,
    derive_seed,
    distinct_rows,
    member_fitness,
    member_rows,
    place_scores,
    plan_rounds,
    seen_mask,
)
from .core.layout import check_population_split
from .data_checks import ContextCheck, check_prompt_column, warn_if_smaller_than_one_step
from .integrations.deepspeed import init_deepspeed_comm
from .reference import ReferenceKL, ReferenceModelAttribute
from .rewards import wrap_reward_funcs
from .router_balance import RouterBalance
from .search import Launch, build_search, space_name
from .seed_log import SeedLogCallback
from .update_step import UpdateStepMixin


logger = logging.getLogger(__name__)

# GA: generations in a row the parent may survive before a warning says the weights are standing still.
GA_STALL_GENERATIONS = 10
ES_STATE_NAME = "es_state.pt"  # a checkpoint's strategy and space state, when they have one


def _nanstd(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.std(unbiased=False)) if valid.numel() > 1 else 0.0


def _nanmean(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else float("nan")


@dataclass
class StepPrompts:
    """The prompts every member of one step completes: the pooled batch, and the slice this process generates."""

    rows: list[dict]
    prompts: list


@dataclass
class MemberResults:
    """What the population produced on one step's prompts."""

    rewards_per_func: torch.Tensor  # (members, prompts, reward functions); NaN where every function gave None
    completions: dict[int, list]  # member -> its completions (the members this process can see)
    extra_logs: dict[int, dict[str, list]]  # member -> the `log_extra` columns of its completions
    member_rows: list[range]  # member -> the rows of the step's batch it completed (its prompt group)
    frac_changed: float | None = None  # es/frac_changed_completions, when log_frac_changed_completions


class ESTrainer(UpdateStepMixin, ReferenceModelAttribute, GRPOTrainer):
    """Train a language model by evolution strategies, with the constructor and data contract of ``GRPOTrainer``.

    Use it exactly like [`~trl.GRPOTrainer`] (every argument is passed through). ``args`` may be an [`ESConfig`] or a
    plain [`~trl.GRPOConfig`] (converted with the ES fields at their defaults). The model can be a hub id or local
    path, a ``PreTrainedModel`` or a ``PeftModel``; with PEFT (or ``peft_config``) only the adapter weights evolve.

    Handling of rewards: a completion for which every reward function returned ``None`` is unscorable and ignored;
    a member with no scorable completion gets no weight in the update (``es/invalid_members`` counts them); a step
    in which no member has a scorable completion raises, leaving the weights untouched.

    Tools and environments (``tools=``, ``environment_factory=``) work as in GRPO. Before each member group generates,
    its environments are taken from GRPO's pool and reset with their rows (``trl_compat.prepare_rollouts``), so every
    member starts from freshly reset environment state, never from what another member's tool calls left; reward
    functions taking ``environments=`` get the instances of the rollouts they score. Resets run under RNG seeds
    shared by all members (per step and row), so an environment drawing its episode from Python's, NumPy's or
    torch's global RNG gives every member the same episode. Greedy decoding keeps the ``num_generations`` repeats of
    a row in such runs: tool results and episodes may differ between repeats.

    Mixture-of-Experts models: where GRPO would add ``router_aux_loss_coef * aux_loss`` to its loss, each member's
    router load-balancing loss is measured under its perturbation, logged as ``aux_loss`` and ``router_aux_loss_coef``
    times it is subtracted from the member's fitness (``trl_es.router_balance``).

    KL to a reference (``beta > 0``): where GRPO would add ``beta * KL`` to its loss, each member's fitness loses
    ``beta`` times its k3 KL estimate to the reference policy on its own completions, logged as ``kl``; GRPO loads no
    reference model, ES keeps its own (``trl_es.reference``), synced with ``sync_ref_model`` as in GRPO.
    """

    _tag_names = ["trl", "trl-es", "evolution-strategies"]
    _name = "ES (evolution strategies, no backprop)"
    _paper = {"title": "Evolution Strategies at Scale: LLM Fine-Tuning Beyond Reinforcement Learning"}

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *grpo_args, **grpo_kwargs):
        args = self._es_config(model, args)
        model = resolve_model(model)  # builtin:... -> its local folder, as every model-id argument accepts
        positional = dict(zip(("train_dataset", "eval_dataset"), grpo_args, strict=False))
        for name in ("train_dataset", "eval_dataset"):
            check_prompt_column(
                grpo_kwargs.get(name, positional.get(name)), name, grpo_kwargs.get("environment_factory") is not None
            )
        init_deepspeed_comm(args)
        # As in GRPO, the reference of an adapter the model arrives with is a copy of it, not the base model.
        arrived_with_adapter = not isinstance(model, str) and is_peft_model(model)
        try:
            # ES keeps its own reference (trl_es.reference); GRPO would load a second model for beta > 0.
            with trl_compat.grpo_builds_no_reference(args):
                super().__init__(model, reward_funcs, args, *grpo_args, **grpo_kwargs)
        except OSError as error:
            if isinstance(model, str) and not os.path.isdir(model):
                offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
                raise OSError(
                    f"Could not load model {model!r}: it is not a local folder, so it has to come from the Hugging "
                    f"Face Hub, which is unreachable{' (HF_HUB_OFFLINE is set)' if offline else ''} and has no "
                    "cached copy. Download it on a connected machine (`hf download "
                    f"{model}`) or pass a local path."
                ) from error
            raise
        trl_compat.check_trl_internals(self)
        if self.is_fsdp_enabled:
            # FSDP shards the parameters behind its own flat handles; writing the ES update into p.grad reaches
            # nothing, so refuse rather than train nothing.
            raise ValueError(
                "ESTrainer does not support FSDP yet: the ES update is written to p.grad for a plain torch optimizer. "
                "Launch with plain DDP or DeepSpeed ZeRO-3 (`accelerate launch` / `torchrun` without an FSDP config)."
            )
        self.reward_funcs = wrap_reward_funcs(self.reward_funcs, self.reward_func_names)
        warn_if_smaller_than_one_step(self.train_dataset, args, self.num_generations)
        self.context_check = ContextCheck(self.model, args.max_completion_length)
        self._greedy = args.temperature == 0.0
        if self._greedy:
            self._use_greedy_decoding()
        # Greedy rollouts of a repeated row are copies only when nothing outside the model (tools, environments, a
        # rollout function) takes part; otherwise the repeats are real samples and are all generated.
        self._drop_repeats = self._greedy and trl_compat.rollouts_depend_only_on_rows(self)
        self.perturbation_space, self.strategy = build_search(self.model, args, Launch.of_trainer(self))
        self.perturbation_name = space_name(self.perturbation_space, self.model)
        # theta_0 for anchor_decay: the evolved tensors as the run starts (a resume loads the checkpoint's copy).
        self.anchor = (
            Anchor(self.perturbation_space.local_tensors(), args.anchor_decay) if args.anchor_decay > 0 else None
        )
        check_population_split(
            self.perturbation_space.member_groups(),
            self.accelerator.num_processes,
            self.perturbation_space.ranks_share_members,
        )
        self.router_balance = RouterBalance(
            self.model,
            trl_compat.router_aux_loss_coef(self),
            self.strategy.population_size,
            self.perturbation_space.members_per_forward,
            getattr(self.processing_class, "tokenizer", self.processing_class).pad_token_id,
        )
        self.reference_kl = ReferenceKL.from_trainer(self, arrived_with_adapter)
        self.add_callback(self.reference_kl)  # syncs the reference on GRPO's schedule (sync_ref_model)
        self._es_micro_step = 0
        self._eval_batches = 0
        self._init_update_step()
        # (step, StrategyUpdate) of the last ES step, (step, None) when it had no signal and made no update; the
        # seed log records it.
        self.last_strategy_update = None
        self.seed_log = SeedLogCallback(self)
        self.add_callback(self.seed_log)

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _es_config(model, args) -> ESConfig:
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            return ESConfig(f"{str(model_name).rstrip('/').split('/')[-1]}-ES")
        if isinstance(args, ESConfig):
            return args
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be an ESConfig or a GRPOConfig, got {type(args).__name__}")
        args = ESConfig.from_grpo_config(args)
        logger.info(
            "Converted GRPOConfig to ESConfig for evolution strategies: population_size=%d, sigma=%g, "
            "fitness_shaping=%s, learning_rate=%g (ES step size), optim=%s, max_grad_norm=%s.",
            args.population_size,
            args.sigma,
            args.fitness_shaping,
            args.learning_rate,
            args.optim,
            args.max_grad_norm,
        )
        return args

    def _use_greedy_decoding(self) -> None:
        greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None}
        if getattr(self, "generation_config", None) is not None:
            self.generation_config.update(**greedy)
        if getattr(self, "generation_kwargs", None) is not None:
            self.generation_kwargs.update(greedy)
        # vLLM reads temperature=0 as greedy decoding already.

    # ------------------------------------------------------------------ checkpoints

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        # Resume from the newest *complete* checkpoint, with the ES settings and optimizer it was written with.
        resume_from_checkpoint = prepare_resume(resume_from_checkpoint, self.args, self.perturbation_name)
        self.seed_log.resume_from = resume_from_checkpoint  # a resumed run continues the checkpoint's seed log
        self._last_applied_step = None  # a second train() counts its steps afresh
        self.interrupted_at_step = None
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        self.raise_held_interrupt()  # a Ctrl-C held during an update: its step is finished, now stop
        return output

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            state = {
                "strategy": self.strategy.state_dict(),
                "space": self.perturbation_space.state_dict(),
                "reference": self.reference_kl.state_dict(),
            }
            if self.anchor is not None:
                state["anchor"] = self.anchor.state_dict()
            # e.g. CMA-ES's search distribution, the SVD space's decomposition, a synced reference, the anchor
            if any(state.values()):
                torch.save(state, os.path.join(folder, ES_STATE_NAME))
            # Written last: a checkpoint with es_settings.json was saved whole.
            save_es_settings(folder, self.args, self.perturbation_name)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, ES_STATE_NAME)
        if os.path.isfile(path):
            state = torch.load(path, weights_only=True)
            self.perturbation_space.load_state_dict(state["space"])
            self.strategy.load_state_dict(state["strategy"])
            self.reference_kl.load_state_dict(state.get("reference", {}))
            if self.anchor is not None:
                if "anchor" not in state:
                    raise ValueError(
                        f"{resume_from_checkpoint} holds no anchor (the initial weights anchor_decay pulls toward): "
                        "it was trained without anchor_decay; resume with anchor_decay=0 or start a new run."
                    )
                self.anchor.load_state_dict(state["anchor"])
        elif self.anchor is not None:
            raise ValueError(
                f"{resume_from_checkpoint} has no {ES_STATE_NAME} with the anchor (initial weights) that "
                f"anchor_decay={self.args.anchor_decay} pulls toward: it was trained without anchor_decay."
            )
        elif self.strategy.state_dict() or self.perturbation_space.state_dict() or self.reference_kl.state_dict():
            raise ValueError(
                f"{resume_from_checkpoint} has no {ES_STATE_NAME}, but strategy={self.args.strategy!r} with "
                f"perturbation={self.perturbation_name!r} needs it to resume (the search state is not in the weights)."
            )

    # ------------------------------------------------------------------ the ES step

    def training_step(self, model, inputs, num_items_in_batch=None):
        # With gradient accumulation GRPO's sampler yields the same generation batch once per micro-step; the ES
        # step runs on the first and the optimizer steps after the last, so one optimizer step = one ES step.
        first_micro_step = self._es_micro_step % self.current_gradient_accumulation_steps == 0
        self._es_micro_step += 1
        if not first_micro_step:
            return torch.zeros((), device=self.accelerator.device)
        start = time.perf_counter()
        model.train()
        loss = self._es_step(inputs)
        if self.perturbation_space.steps_own_optimizer and self.accelerator.sync_gradients:
            # The Trainer's optimizer.step() is a no-op here (DeepSpeed): the space's engine applies the update.
            self._before_update()
            self.perturbation_space.step_optimizer()
            self._after_update()
        trl_compat.metrics(self, "train")["step_time"].append(time.perf_counter() - start)
        return loss

    def _es_step(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        step = self.state.global_step
        comm_bytes = self.accelerator.num_processes * len(pickle.dumps(rows)) if self._multi_process else 0
        batch = self._step_prompts(rows)
        self.strategy.ask(step)
        # Closed before the update: an in-place space keeps one clean copy of the weights across the members in it.
        with self.perturbation_space.population(step):
            results, member_comm_bytes = self._evaluate_members(step, batch)
        comm_bytes += member_comm_bytes
        rewards = self._combine_reward_funcs(results.rewards_per_func)  # (members, prompts)
        fitness = member_fitness(rewards, normalize_per_prompt=self.args.normalize_per_prompt)
        fitness = self.router_balance.penalize(fitness, self.accelerator, trl_compat.metrics(self, "train"))
        fitness = self.reference_kl.penalize(fitness, self.accelerator, trl_compat.metrics(self, "train"))
        invalid = self._check_fitness(step, fitness)
        if invalid.all():
            # No signal: the optimizer finds no gradient and leaves the weights as they are; the run goes on.
            self.last_strategy_update = (step, None)
            reward = self._log_step(batch, results, rewards, fitness, invalid, torch.zeros_like(fitness), comm_bytes)
        else:
            # Before tell: strategies that set the tensors themselves (CMA-ES, GA) move them inside it.
            self._snapshot_weights()
            update = self.strategy.tell(step, fitness)
            if self.strategy.selects_a_member:
                self._log_selection(step, update)
            if self.anchor is not None:
                trl_compat.metrics(self, "train")["es/anchor_distance"].append(
                    self.anchor.add_pull(self.perturbation_space.named_tensors())
                )
            self.last_strategy_update = (step, update)
            reward = self._log_step(batch, results, rewards, fitness, invalid, update.shaped, comm_bytes)
        # The loss Trainer logs: minus the logged reward (the members' mean weighted reward, as GRPO logs it).
        return torch.tensor(-reward, device=self.accelerator.device)

    def _log_selection(self, step: int, update) -> None:
        """GA: whether the parent survived (``es/ga_parent_kept``), and one warning when it has survived
        ``GA_STALL_GENERATIONS`` generations in a row: no child beats it, so the weights stand still."""
        trl_compat.metrics(self, "train")["es/ga_parent_kept"].append(float(update.winner is None))
        if self.strategy.generations_parent_kept(step) == GA_STALL_GENERATIONS:
            warnings.warn(
                f"strategy='ga': the parent has been kept for {GA_STALL_GENERATIONS} generations in a row (step "
                f"{step}): none of the {self.strategy.population_size - 1} children beat it by more than "
                f"ga_min_improvement={self.args.ga_min_improvement:g}, so the weights have not changed. Usually the "
                f"children are too few or sigma={self.perturbation_space.sigma:g} is too small to change a greedy "
                "completion (too large and every child is worse): raise population_size, or tune sigma with "
                "log_frac_changed_completions.",
                UserWarning,
                stacklevel=2,
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # CMA-ES and GA move the weights themselves: the optimizer's learning rate is not what they use.
        if "learning_rate" in logs and not self.strategy.uses_optimizer:
            del logs["learning_rate"]
            logs.update(self.strategy.step_size_logs())
        super().log(logs, start_time)

    @property
    def _multi_process(self) -> bool:
        return self.accelerator.num_processes > 1

    def _step_prompts(self, rows: list[dict]) -> StepPrompts:
        """The prompts every member completes: the whole batch of every process (common random numbers across
        members), once each under greedy decoding. Only prompts and scalar rewards cross processes."""
        if self._multi_process:
            rows = gather_object(rows)
        if self._drop_repeats:
            rows = distinct_rows(
                rows,
                self.num_generations,
                self.accelerator.num_processes,
                self.perturbation_space.ranks_share_members,
            )
        return StepPrompts(rows=rows, prompts=trl_compat.row_prompts(self, rows))

    def _evaluate_members(self, step: int, batch: StepPrompts) -> tuple[MemberResults, int]:
        """Let every member complete the prompts of its prompt group and score the completions; the weights are
        restored after every member group, before any reward function runs."""
        space, process = self.perturbation_space, self.accelerator.process_index
        population, num_rows = self.strategy.population_size, len(batch.rows)
        if (
            not self._drop_repeats
            and self.args.prompt_groups > 1
            and (num_rows // self.args.prompt_groups) % max(1, self.num_generations)
        ):
            raise ValueError(
                f"prompt_groups={self.args.prompt_groups} would split the {self.num_generations} repeats of a prompt "
                f"over groups: each group of the step's {num_rows} rows must hold whole prompts (a multiple of "
                f"num_generations={self.num_generations} rows)."
            )
        rounds = plan_rounds(
            self.strategy.member_groups(),
            self.accelerator.num_processes,
            num_rows,
            space.ranks_share_members,
            self.args.prompt_groups,
        )
        rewards_per_func = torch.full((population, num_rows, len(self.reward_funcs)), float("nan"))
        results = MemberResults(
            rewards_per_func,
            completions={},
            extra_logs={},
            member_rows=member_rows(population, num_rows, self.args.prompt_groups),
        )
        reference = self._reference_completion_ids(step, batch) if self.args.log_frac_changed_completions else None
        changed = torch.zeros(2, dtype=torch.float64)  # (completions that differ from the reference, compared)
        comm_bytes = 0
        show_progress = len(rounds) > 1 and not self.args.disable_tqdm and self.is_world_process_zero()
        # A step evaluates the whole population: with slow rewards it can take minutes, so show it moving.
        for round_ in tqdm(rounds, desc=f"ES step {step + 1}: members", leave=False, disable=not show_progress):
            members, rows = round_.members[process], round_.block_rows(process)
            # Member-major block: one equal-sized block of rows per member (each member's own prompt group).
            block_rows = [batch.rows[i] for i in rows]
            # Fresh environments for this block, reset under seeds shared by every member (common random numbers).
            reset_seeds = [derive_seed(self.args.seed, "reset", step, i) for i in rows]
            block_prompts = trl_compat.prepare_rollouts(self, block_rows, reset_seeds)
            with (
                self._sampling_overflow(step, members),  # first in, last out: names a failure once restored
                self.strategy.perturbed(step, members),
                self._seeded_sampling(space.noise.sampling_seed(step, members[0])),
            ):
                trl_compat.force_weight_sync(self)
                prompt_ids, completion_ids, tool_mask, completions = trl_compat.rollout_with_tool_mask(
                    self, block_prompts
                )
                self.context_check.check(step, prompt_ids)
                self.router_balance.measure(members, prompt_ids, completion_ids)
                self.reference_kl.measure(members, prompt_ids, completion_ids, tool_mask)
            if reference is not None:
                changed += torch.tensor(
                    [sum(list(ids) != reference[i] for ids, i in zip(completion_ids, rows, strict=True)), len(rows)],
                    dtype=torch.float64,
                )
            scores = trl_compat.calculate_rewards(self, block_rows, block_prompts, completions, completion_ids).cpu()
            place_scores(rewards_per_func, round_, scores)
            logs = self._split_by_member(members, round_.share, completions, trl_compat.take_extra_logs(self))
            if self._multi_process:
                comm_bytes += scores.numel() * scores.element_size()
            if space.ranks_share_members and self._multi_process:
                # Each process completed its share of the prompts: pool the texts so the completion log is whole.
                comm_bytes += self.accelerator.num_processes * len(pickle.dumps(logs))
                logs = _pool_member_logs(gather_object([logs]), members)
            for member, (texts, extras) in logs.items():
                results.completions[member], results.extra_logs[member] = texts, extras
        trl_compat.force_weight_sync(self)  # vLLM still holds the last member's weights
        if reference is not None:
            if self._multi_process:  # each process compared its own members (or its share of the rows)
                changed = self.accelerator.reduce(changed.to(self.accelerator.device), reduction="sum").cpu()
            results.frac_changed = float(changed[0] / changed[1]) if changed[1] else math.nan
        return results, comm_bytes

    def _reference_completion_ids(self, step: int, batch: StepPrompts) -> list[list[int]]:
        """The unperturbed model's greedy completions of every row of the step (one extra generation), to count the
        members' completions that differ from them (``es/frac_changed_completions``)."""
        reset_seeds = [derive_seed(self.args.seed, "reset", step, i) for i in range(len(batch.rows))]
        prompts = trl_compat.prepare_rollouts(self, batch.rows, reset_seeds)
        metrics = trl_compat.metrics(self, "train")
        logged = {key: len(values) for key, values in metrics.items()}
        trl_compat.force_weight_sync(self)  # vLLM may still hold another model's weights
        with torch.no_grad():
            _, completion_ids, _ = trl_compat.rollout(self, prompts)
        # The completion statistics GRPO's generation logs describe the members; num_tokens counts what was generated.
        for key, values in metrics.items():
            if key != "num_tokens":
                del values[logged.get(key, 0) :]
        trl_compat.take_extra_logs(self)
        return [list(ids) for ids in completion_ids]

    @staticmethod
    def _split_by_member(members, rows_per_member: int, completions: list, extra: dict) -> dict:
        """member -> (its completions, its `log_extra` columns) from one member-major generation block."""
        total = rows_per_member * len(members)
        return {
            member: (
                completions[offset * rows_per_member : (offset + 1) * rows_per_member],
                {
                    column: values[offset * rows_per_member : (offset + 1) * rows_per_member]
                    for column, values in extra.items()
                    if len(values) == total
                },
            )
            for offset, member in enumerate(members)
        }

    def _check_fitness(self, step: int, fitness: torch.Tensor) -> torch.Tensor:
        invalid = torch.isnan(fitness)
        if invalid.all():
            logger.warning(
                "ES step %d: every reward function (%s) returned None for every completion of every member; there "
                "is no signal, so this step makes no update (the weights stay as they are).",
                step,
                ", ".join(self.reward_func_names),
            )
        elif invalid.any():
            logger.warning(
                "ES step %d: members %s have no scorable completion (all rewards None) and are left out of the "
                "update.",
                step,
                invalid.nonzero().flatten().tolist(),
            )
        return invalid

    # ------------------------------------------------------------------ rewards and logging

    @contextlib.contextmanager
    def _seeded_sampling(self, seed: int):
        """Sample from a private RNG stream: per-member completions are reproducible and the global RNG untouched."""
        device = self.accelerator.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _combine_reward_funcs(self, rewards_per_func: torch.Tensor, aggregation: str | None = None) -> torch.Tensor:
        """One reward per completion from every function's, as GRPO's ``multi_objective_aggregation`` says."""
        aggregation = aggregation or self.args.multi_objective_aggregation
        return combine_reward_functions(rewards_per_func, self.reward_weights, aggregation)

    def _log_reward_metrics(self, mode: str, rewards_per_func: torch.Tensor) -> float:
        """Log the reward metrics GRPO logs; returns the logged ``reward``."""
        metrics = trl_compat.metrics(self, mode)
        flat = rewards_per_func.reshape(-1, rewards_per_func.shape[-1])
        for index, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(_nanmean(flat[:, index]))
            metrics[f"rewards/{name}/std"].append(_nanstd(flat[:, index]))
        # GRPO logs the weighted sum of the raw rewards under either multi_objective_aggregation (what
        # normalize_then_sum normalises is its advantage, not the logged reward, which would be ~0 by construction).
        rewards = self._combine_reward_funcs(flat, "sum_then_normalize").reshape(-1)
        reward = _nanmean(rewards)
        metrics["reward"].append(reward)
        metrics["reward_std"].append(_nanstd(rewards))
        # What reward functions sent through `log_metric`, averaged over processes as GRPO does.
        device = self.accelerator.device
        for name, values in sorted(trl_compat.take_logged_metrics(self).items()):
            local = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=device)
            total, count = self.accelerator.gather(local).view(-1, 2).sum(dim=0).tolist()
            metrics[name].append(total / max(count, 1))
        return reward

    def _log_step(self, batch, results, rewards, fitness, invalid, shaped, comm_bytes: int) -> float:
        """Log the step's metrics; returns the logged ``reward``."""
        metrics = trl_compat.metrics(self, "train")
        reward = self._log_reward_metrics("train", results.rewards_per_func)
        valid_fitness = fitness[~invalid]
        metrics["es/fitness_std"].append(_nanstd(valid_fitness))
        metrics["es/best_member_reward"].append(float(valid_fitness.max()) if valid_fitness.numel() else math.nan)
        metrics["es/worst_member_reward"].append(float(valid_fitness.min()) if valid_fitness.numel() else math.nan)
        metrics["es/invalid_members"].append(float(invalid.sum()))
        metrics["es/search_dim"].append(float(self.perturbation_space.num_parameters()))
        if self._multi_process:
            metrics["es/comm_bytes"].append(float(comm_bytes))
        if results.frac_changed is not None:
            metrics["es/frac_changed_completions"].append(results.frac_changed)
        if self.args.sigma_decay != 1.0:
            metrics["es/sigma"].append(float(self.perturbation_space.sigma))
        # Prompts on which every member that completed them scored the same carry no ES signal (an unscorable
        # completion counts as 0 here).
        seen = seen_mask(*rewards.shape, self.args.prompt_groups)
        values = torch.nan_to_num(rewards, nan=0.0)
        highest = torch.where(seen, values, -math.inf).amax(dim=0)
        lowest = torch.where(seen, values, math.inf).amin(dim=0)
        metrics["es/frac_prompts_no_signal"].append(float((highest == lowest).float().mean()))
        if self.log_completions:
            self._log_best_member(batch, results, fitness, shaped)
        return reward

    def _log_best_member(self, batch: StepPrompts, results: MemberResults, fitness, shaped) -> None:
        """Feed GRPO's completion log with the best member's rows (of those this process saw); advantage = its
        shaped fitness."""
        scores = torch.nan_to_num(fitness, nan=-math.inf).tolist()
        best = max(results.completions, key=lambda member: scores[member])
        rows = results.member_rows[best]  # its prompt group's rows
        rewards = {
            name: results.rewards_per_func[best, rows.start : rows.stop, index].tolist()
            for index, name in enumerate(self.reward_func_names)
        }
        trl_compat.log_completions(
            self,
            batch.prompts[rows.start : rows.stop],
            results.completions[best],
            rewards,
            [float(shaped[best])] * len(rows),
            results.extra_logs[best],
        )

    # ------------------------------------------------------------------ evaluation: the unperturbed model

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """``Trainer.evaluate()`` through the trainer's own generation backend: the unperturbed model's rewards.

        (The A/B harness and the policy builder score held-out accuracy with ``trl_es.evaluation`` instead, one
        greedy evaluation for ES and GRPO alike.)
        """
        rows = distinct_rows(inputs, self.num_generations_eval) if self._drop_repeats else inputs
        prompts = trl_compat.prepare_rollouts(self, rows)
        seed = derive_seed(self.args.seed, "eval", self.state.global_step, self._eval_batches)
        self._eval_batches += 1
        with torch.no_grad(), self._seeded_sampling(seed):
            prompt_ids, completion_ids, tool_mask, completions = trl_compat.rollout_with_tool_mask(self, prompts)
        eval_metrics = trl_compat.metrics(self, "eval")
        self.router_balance.log_eval(prompt_ids, completion_ids, self.accelerator, eval_metrics)
        self.reference_kl.log_eval(prompt_ids, completion_ids, tool_mask, self.accelerator, eval_metrics)
        rewards_per_func = trl_compat.calculate_rewards(self, rows, prompts, completions, completion_ids).cpu()
        reward = self._log_reward_metrics("eval", rewards_per_func)
        trl_compat.take_extra_logs(self)
        # Trainer wants a loss: ES's is the negative mean reward of the unperturbed model.
        loss = torch.tensor(-reward, device=self.accelerator.device)
        return loss, None, None


def _pool_member_logs(parts: list[dict], members) -> dict:
    """Join the per-process completion logs of members whose prompts were split over processes."""
    return {
        member: (
            [text for part in parts for text in part[member][0]],
            {
                column: [value for part in parts for value in part[member][1][column]]
                for column in parts[0][member][1]
                if all(column in part[member][1] for part in parts)
            },
        )
        for member in members
    }


__all__ = ["ESTrainer"]
