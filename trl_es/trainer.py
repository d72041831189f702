"""``ESTrainer``: ``GRPOTrainer`` with the policy-gradient step replaced by an evolution-strategies step.

Everything around the step is GRPO's: model loading, PEFT wrapping, the prompt sampler, generation
(``_generate``: transformers, continuous batching or vLLM), reward computation (``_calculate_rewards``: sync, async
and model rewards, ``reward_weights``, ``log_extra``/``log_metric``), logging, saving and checkpointing. Only
``training_step`` (one ES step) and ``prediction_step`` (scoring the unperturbed model) are ES's own.

Data path of one step::

    prompts of the generation batch
      -> population members (seeded perturbations, ``core.spaces``)
      -> completions (GRPO's ``_generate``, one seeded call per member group)
      -> rewards (GRPO's ``_calculate_rewards``)              shape (members, completions, reward funcs)
      -> fitness (``core.fitness``)                           one value per member
      -> pseudo-gradient in ``p.grad`` (``space.write_gradients``)
      -> the Trainer's optimizer and LR scheduler step
"""

import contextlib
import logging
import math
import os
import pickle
import time
from typing import Any

import torch
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset, IterableDataset
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import disable_dropout_in_model

from .config import ESConfig
from .core import (
    InPlaceSpace,
    LowRankSpace,
    MemberNoise,
    PerturbationSpace,
    derive_seed,
    member_fitness,
    shape_fitness,
)
from .rewards import wrap_reward_funcs


logger = logging.getLogger(__name__)


def _nanstd(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.std(unbiased=False)) if valid.numel() > 1 else 0.0


def _nanmean(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else float("nan")


def _check_prompt_column(dataset, name: str) -> None:
    """Fail before any model is loaded when a dataset has no ``prompt`` column."""
    if dataset is None:
        return
    if isinstance(dataset, dict):  # DatasetDict or {name: dataset} for eval
        for key, value in dataset.items():
            _check_prompt_column(value, f"{name}[{key!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None and isinstance(dataset, IterableDataset):
        first = next(iter(dataset), None)
        columns = list(first) if first is not None else []
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"{name} has no 'prompt' column (columns: {sorted(columns)}). ESTrainer, like GRPOTrainer, reads the "
            "prompts from a column named 'prompt'; rename yours, e.g. dataset.rename_column('question', 'prompt')."
        )


def _distinct_rows(rows: list[dict], group: int) -> list[dict]:
    """Drop the ``group``-fold repeats GRPO's sampler puts next to each other (identical under greedy decoding)."""
    if group <= 1 or len(rows) % group:
        return rows
    firsts = rows[::group]
    for index, row in enumerate(rows):
        if row["prompt"] != firsts[index // group]["prompt"]:
            return rows  # not laid out as consecutive repeats: keep every row
    return firsts


class ESTrainer(GRPOTrainer):
    """Train a language model by evolution strategies, with the constructor and data contract of ``GRPOTrainer``.

    Use it exactly like [`~trl.GRPOTrainer`]. ``args`` may be an [`ESConfig`] or a plain [`~trl.GRPOConfig`] (converted
    with the ES fields at their defaults). The model can be a hub id or local path, a ``PreTrainedModel`` or a
    ``PeftModel``; with PEFT (or ``peft_config``) only the adapter weights are evolved.

    Handling of rewards: a completion for which every reward function returned ``None`` is unscorable and ignored;
    a member with no scorable completion gets no weight in the update (``es/invalid_members`` counts them); a step
    in which no member has a scorable completion raises, leaving the weights untouched.
    """

    _tag_names = ["trl", "trl-es", "evolution-strategies"]
    _name = "ES (evolution strategies, no backprop)"
    _paper = {"title": "Evolution Strategies at Scale: LLM Fine-Tuning Beyond Reinforcement Learning"}

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = ESConfig(f"{str(model_name).rstrip('/').split('/')[-1]}-ES")
        elif not isinstance(args, ESConfig):
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
        if environment_factory is None:
            _check_prompt_column(train_dataset, "train_dataset")
            _check_prompt_column(eval_dataset, "eval_dataset")
        if args.deepspeed:
            from .deepspeed_space import init_deepspeed_comm

            init_deepspeed_comm(args)

        try:
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                reward_processing_classes=reward_processing_classes,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
                tools=tools,
                rollout_func=rollout_func,
                environment_factory=environment_factory,
            )
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

        if self.is_fsdp_enabled:
            # FSDP shards the parameters behind its own flat handles; writing the ES update into p.grad reaches
            # nothing, so refuse rather than train nothing.
            raise ValueError(
                "ESTrainer does not support FSDP yet: the ES update is written to p.grad for a plain torch optimizer. "
                "Launch with plain DDP or DeepSpeed ZeRO-3 (`accelerate launch` / `torchrun` without an FSDP config)."
            )
        if self.is_deepspeed_enabled:
            self._check_deepspeed()
        # ES never backpropagates, so dropout would only add noise to the member comparison.
        disable_dropout_in_model(self.model)
        self.reward_funcs = wrap_reward_funcs(self.reward_funcs, self.reward_func_names)
        self._greedy = args.temperature == 0.0
        if self._greedy:
            self._use_greedy_decoding()
        self.es_noise = MemberNoise(args.seed, args.population_size, args.antithetic)
        self.perturbation_space = self._build_perturbation_space()
        self._check_population_split()
        self._es_micro_step = 0
        self._step_comm_bytes = 0
        self._eval_batches = 0
        self._weights_before_update = None

    # ------------------------------------------------------------------ setup

    def _use_greedy_decoding(self) -> None:
        greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None}
        if getattr(self, "generation_config", None) is not None:
            self.generation_config.update(**greedy)
        if getattr(self, "generation_kwargs", None) is not None:
            self.generation_kwargs.update(greedy)
        # vLLM reads temperature=0 as greedy decoding already.

    def _check_deepspeed(self) -> None:
        from .deepspeed_space import check_deepspeed_config, zero_stage

        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        if zero_stage(config) != 3:
            raise ValueError(
                f"ESTrainer supports DeepSpeed with ZeRO stage 3 only, got stage {zero_stage(config)}: stages 0-2 "
                "step their optimizer from their own backward hooks, which ES never runs. Use "
                '"zero_optimization": {"stage": 3}, or plain DDP (no DeepSpeed config) for a model that fits.'
            )
        if self.args.perturbation == "low_rank":
            raise ValueError(
                "perturbation='low_rank' is not supported under DeepSpeed ZeRO-3 (its batched members need the full "
                "weight matrices); use perturbation='full' or 'lora'."
            )
        for warning in check_deepspeed_config(config):
            logger.warning(warning)

    def _build_perturbation_space(self) -> PerturbationSpace:
        requested = self.args.perturbation
        peft = is_peft_model(self.model)
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
        if requested == "low_rank":
            if peft:
                raise ValueError(
                    "perturbation='low_rank' evolves the model's own Linear layers; it does not combine with PEFT "
                    "adapters. Drop peft_config, or use perturbation='lora'."
                )
            self.perturbation_name = "low_rank"
            return LowRankSpace(
                self._low_rank_targets(),
                self.es_noise,
                self.args.sigma,
                rank=self.args.perturbation_rank,
                # default: one batched generate per process, the population split evenly over processes
                members_per_forward=self.args.population_batch_size
                or max(1, self.es_noise.population_size // self.accelerator.num_processes),
            )
        self.perturbation_name = "lora" if peft else "full"
        named = [(name, param) for name, param in self.model.named_parameters() if param.requires_grad]
        if not named:
            raise ValueError("The model has no trainable parameters (requires_grad=True) to evolve.")
        if self.is_deepspeed_enabled:
            from .deepspeed_space import ZeRO3Space

            # The engine exists only once train() has prepared the model; the space asks for it when it needs it.
            return ZeRO3Space(
                named,
                self.es_noise,
                self.args.sigma,
                engine=lambda: self.deepspeed,
                restore=self.args.perturbation_restore,
            )
        return InPlaceSpace(named, self.es_noise, self.args.sigma, restore=self.args.perturbation_restore)

    def _check_population_split(self) -> None:
        """Each process evaluates whole member groups, the same number and size on every process."""
        groups = self.perturbation_space.member_groups()
        # Ranks that share members (ZeRO-3) split the prompts, not the population.
        world = 1 if getattr(self.perturbation_space, "ranks_share_members", False) else self.accelerator.num_processes
        if len({len(group) for group in groups}) != 1 or len(groups) % world:
            raise ValueError(
                f"population_size={self.args.population_size} does not split into equal member groups of "
                f"{self.perturbation_space.members_per_forward} (population_batch_size) over {world} processes; "
                "choose a population_size divisible by processes x population_batch_size."
            )

    def _low_rank_targets(self) -> list[tuple[str, torch.nn.Linear]]:
        """Linear layers to evolve: the configured ones, or all but the output head (tied to the embeddings in
        many models, where a low-rank output-side update would silently move the input embeddings too)."""
        head = self.model.get_output_embeddings()
        wanted = self.args.perturbation_target_modules
        targets = []
        for name, module in self.model.named_modules():
            if not isinstance(module, torch.nn.Linear) or not module.weight.requires_grad:
                continue
            if wanted is None:
                if module is not head:
                    targets.append((name, module))
            elif any(name == w or name.endswith("." + w) for w in wanted):
                targets.append((name, module))
        if not targets:
            raise ValueError(
                f"perturbation_target_modules={wanted} matches no trainable nn.Linear layer of the model; "
                f"Linear layers: {sorted({n.split('.')[-1] for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)})}."
            )
        return targets

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        # Under DeepSpeed this torch optimizer steps DeepSpeed's flat fp32 partitions, not the model's parameters:
        # the update is measured around the engine's step instead (_step_deepspeed).
        if self.args.log_update_norm and not self.is_deepspeed_enabled:
            optimizer.register_step_pre_hook(self._snapshot_weights)
            optimizer.register_step_post_hook(self._log_update_norm)
        return optimizer

    def _evolved_tensors(self) -> list[torch.Tensor]:
        return [param for _, param in self.perturbation_space.named_params]

    def _snapshot_weights(self, optimizer, args, kwargs):
        self._weights_before_update = [param.detach().clone() for param in self._evolved_tensors()]

    def _log_update_norm(self, optimizer, args, kwargs):
        if self._weights_before_update is None:
            return
        update_sq, weight_sq = 0.0, 0.0
        for param, before in zip(self._evolved_tensors(), self._weights_before_update, strict=True):
            update_sq += float((param.detach().float() - before.float()).square().sum())
            weight_sq += float(before.float().square().sum())
        self._weights_before_update = None
        metrics = self._metrics["train"]
        metrics["es/update_norm"].append(update_sq**0.5)
        metrics["es/update_to_weight_ratio"].append(update_sq**0.5 / max(weight_sq**0.5, 1e-12))

    # ------------------------------------------------------------------ generation and scoring

    @contextlib.contextmanager
    def _seeded_sampling(self, seed: int):
        """Sample from a private RNG stream: per-member completions are reproducible and the global RNG untouched."""
        device = self.accelerator.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _invalidate_vllm_weights(self) -> None:
        """GRPO syncs weights to vLLM once per optimizer step; ES changes them once per member, so force a sync."""
        if self.use_vllm:
            self._last_loaded_step = -1

    def _score(self, rows: list[dict], prompts: list, completions: list, completion_ids: list) -> torch.Tensor:
        """Rewards per completion and reward function, ``(world * len(rows), num_funcs)``, rank-major."""
        return self._calculate_rewards(rows, prompts, completions, completion_ids).float()

    def _combine_reward_funcs(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """Weighted sum over reward functions (as GRPO); NaN where every function returned None."""
        weights = self.reward_weights.to(rewards_per_func.device).float()
        rewards = (rewards_per_func * weights).nansum(dim=-1)
        rewards[torch.isnan(rewards_per_func).all(dim=-1)] = float("nan")
        return rewards

    def _log_reward_metrics(self, mode: str, rewards_per_func: torch.Tensor, rewards: torch.Tensor) -> None:
        metrics = self._metrics[mode]
        flat = rewards_per_func.reshape(-1, rewards_per_func.shape[-1])
        for index, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(_nanmean(flat[:, index]))
            metrics[f"rewards/{name}/std"].append(_nanstd(flat[:, index]))
        metrics["reward"].append(_nanmean(rewards.reshape(-1)))
        metrics["reward_std"].append(_nanstd(rewards.reshape(-1)))

    def _flush_reward_logged_metrics(self, mode: str) -> None:
        """Average what reward functions sent through ``log_metric`` over processes, as GRPO does."""
        device = self.accelerator.device
        for name in sorted(self._pending_metrics):
            values = self._pending_metrics[name]
            local = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=device)
            total, count = self.accelerator.gather(local).view(-1, 2).sum(dim=0).tolist()
            self._metrics[mode][name].append(total / max(count, 1))
        self._pending_metrics.clear()

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
        if self.is_deepspeed_enabled and self.accelerator.sync_gradients:
            self._step_deepspeed()
        self._metrics["train"]["step_time"].append(time.perf_counter() - start)
        return loss

    def _step_deepspeed(self) -> None:
        """Apply the pseudo-gradient written by the ZeRO-3 space through the engine's optimizer and scheduler.

        Under DeepSpeed the Trainer's ``optimizer.step()`` and ``lr_scheduler.step()`` that follow are no-ops (the
        engine steps inside ``accelerator.backward``, which ES never calls), so this is the step's only update.
        """
        from .deepspeed_space import step_engine

        space = self.perturbation_space
        before = [shard.clone() for shard in space.local_shards()] if self.args.log_update_norm else None
        step_engine(self.deepspeed)
        if before is not None:
            update_norm, weight_norm = space.weight_and_update_norms(before)
            self._metrics["train"]["es/update_norm"].append(update_norm)
            self._metrics["train"]["es/update_to_weight_ratio"].append(update_norm / max(weight_norm, 1e-12))

    def _es_step(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        step = self.state.global_step
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if world > 1:
            # Every process scores its share of the population on the *whole* prompt batch (common random
            # numbers across members), so the per-process prompt slices are pooled first. Only prompts and scalar
            # rewards cross processes; every process then applies the same update from the seeds.
            self._step_comm_bytes = world * len(pickle.dumps(rows))
            rows = gather_object(rows)
        # ZeRO-3 holds only a shard of the weights per rank and a forward gathers every rank's shard, so all ranks
        # must act as the same member at once: they split the prompts instead of the population.
        sharded = world > 1 and getattr(self.perturbation_space, "ranks_share_members", False)
        if self._greedy:
            distinct = _distinct_rows(rows, self.num_generations)
            rows = distinct if not sharded or len(distinct) % world == 0 else rows
        prompts = [row["prompt"] for row in rows]
        num_rows, population = len(rows), self.es_noise.population_size
        groups = self.perturbation_space.member_groups()
        if sharded:
            share = num_rows // world  # rows of the pooled batch are a multiple of world (world x per-device rows)
            rows_here, prompts_here = (
                rows[rank * share : (rank + 1) * share],
                prompts[rank * share : (rank + 1) * share],
            )
            rounds = [[group] * world for group in groups]
        else:
            rows_here, prompts_here = rows, prompts
            rounds = [groups[start : start + world] for start in range(0, len(groups), world)]

        # rewards_per_func[i, j, k]: member i, completion slot j, reward function k.
        rewards_per_func = torch.full((population, num_rows, len(self.reward_funcs)), float("nan"))
        member_completions: dict[int, list] = {}
        member_extras: dict[int, dict[str, list]] = {}
        for round_groups in rounds:
            # One round: process r evaluates round_groups[r]; all groups of a round have the same size, so every
            # process makes the same collective calls (GRPO's generation and reward code gather).
            members, n_here = round_groups[rank], len(rows_here)
            block_rows, block_prompts = rows_here * len(members), prompts_here * len(members)
            seed = self.es_noise.sampling_seed(step, members[0])
            # The weights are restored when this block exits, before any reward function runs.
            with self.perturbation_space.perturbed(step, members), self._seeded_sampling(seed):
                self._invalidate_vllm_weights()
                _, completion_ids, _, completions, *_ = self._generate(block_prompts)
            scores = self._score(block_rows, block_prompts, completions, completion_ids).cpu()
            self._step_comm_bytes += scores.numel() * scores.element_size() if world > 1 else 0
            # gathered rows are (process, member of that process's group, that process's prompts)
            scores = scores.view(world, len(members), n_here, -1)
            if sharded:
                rewards_per_func[members] = scores.transpose(0, 1).reshape(len(members), num_rows, -1)
            else:
                for process in range(world):
                    rewards_per_func[round_groups[process]] = scores[process]
            logs = {
                member: (
                    completions[offset * n_here : (offset + 1) * n_here],
                    {
                        column: values[offset * n_here : (offset + 1) * n_here]
                        for column, values in self._pending_extra_logs.items()
                        if len(values) == len(block_rows)
                    },
                )
                for offset, member in enumerate(members)
            }
            self._pending_extra_logs.clear()
            if sharded:
                # Each rank completed its share of the prompts: pool the texts so the completion log is whole.
                self._step_comm_bytes += world * len(pickle.dumps(logs))
                parts = gather_object([logs])
                logs = {
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
            for member, (texts, extras) in logs.items():
                member_completions[member], member_extras[member] = texts, extras

        self._invalidate_vllm_weights()  # vLLM still holds the last member's weights
        rewards = self._combine_reward_funcs(rewards_per_func)  # (members, completions)
        fitness = member_fitness(rewards, normalize_per_prompt=self.args.normalize_per_prompt)
        invalid = torch.isnan(fitness)
        if invalid.all():
            raise ValueError(
                f"ES step {step}: every reward function returned None for every completion of every member, so "
                f"there is no signal to update from (reward functions: {self.reward_func_names}). The weights were "
                "left unchanged."
            )
        if invalid.any():
            logger.warning(
                "ES step %d: members %s have no scorable completion (all rewards None) and are left out of the update.",
                step,
                invalid.nonzero().flatten().tolist(),
            )
        shaped = shape_fitness(fitness, self.args.fitness_shaping)
        self.perturbation_space.write_gradients(step, shaped)

        metrics = self._metrics["train"]
        self._log_reward_metrics("train", rewards_per_func, rewards)
        valid_fitness = fitness[~invalid]
        metrics["es/fitness_std"].append(_nanstd(valid_fitness))
        metrics["es/best_member_reward"].append(float(valid_fitness.max()))
        metrics["es/worst_member_reward"].append(float(valid_fitness.min()))
        metrics["es/invalid_members"].append(float(invalid.sum()))
        if world > 1:
            metrics["es/comm_bytes"].append(float(self._step_comm_bytes))
        # Prompts on which every member scored the same carry no ES signal.
        spread = torch.nan_to_num(rewards, nan=0.0).std(dim=0, unbiased=False)
        metrics["es/frac_prompts_no_signal"].append(float((spread == 0).float().mean()))
        self._flush_reward_logged_metrics("train")
        self._log_best_member(fitness, shaped, prompts, member_completions, member_extras, rewards_per_func)
        return torch.tensor(-_nanmean(rewards.reshape(-1)), device=self.accelerator.device)

    def _log_best_member(self, fitness, shaped, prompts, member_completions, member_extras, rewards_per_func):
        """Feed GRPO's completion log (``log_completions``) with the best member's rows; advantage = its fitness."""
        if not self.log_completions:
            return
        # With several processes only this process's members have their completions here.
        local = torch.full_like(fitness, -math.inf)
        local[list(member_completions)] = torch.nan_to_num(fitness[list(member_completions)], nan=-math.inf)
        best = int(local.argmax())
        self._logs["prompt"].extend(prompts)
        self._logs["completion"].extend(member_completions[best])
        for index, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[best, :, index].tolist())
        self._logs["advantages"].extend([float(shaped[best])] * len(prompts))
        for column, values in member_extras[best].items():
            self._logs["extra"][column].extend(values)

    # ------------------------------------------------------------------ evaluation: the unperturbed model

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        rows = _distinct_rows(inputs, self.num_generations_eval) if self._greedy else inputs
        prompts = [row["prompt"] for row in rows]
        seed = derive_seed(self.args.seed, "eval", self.state.global_step, self._eval_batches)
        self._eval_batches += 1
        with torch.no_grad(), self._seeded_sampling(seed):
            _, completion_ids, _, completions, *_ = self._generate(prompts)
        rewards_per_func = self._score(rows, prompts, completions, completion_ids).cpu()
        rewards = self._combine_reward_funcs(rewards_per_func)
        self._log_reward_metrics("eval", rewards_per_func, rewards)
        self._flush_reward_logged_metrics("eval")
        self._pending_extra_logs.clear()
        # Trainer wants a loss: ES's is the negative mean reward of the unperturbed model.
        loss = torch.tensor(-_nanmean(rewards), device=self.accelerator.device)
        return loss, None, None


__all__ = ["ESTrainer"]
