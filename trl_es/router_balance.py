"""Mixture-of-Experts router load balancing under ES: each member's balance loss, measured under its perturbation.

GRPO adds ``router_aux_loss_coef * aux_loss`` to the loss it minimises, where ``aux_loss`` is the model's own router
load-balancing loss over the prompt and completion tokens (it is large when a few experts get most tokens). ES has
no loss, so the same term acts on the fitness instead: after a member group generates, and while its perturbation
is still applied, one no-grad forward over the group's prompt + completion tokens measures each member's
``aux_loss``; the step logs the population mean as ``aux_loss`` (GRPO's metric name) and each member's fitness loses
``router_aux_loss_coef * aux_loss`` (``core.fitness.penalize_router_imbalance``), so members that route less evenly
rank lower. It runs exactly when GRPO would add the loss: a model whose config has ``output_router_logits`` and a
coefficient that is not 0 (``router_aux_loss_coef`` of the config, or the model's own default).

Cost: one forward per member group with ``logits_to_keep=1`` (no vocabulary-sized logits), small next to generation.
"""

import sys

import torch

from .core import MemberMeans, penalize_router_imbalance


class RouterBalance:
    """Per-member router balance losses of one ES step, and the fitness penalty they give.

    Args:
        model: the policy (a ``PeftModel`` is unwrapped to find the architecture's own balance-loss function).
        coef: ``router_aux_loss_coef`` when the loss is in play, else ``None`` (then every method is a no-op).
        population_size: members per step.
        members_per_forward: members sharing one forward (batched spaces: ``len(members)`` blocks of rows).
        pad_token_id: id used to right-pad the block (padding is masked out of the loss).
    """

    def __init__(self, model, coef: float | None, population_size: int, members_per_forward: int, pad_token_id):
        self.model = model
        self.coef = coef
        self.enabled = coef is not None
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0
        self._measured = MemberMeans(population_size)
        self._per_member_loss = None
        if self.enabled and members_per_forward > 1:
            self._per_member_loss = _architecture_balance_loss(model)

    def measure(self, members, prompt_ids: list, completion_ids: list) -> None:
        """Record each member's balance loss on its rows of a member-major block (call under the perturbation)."""
        if not self.enabled:
            return
        losses = self.losses(prompt_ids, completion_ids, len(members))
        self._measured.add(members, losses, 1)

    @torch.no_grad()
    def losses(self, prompt_ids: list, completion_ids: list, num_members: int = 1) -> torch.Tensor:
        """``(num_members,)`` balance losses of a member-major block of prompt + completion sequences."""
        sequences = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        if len(sequences) % num_members:
            raise ValueError(f"{len(sequences)} rollouts do not split into {num_members} member blocks")
        device = next(self.model.parameters()).device
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, : len(sequence)] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_router_logits=True,
            logits_to_keep=1,  # only the router statistics are needed, not vocabulary-sized logits
            use_cache=False,
        )
        if num_members == 1:
            if getattr(outputs, "aux_loss", None) is None:
                raise RuntimeError(
                    f"{type(self.model).__name__} returned no aux_loss with output_router_logits=True; set "
                    "router_aux_loss_coef=0 to train it without the router balance term."
                )
            return outputs.aux_loss.detach().float().reshape(1).cpu()
        # Several members share the forward: the loss is not additive over rows, so compute it per member block
        # from the router logits (one (rows x tokens, experts) tensor per layer, row-major).
        rows = len(sequences) // num_members
        layers = []
        for logits in outputs.router_logits:
            if logits.shape[0] != len(sequences) * length:
                raise RuntimeError(
                    f"{type(self.model).__name__} returned router logits of shape {tuple(logits.shape)}, not one row "
                    f"per token ({len(sequences)} x {length}); the per-member balance loss cannot be split by member. "
                    "Use perturbation='full' or set router_aux_loss_coef=0."
                )
            layers.append(logits.reshape(len(sequences), length, -1))
        return torch.stack(
            [
                self._per_member_loss(
                    tuple(layer[m * rows : (m + 1) * rows].reshape(rows * length, -1) for layer in layers),
                    attention_mask[m * rows : (m + 1) * rows],
                )
                .detach()
                .float()
                .cpu()
                for m in range(num_members)
            ]
        )

    def penalize(self, fitness: torch.Tensor, accelerator, metrics) -> torch.Tensor:
        """The step's fitness minus ``coef`` x each member's balance loss; logs the mean loss as ``aux_loss``.

        Every process must call it (the measurements are summed over processes, which may hold different members).
        """
        if not self.enabled:
            return fitness
        aux_loss = self._measured.take(accelerator)
        measured = aux_loss[~torch.isnan(aux_loss)]
        metrics["aux_loss"].append(float(measured.mean()) if measured.numel() else float("nan"))
        return penalize_router_imbalance(fitness, aux_loss, self.coef)

    def log_eval(self, prompt_ids: list, completion_ids: list, accelerator, metrics) -> None:
        """Log the unperturbed model's balance loss on an evaluation batch as ``aux_loss`` (mean over processes)."""
        if not self.enabled:
            return
        loss = self.losses(prompt_ids, completion_ids).to(accelerator.device)
        metrics["aux_loss"].append(float(accelerator.gather(loss).mean()))


def _architecture_balance_loss(model):
    """``f(router_logits, attention_mask) -> loss`` with the architecture's own ``load_balancing_loss_func``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules.get(type(base).__module__)
    func = getattr(module, "load_balancing_loss_func", None)
    num_experts, top_k = getattr(base, "num_experts", None), getattr(base, "num_experts_per_tok", None)
    if func is None or num_experts is None or top_k is None:
        raise ValueError(
            f"{type(base).__name__}: measuring each member's router balance loss when several members share one "
            "forward needs the architecture's `load_balancing_loss_func` and `num_experts` / `num_experts_per_tok` "
            f"on the model, which {type(base).__module__} does not provide. Use perturbation='full' (one member per "
            "forward, the model's own aux_loss) or set router_aux_loss_coef=0."
        )
    return lambda router_logits, attention_mask: func(router_logits, num_experts, top_k, attention_mask)
