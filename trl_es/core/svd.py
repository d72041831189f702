"""Singular-value perturbation space (ESSA: Gorbatovski et al. 2025, arXiv 2507.04453).

Each target matrix ``M`` is decomposed once, in fp32, as ``M = U diag(s) V^T`` (thin SVD). ``U`` and ``V`` are frozen
and only the top ``k = max(1, ceil(svd_fraction * rank))`` singular values ``s_k`` are evolved; the model's weight is
always

    W = M + U_k diag(s_k - s_k0) V_k^T

written in place into the weight (cast to its dtype). Adding the *change* of the singular values to the original
``M``, rather than rebuilding ``U diag(s) V^T``, keeps the untouched tail of the spectrum exactly and makes the model
at ``s_k = s_k0`` bit-identical to the model before the decomposition (no fp32 round trip through the SVD).

Two kinds of targets, told apart by the modules the space is given:

* PEFT LoRA layers (any module with ``lora_A`` / ``lora_B`` ``ModuleDict``\\ s, as ``peft.tuners.lora.Linear``):
  ``lora_A.<adapter>.weight`` (r x in) and ``lora_B.<adapter>.weight`` (out x r) of every active adapter are
  decomposed *separately*, as ESSA does, so each factor contributes ``ceil(svd_fraction * r)`` values. The search
  dimension is ~ layers x projections x 2 x r x svd_fraction: hundreds to a few thousand for a 7B model, small
  enough for CMA-ES.
* plain ``nn.Linear`` layers (singular-value fine-tuning of the base weights): ``ceil(svd_fraction * min(out, in))``
  values per layer, so a much larger search space; each layer also keeps a copy of its original weight.

Default ``svd_fraction = 0.5``: ESSA reports that evolving a fraction alpha >= 0.4 of the singular values is enough
and rank 2-4 adapters are often best. With the ceiling, 0.4 and 0.5 give the same ``k`` at rank 2, 4 and 8 (1, 2,
4); 0.5 keeps a margin above the reported threshold at larger ranks while halving the search dimension of
``svd_fraction = 1``.

Saving: the model's weights always hold the rebuilt values (``after_update`` / ``set_vector`` write them), so
``save_model`` writes plain weights that load with plain transformers and, in LoRA mode, plain ``lora_A`` /
``lora_B`` factors that load with plain peft; nothing of this space is needed to use the result.
:meth:`SVDSpace.rebuilt_weights` returns the same tensors computed from the evolved values, for saving without
touching the model. Resuming needs :meth:`SVDSpace.state_dict` too (the decomposition and the values): the weights
alone do not say in which coordinates the optimizer or CMA-ES state was expressed.
"""

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .noise import MemberNoise
from .spaces import PerturbationSpace


DEFAULT_SVD_FRACTION = 0.5


@dataclass
class _Target:
    name: str  # of the evolved tensor: seeds the noise
    weight_name: str
    weight: torch.Tensor  # the model's weight, written in place
    original: torch.Tensor  # M, in the weight's dtype
    u: torch.Tensor  # (out, k) fp32
    vh: torch.Tensor  # (k, in) fp32
    initial: torch.Tensor  # s_k0, fp32
    values: nn.Parameter  # s_k, fp32: what the optimizer steps


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer with at least one adapter on a Linear (duck-typed: the core does not import peft)."""
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and len(module.lora_A) > 0


def _active_adapters(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = list(module.lora_A.keys())
    elif isinstance(active, str):
        active = [active]
    return [name for name in active if name in module.lora_A]


def svd_target_modules(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The modules an :class:`SVDSpace` over ``model`` decomposes.

    If the model carries LoRA layers (a PeftModel), those (ESSA); else its ``nn.Linear`` layers except the output
    head (often tied to the input embeddings, which a change of its spectrum would silently move too).
    ``target_modules`` keeps only modules whose name equals, or ends with ``"." +``, one of its entries (e.g.
    ``["q_proj", "v_proj"]``), as ``perturbation_target_modules`` does for the low-rank space.
    """

    def wanted(name: str) -> bool:
        return target_modules is None or any(name == w or name.endswith("." + w) for w in target_modules)

    lora = [(name, module) for name, module in model.named_modules() if is_lora_layer(module)]
    if lora:
        targets = [(name, module) for name, module in lora if wanted(name)]
        kind = "LoRA layer"
        available = lora
    else:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        available = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        targets = [
            (name, module)
            for name, module in available
            if wanted(name) and (target_modules is not None or module is not head)
        ]
        kind = "nn.Linear layer"
    if not targets:
        names = sorted({name.split(".")[-1] for name, _ in available})
        raise ValueError(f"target_modules={target_modules} matches no {kind} of the model; {kind}s: {names}.")
    return targets


def _target_weights(named_modules: Sequence[tuple[str, nn.Module]]) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    """``(mode, [(weight name, weight)])`` for LoRA layers (both factors of every active adapter) or Linear layers."""
    lora = [name for name, module in named_modules if is_lora_layer(module)]
    plain = [name for name, module in named_modules if not is_lora_layer(module)]
    if lora and plain:
        raise ValueError(
            f"got LoRA layers ({lora[0]!r}, ...) and plain layers ({plain[0]!r}, ...) together; an SVD space evolves "
            "either the LoRA factors (ESSA) or plain nn.Linear weights, not both"
        )
    weights = []
    for name, module in named_modules:
        if lora:
            adapters = _active_adapters(module)
            if not adapters:
                raise ValueError(
                    f"LoRA layer {name!r} has no active adapter on a Linear (lora_A: {list(module.lora_A)})"
                )
            for adapter in adapters:
                weights.append((f"{name}.lora_A.{adapter}.weight", module.lora_A[adapter].weight))
                weights.append((f"{name}.lora_B.{adapter}.weight", module.lora_B[adapter].weight))
        elif isinstance(module, nn.Linear):
            weights.append((f"{name}.weight", module.weight))
        else:
            raise TypeError(
                f"SVD space targets must be nn.Linear or PEFT LoRA layers; {name!r} is {type(module).__name__}"
            )
    return ("lora" if lora else "linear"), weights


class SVDSpace(PerturbationSpace):
    """Evolve the top singular values of each target matrix; everything else of the model stays fixed.

    Args:
        named_modules: ``(name, module)`` pairs, all ``nn.Linear`` or all PEFT LoRA layers (see
            :func:`svd_target_modules`). Names must be unique: they name the evolved tensors, which seed the noise.
        noise: member -> seeded direction mapping (its ``sigma``, given per step, is in units of singular values:
            absolute, like every space's).
        svd_fraction: fraction of each matrix's singular values to evolve, in (0, 1]; at least one per matrix.
    """

    members_per_forward = 1
    tensors_are_model_parameters = False  # the singular values are the space's own tensors
    applies_members = True

    def __init__(
        self,
        named_modules: Sequence[tuple[str, nn.Module]],
        noise: MemberNoise,
        svd_fraction: float = DEFAULT_SVD_FRACTION,
    ):
        super().__init__(noise)
        if not 0 < svd_fraction <= 1:
            raise ValueError(f"svd_fraction must be in (0, 1], got {svd_fraction}")
        named_modules = list(named_modules)
        if not named_modules:
            raise ValueError("no modules to decompose: the SVD space needs at least one target")
        names = [name for name, _ in named_modules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"module names must be unique (they seed the noise); repeated: {duplicates}")
        self.svd_fraction = svd_fraction
        self.mode, weights = _target_weights(named_modules)
        seen: dict[int, str] = {}
        for weight_name, weight in weights:
            # A weight reached under two names (tied weights) would get two decompositions that overwrite each other.
            if id(weight) in seen:
                raise ValueError(f"{weight_name!r} is the same tensor as {seen[id(weight)]!r} (tied weights?)")
            seen[id(weight)] = weight_name
        self._targets = [self._decompose(weight_name, weight) for weight_name, weight in weights]

    def _decompose(self, weight_name: str, weight: torch.Tensor) -> _Target:
        if weight.ndim != 2:
            raise ValueError(f"{weight_name}: SVD needs a 2-D weight, got shape {tuple(weight.shape)}")
        if weight.numel() == 0:
            raise ValueError(f"{weight_name} is empty (a ZeRO-3 partitioned weight?); the SVD space needs it whole")
        with torch.no_grad():
            original = weight.detach().clone()
            u, s, vh = torch.linalg.svd(original.float(), full_matrices=False)
            # The epsilon keeps float error from bumping k up (0.1 * 30 = 3.0000000000000004 would give 4).
            k = max(1, math.ceil(self.svd_fraction * s.numel() - 1e-9))
            initial = s[:k].clone()
        return _Target(
            name=f"{weight_name}.singular_values",
            weight_name=weight_name,
            weight=weight,
            original=original,
            u=u[:, :k].contiguous(),
            vh=vh[:k].contiguous(),
            initial=initial,
            values=nn.Parameter(initial.clone()),
        )

    # ----- what the trainer and the optimizers see

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The evolved singular values, one fp32 leaf tensor per target matrix, in a fixed order."""
        return [(target.name, target.values) for target in self._targets]

    @property
    def search_dim(self) -> int:
        """Total number of evolved singular values (the dimension CMA-ES searches)."""
        return sum(target.values.numel() for target in self._targets)

    def num_parameters(self) -> int:
        return self.search_dim

    # ----- writing weights

    @torch.no_grad()
    def _rebuild(self, target: _Target, values: torch.Tensor) -> torch.Tensor:
        """``M + U_k diag(values - s_k0) V_k^T`` in the weight's dtype; exactly ``M`` when ``values == s_k0``."""
        change = values.detach().float() - target.initial
        if not torch.any(change):
            return target.original
        rebuilt = torch.addmm(target.original.float(), target.u * change, target.vh)
        return rebuilt.to(target.weight.dtype)

    @torch.no_grad()
    def _write(self, target: _Target, values: torch.Tensor) -> None:
        target.weight.copy_(self._rebuild(target, values))

    @contextlib.contextmanager
    def _acting_as(self, values: dict[int, torch.Tensor]) -> Iterator[None]:
        """Model weights rebuilt from ``values`` (target index -> singular values) inside; exact restore on exit."""
        saved: list[tuple[_Target, torch.Tensor]] = []
        try:
            for index, target in enumerate(self._targets):
                if index not in values:
                    continue
                # Save before writing: an interrupt between the two leaves this weight untouched, so restoring the
                # saved list is always exact, whichever target a failure hits.
                saved.append((target, target.weight.detach().clone()))
                self._write(target, values[index])
            yield
        finally:
            with torch.no_grad():
                for target, weight in saved:
                    target.weight.copy_(weight)

    def _member_values(self, step: int, member: int, sigma: float) -> dict[int, torch.Tensor]:
        values = {}
        for index, target in enumerate(self._targets):
            eps = self.noise.member_noise(step, member, target.name, target.values.shape, target.values.device)
            values[index] = target.values.detach() + sigma * eps
        return values

    def perturbed(self, step: int, members: Sequence[int], sigma: float) -> contextlib.AbstractContextManager[None]:
        """The model acts as ``s + sigma * eps_member`` for the one member given; exact restore on exit."""
        members = list(members)
        if len(members) != 1:
            raise ValueError(f"SVDSpace evaluates one member at a time, got {members}")
        return self._acting_as(self._member_values(step, members[0], sigma))

    def apply_member(self, step: int, member: int, sigma: float) -> None:
        """``s += sigma * eps_member`` (the same sum :meth:`perturbed` forms) and the weights rebuilt from it."""
        values = self._member_values(step, member, sigma)
        with torch.no_grad():
            for index, target in enumerate(self._targets):
                target.values.copy_(values[index])
        self.after_update()

    def perturbed_by(self, offsets: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """The model acts as the evolved values plus explicit ``offsets`` (by evolved-tensor name; missing = 0)."""
        index_of = {target.name: index for index, target in enumerate(self._targets)}
        unknown = sorted(set(offsets) - set(index_of))
        if unknown:
            raise KeyError(
                f"offsets for unknown evolved tensors {unknown}; known names look like {self._targets[0].name!r}"
            )
        values = {}
        for name, offset in offsets.items():
            target = self._targets[index_of[name]]
            if offset.shape != target.values.shape:
                raise ValueError(
                    f"offset for {name!r} has shape {tuple(offset.shape)}, expected {tuple(target.values.shape)}"
                )
            values[index_of[name]] = target.values.detach() + offset.to(target.values.device, torch.float32)
        return self._acting_as(values)

    def write_gradients(self, step: int, coefficients: torch.Tensor) -> None:
        """``grad(s) = sum_k c_k eps_k(s)`` for each evolved tensor, accumulated in fp32."""
        coefficients = torch.as_tensor(coefficients, dtype=torch.float32)
        if coefficients.shape != (self.noise.num_directions,):
            raise ValueError(
                f"expected one coefficient per noise direction ({self.noise.num_directions}), "
                f"got shape {tuple(coefficients.shape)}"
            )
        with torch.no_grad():
            for target in self._targets:
                values = target.values
                grad = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
                for direction, coefficient in enumerate(coefficients.tolist()):
                    if coefficient != 0.0:
                        eps = self.noise.direction(step, direction, target.name, values.shape, values.device)
                        grad.add_(eps, alpha=coefficient)
                values.grad = grad

    def after_update(self) -> None:
        """Push the evolved singular values into the model's weights (call after the optimizer stepped them)."""
        for target in self._targets:
            self._write(target, target.values)

    # ----- flat view (CMA-ES works on vectors)

    def get_vector(self) -> torch.Tensor:
        """The evolved values concatenated in :meth:`named_tensors` order (fp32 copy)."""
        return torch.cat([target.values.detach().reshape(-1).float().cpu() for target in self._targets])

    def split_vector(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector of length :attr:`search_dim` cut into per-tensor pieces, keyed by evolved-tensor name."""
        vector = torch.as_tensor(vector)
        if vector.shape != (self.search_dim,):
            raise ValueError(f"expected a vector of shape ({self.search_dim},), got {tuple(vector.shape)}")
        pieces, start = {}, 0
        for target in self._targets:
            size = target.values.numel()
            pieces[target.name] = vector[start : start + size].reshape(target.values.shape).float()
            start += size
        return pieces

    def set_vector(self, vector: torch.Tensor) -> None:
        """Set the evolved values from a flat vector and write the rebuilt weights into the model."""
        pieces = self.split_vector(vector)
        with torch.no_grad():
            for target in self._targets:
                target.values.copy_(pieces[target.name])
        self.after_update()

    # ----- checkpoints

    def state_dict(self) -> dict:
        """The decomposition and the evolved values, for resuming (tensors and plain values only).

        Resuming needs more than the model's weights: a space rebuilt from a checkpoint's weights would decompose
        ``M + U_k diag(s_k - s_k0) V_k^T`` afresh, with other ``s_k0`` (and, if evolved values crossed the spectrum's
        tail, other singular vectors), so optimizer and CMA-ES states would refer to other coordinates. Holds one copy
        of each target's original weight: small for LoRA factors, the targeted weights' size for plain Linear layers.
        """
        return {
            "svd_fraction": self.svd_fraction,
            "targets": {
                target.weight_name: {
                    "original": target.original.clone(),
                    "u": target.u.clone(),
                    "vh": target.vh.clone(),
                    "initial": target.initial.clone(),
                    "values": target.values.detach().clone(),
                }
                for target in self._targets
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Take over a saved decomposition and evolved values (same target weights), and write them into the model."""
        saved = state["targets"]
        names = [target.weight_name for target in self._targets]
        if sorted(saved) != sorted(names):
            raise ValueError(
                f"SVD space state is for weights {sorted(set(saved) ^ set(names))[:4]}... that this space does not "
                "have (or lacks weights it has); build the space over the same target modules"
            )
        for target in self._targets:
            entry = saved[target.weight_name]
            if entry["original"].shape != target.weight.shape:
                raise ValueError(
                    f"saved {target.weight_name} has shape {tuple(entry['original'].shape)}, "
                    f"the model's has {tuple(target.weight.shape)}"
                )
            if entry["values"].shape != target.values.shape:
                raise ValueError(
                    f"saved {target.weight_name} evolves {entry['values'].numel()} singular values "
                    f"(svd_fraction={state['svd_fraction']}), this space {target.values.numel()} "
                    f"(svd_fraction={self.svd_fraction})"
                )
        with torch.no_grad():
            for target in self._targets:
                entry = saved[target.weight_name]
                device = target.weight.device
                target.original = entry["original"].to(device, target.weight.dtype).clone()
                target.u = entry["u"].to(device, torch.float32).clone()
                target.vh = entry["vh"].to(device, torch.float32).clone()
                target.initial = entry["initial"].to(device, torch.float32).clone()
                # In place: an optimizer built before the checkpoint is loaded keeps stepping the same tensors.
                target.values.copy_(entry["values"])
        self.after_update()

    # ----- saving

    def rebuilt_weights(self) -> dict[str, torch.Tensor]:
        """``{weight name: M + U_k diag(s_k - s_k0) V_k^T}`` in each weight's dtype, from the evolved values.

        The model's weights already hold these after :meth:`after_update`, so ``save_model`` needs nothing from this
        space: the checkpoint is a plain model (or a plain PEFT adapter in LoRA mode).
        """
        return {target.weight_name: self._rebuild(target, target.values).clone() for target in self._targets}
