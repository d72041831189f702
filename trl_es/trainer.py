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
      -> strategy.tell: shaped fitness -> the step's update (core.strategies: a pseudo-gradient, a selected member
         or new values)
      -> core.apply.apply_update, the one update path (replay's too): a pseudo-gradient is written to t.grad, the
         anchor's pull added (anchor_decay), clipped and stepped by the Trainer's torch optimizer, or with plain SGD
         (ESConfig.inplace_update) applied straight from the seeds; then space.after_update()

The update is made inside ``training_step``, within the guards of ``update_step.UpdateStepMixin``; the Trainer's own
optimizer step then finds no gradient, and its LR scheduler advances as usual.
"""

import contextlib
import logging
import math
import os
import pickle
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather_object, is_peft_model
from tqdm.auto import tqdm
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from . import trl_compat
from .builtin_models import resolve_model
from .checkpoints import load_search_state, prepare_resume, save_es_settings, save_search_state
from .config import ESConfig
from .core import (
    Anchor,
    UpdateKind,
    combine_reward_functions,
    derive_seed,
    distinct_rows,
    member_fitness,
    member_rows,
    place_scores,
    plan_rounds,
)
from .core.layout import check_population_split
from .data_checks import ContextCheck, check_prompt_column, warn_if_smaller_than_one_step
from .integrations.deepspeed import init_deepspeed_comm
from .integrations.vllm_engine import engine_build_options, engine_members_of
from .reference import ReferenceKL, ReferenceModelAttribute
from .rewards import wrap_reward_funcs
from .router_balance import RouterBalance
from .search import Launch, build_search, space_name
from .seed_log import SeedLogCallback
from .step_logs import StepLogsMixin
from .update_step import UpdateStepMixin


logger = logging.getLogger(__name__)


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


class ESTrainer(UpdateStepMixin, StepLogsMixin, ReferenceModelAttribute, GRPOTrainer):
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
            with trl_compat.grpo_builds_no_reference(args), engine_build_options(model, args):
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
        # vLLM colocated: members built inside the engine from their seeds (else GRPO pushes each member's weights)
        self.engine_members = engine_members_of(self) if args.use_vllm else None
        # theta_0 for anchor_decay: the evolved tensors as the run starts (a resume loads the checkpoint's copy).
        self.anchor = (
            Anchor(self.perturbation_space.local_tensors(), args.anchor_decay) if args.anchor_decay > 0 else None
        )
        check_population_split(
            self.perturbation_space.member_groups(),
            self.accelerator.num_processes,
            self.perturbation_space.ranks_share_members,
        )
        pad_token_id = getattr(self.processing_class, "tokenizer", self.processing_class).pad_token_id
        self.router_balance = RouterBalance(
            self.model,
            trl_compat.router_aux_loss_coef(self),
            self.strategy.population_size,
            self.perturbation_space.members_per_forward,
            pad_token_id,
        )
        self.reference_kl = ReferenceKL.build(
            self.model, self.perturbation_space, args, pad_token_id, arrived_with_adapter
        )
        self.add_callback(self.reference_kl)  # syncs the reference on GRPO's schedule (sync_ref_model)
        self._es_micro_step = 0
        self._eval_batches = 0
        self._init_update_step()
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
            save_search_state(folder, self._search_parts())
            # Written last: a checkpoint with es_settings.json was saved whole.
            save_es_settings(folder, self.args, self.perturbation_name)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_search_state(resume_from_checkpoint, self._search_parts(), self.args, self.perturbation_name)

    def _search_parts(self) -> dict:
        """What holds search state beyond the weights: CMA-ES's distribution, the SVD space's decomposition, a
        synced reference, the anchor (None without anchor_decay)."""
        return {
            "strategy": self.strategy,
            "space": self.perturbation_space,
            "reference": self.reference_kl,
            "anchor": self.anchor,
        }

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
        trl_compat.metrics(self, "train")["step_time"].append(time.perf_counter() - start)
        return loss

    def _es_step(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        step = self.state.global_step
        comm_bytes = self.accelerator.num_processes * len(pickle.dumps(rows)) if self._multi_process else 0
        batch = self._step_prompts(rows)
        self.strategy.ask(step)
        # Closed before the update: an in-place space keeps one clean copy of the weights across the members in it.
        with self.perturbation_space.population(step), self._engine_population():
            results, member_comm_bytes = self._evaluate_members(step, batch)
        comm_bytes += member_comm_bytes
        rewards = self._combine_reward_funcs(results.rewards_per_func)  # (members, prompts)
        fitness = member_fitness(rewards, normalize_per_prompt=self.args.normalize_per_prompt)
        fitness = self.router_balance.penalize(fitness, self.accelerator, trl_compat.metrics(self, "train"))
        fitness = self.reference_kl.penalize(fitness, self.accelerator, trl_compat.metrics(self, "train"))
        invalid = self._check_fitness(step, fitness)
        if invalid.all():
            # No signal: no update, the weights stay as they are; the run goes on.
            self._grad_norm = 0.0
            self.seed_log.record(step, None)
            reward = self._log_step(batch, results, rewards, fitness, invalid, torch.zeros_like(fitness), comm_bytes)
        else:
            update = self.strategy.tell(step, fitness)
            self._apply_strategy_update(step, update)  # the one update path (core.apply), inside its guards
            if update.kind is UpdateKind.SELECTION:
                self._log_selection(step, update)
            self.seed_log.record(step, update)
            reward = self._log_step(batch, results, rewards, fitness, invalid, update.shaped, comm_bytes)
        # The loss Trainer logs: minus the logged reward (the members' mean weighted reward, as GRPO logs it).
        return torch.tensor(-reward, device=self.accelerator.device)

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
                self._as_members(step, members),
                self._seeded_sampling(space.noise.sampling_seed(step, members[0])),
            ):
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
        if self.engine_members is None:
            trl_compat.force_weight_sync(self)  # vLLM still holds the last member's weights
        if reference is not None:
            if self._multi_process:  # each process compared its own members (or its share of the rows)
                changed = self.accelerator.reduce(changed.to(self.accelerator.device), reduction="sum").cpu()
            results.frac_changed = float(changed[0] / changed[1]) if changed[1] else math.nan
        return results, comm_bytes

    @contextlib.contextmanager
    def _as_members(self, step: int, members):
        """What generation runs as while ``members`` generate: the trainer's model perturbed (pushed to vLLM, if any,
        by GRPO's weight sync), or the members built inside the vLLM engine, with the trainer's model perturbed too
        only when something reads it (KL to the reference, router balance)."""
        if self.engine_members is None:
            trl_compat.force_weight_sync(self)
            with self.strategy.perturbed(step, members):
                yield
            return
        with contextlib.ExitStack() as stack:
            if self.reference_kl.enabled or self.router_balance.enabled:
                stack.enter_context(self.strategy.perturbed(step, members))
            stack.enter_context(self.engine_members.perturbed(step, members, self.strategy.sigma_at(step)))
            yield

    @contextlib.contextmanager
    def _engine_population(self):
        """Around a step's members served inside the vLLM engine: the step's weights pushed once first."""
        if self.engine_members is None:
            yield
            return
        trl_compat.sync_vllm_weights(self)
        with self.engine_members.population():
            yield

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
