"""KL to a reference policy under ES (GRPO's ``beta``): each member's KL on its own completions, a fitness penalty.

GRPO adds ``beta * KL(policy || reference)`` to the loss it minimises, estimating the KL per completion token with
Schulman's k3 estimator on the completions the policy sampled. ES has no loss, so the same term acts on the fitness:

1. after a member group generates, while its perturbation is still applied, one no-grad forward over the group's
   prompt + completion tokens gives each completion token's log-probability under the member
   (:meth:`ReferenceKL.measure`);
2. once every member has generated, the reference gives the same tokens' log-probabilities;
3. per token ``k3 = exp(r) - r - 1`` with ``r = logp_ref - logp_member`` (tool results and padding excluded, as in
   GRPO), averaged over each completion's tokens, then over the member's completions
   (``core.fitness.k3_kl_per_completion``);
4. each member's fitness loses ``beta`` times its KL (``core.fitness.penalize_kl``), before fitness shaping; the step
   logs the mean over members as ``kl`` (GRPO's metric name).

Log-probabilities are those of the logits divided by ``temperature``, as GRPO computes them; under greedy decoding
(``temperature=0``, ES's default) the logits are taken as they are. With sampled completions k3 is an unbiased
estimate of KL(member || reference); with greedy ones the tokens are the member's argmax path, not samples, so the
number is a divergence along that path (>= 0, 0 where both models give its tokens the same probability) rather than
an unbiased KL estimate. Either way it is the same function of the weights for every member, which is what ranking
the members needs.

The reference, chosen by :func:`build_reference`:

* no PEFT (``full``, ``low_rank``, ``svd`` over Linear weights): a frozen copy of the evolved tensors as they were
  when the trainer was built. Memory: one copy of the evolved tensors (every trainable weight under ``full``; the
  targeted Linear weights under ``low_rank``; a few thousand singular values under ``svd``), next to the copy the
  ``copy`` restore keeps while a member is evaluated. GRPO loads a whole second model instead. The reference forward
  swaps the copy into the evolved tensors (an exchange of storage pointers, no further copy; ``svd`` rebuilds its
  weights on each swap), runs the model and swaps back, so one model serves both.
* PEFT with an adapter created from ``peft_config``: the model with the adapter disabled, i.e. the base model, as
  GRPO does; no memory.
* PEFT with an adapter the model arrived with (a warm start), or with ``sync_ref_model``: a frozen copy of the
  initial adapter weights (GRPO's "ref" adapter copy; GRPO refuses ``sync_ref_model`` with PEFT, ES can move a copy).

``trainer.ref_model`` (what GRPO scripts and callbacks read): without PEFT, :func:`shared_reference_model`, a model of
its own whose evolved tensors *are* the frozen copy's and whose other tensors are the policy's, so it costs no tensor
memory and moves with every sync; ``None`` with PEFT or ``beta == 0``, as in GRPO.

``sync_ref_model`` (TR-DPO, Gorbatovski et al. 2024): after every ``ref_model_sync_steps``-th optimizer step (GRPO's
``SyncRefModelCallback`` schedule) the reference becomes ``alpha * policy + (1 - alpha) * reference`` with ``alpha =
ref_model_mixup_alpha``, tensor by tensor over the evolved tensors (the others are the same in both). A moved
reference is saved in the checkpoint's ``es_state.pt``.

Cost: two no-grad forwards over every member's prompt + completion tokens with completion-length logits (GRPO's
reference forward is one of them), in chunks of rows whose logits fit ``LOGITS_BYTES_PER_FORWARD``.
"""

import contextlib
import copy
import logging

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback

from .core import MemberMeans, k3_kl_per_completion, penalize_kl
from .guards import DeferredInterrupt


logger = logging.getLogger(__name__)

# Bytes of fp32 completion-length logits (rows x (completion tokens + 1) x vocabulary) one no-grad forward may make;
# the log-softmax holds about as much again. Decides how many rows a forward takes (at least one per member of a
# batched member group): all of a small model's rows at once, a single row of a long completion over a large
# vocabulary.
LOGITS_BYTES_PER_FORWARD = 256 * 2**20


class FrozenCopy:
    """The reference as a copy of a space's evolved tensors, swapped into the model for its forward."""

    def __init__(self, space):
        self.space = space
        self._swapped_in = False
        with torch.no_grad():
            self.tensors = [tensor.detach().clone() for tensor in space.local_tensors()]

    def _swap(self) -> None:
        with DeferredInterrupt(), torch.no_grad():  # a half-swapped model would be neither policy nor reference
            for tensor, reference in zip(self.space.local_tensors(), self.tensors, strict=True):
                tensor.data, reference.data = reference.data, tensor.data
            # Inside the guard: a Ctrl-C held during the swap is raised after this, so `active` knows to swap back.
            self._swapped_in = not self._swapped_in

    @contextlib.contextmanager
    def active(self):
        """The model acts as the reference inside (the evolved tensors are exactly back on exit, Ctrl-C included)."""
        try:
            self._swap()
            self.space.after_update()  # spaces whose tensors are not the weights (svd) rebuild them
            yield
        finally:
            if self._swapped_in:
                self._swap()
                self.space.after_update()

    @torch.no_grad()
    def sync(self, alpha: float) -> None:
        """``reference <- alpha * policy + (1 - alpha) * reference`` (TR-DPO's soft update)."""
        for tensor, reference in zip(self.space.local_tensors(), self.tensors, strict=True):
            reference.mul_(1.0 - alpha).add_(tensor.detach().to(reference.dtype), alpha=alpha)

    def state_dict(self) -> dict:
        return {"tensors": [tensor.clone() for tensor in self.tensors]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["tensors"]
        if len(saved) != len(self.tensors) or any(a.shape != b.shape for a, b in zip(saved, self.tensors)):
            raise ValueError(
                f"the checkpoint's reference has {len(saved)} tensors of shapes {[tuple(t.shape) for t in saved][:4]}"
                f"..., this run evolves {len(self.tensors)} of shapes {[tuple(t.shape) for t in self.tensors][:4]}..."
            )
        with torch.no_grad():
            for reference, value in zip(self.tensors, saved, strict=True):
                reference.copy_(value)


class DisabledAdapter:
    """The reference as the PEFT model with its adapter disabled (the base model); costs no memory."""

    def __init__(self, model):
        self.model = model

    def active(self):
        return self.model.disable_adapter()

    def sync(self, alpha: float) -> None:
        raise RuntimeError(
            "a disabled adapter cannot be synced; build_reference copies the adapter for sync_ref_model"
        )

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"the reference is the base model (adapter disabled), but the checkpoint holds {state}")


def shared_reference_model(model, reference: FrozenCopy):
    """The reference policy as a model of its own (``trainer.ref_model``), sharing every tensor: its evolved parameters
    are the frozen copy's tensors, so a sync or a resumed checkpoint moves it too, and every other parameter or buffer
    is the policy's own. Only the module structure is copied. ``None`` when the evolved tensors are not parameters of
    the model (the ``svd`` space evolves singular values, from which the weights are rebuilt): sharing cannot express
    that reference, and a materialised copy would go stale at the next sync."""
    space = reference.space
    if not space.tensors_are_model_parameters:
        return None
    # deepcopy takes an object found in the memo as its own copy: the copied modules point at these tensors.
    memo = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    for (_, tensor), frozen in zip(space.named_tensors(), reference.tensors, strict=True):
        memo[id(tensor)] = torch.nn.Parameter(frozen, requires_grad=False)  # the frozen copy's storage, not a copy
    ref_model = copy.deepcopy(model, memo)
    # GRPO (its fused LM head) and accelerate (autocast) replace the policy's forward by closures that call the
    # policy's own bound forward: copied, they would run the policy. The reference runs its class's forward.
    for name in ("forward", "_original_forward"):
        ref_model.__dict__.pop(name, None)
    return ref_model.eval()


def build_reference(model, space, sync: bool, arrived_with_adapter: bool):
    """The reference for ``model`` evolved in ``space`` (see the module docstring for the rules)."""
    if is_peft_model(model) and not sync and not arrived_with_adapter:
        return DisabledAdapter(model)
    return FrozenCopy(space)


@torch.no_grad()
def completion_logps(
    model, prompt_ids: list, completion_ids: list, tool_mask, num_members: int, pad_token_id: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, mask)``, both ``(rows, longest completion)`` on CPU: each completion token's log-probability given
    its prompt and the tokens before it, and 1 where a token counts (0 for padding and tool results).

    The rows are a member-major block (``num_members`` equal blocks); each forward takes the same rows of every
    member's block, so a batched space still sees member-major batches.
    """
    rows = len(completion_ids)
    if rows % num_members:
        raise ValueError(f"{rows} rollouts do not split into {num_members} member blocks")
    prompt_len = max((len(p) for p in prompt_ids), default=0)
    completion_len = max((len(c) for c in completion_ids), default=0)
    logps = torch.zeros(rows, completion_len)
    mask = torch.zeros(rows, completion_len)
    if completion_len == 0:
        return logps, mask
    input_ids = torch.full((rows, prompt_len + completion_len), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        # Prompts left-padded, completions right-padded: every completion starts at column prompt_len, so the
        # logits of the last completion_len + 1 positions cover them all.
        input_ids[row, prompt_len - len(prompt) : prompt_len] = torch.tensor(list(prompt), dtype=torch.long)
        input_ids[row, prompt_len : prompt_len + len(completion)] = torch.tensor(list(completion), dtype=torch.long)
        attention[row, prompt_len - len(prompt) : prompt_len + len(completion)] = 1
        mask[row, : len(completion)] = 1
        if tool_mask is not None:
            mask[row, : len(completion)] *= torch.tensor(list(tool_mask[row]), dtype=mask.dtype)
    # Positions count real tokens only, as in generation, so left padding does not shift them.
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    per_member = rows // num_members
    vocabulary = getattr(getattr(model, "config", None), "vocab_size", None) or 2**17  # unknown: assume a large one
    chunk = max(1, LOGITS_BYTES_PER_FORWARD // (4 * (completion_len + 1) * vocabulary * num_members))
    for start in range(0, per_member, chunk):
        index = torch.tensor(
            [m * per_member + r for m in range(num_members) for r in range(start, min(start + chunk, per_member))]
        )
        logits = model(
            input_ids=input_ids[index].to(device),
            attention_mask=attention[index].to(device),
            position_ids=positions[index].to(device),
            logits_to_keep=completion_len + 1,
            use_cache=False,
        ).logits[:, :-1]
        logits = logits.float() / (temperature if temperature > 0 else 1.0)
        targets = input_ids[index, prompt_len:].to(device)
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        logps[index] = token_logps.cpu()
    return logps, mask


class ReferenceModelAttribute:
    """``trainer.ref_model`` for ``ESTrainer`` (a mixin before ``GRPOTrainer``), which GRPO scripts and callbacks read:
    with ``beta > 0`` a model sharing the tensors of ES's reference (:func:`shared_reference_model`: no second copy in
    memory), ``None`` with ``beta == 0`` or PEFT, as in GRPO (``ReferenceKL.reference_model``)."""

    @property
    def ref_model(self):
        reference_kl = self.__dict__.get("reference_kl")  # GRPO's __init__ touches ref_model before it exists
        return None if reference_kl is None else reference_kl.reference_model()

    @ref_model.setter
    def ref_model(self, value) -> None:
        # GRPO's __init__ stores None (ES hides beta from it); a model put here would never be used, so say so.
        if value is not None:
            raise AttributeError(
                "ESTrainer.ref_model cannot be replaced: ES keeps its reference in trainer.reference_kl (a copy of "
                "the initial evolved tensors, or the base model under PEFT) and ref_model only shows it."
            )


class ReferenceKL(TrainerCallback):
    """Per-member KL to the reference for one ES step, the fitness penalty ``beta * KL``, and the reference's sync.

    Args:
        model: the policy (what generates; a ``PeftModel`` with PEFT).
        reference: :class:`FrozenCopy` or :class:`DisabledAdapter` (see :func:`build_reference`); ``None`` when
            ``beta == 0`` (then every method is a no-op).
        beta: weight of the penalty.
        population_size: members per step.
        pad_token_id: id the blocks are padded with (masked out).
        temperature: the sampling temperature (0 = greedy: logits unscaled).
        sync: the reference moves (``sync_ref_model``; the schedule is read from the training arguments).
    """

    def __init__(
        self,
        model,
        reference,
        beta: float,
        population_size: int,
        pad_token_id,
        temperature: float,
        sync: bool = False,
    ):
        self.model = model
        self.reference = reference
        self.beta = beta
        self.enabled = reference is not None and beta > 0
        self.sync = sync and self.enabled
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0
        self.temperature = temperature
        self._blocks = []  # (members, prompt_ids, completion_ids, member logps, mask) of the step so far
        self._measured = MemberMeans(population_size)
        self._reference_model = None

    def reference_model(self):
        """GRPO's ``ref_model`` for this reference: a model sharing the frozen copy's tensors (built on first use),
        or ``None`` where GRPO has none either (``beta == 0``; PEFT, where the reference is the adapter disabled or
        a copy of the adapter's own weights) or the reference is no set of model parameters (``svd``)."""
        if not self.enabled or isinstance(self.reference, DisabledAdapter) or is_peft_model(self.model):
            return None
        if self._reference_model is None:
            self._reference_model = shared_reference_model(self.model, self.reference)
            if self._reference_model is None:
                self._reference_model = False  # warned once
                logger.warning(
                    "trainer.ref_model is None: the %s space evolves tensors that are not model parameters, so the "
                    "reference (a copy of them) is no model of its own. The KL penalty uses it as usual; "
                    "`with trainer.reference_kl.reference.active():` makes trainer.model act as the reference.",
                    type(self.reference.space).__name__,
                )
        return self._reference_model or None

    @classmethod
    def build(cls, model, space, args, pad_token_id: int, arrived_with_adapter: bool) -> "ReferenceKL":
        """The KL penalty ``args`` asks for (``beta``, ``sync_ref_model``) on ``model``, whose ``space`` evolves;
        ``arrived_with_adapter``: the model came with a PEFT adapter (its reference is then a copy of it)."""
        reference = None
        if args.beta > 0:
            if space.ranks_share_members or space.steps_own_optimizer:
                raise ValueError(
                    f"beta={args.beta} needs a reference policy, which ESTrainer does not keep under DeepSpeed ZeRO-3 "
                    f"({type(space).__name__}) yet. Set beta=0.0, or launch without DeepSpeed."
                )
            reference = build_reference(model, space, args.sync_ref_model, arrived_with_adapter)
            logger.info(
                "KL penalty beta=%g against %s%s.",
                args.beta,
                "the base model (adapter disabled)"
                if isinstance(reference, DisabledAdapter)
                else "a frozen copy of "
                f"the initial evolved tensors ({sum(t.numel() for t in reference.tensors):,} numbers)",
                f", synced every {args.ref_model_sync_steps} steps with alpha={args.ref_model_mixup_alpha}"
                if args.sync_ref_model
                else "",
            )
        return cls(
            model,
            reference,
            args.beta,
            args.population_size,
            pad_token_id,
            args.temperature,
            sync=args.sync_ref_model,
        )

    # ------------------------------------------------------------------ one ES step

    def measure(self, members, prompt_ids: list, completion_ids: list, tool_mask=None) -> None:
        """Record the member log-probabilities of a member-major block (call under the members' perturbation)."""
        if not self.enabled:
            return
        logps, mask = completion_logps(
            self.model, prompt_ids, completion_ids, tool_mask, len(members), self.pad_token_id, self.temperature
        )
        self._blocks.append((list(members), prompt_ids, completion_ids, logps, mask))

    def member_kl(self, accelerator) -> torch.Tensor:
        """Each member's KL estimate ``(population,)`` from the blocks measured this step (NaN: no completion token),
        summed over processes; every process must call it. Forgets the blocks."""
        blocks, self._blocks = self._blocks, []
        with self.reference.active():
            for members, prompt_ids, completion_ids, member_logps, mask in blocks:
                ref_logps, _ = completion_logps(
                    self.model, prompt_ids, completion_ids, None, 1, self.pad_token_id, self.temperature
                )
                per_completion = k3_kl_per_completion(member_logps, ref_logps, mask).view(len(members), -1)
                valid = ~torch.isnan(per_completion)
                self._measured.add(members, torch.where(valid, per_completion, 0.0).sum(dim=1), valid.sum(dim=1))
        return self._measured.take(accelerator)

    def penalize(self, fitness: torch.Tensor, accelerator, metrics) -> torch.Tensor:
        """The step's fitness minus ``beta`` x each member's KL; logs the mean over members as ``kl``."""
        if not self.enabled:
            return fitness
        kl = self.member_kl(accelerator)
        measured = kl[~torch.isnan(kl)]
        metrics["kl"].append(float(measured.mean()) if measured.numel() else float("nan"))
        return penalize_kl(fitness, kl, self.beta)

    def log_eval(self, prompt_ids: list, completion_ids: list, tool_mask, accelerator, metrics) -> None:
        """Log the unperturbed model's KL to the reference on an evaluation batch as ``kl`` (mean over processes)."""
        if not self.enabled:
            return
        args = (prompt_ids, completion_ids, tool_mask, 1, self.pad_token_id, self.temperature)
        policy_logps, mask = completion_logps(self.model, *args)
        with self.reference.active():
            ref_logps, _ = completion_logps(self.model, *args)
        per_completion = k3_kl_per_completion(policy_logps, ref_logps, mask)
        valid = ~torch.isnan(per_completion)
        local = torch.tensor([float(per_completion[valid].sum()), float(valid.sum())], device=accelerator.device)
        total, count = accelerator.reduce(local, reduction="sum").tolist()
        metrics["kl"].append(total / count if count else float("nan"))

    # ------------------------------------------------------------------ the reference across steps

    def on_step_end(self, args, state, control, **kwargs):
        # GRPO's SyncRefModelCallback schedule: after every ref_model_sync_steps-th optimizer step.
        if self.sync and state.global_step % args.ref_model_sync_steps == 0:
            self.reference.sync(args.ref_model_mixup_alpha)

    def state_dict(self) -> dict:
        """What a checkpoint must hold: the reference once it can move (``sync_ref_model``), else nothing."""
        return self.reference.state_dict() if self.sync else {}

    def load_state_dict(self, state: dict) -> None:
        if state and not self.sync:
            raise ValueError(
                "the checkpoint holds a synced reference policy, but this run does not sync one (beta="
                f"{self.beta}, sync_ref_model={self.sync}); resume with the checkpoint's beta and sync_ref_model"
            )
        if state:
            self.reference.load_state_dict(state)
