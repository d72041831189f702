"""What ``ESTrainer`` logs each step, on top of GRPO's own metrics: the reward metrics GRPO logs (from every
member's rewards), the ES metrics (``es/...``: fitness spread, best and worst member, members without a score,
search dimension, prompts without signal, ...), the best member's completions for GRPO's completion table, GA's
selection, and the step size strategies that use no optimizer report instead of ``learning_rate``.

A mixin over ``GRPOTrainer`` (it overrides ``log``); it expects the trainer's ``args``, ``strategy``,
``perturbation_space``, ``reward_func_names``, ``reward_weights``, ``accelerator``, ``state`` and
``log_completions`` and ``_combine_reward_funcs`` (metrics and the completion table through ``trl_compat``).
"""

import math
import warnings

import torch

from . import trl_compat
from .core import UpdateKind, seen_mask


# GA: generations in a row the parent may survive before a warning says the weights are standing still.
GA_STALL_GENERATIONS = 10


def _nanstd(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.std(unbiased=False)) if valid.numel() > 1 else 0.0


def _nanmean(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else float("nan")


class StepLogsMixin:
    """The step's metrics (see the module docstring)."""

    def _log_selection(self, step: int, update) -> None:
        """GA: whether the parent survived (``es/ga_parent_kept``), and one warning when it has survived
        ``GA_STALL_GENERATIONS`` generations in a row: no child beats it, so the weights stand still."""
        trl_compat.metrics(self, "train")["es/ga_parent_kept"].append(float(update.winner is None))
        if self.strategy.generations_parent_kept(step) == GA_STALL_GENERATIONS:
            warnings.warn(
                f"strategy='ga': the parent has been kept for {GA_STALL_GENERATIONS} generations in a row (step "
                f"{step}): none of the {self.strategy.population_size - 1} children beat it by more than "
                f"ga_min_improvement={self.args.ga_min_improvement:g}, so the weights have not changed. Usually the "
                f"children are too few or sigma={self.strategy.sigma_at(step):g} is too small to change a greedy "
                "completion (too large and every child is worse): raise population_size, or tune sigma with "
                "log_frac_changed_completions.",
                UserWarning,
                stacklevel=2,
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # CMA-ES and GA move the weights without the optimizer: its learning rate is not what they use.
        if "learning_rate" in logs and self.strategy.update_kind is not UpdateKind.GRADIENT:
            del logs["learning_rate"]
            logs.update(self.strategy.step_size_logs(self.state.global_step - 1))  # the step just made
        super().log(logs, start_time)

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
            metrics["es/sigma"].append(self.strategy.sigma_at(self.state.global_step))  # the step being logged
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

    def _log_best_member(self, batch, results, fitness, shaped) -> None:
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
