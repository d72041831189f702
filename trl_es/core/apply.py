"""The one place an ES update reaches the evolved tensors: :func:`apply_update`, called by the trainer after
``strategy.tell`` and by replay for every record of a seed log, so a run and its replay make the same update by the
same code.

What happens depends on the update's kind (``core.strategies.UpdateKind``), which the strategy declares:

* ``GRADIENT`` (Gaussian ES): the pseudo-gradient ``g = sum_k c_k eps_k`` is stepped by an optimizer, as
  :class:`GradientStep` describes. Either the space writes ``g`` to ``t.grad``, the anchor's pull is added, the
  whole gradient is clipped, and the torch optimizer (or, for a space that ``steps_own_optimizer``, its engine)
  steps; or, with plain SGD (``in_place``), the space applies SGD's step straight from the seeds and no ``t.grad`` is
  ever held. The two give bit-identical weights.
* ``SELECTION`` (GA): the winner's perturbation is made permanent (``space.apply_member``); no optimizer.
* ``SET`` (CMA-ES): the evolved vector becomes the strategy's values (``space.set_vector``); no optimizer.

Then ``space.after_update()`` runs (the SVD space rebuilds its weights from the singular values there).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .anchor import Anchor
from .spaces import PerturbationSpace
from .strategies import StrategyUpdate, UpdateKind
from .update import sgd_hyperparameters


class UpdateRefused(FloatingPointError):
    """The update was refused before any weight was touched (a NaN or infinite pseudo-gradient)."""


@dataclass
class GradientStep:
    """How a ``GRADIENT`` update is stepped.

    Attributes:
        optimizer: the torch optimizer over the space's tensors; its param groups give each tensor's learning rate
            and weight decay. Unused for a space that ``steps_own_optimizer`` (DeepSpeed's engine steps there).
        in_place: apply plain SGD's step from the seeds (``space.apply_update``) instead of through ``t.grad``; only
            when ``update.plain_sgd_problem`` finds none and there is no anchor or clipping.
        anchor: ``anchor_decay``'s pull toward the initial tensors, added to the gradient before clipping.
        max_grad_norm: clip the whole gradient to this norm (0: no clipping), over ``clip_parameters``.
        clip_parameters: what the norm is taken over: the model's parameters, as the Trainer clips them (the
            evolved tensors hold the only gradients); by default the space's tensors.
    """

    optimizer: torch.optim.Optimizer | None = None
    in_place: bool = False
    anchor: Anchor | None = None
    max_grad_norm: float = 0.0
    clip_parameters: Sequence[torch.Tensor] | None = None

    def __post_init__(self):
        if self.in_place and (self.anchor is not None or self.max_grad_norm > 0):
            raise ValueError("an in-place update has no t.grad to add an anchor's pull to or to clip")


@dataclass
class AppliedUpdate:
    """What applying one update measured, for the logs."""

    #: Norm of the pseudo-gradient (anchor pull included, before clipping) over every process; None when the space's
    #: engine steps it (DeepSpeed measures its own) or the update is not a ``GRADIENT``.
    grad_norm: float | None = None
    #: ``||theta - theta_0||`` before the update, when an anchor pulled.
    anchor_distance: float | None = None


def apply_update(
    space: PerturbationSpace, step: int, update: StrategyUpdate, gradient: GradientStep | None = None
) -> AppliedUpdate:
    """Make ``update`` (``strategy.tell``'s result for ``step``, or a seed-log record's) on ``space``'s tensors.

    A ``GRADIENT`` update needs ``gradient``. Raises ``FloatingPointError`` before touching a weight when the
    pseudo-gradient is NaN or infinite (:class:`UpdateRefused`; the gradients written are cleared again)."""
    if update.kind is UpdateKind.SELECTION:
        if update.winner is not None:  # None: the parent survived, the weights stay
            space.apply_member(step, update.winner, update.sigma)
        applied = AppliedUpdate()
    elif update.kind is UpdateKind.SET:
        space.set_vector(update.values)
        applied = AppliedUpdate()
    elif update.kind is UpdateKind.GRADIENT:
        if gradient is None:
            raise ValueError("a GRADIENT update needs a GradientStep (the optimizer that steps it)")
        applied = _step_gradient(space, step, update.coefficients, gradient)
    else:
        raise ValueError(f"unknown update kind {update.kind!r}")
    space.after_update()
    return applied


def _step_gradient(
    space: PerturbationSpace, step: int, coefficients: torch.Tensor, gradient: GradientStep
) -> AppliedUpdate:
    if not torch.isfinite(coefficients).all():
        raise UpdateRefused(f"the pseudo-gradient (coefficients {coefficients.tolist()}) is NaN or infinite")
    named = space.named_tensors()
    tensors = [tensor for _, tensor in named]
    if gradient.in_place:
        grad_sq = space.apply_update(step, coefficients, *sgd_hyperparameters(gradient.optimizer, tensors))
        total = space.sum_over_processes(torch.tensor([grad_sq], dtype=torch.float64))
        return AppliedUpdate(grad_norm=float(total[0]) ** 0.5)
    space.write_gradients(step, coefficients)
    distance = gradient.anchor.add_pull(named) if gradient.anchor is not None else None
    bad = [name for name, tensor in named if tensor.grad is not None and not torch.isfinite(tensor.grad).all()]
    if bad:
        for tensor in tensors:
            tensor.grad = None
        raise UpdateRefused(f"the pseudo-gradient of {bad[:5]} is NaN or infinite")
    if space.steps_own_optimizer:
        space.step_optimizer()  # the engine clips (its config) and measures its own norm
        return AppliedUpdate(anchor_distance=distance)
    parameters = list(gradient.clip_parameters if gradient.clip_parameters is not None else tensors)
    if gradient.max_grad_norm > 0:
        # What Trainer does before its optimizer step (accelerate's clip_grad_norm_ is torch's, on one device).
        norm = torch.nn.utils.clip_grad_norm_(parameters, gradient.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    gradient.optimizer.step()
    gradient.optimizer.zero_grad(set_to_none=True)
    return AppliedUpdate(grad_norm=float(norm), anchor_distance=distance)


__all__ = ["AppliedUpdate", "GradientStep", "UpdateRefused", "apply_update"]
