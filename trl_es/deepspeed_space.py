"""ES under DeepSpeed ZeRO-3: perturb, restore and update each rank's own parameter shard, never the full tensor.

Under ZeRO-3 a parameter ``p`` is an empty placeholder; its values live in ``p.ds_tensor``, this rank's flat slice
``[rank * partition, (rank + 1) * partition)`` of ``p`` flattened (the last rank's slice is padded past
``p.ds_numel``; the padding is never gathered). The noise of a member for ``p`` is still generated for the *full*
tensor from the same seeded generator as in :class:`~trl_es.core.InPlaceSpace`, flattened and sliced, so a ZeRO-3
run perturbs and updates exactly the numbers a single-process run does, whatever the number of ranks.

Only weights that are gathered for a forward see a perturbation: ZeRO-3 keeps small "persistent" parameters
(``stage3_param_persistence_threshold``) gathered between steps, and ``GatheredParameters`` skips parameters that are
already available, so every gathered copy is released before the shards change (perturb and restore) and the next
forward gathers from the edited shards.

The update goes through DeepSpeed's own optimizer: the pseudo-gradient shard is written with
``deepspeed.utils.safe_set_local_grad`` and :func:`step_engine` runs the engine's ``step()``, so the torch optimizer,
LR scheduler and weight decay configured in the Trainer apply to DeepSpeed's fp32 master partitions.

DeepSpeed is imported lazily: importing this module costs nothing when DeepSpeed is not used.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from .core import MemberNoise, PerturbationSpace, pseudo_gradient_coefficients


def zero_stage(engine_or_config) -> int:
    """ZeRO stage of a DeepSpeed engine, or of a DeepSpeed config dict (0 when absent)."""
    if isinstance(engine_or_config, dict):
        return int(engine_or_config.get("zero_optimization", {}).get("stage", 0))
    return int(engine_or_config.zero_optimization_stage())


def init_deepspeed_comm(args) -> None:
    """Hand DeepSpeed the process group that ``accelerate`` set up, before the model is loaded under ``zero.Init``.

    On GPUs ``accelerate`` initialises ``deepspeed.comm`` itself. With ``use_cpu=True`` it only creates a torch
    (gloo) group, so ``zero.Init`` would read a world size of 1 and reject the batch sizes that the HF integration
    filled in for the real world size (``train_batch_size != micro_batch * grad_acc * 1``).
    """
    import deepspeed
    import torch.distributed

    _ = args.device  # creates accelerate's PartialState and, under torchrun, the torch process group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def check_deepspeed_config(config: dict) -> list[str]:
    """Refuse the ZeRO-3 features that keep a second copy of the weights this space would not edit.

    Returns warnings for settings that change the ES update without being an error.
    """
    zero = config.get("zero_optimization", {})
    problems = []
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        problems.append("zero_hpz_partition_size > 1 (ZeRO++ keeps a secondary weight partition)")
    if zero.get("zero_quantized_weights") or zero.get("zero_quantized_nontrainable_weights"):
        problems.append("zero_quantized_weights (ZeRO++ gathers quantized copies)")
    if str(zero.get("offload_param", {}).get("device", "none")).lower() == "nvme":
        problems.append("offload_param to nvme (the shards are not in memory to be perturbed)")
    if problems:
        raise ValueError(
            "ESTrainer under DeepSpeed ZeRO-3 perturbs each rank's parameter shard in place and cannot run with "
            + "; ".join(problems)
            + ". Remove these settings from the DeepSpeed config."
        )
    warnings = []
    clipping = config.get("gradient_clipping", 0.0)
    if isinstance(clipping, (int, float)) and clipping > 0:
        warnings.append(
            f"DeepSpeed config sets gradient_clipping={clipping}: the ES pseudo-gradient will be clipped. Set it to "
            '"auto" (then ESConfig.max_grad_norm=0 applies) or 0 for the plain ES update.'
        )
    return warnings


class ZeRO3Space(PerturbationSpace):
    """The ``full`` / ``lora`` space for parameters partitioned by DeepSpeed ZeRO-3 (one member per forward).

    Args:
        named_params: the ZeRO-3 parameters to evolve, with the same names as the non-DeepSpeed run (they seed the
            noise).
        noise: member -> seeded direction mapping.
        sigma: perturbation scale.
        engine: returns the DeepSpeed engine once the Trainer has built it (``None`` before ``train()``).
        restore: ``"copy"`` (bit-exact; holds a copy of this rank's shards) or ``"subtract"``.
    """

    members_per_forward = 1
    #: Every forward gathers all ranks' shards, so all ranks must evaluate the same member at the same time (the
    #: trainer then splits the prompts over ranks instead of the population).
    ranks_share_members = True

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        noise: MemberNoise,
        sigma: float,
        engine: Callable[[], object],
        restore: str = "copy",
    ):
        super().__init__(noise, sigma)
        if restore not in ("copy", "subtract"):
            raise ValueError(f"restore must be 'copy' or 'subtract', got {restore!r}")
        if not named_params:
            raise ValueError("no parameters to perturb")
        missing = [name for name, param in named_params if not hasattr(param, "ds_tensor")]
        if missing:
            raise ValueError(f"not ZeRO-3 partitioned parameters: {missing[:5]}")
        self.named_params = list(named_params)
        self.engine = engine
        self.restore = restore

    # ------------------------------------------------------------------ shards

    def num_parameters(self) -> int:
        return sum(param.ds_numel for _, param in self.named_params)

    @staticmethod
    def _shard(param: torch.nn.Parameter) -> tuple[torch.Tensor, int, int]:
        """(the real, unpadded part of this rank's shard, its offset in the flattened tensor, its length).

        ``param.ds_tensor`` is read each time: DeepSpeed's optimizer re-points it into its flat buffers.
        """
        from deepspeed import comm as dist

        partition = param.ds_tensor.ds_numel
        start = dist.get_rank(group=param.ds_process_group) * partition
        length = max(0, min(partition, param.ds_numel - start))
        return param.ds_tensor.narrow(0, 0, length), start, length

    def local_shards(self) -> list[torch.Tensor]:
        """This rank's unpadded shards (views), e.g. to measure the update."""
        return [self._shard(param)[0] for _, param in self.named_params]

    def _noise_slice(self, step: int, direction: int, name: str, param, start: int, length: int) -> torch.Tensor:
        # The full tensor's noise, then this rank's slice: the same numbers as an unsharded run, on any world size.
        full = self.noise.direction(step, direction, name, tuple(param.ds_shape), param.ds_tensor.device)
        return full.view(-1).narrow(0, start, length)

    def _release_gathered(self) -> None:
        """Free every gathered full copy, so the next forward or ``GatheredParameters`` gathers the current shards."""
        engine = self.engine()
        optimizer = getattr(engine, "optimizer", None)
        if hasattr(optimizer, "empty_partition_cache"):
            # Through the parameter coordinator, which also keeps its count of gathered parameters right.
            optimizer.empty_partition_cache()
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # Before the engine exists (e.g. evaluate() before train()) nothing is persistent; release what is gathered.
        available = [p for _, p in self.named_params if p.ds_status == ZeroParamStatus.AVAILABLE]
        if available:
            available[0].partition(param_list=available)

    def _add_noise(self, step: int, member: int, scale: float) -> None:
        for name, param in self.named_params:
            shard, start, length = self._shard(param)
            if length:
                # Same calls and rounding as InPlaceSpace._add_noise, on this rank's slice of the result.
                eps = self.noise.member_noise(step, member, name, tuple(param.ds_shape), shard.device)
                shard.add_(eps.view(-1).narrow(0, start, length).mul_(scale).to(shard.dtype))

    # ------------------------------------------------------------------ PerturbationSpace

    @contextlib.contextmanager
    def perturbed(self, step: int, members: Sequence[int]) -> Iterator[None]:
        if len(members) != 1:
            raise ValueError(f"ZeRO3Space evaluates one member at a time, got {list(members)}")
        (member,) = members
        with torch.no_grad():
            self._release_gathered()
            backup = [shard.clone() for shard in self.local_shards()] if self.restore == "copy" else None
            try:
                self._add_noise(step, member, self.sigma)
                yield
            finally:
                # Restore even when generation or a reward function raised; then drop any gathered perturbed copy.
                self._release_gathered()
                if backup is not None:
                    for shard, saved in zip(self.local_shards(), backup, strict=True):
                        shard.copy_(saved)
                else:
                    self._add_noise(step, member, -self.sigma)

    def write_gradients(self, step: int, shaped_fitness: torch.Tensor) -> dict[str, float]:
        from deepspeed.utils import safe_set_local_grad

        coefficients = pseudo_gradient_coefficients(shaped_fitness, self.noise, self.sigma).tolist()
        squared_norm = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for name, param in self.named_params:
                _, start, length = self._shard(param)
                # fp32, padded to the partition size DeepSpeed expects (the padding's gradient is zero).
                grad = torch.zeros(param.ds_tensor.ds_numel, dtype=torch.float32, device=param.ds_tensor.device)
                if length:
                    for direction, coefficient in enumerate(coefficients):
                        if coefficient != 0.0:
                            eps = self._noise_slice(step, direction, name, param, start, length)
                            grad[:length].add_(eps, alpha=coefficient)
                squared_norm += grad.double().square().sum()
                safe_set_local_grad(param, grad)
        return {"grad_norm": float(_sum_over_ranks(squared_norm, self.named_params[0][1])) ** 0.5}

    def weight_and_update_norms(self, before: list[torch.Tensor]) -> tuple[float, float]:
        """(norm of the update since ``before``, norm of ``before``) over the whole model, summed over ranks."""
        sums = torch.zeros(2, dtype=torch.float64)
        for shard, saved in zip(self.local_shards(), before, strict=True):
            sums[0] += (shard.double() - saved.double()).square().sum()
            sums[1] += saved.double().square().sum()
        sums = _sum_over_ranks(sums, self.named_params[0][1])
        return float(sums[0]) ** 0.5, float(sums[1]) ** 0.5


def _sum_over_ranks(value: torch.Tensor, param) -> torch.Tensor:
    """Sum a small statistic over the ranks that share ``param``'s partition (the shards are disjoint)."""
    from deepspeed import comm as dist

    if dist.get_world_size(group=param.ds_process_group) == 1:
        return value
    device = param.ds_tensor.device
    summed = value.to(device=device, dtype=torch.float32)  # float32: not every backend reduces float64
    dist.all_reduce(summed, group=param.ds_process_group)
    return summed.double().cpu()


def step_engine(engine) -> None:
    """One optimizer step of a DeepSpeed engine from gradients written without a backward pass.

    ``accelerate`` steps the engine inside ``accelerator.backward``, which ES never calls, and turns the Trainer's own
    ``optimizer.step()`` / ``lr_scheduler.step()`` into no-ops under DeepSpeed; so ES steps the engine itself, once
    per ES step. ``allreduce_gradients`` is the engine's end-of-backward hook: under ZeRO-3 it only publishes the
    shards written by ``safe_set_local_grad`` to the optimizer (there is nothing in the reduce buckets, so nothing is
    averaged over ranks: every rank wrote the exact pseudo-gradient of its own shard).
    """
    engine.set_gradient_accumulation_boundary(True)
    engine.allreduce_gradients()
    engine.step()
