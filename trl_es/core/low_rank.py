"""Low-rank population batching (EGGROLL-style): every member of the population in one batched forward.

Member ``i`` perturbs each adapted weight ``W`` (out x in) by ``sigma * E_i`` with ``E_i = A_i B_i^T / sqrt(r)``,
``A_i`` (out x r), ``B_i`` (in x r). Because

    x (W + sigma E_i)^T = x W^T + (sigma / sqrt(r)) (x B_i) A_i^T,

all members share the expensive ``x W^T`` and each adds a rank-r term. During ``perturbed(step, members)`` the
adapted ``nn.Linear`` layers compute that term for every row of the batch, where the batch is laid out
member-major: ``len(members)`` equal blocks of rows, block ``g`` belonging to ``members[g]``. No member's
``W + sigma E_i`` is ever formed. The factors of the whole population (``N / 2 * r * (out + in)`` numbers per
matrix with antithetic pairs) are drawn from one seeded generator per matrix and step, kept until that step's
update and then dropped.

Optionally (``share_inputs=True``), layers fed the same input (a block's q/k/v projections; gate/up) share one
``x [B_q | B_k | B_v]`` product: the first of them to run computes it for all, the others read their columns
(``SHARED_INPUT_PROJECTIONS``). Off by default: on the 2-core CPU it measured 0.96-1.01x of computing ``x B`` per
layer (``benchmarks/population_throughput.py``, ``shared_input_speedup``); the saved matmuls are small next to the
Python and slicing per call. It may pay where reading ``x`` dominates (long prefills, wide layers, GPUs).

On the CPU, a layer alone (fp32) adds its members' terms with one compiled call (``cpu_kernel.py``,
``kernel="auto"``): the batched matmul, multiply-add and views of the torch path cost as much call overhead as the
layer's own GEMM on a small model. Layers sharing an input product, other dtypes and other devices use torch ops.

The update ``sum_i f_i A_i B_i^T`` is high rank in general; it is computed per matrix as one matmul.
"""

import contextlib
import functools
import math
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import cpu_kernel
from .noise import MemberNoise
from .spaces import PerturbationSpace, check_finite_gradient, per_tensor_values, sgd_step


#: Sibling ``nn.Linear`` names that models feed the same input (attention q/k/v, gated-MLP gate/up); layers of one such
#: set under one parent compute ``x B`` in one batched matmul. A layer called with another input recomputes the
#: product for its own input, so a wrong guess costs time, never correctness.
SHARED_INPUT_PROJECTIONS = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"w1", "w3"}),
)


class LowRankSpace(PerturbationSpace):
    """Rank-``r`` perturbations of a set of ``nn.Linear`` layers, all members served by one forward.

    Args:
        named_linears: the layers to evolve, with stable names (the names seed the factors). Only their weights are
            perturbed and updated; biases, embeddings, norms and untargeted layers stay as they are.
        noise: member -> seeded direction mapping.
        rank: ``r``.
        members_per_forward: how many members one forward serves (default: the whole population;
            ``ESConfig.population_batch_size``).
        share_inputs: compute ``x B`` once for layers that share an input (``SHARED_INPUT_PROJECTIONS``; off by
            default, see the module docstring); the numbers are the same either way up to the matmul's rounding.
        kernel: how a layer alone on the CPU adds the members' terms: ``"auto"`` (the compiled kernel of
            ``cpu_kernel.py`` for fp32 CPU layers if it builds here, else torch ops), ``"compiled"`` (the same, but
            raise if it does not build) or ``"torch"`` (torch ops only). Equal up to float rounding.
    """

    supports_apply_update = True

    def __init__(
        self,
        named_linears: Sequence[tuple[str, nn.Linear]],
        noise: MemberNoise,
        rank: int = 1,
        members_per_forward: int | None = None,
        share_inputs: bool = False,
        kernel: str = "auto",
    ):
        super().__init__(noise)
        if rank < 1:
            raise ValueError(f"perturbation_rank must be >= 1, got {rank}")
        if not named_linears:
            raise ValueError("no Linear layers to perturb")
        for name, module in named_linears:
            if not isinstance(module, nn.Linear):
                raise TypeError(f"low-rank perturbation needs nn.Linear layers; {name!r} is {type(module).__name__}")
        self.named_linears = list(named_linears)
        self.rank = rank
        self.members_per_forward = members_per_forward or noise.population_size
        # Tensors the update writes to: what the optimizer steps and what the update-norm metric reads.
        self.named_params = [(f"{name}.weight", module.weight) for name, module in self.named_linears]
        # Factors drawn while the members generate are kept until the update of the same step (N r (out + in)
        # numbers per matrix, the space's stated memory) so the update does not draw them again.
        self._factor_cache: dict[tuple[int, str], torch.Tensor] = {}
        self.input_groups = _input_groups(self.named_linears) if share_inputs else [[nl] for nl in self.named_linears]
        self.kernel = kernel
        self._compiled = cpu_kernel.resolve_kernel(kernel)  # None: torch ops everywhere

    @property
    def uses_compiled_kernel(self) -> bool:
        """Whether fp32 CPU layers alone add their terms with the compiled kernel here (``kernel`` resolved)."""
        return self._compiled is not None

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return self.named_params

    def _drawn(self, step: int, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The factors of every direction for one layer as drawn, ``(K, out + in, r)`` fp32 contiguous: ``A`` is
        the first ``out`` rows of each direction, ``B`` the other ``in``; one draw, kept until the update."""
        drawn = self._factor_cache.get((step, name))
        if drawn is None:
            out_features, in_features = weight.shape
            drawn = self.noise.all_directions(step, name, (out_features + in_features, self.rank), weight.device)
            self._factor_cache[(step, name)] = drawn
        return drawn

    def _all_factors(self, step: int, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of every direction for one layer, ``(K, out, r)`` and ``(K, in, r)``, fp32 views of the draw."""
        drawn = self._drawn(step, name, weight)
        return drawn[:, : weight.shape[0]], drawn[:, weight.shape[0] :]

    def factors(self, step: int, direction: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of one direction for one layer (``E = A B^T / sqrt(r)``), fp32."""
        weight = dict(self.named_linears)[name].weight
        a, b = self._all_factors(step, name, weight)
        return a[direction], b[direction]

    @contextlib.contextmanager
    def perturbed(self, step: int, members: Sequence[int], sigma: float) -> Iterator[None]:
        """``sigma``: the scale of ``E_i``, whose entries have unit variance like full-rank Gaussian noise."""
        members = list(members)
        directions, signs = zip(*(self.noise.direction_and_sign(member) for member in members))
        directions = torch.tensor(directions)
        scales = torch.tensor(signs) * (sigma / math.sqrt(self.rank))
        patched = []
        bound = None
        if self._compiled is not None:
            bound = cpu_kernel.BoundMembers(self._compiled, directions, scales, self.noise.num_directions)
        try:
            with torch.no_grad():
                for group in self.input_groups:
                    (name, module), alone = group[0], len(group) == 1
                    if alone and bound is not None and cpu_kernel.supports(module.weight):
                        add = bound.layer(self._drawn(step, name, module.weight), module.in_features)
                        torch_terms = functools.partial(self._member_factors, step, name, module, directions, scales)
                        module.forward = _compiled_member_forward(module, len(members), add, torch_terms)
                        patched.append(module)
                        continue
                    factors = [self._member_factors(step, name, module, directions, scales) for name, module in group]
                    # (G, in, r * layers): one x B for a group of layers, each layer reads its r columns
                    shared = _InputProduct(torch.cat([b for _, b in factors], dim=2)) if not alone else None
                    for position, ((_, module), (a, b)) in enumerate(zip(group, factors, strict=True)):
                        columns = slice(position * self.rank, (position + 1) * self.rank)
                        module.forward = _batched_member_forward(module, a, b, shared, columns)
                        patched.append(module)
            yield
        finally:
            # Deleting the instance attribute brings back the class's forward; the weights were never modified.
            for module in patched:
                del module.forward

    def _member_factors(self, step, name, module, directions, scales) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the members of a forward for one layer, ``(G, out, r)`` and ``(G, in, r)`` in the weight's
        dtype: member ``g``'s ``sign_g * sigma / sqrt(r) * A_{d(g)}`` and ``B_{d(g)}`` (antithetic partners share
        factors), gathered for the torch ops."""
        weight = module.weight
        a_all, b_all = self._all_factors(step, name, weight)
        index = directions.to(weight.device)
        a = (a_all[index] * scales.to(weight.device)[:, None, None]).to(weight.dtype)
        return a, b_all[index].to(weight.dtype)

    def _pseudo_gradient(self, step: int, name: str, weight: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """``sum_k c_k A_k B_k^T / sqrt(r)`` for one layer as one (out x K r) @ (K r x in) matmul, in fp32, cast to the
        weight's dtype (what the optimizer is handed)."""
        drawn = self._drawn(step, name, weight)
        scale = coefficients.to(weight.device) / math.sqrt(self.rank)
        out_features, in_features = weight.shape
        left = (drawn[:, :out_features] * scale[:, None, None]).permute(1, 0, 2).reshape(out_features, -1)
        right = drawn[:, out_features:].permute(1, 0, 2).reshape(in_features, -1)
        grad = left @ right.T
        return grad if weight.dtype == torch.float32 else grad.to(weight.dtype)

    def write_gradients(self, step: int, coefficients: torch.Tensor) -> None:
        with torch.no_grad():
            for name, module in self.named_linears:
                module.weight.grad = self._pseudo_gradient(step, name, module.weight, coefficients)
        self._factor_cache.clear()

    def apply_update(self, step, coefficients, lr, weight_decay=0.0) -> float:
        # One layer's pseudo-gradient at a time (a weight-sized temporary; row blocks of the matmul could round
        # differently from the whole product, and the update must equal write_gradients + SGD bit for bit).
        lrs = per_tensor_values(lr, len(self.named_linears), "lr")
        decays = per_tensor_values(weight_decay, len(self.named_linears), "weight_decay")
        grad_sq = 0.0
        with torch.no_grad():
            for (name, module), lr_, decay in zip(self.named_linears, lrs, decays, strict=True):
                grad = self._pseudo_gradient(step, name, module.weight, coefficients)
                check_finite_gradient(grad, f"{name}.weight", coefficients.tolist())
                grad_sq += float(torch.linalg.vector_norm(grad, dtype=torch.float32)) ** 2
                sgd_step(module.weight, grad, lr_, decay)
                del grad
        self._factor_cache.clear()
        return grad_sq


def _input_groups(named_linears) -> list[list[tuple[str, nn.Linear]]]:
    """The layers in groups that share an input (siblings named in one set of ``SHARED_INPUT_PROJECTIONS`` with the
    same ``in_features``), in the order of ``named_linears``; every other layer alone."""
    groups, where = [], {}
    for name, module in named_linears:
        parent, _, leaf = name.rpartition(".")
        family = next((i for i, names in enumerate(SHARED_INPUT_PROJECTIONS) if leaf in names), None)
        key = (parent, family, module.in_features)
        if family is not None and key in where:
            groups[where[key]].append((name, module))
            continue
        if family is not None:
            where[key] = len(groups)
        groups.append([(name, module)])
    return groups


class _InputProduct:
    """``x B`` for the layers of one input group: computed by the first layer called with ``x``, read by the others.

    It knows the last input by a weak reference and its in-place version (holding the activation itself would keep
    it from being freed), and keeps the product only while the group is patched; a layer called with any other
    tensor recomputes the product for it.
    """

    def __init__(self, b: torch.Tensor):
        self.b = b  # (G, in, r * layers)
        self.input = lambda: None
        self.version = -1
        self.product: torch.Tensor | None = None

    def of(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.input() is not x or x._version != self.version:
            self.product = torch.bmm(rows, self.b)  # (G, rows per member * tokens, r * layers)
            self.input, self.version = weakref.ref(x), x._version
        return self.product


def _check_member_major(x: torch.Tensor, members: int) -> None:
    if x.shape[0] % members:
        raise RuntimeError(
            f"batch of {x.shape[0]} rows cannot be split into {members} member blocks; the low-rank space needs "
            "member-major batches (len(members) equal blocks of rows)"
        )


def _compiled_member_forward(module: nn.Linear, members: int, add, torch_terms):
    """A replacement ``forward`` adding every member's term with one call of the compiled CPU kernel (``add``).
    Under autocast (an output that is not fp32) it falls back to torch ops on factors gathered by ``torch_terms()``
    the first time they are needed."""
    fallback = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, module.weight, module.bias)
        _check_member_major(x, members)
        if x.dtype is torch.float32 and out.dtype is torch.float32:
            add(x, out)
            return out
        if not fallback:
            fallback.append(_batched_member_forward(module, *torch_terms(), None, slice(None)))
        return fallback[0](x)

    return forward


def _batched_member_forward(
    module: nn.Linear, a: torch.Tensor, b: torch.Tensor, shared: _InputProduct | None, columns: slice
):
    """A replacement ``forward`` adding member ``g``'s ``(x B_g) A_g^T`` to the rows of block ``g`` with torch ops;
    ``x B_g`` comes from ``shared`` (columns ``columns``) when the layer shares its input with others, else from its
    own ``b``."""
    members, rank = a.shape[0], a.shape[2]
    a_t = a.transpose(1, 2).contiguous()  # (G, r, out): ready for the second bmm
    index = (Ellipsis, columns)

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, module.weight, module.bias)
        _check_member_major(x, members)
        rows = x.reshape(members, -1, x.shape[-1])  # (G, rows per member * tokens, in)
        x_b = torch.bmm(rows, b) if shared is None else shared.of(x, rows)[index]  # (G, rows * tokens, r)
        # In place on the fresh output of F.linear: no second output-sized tensor per layer and token.
        out_blocks = out.view(members, -1, out.shape[-1])
        if rank == 1:  # an outer product: one fused multiply-add beats a matmul with inner dimension 1
            out_blocks.addcmul_(x_b, a_t)
        else:
            out_blocks.baddbmm_(x_b, a_t)  # out_g += (x_g B_g) A_g^T
        return out

    return forward
