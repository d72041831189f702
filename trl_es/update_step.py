"""The update of ``ESTrainer``: ``core.apply.apply_update`` (the one update path, shared with replay) inside the
guards that keep the weights right, and the update's metrics.

``_apply_strategy_update`` runs in ``training_step``, right after ``strategy.tell``:

* before: keep what a failed update must be undone with (``_snapshot_weights``); with the in-place update
  (``ESConfig.inplace_update``: plain SGD, no clipping, no anchor) refuse a ``p.grad`` that something outside
  ESTrainer wrote;
* during: Ctrl-C is held until every tensor is written and the step's bookkeeping is done
  (``_stop_after_this_step``); a NaN or infinite pseudo-gradient is refused before any weight is touched;
* after: put the weights back if the update made one non-finite or beyond the overflow bound, and log
  ``es/update_norm`` and ``es/update_to_weight_ratio``; the pseudo-gradient's norm becomes Trainer's ``grad_norm``.

The Trainer's own optimizer step then finds no gradient and steps nothing; its LR scheduler advances as usual (the
update used the learning rate of this step, as the Trainer's step would have).

A mixin, so these methods override ``Trainer``'s (``create_optimizer``, ``_get_grad_norm``) while the ES step itself
stays in ``trainer.py``. It expects the trainer's ``perturbation_space``, ``strategy``, ``perturbation_name``,
``anchor``, ``args``, ``state``, ``control``, ``model`` and ``accelerator`` (metrics through ``trl_compat``).
"""

import logging

import torch
from accelerate.optimizer import AcceleratedOptimizer

from . import trl_compat
from .core import UpdateKind, plain_sgd_problem
from .core.apply import GradientStep, UpdateRefused, apply_update
from .guards import DeferredInterrupt, beyond_overflow_bound, nonfinite, overflow_bound, sampling_overflow_named


logger = logging.getLogger(__name__)


class UpdateStepMixin:
    """The ES update with its guards and metrics (see the module docstring)."""

    def _init_update_step(self) -> None:
        self._weights_before_update = None
        # Indices of evolved tensors already beyond the overflow bound before this step's update (None: not measured)
        self._beyond_bound_before: set[int] | None = None
        # Resolved in create_optimizer, once the optimizer exists (ESConfig.inplace_update).
        self._inplace_update = False
        self._grad_norm = 0.0  # the last update's pseudo-gradient norm: what Trainer logs as grad_norm
        # Ctrl-C during the update is held until every tensor is written, then until the step's bookkeeping is done
        # too (`_stop_after_this_step`).
        self._update_guard = DeferredInterrupt(raise_on_exit=False)
        self.interrupted_at_step: int | None = None  # the step in whose update a held Ctrl-C arrived
        self._warned_large_update = False
        # Loss scaling (fp16 mixed precision on a GPU) exists for backward passes, which ES never runs: a GradScaler
        # would find no gradient at the Trainer's optimizer step and fail there. The forward keeps fp16 autocast.
        if getattr(self.accelerator, "scaler", None) is not None:
            self.accelerator.scaler = None

    def create_optimizer(self, model=None):
        space = self.perturbation_space
        if space.tensors_are_model_parameters:
            optimizer = super().create_optimizer(model)
        else:
            # The evolved tensors are the space's own (singular values): the optimizer steps those.
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            tensors = [tensor for _, tensor in space.named_tensors()]
            self.optimizer = optimizer = optimizer_cls(tensors, **optimizer_kwargs)
        if not space.steps_own_optimizer:  # DeepSpeed's engine steps its own partitions
            self._resolve_inplace_update(optimizer)
        return optimizer

    def _resolve_inplace_update(self, optimizer) -> None:
        """Decide ``ESConfig.inplace_update`` against the optimizer actually built."""
        wanted = self.args.inplace_update
        problem = None if wanted is False else self._inplace_update_problem(optimizer)
        if wanted and problem:
            raise ValueError(
                f"inplace_update=True, but {problem}. Set inplace_update=None (auto) or False to write the "
                "pseudo-gradient to p.grad for the optimizer."
            )
        self._inplace_update = wanted is not False and problem is None
        if wanted is None:
            logger.info(
                "ES update: %s.",
                "applied in place from the seeds (plain SGD: no p.grad buffer)"
                if self._inplace_update
                else f"written to p.grad for the optimizer ({problem})",
            )

    def _inplace_update_problem(self, optimizer) -> str | None:
        space, args = self.perturbation_space, self.args
        if not space.supports_apply_update:
            return f"the {self.perturbation_name} space ({type(space).__name__}) has no in-place update"
        if self.strategy.update_kind is not UpdateKind.GRADIENT:
            return f"strategy={args.strategy!r} writes no pseudo-gradient to apply"
        if args.max_grad_norm:
            return f"max_grad_norm={args.max_grad_norm} clips the pseudo-gradient, which needs it whole in p.grad"
        if args.anchor_decay:
            return f"anchor_decay={args.anchor_decay} adds its pull to the pseudo-gradient in p.grad"
        return plain_sgd_problem(optimizer, [tensor for _, tensor in space.named_tensors()])

    def _get_grad_norm(self, model, grad_norm=None):
        # The update is made before the Trainer's optimizer step, which finds no p.grad: report the update's own.
        if self.perturbation_space.steps_own_optimizer:
            return super()._get_grad_norm(model, grad_norm=grad_norm)  # DeepSpeed's engine measured it
        return self._grad_norm

    # ------------------------------------------------------------------ the update

    def _gradient_step(self) -> GradientStep:
        """How this step's pseudo-gradient is stepped: the Trainer's own torch optimizer (not accelerate's wrapper,
        which would skip the step on a gradient-accumulation micro-step), its clipping and the anchor."""
        space, optimizer = self.perturbation_space, self.optimizer
        if isinstance(optimizer, AcceleratedOptimizer):
            optimizer = optimizer.optimizer
        if self._inplace_update:
            stale = [name for name, tensor in space.named_tensors() if tensor.grad is not None]
            if stale:
                raise RuntimeError(
                    f"ES step {self.state.global_step}: {stale[:5]} hold a gradient although the update is applied "
                    "in place (inplace_update); the optimizer would step them a second time. Something outside "
                    "ESTrainer wrote p.grad: run with inplace_update=False."
                )
            return GradientStep(optimizer, in_place=True)
        return GradientStep(
            optimizer,
            anchor=self.anchor,
            max_grad_norm=0.0 if space.steps_own_optimizer else self.args.max_grad_norm,  # the engine clips there
            # Trainer clips the model's parameters; singular values are the space's own tensors (the default).
            clip_parameters=list(self.model.parameters()) if space.tensors_are_model_parameters else None,
        )

    def _apply_strategy_update(self, step: int, update) -> None:
        """``strategy.tell``'s update made on the weights, inside the guards (see the module docstring)."""
        space = self.perturbation_space
        gradient = self._gradient_step() if update.kind is UpdateKind.GRADIENT else None
        self._snapshot_weights()
        settings = f"sigma={self.strategy.sigma_at(step)}, fitness shaping {self.args.fitness_shaping!r}"
        with self._update_guard:  # Ctrl-C waits until every tensor is written
            try:
                applied = apply_update(space, step, update, gradient)
            except UpdateRefused as error:
                self._weights_before_update = self._beyond_bound_before = None
                raise FloatingPointError(f"ES step {step}: {error} ({settings}); no update was made.") from error
            except FloatingPointError as error:
                # The tensors before the culprit were already updated: put them back if a copy was kept.
                raise FloatingPointError(
                    f"ES step {step}: {error} ({settings}). " + self._put_back_weights_before_update()
                ) from error
            self._check_weights_usable()
        if self._update_guard.received:
            self._stop_after_this_step()
        metrics = trl_compat.metrics(self, "train")
        if applied.anchor_distance is not None:
            metrics["es/anchor_distance"].append(applied.anchor_distance)
        self._grad_norm = applied.grad_norm if applied.grad_norm is not None else 0.0
        self._log_update_norm()

    def _snapshot_weights(self) -> None:
        """Keep the weights before this step's update: the update norm is measured against them, and a non-finite
        or overflowing update is undone with them."""
        space = self.perturbation_space
        if self.args.log_update_norm:
            self._weights_before_update = [t.detach().clone() for t in space.local_tensors()]
        # A model that arrived with such values is not the update's doing: only tensors it pushes past are refused.
        self._beyond_bound_before = set(beyond_overflow_bound(enumerate(space.local_tensors())))

    def _log_update_norm(self) -> None:
        space = self.perturbation_space
        if self._weights_before_update is None:
            return
        sums = torch.zeros(2, dtype=torch.float64)
        for tensor, before in zip(space.local_tensors(), self._weights_before_update, strict=True):
            sums[0] += (tensor.detach().double() - before.double()).square().sum()
            sums[1] += before.double().square().sum()
        self._weights_before_update = None
        update_norm, weight_norm = (float(x) ** 0.5 for x in space.sum_over_processes(sums))
        metrics = trl_compat.metrics(self, "train")
        metrics["es/update_norm"].append(update_norm)
        metrics["es/update_to_weight_ratio"].append(update_norm / max(weight_norm, 1e-12))
        if update_norm > weight_norm and not self._warned_large_update:
            self._warned_large_update = True
            logger.warning(
                "ES step %d moved the weights by more than their own norm (update %.3g, weights %.3g): "
                "learning_rate=%g is probably far too large.",
                self.state.global_step,
                update_norm,
                weight_norm,
                self.args.learning_rate,
            )

    def _stop_after_this_step(self) -> None:
        """A Ctrl-C held during the update: let the Trainer finish this step, then stop; ``train`` raises it then.

        Raising here, between the optimizer step and the Trainer's bookkeeping, would leave the weights one step ahead
        of ``global_step``, the LR scheduler and the callbacks (a ``save_model`` in an ``except KeyboardInterrupt``
        would label step N+1's weights as step N). The alternative, rolling the update back, would need a copy of the
        weights (kept only with ``log_update_norm``) and of the optimizer's state (momentum, Adam's moments), which
        nothing keeps. Finishing the step costs nothing: the scheduler step, ``on_step_end`` callbacks (the reference
        sync, the seed log), logging and a due checkpoint run as for any step, and training stops as a callback would
        stop it (``should_training_stop``). A second Ctrl-C meanwhile interrupts at once.
        """
        self.interrupted_at_step = self.state.global_step + 1  # the Trainer counts this step right after
        self.control.should_training_stop = True
        logger.warning(
            "Ctrl-C arrived while ES step %d's update was being written: that step is finished (global step, LR "
            "scheduler, callbacks, logging), then training stops with KeyboardInterrupt. Press Ctrl-C again to stop "
            "at once.",
            self.interrupted_at_step,
        )

    def raise_held_interrupt(self) -> None:
        """Raise the Ctrl-C held by ``_stop_after_this_step``, once the step it arrived in is finished."""
        step, self.interrupted_at_step = self.interrupted_at_step, None
        if step is not None:
            raise KeyboardInterrupt(f"Ctrl-C during ES step {step}; training stopped after that step")

    def _check_weights_usable(self) -> None:
        """Refuse an update that made a weight NaN or infinite, or finite but beyond the overflow bound (a huge
        learning rate: the next forward would overflow), putting the weights back."""
        space = self.perturbation_space
        named = list(zip((name for name, _ in space.named_tensors()), space.local_tensors(), strict=True))
        settings = f"learning_rate={self.args.learning_rate}, optim={self.args.optim!r}"
        before, self._beyond_bound_before = self._beyond_bound_before, None
        bad = nonfinite(named)
        if bad:
            raise FloatingPointError(
                f"ES step {self.state.global_step}: the update made {bad[:5]} NaN or infinite ({settings}). "
                + self._put_back_weights_before_update()
            )
        if before is None:
            return  # no update was measured this step (no signal)
        huge = beyond_overflow_bound(pair for index, pair in enumerate(named) if index not in before)
        if huge:
            largest = max(float(tensor.detach().abs().amax()) for name, tensor in named if name in huge)
            dtype = dict(named)[huge[0]].dtype
            raise FloatingPointError(
                f"ES step {self.state.global_step}: the update pushed {huge[:5]} to magnitudes up to {largest:.3g}, "
                f"beyond {overflow_bound(dtype):.3g}, where the next forward overflows {dtype} ({settings}, sigma="
                f"{self.strategy.sigma_at(self.state.global_step)}): the step is far too large. "
                + self._put_back_weights_before_update()
            )

    def _sampling_overflow(self, step: int, members):
        """Around a member group's generation, outside its perturbation: a sampler that meets inf/NaN probabilities
        becomes a ``FloatingPointError`` naming the step, the members and the likely cause, once their perturbation
        is undone."""

        def describe() -> str:
            space, sigma = self.perturbation_space, self.strategy.sigma_at(step)
            largest = max((float(t.detach().abs().amax()) for t in space.local_tensors() if t.numel()), default=0.0)
            return (
                f"ES step {step}: member(s) {list(members)} met inf/NaN token probabilities while sampling (the "
                f"forward overflowed). Their perturbation is undone: the weights are the step's unperturbed ones "
                f"(largest |weight| {largest:.3g}). Either sigma={sigma} is too large for these weights, or an "
                f"earlier update made them too large (learning_rate={self.args.learning_rate}; see "
                "es/update_to_weight_ratio)"
            )

        return sampling_overflow_named(describe)

    def _put_back_weights_before_update(self) -> str:
        """Undo a failed update from the copy ``log_update_norm`` keeps; says what became of the weights."""
        space = self.perturbation_space
        restored = self._weights_before_update is not None
        if restored:
            with torch.no_grad():
                for tensor, before in zip(space.local_tensors(), self._weights_before_update, strict=True):
                    tensor.copy_(before)
            space.after_update()
        self._weights_before_update = None
        if restored:
            return "The weights were put back to those before the update."
        return (
            "The weights are no longer usable (log_update_norm=False keeps no copy to put back); resume from the "
            "last checkpoint with a smaller learning_rate."
        )
