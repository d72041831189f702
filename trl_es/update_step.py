"""What happens around the optimizer step of ``ESTrainer``: the guards that keep the weights right and the in-place
update.

The Trainer's optimizer steps the evolved tensors; hooks registered on it in ``create_optimizer`` run

* before the step (``_before_update``): refuse a non-finite pseudo-gradient before anything is touched, hold Ctrl-C
  until every tensor is written and the step's bookkeeping is done (``_stop_after_this_step``), and with the in-place
  update (``ESConfig.inplace_update``: plain SGD, no clipping, no anchor) apply SGD's update straight from the seeds
  through ``space.apply_update`` so that no ``p.grad`` is ever held and the optimizer finds nothing to step;
* after it (``_after_update``): ``space.after_update()``, put the weights back if the update made one non-finite or
  beyond the overflow bound (from the copy ``log_update_norm`` keeps), and log ``grad_norm``, ``es/update_norm`` and
  ``es/update_to_weight_ratio``.

A mixin, so these methods override ``Trainer``'s (``create_optimizer``, ``_get_grad_norm``) while the ES step itself
stays in ``trainer.py``. It expects the trainer's ``perturbation_space``, ``strategy``, ``perturbation_name``,
``last_strategy_update``, ``args``, ``state``, ``control`` and ``accelerator`` (metrics through ``trl_compat``).
"""

import logging

import torch

from . import trl_compat
from .core import plain_sgd_problem, sgd_hyperparameters
from .guards import DeferredInterrupt, beyond_overflow_bound, nonfinite, overflow_bound, sampling_overflow_named


logger = logging.getLogger(__name__)


class UpdateStepMixin:
    """The optimizer step's guards, in-place update and update metrics (see the module docstring)."""

    def _init_update_step(self) -> None:
        self._weights_before_update = None
        # Indices of evolved tensors already beyond the overflow bound before this step's update (None: not measured)
        self._beyond_bound_before: set[int] | None = None
        # Resolved in create_optimizer, once the optimizer exists (ESConfig.inplace_update).
        self._inplace_update = False
        self._inplace_grad_sq: float | None = None  # squared pseudo-gradient norm of the update just applied
        self._last_applied_step: int | None = None
        # Ctrl-C during the optimizer step is held until every tensor is written, then until the step's bookkeeping
        # is done too (`_stop_after_this_step`).
        self._update_guard = DeferredInterrupt(raise_on_exit=False)
        self.interrupted_at_step: int | None = None  # the step in whose update a held Ctrl-C arrived
        self._warned_large_update = False

    def create_optimizer(self, model=None):
        space = self.perturbation_space
        if space.tensors_are_model_parameters:
            optimizer = super().create_optimizer(model)
        else:
            # The evolved tensors are the space's own (singular values): the optimizer steps those.
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            tensors = [tensor for _, tensor in space.named_tensors()]
            self.optimizer = optimizer = optimizer_cls(tensors, **optimizer_kwargs)
        if self.perturbation_space.steps_own_optimizer:
            return optimizer  # the space applies the update itself (training_step measures it there)
        self._resolve_inplace_update(optimizer)
        optimizer.register_step_pre_hook(lambda opt, *_: self._before_update(opt))
        optimizer.register_step_post_hook(lambda *_: self._after_update())
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
        self.strategy.update_in_place = self._inplace_update
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
        if not self.strategy.supports_update_in_place:
            return f"strategy={args.strategy!r} writes no pseudo-gradient to apply"
        if args.max_grad_norm:
            return f"max_grad_norm={args.max_grad_norm} clips the pseudo-gradient, which needs it whole in p.grad"
        if args.anchor_decay:
            return f"anchor_decay={args.anchor_decay} adds its pull to the pseudo-gradient in p.grad"
        if getattr(self.accelerator, "scaler", None) is not None:
            return "a gradient scaler (fp16) unscales and checks p.grad before the optimizer steps"
        return plain_sgd_problem(optimizer, [tensor for _, tensor in space.named_tensors()])

    def _get_grad_norm(self, model, grad_norm=None):
        # In place there is no p.grad to measure (Trainer would log 0): `_after_update` logs the update's own norm.
        if self._inplace_update:
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # ------------------------------------------------------------------ around the optimizer step

    def _before_update(self, optimizer=None) -> None:
        space = self.perturbation_space
        bad = nonfinite((name, tensor.grad) for name, tensor in space.named_tensors())
        if bad:
            # Raised before the optimizer touches anything: the weights stay those of the last good step.
            raise FloatingPointError(
                f"ES step {self.state.global_step}: the pseudo-gradient of {bad[:5]} is NaN or infinite (sigma="
                f"{space.sigma}, fitness shaping {self.args.fitness_shaping!r}); no update was made."
            )
        pending = self._pending_inplace_update(optimizer) if self._inplace_update else None
        if self._inplace_update:
            self._inplace_grad_sq = 0.0  # a step without signal: no gradient, as the p.grad path logs it
        self._update_guard.__enter__()  # Ctrl-C waits until every tensor is stepped
        if pending is not None:
            step, coefficients, lrs, decays = pending
            try:
                self._inplace_grad_sq = space.apply_update(step, coefficients, lrs, decays)
            except BaseException as error:
                self._update_guard.__exit__(None, None, None)  # the post-hook will not run
                if not isinstance(error, FloatingPointError):
                    raise
                # The tensors before the culprit were already updated: put them back if a copy was kept.
                raise FloatingPointError(
                    f"ES step {step}: {error} (sigma={space.sigma}, fitness shaping {self.args.fitness_shaping!r}). "
                    + self._put_back_weights_before_update()
                ) from error
            self._last_applied_step = step

    def _pending_inplace_update(self, optimizer):
        """``(step, coefficients, lr per tensor, weight decay per tensor)`` of the update the optimizer step stands
        for, or None for a step without signal; checked before anything is touched."""
        space, global_step = self.perturbation_space, self.state.global_step
        named = space.named_tensors()
        stale = [name for name, tensor in named if tensor.grad is not None]
        if stale:
            raise RuntimeError(
                f"ES step {global_step}: {stale[:5]} hold a gradient although the update is applied in place "
                "(inplace_update); the optimizer would step them a second time. Something outside ESTrainer wrote "
                "p.grad: run with inplace_update=False."
            )
        step, update = self.last_strategy_update or (None, None)
        if step != global_step or step == self._last_applied_step:
            raise RuntimeError(
                f"the optimizer steps at global step {global_step}, but the last ES update is for step {step}"
                f"{' (already applied)' if step == self._last_applied_step else ''}."
            )
        if update is None or update.coefficients is None:
            return None  # no signal this step: nothing to apply, as the p.grad path finds no gradient
        coefficients = update.coefficients
        if not torch.isfinite(coefficients).all():
            raise FloatingPointError(
                f"ES step {global_step}: the pseudo-gradient (coefficients {coefficients.tolist()}) is NaN or "
                f"infinite (sigma={space.sigma}, fitness shaping {self.args.fitness_shaping!r}); no update was made."
            )
        lrs, decays = sgd_hyperparameters(optimizer, [tensor for _, tensor in named])
        return step, coefficients, lrs, decays

    def _snapshot_weights(self) -> None:
        """Keep the weights before this step's update: the update norm is measured against them, and a non-finite
        or overflowing update is undone with them."""
        space = self.perturbation_space
        if self.args.log_update_norm:
            self._weights_before_update = [t.detach().clone() for t in space.local_tensors()]
        # A model that arrived with such values is not the update's doing: only tensors it pushes past are refused.
        self._beyond_bound_before = set(beyond_overflow_bound(enumerate(space.local_tensors())))

    def _after_update(self) -> None:
        space = self.perturbation_space
        try:
            space.after_update()
            self._check_weights_usable()
        finally:
            self._update_guard.__exit__(None, None, None)
        if self._update_guard.received:
            self._stop_after_this_step()
        if self._inplace_grad_sq is not None:
            # What Trainer logs as grad_norm on the p.grad path: the norm of the pseudo-gradient before weight decay.
            grad_sq = space.sum_over_processes(torch.tensor([self._inplace_grad_sq], dtype=torch.float64))
            trl_compat.metrics(self, "train")["grad_norm"].append(float(grad_sq[0]) ** 0.5)
            self._inplace_grad_sq = None
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
                f"{space.sigma}): the step is far too large. " + self._put_back_weights_before_update()
            )

    def _sampling_overflow(self, step: int, members):
        """Around a member group's generation, outside its perturbation: a sampler that meets inf/NaN probabilities
        becomes a ``FloatingPointError`` naming the step, the members and the likely cause, once their perturbation
        is undone."""

        def describe() -> str:
            space = self.perturbation_space
            largest = max((float(t.detach().abs().amax()) for t in space.local_tensors() if t.numel()), default=0.0)
            return (
                f"ES step {step}: member(s) {list(members)} met inf/NaN token probabilities while sampling (the "
                f"forward overflowed). Their perturbation is undone: the weights are the step's unperturbed ones "
                f"(largest |weight| {largest:.3g}). Either sigma={space.sigma} is too large for these weights, or an "
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
