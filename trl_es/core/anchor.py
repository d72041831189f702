"""Drift control: pull the evolved tensors back toward their initial values.

``anchor_decay * (theta - theta_0)`` is added to the pseudo-gradient before the optimizer steps, i.e. the optimizer
descends on ``-E[reward] + anchor_decay / 2 * ||theta - theta_0||^2``: an L2 penalty centred on the starting weights
rather than on zero (weight decay pulls toward zero, which for a pretrained model is drift of its own). It is part of
the gradient, so an Adam-family optimizer normalises it together with the ES estimate (coupled, as Adam's own
``weight_decay``; not AdamW's decoupled decay).

Cost: one fp32-or-native copy of the evolved tensors (theta_0), held for the whole run and saved in checkpoints so a
resumed run pulls toward the same point.
"""

import torch


class Anchor:
    """``theta_0`` of every evolved tensor and the pull toward it.

    Args:
        tensors: the evolved tensors at the start of training (copied).
        decay: ``anchor_decay`` (> 0).
    """

    def __init__(self, tensors: list[torch.Tensor], decay: float):
        if not 0 < decay < float("inf"):
            raise ValueError(f"anchor_decay must be finite and > 0, got {decay}")
        self.decay = decay
        self.initial = [tensor.detach().clone() for tensor in tensors]

    @torch.no_grad()
    def add_pull(self, named_tensors: list[tuple[str, torch.Tensor]]) -> float:
        """``t.grad += decay * (t - t_0)`` for every evolved tensor (fp32 arithmetic); returns ``||theta - theta_0||``.

        Call after the strategy wrote the pseudo-gradient and before the optimizer steps (and before any clipping,
        which then acts on the whole gradient).
        """
        if len(named_tensors) != len(self.initial):
            raise ValueError(f"the anchor holds {len(self.initial)} tensors, the space evolves {len(named_tensors)}")
        squared = 0.0
        for index, (name, tensor) in enumerate(named_tensors):
            initial = self.initial[index]
            if initial.shape != tensor.shape:
                raise ValueError(
                    f"anchor of {name!r} has shape {tuple(initial.shape)}, the tensor {tuple(tensor.shape)}"
                )
            if initial.device != tensor.device:  # the Trainer may move the model after the anchor was taken
                initial = self.initial[index] = initial.to(tensor.device)
            drift = tensor.detach().float() - initial.float()
            squared += float(drift.square().sum())
            pull = drift.mul_(self.decay)
            if tensor.grad is None:
                tensor.grad = pull.to(tensor.dtype)
            else:
                tensor.grad.add_(pull.to(tensor.grad.dtype))
        return squared**0.5

    def state_dict(self) -> dict:
        return {"initial": [tensor.cpu() for tensor in self.initial]}

    def load_state_dict(self, state: dict) -> None:
        initial = state["initial"]
        if len(initial) != len(self.initial) or any(
            a.shape != b.shape for a, b in zip(initial, self.initial, strict=True)
        ):
            raise ValueError(
                "the checkpoint's anchor (initial weights for anchor_decay) does not match the evolved tensors: "
                f"{[tuple(t.shape) for t in initial][:3]}... vs {[tuple(t.shape) for t in self.initial][:3]}..."
            )
        self.initial = [
            saved.to(device=mine.device, dtype=mine.dtype) for saved, mine in zip(initial, self.initial, strict=True)
        ]
