"""Fitness shaping: per-completion rewards -> one weight per population member.

Higher reward is better everywhere (evosax minimises; we do not). All functions are pure, NaN-aware and never
return NaN: a member with no valid reward gets shaped fitness 0, i.e. it is left out of the update, and a
population whose valid fitness values are all equal gets all zeros (a zero update, not a division by zero).
"""

import torch


def centered_rank(fitness: torch.Tensor) -> torch.Tensor:
    """Ranks mapped linearly to [-0.5, 0.5]; ties share their average rank. NaN entries -> 0."""
    shaped = torch.zeros_like(fitness, dtype=torch.float32)
    valid = ~torch.isnan(fitness)
    n = int(valid.sum())
    if n < 2:
        return shaped
    values = fitness[valid].float()
    # Average rank of ties: count of strictly smaller + (count of equal - 1) / 2.
    smaller = (values.unsqueeze(0) < values.unsqueeze(1)).sum(dim=1).float()
    equal = (values.unsqueeze(0) == values.unsqueeze(1)).sum(dim=1).float()
    ranks = smaller + (equal - 1) / 2
    shaped[valid] = ranks / (n - 1) - 0.5
    return shaped


def zscore(fitness: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(f - mean) / std over the valid members (population std). NaN entries and a zero spread -> 0."""
    shaped = torch.zeros_like(fitness, dtype=torch.float32)
    valid = ~torch.isnan(fitness)
    if int(valid.sum()) < 2:
        return shaped
    values = fitness[valid].float()
    std = values.std(unbiased=False)
    if std <= eps:
        return shaped
    shaped[valid] = (values - values.mean()) / std
    return shaped


def no_shaping(fitness: torch.Tensor) -> torch.Tensor:
    """Raw fitness, centered on its mean so a constant offset in the reward cannot bias the update."""
    shaped = torch.zeros_like(fitness, dtype=torch.float32)
    valid = ~torch.isnan(fitness)
    if int(valid.sum()) < 2:
        return shaped
    values = fitness[valid].float()
    shaped[valid] = values - values.mean()
    return shaped


FITNESS_SHAPINGS = {"centered_rank": centered_rank, "zscore": zscore, "none": no_shaping}


REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def combine_reward_functions(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    aggregation: str = "sum_then_normalize",
    eps: float = 1e-4,
) -> torch.Tensor:
    """``(members, completions, reward functions)`` -> ``(members, completions)``, as GRPO's
    ``multi_objective_aggregation`` does with its groups; NaN where every function returned None.

    * ``sum_then_normalize``: the weighted sum of the functions (fitness shaping normalises afterwards).
    * ``normalize_then_sum`` (GDPO): each function is first normalised across the members for each completion slot
      (the members' answers to the same prompt are ES's group), ``(r - mean) / (std + eps)`` as GRPO does, then
      weighted and summed, so a function with a large scale cannot drown the others.
    """
    if aggregation not in REWARD_AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation={aggregation!r}; choose one of {list(REWARD_AGGREGATIONS)}")
    rewards_per_func = rewards_per_func.float()
    unscorable = torch.isnan(rewards_per_func).all(dim=-1)
    if aggregation == "normalize_then_sum":
        mean = torch.nanmean(rewards_per_func, dim=0, keepdim=True)
        count = (~torch.isnan(rewards_per_func)).sum(dim=0, keepdim=True).clamp(min=1)
        std = torch.sqrt(torch.nansum((rewards_per_func - mean) ** 2, dim=0, keepdim=True) / count)
        rewards_per_func = (rewards_per_func - mean) / (std + eps)
    rewards = (rewards_per_func * weights.to(rewards_per_func.device).float()).nansum(dim=-1)
    rewards[unscorable] = float("nan")
    return rewards


def member_fitness(rewards: torch.Tensor, normalize_per_prompt: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """Collapse a ``(members, completions)`` reward matrix into one raw fitness per member.

    ``rewards[i, j]`` is member ``i``'s reward on completion slot ``j``; every member saw the same prompt in slot
    ``j``. NaN marks an unscorable completion and is ignored. With ``normalize_per_prompt`` each column is first
    z-scored across members, so easy and hard prompts weigh the same. A member with no valid reward gets NaN.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (members, completions), got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    if normalize_per_prompt:
        mean = torch.nanmean(rewards, dim=0, keepdim=True)
        centered = rewards - mean
        count = (~torch.isnan(rewards)).sum(dim=0, keepdim=True).clamp(min=1)
        std = torch.sqrt(torch.nansum(centered**2, dim=0, keepdim=True) / count)
        # A prompt on which every member scored the same carries no signal: it contributes 0, not NaN.
        rewards = torch.where(std > eps, centered / std.clamp(min=eps), centered * 0)
    return torch.nanmean(rewards, dim=1)


def penalize_router_imbalance(fitness: torch.Tensor, aux_loss: torch.Tensor, coef: float) -> torch.Tensor:
    """Fitness of a Mixture-of-Experts member minus ``coef`` times its router load-balancing loss.

    GRPO adds ``coef * aux_loss`` to the loss it minimises; ES maximises fitness, so a member whose routing is less
    balanced is less fit by the same amount. A member without a measurement (NaN ``aux_loss``) keeps its fitness, and
    an unscorable member (NaN fitness) stays unscorable.
    """
    if fitness.shape != aux_loss.shape:
        raise ValueError(f"fitness {tuple(fitness.shape)} and aux_loss {tuple(aux_loss.shape)} must match per member")
    aux_loss = aux_loss.to(fitness.device, torch.float32)
    return torch.where(torch.isnan(aux_loss), fitness, fitness - coef * aux_loss)


def k3_kl_per_completion(member_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each completion's KL estimate to the reference: the mean over its tokens of Schulman's k3 estimator.

    ``(completions, tokens)`` log-probabilities of the completion tokens under the member (which generated them) and
    under the reference, and a 0/1 ``mask`` of the tokens that count (padding and tool results are 0). Per token,
    with ``r = logp_ref - logp_member``: ``k3 = exp(r) - r - 1``, the estimator GRPO uses; it is >= 0 and unbiased
    for KL(member || reference) when the tokens are sampled from the member. A completion without a counted token
    gets NaN (no estimate).
    """
    if member_logps.shape != ref_logps.shape or member_logps.shape != mask.shape:
        raise ValueError(
            f"member_logps {tuple(member_logps.shape)}, ref_logps {tuple(ref_logps.shape)} and mask "
            f"{tuple(mask.shape)} must have one shape (completions, tokens)"
        )
    log_ratio = ref_logps.double() - member_logps.double()
    per_token = torch.expm1(log_ratio) - log_ratio  # exp(r) - 1 - r without cancellation near r = 0
    mask = mask.to(per_token.dtype)
    tokens = mask.sum(dim=-1)
    total = (per_token * mask).sum(dim=-1)
    return torch.where(tokens > 0, total / tokens.clamp(min=1), torch.nan).float()


def penalize_kl(fitness: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """Fitness of each member minus ``beta`` times its KL estimate to the reference policy.

    GRPO adds ``beta * KL`` to the loss it minimises; ES maximises fitness, so a member that drifts further from the
    reference on its own completions is less fit by the same amount. A member without an estimate (NaN ``kl``: no
    completion token) keeps its fitness; an unscorable member (NaN fitness) stays unscorable.
    """
    if fitness.shape != kl.shape:
        raise ValueError(f"fitness {tuple(fitness.shape)} and kl {tuple(kl.shape)} must match per member")
    if not 0 <= beta < float("inf"):
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    kl = kl.to(fitness.device, torch.float32)
    return torch.where(torch.isnan(kl), fitness, fitness - beta * kl)


class MemberMeans:
    """Per-member running sums and counts of a measurement taken during one step (a penalty's loss, a KL), and
    each member's mean over every process once the step is scored.

    ``accelerator`` in :meth:`take` is anything with ``num_processes``, ``device`` and ``reduce(tensor,
    reduction="sum")`` (accelerate's ``Accelerator``); the core imports nothing of accelerate.
    """

    def __init__(self, population_size: int):
        self._sums = torch.zeros(population_size, dtype=torch.float64)
        self._counts = torch.zeros(population_size, dtype=torch.float64)

    def add(self, members, sums: torch.Tensor, counts) -> None:
        """Add ``sums`` (one per member of ``members``) over ``counts`` measurements (a number or one per member)."""
        members = list(members)
        self._sums[members] += sums.double()
        self._counts[members] += counts.double() if isinstance(counts, torch.Tensor) else float(counts)

    def take(self, accelerator) -> torch.Tensor:
        """Each member's mean ``(population,)`` over all processes, NaN where nothing was measured; forgets the step.
        Every process must call it (it sums over processes)."""
        totals = torch.stack([self._sums, self._counts])
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        self._sums.zero_()
        self._counts.zero_()
        sums, counts = totals
        return torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan).float()


def shape_fitness(fitness: torch.Tensor, method: str = "centered_rank") -> torch.Tensor:
    if method not in FITNESS_SHAPINGS:
        raise ValueError(f"unknown fitness_shaping {method!r}; choose one of {sorted(FITNESS_SHAPINGS)}")
    return FITNESS_SHAPINGS[method](fitness)
