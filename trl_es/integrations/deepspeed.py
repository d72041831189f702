"""ES under DeepSpeed ZeRO-3: perturb, restore and update each rank's own parameter shard, never the full tensor.

Under ZeRO-3 a parameter ``p`` is an empty placeholder; its values live in ``p.ds_tensor``, this rank's flat slice
``[rank * partition, (rank + 1) * partition)`` of ``p`` flattened (the last rank's slice is padded past
``p.ds_numel``; the padding is never gathered). The noise of a member for ``p`` is the *full* tensor's seeded noise,
which is defined chunk by chunk (``core.noise``): a rank draws only the chunks its slice overlaps and cuts its part
from each, so a ZeRO-3 run perturbs and updates exactly the numbers a single-process run does, whatever the number of
ranks, while each rank's noise work shrinks with its shard (down to one chunk per tensor it touches).

Only weights that are gathered for a forward see a perturbation: ZeRO-3 keeps small "persistent" parameters
(``stage3_param_persistence_threshold``) gathered between steps, and ``GatheredParameters`` skips parameters that are
already available, so every gathered copy is released before the shards change (perturb and restore) and the next
forward gathers from the edited shards.

The update goes through DeepSpeed's own optimizer: the pseudo-gradient shard is written with
``deepspeed.utils.safe_set_local_grad`` and :func:`step_engine` runs the engine's ``step()``, so the torch optimizer,
LR scheduler and weight decay configured in the Trainer apply to DeepSpeed's fp32 master partitions.

DeepSpeed is imported lazily: importing this module costs nothing when DeepSpeed is not used.
"""

from collections.abc import Callable, Sequence

import torch

from ..core import InPlaceSpace, MemberNoise


def zero_stage(engine_or_config) -> int:
    """ZeRO stage of a DeepSpeed engine, or of a DeepSpeed config dict (0 when absent)."""
    if isinstance(engine_or_config, dict):
        return int(engine_or_config.get("zero_optimization", {}).get("stage", 0))
    return int(engine_or_config.zero_optimization_stage())


def init_deepspeed_comm(args) -> None:
    """With a DeepSpeed config in ``args``: hand DeepSpeed the process group that ``accelerate`` set up, before the
    model is loaded under ``zero.Init``.

    On GPUs ``accelerate`` initialises ``deepspeed.comm`` itself. With ``use_cpu=True`` it only creates a torch
    (gloo) group, so ``zero.Init`` would read a world size of 1 and reject the batch sizes that the HF integration
    filled in for the real world size (``train_batch_size != micro_batch * grad_acc * 1``).
    """
    if not args.deepspeed:
        return
    import deepspeed
    import torch.distributed

    _ = args.device  # creates accelerate's PartialState and, under torchrun, the torch process group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def check_zero3_trainer(config: dict, perturbation: str) -> list[str]:
    """Refuse what ES cannot run under DeepSpeed; return warnings for settings that change the update."""
    if zero_stage(config) != 3:
        raise ValueError(
            f"ESTrainer supports DeepSpeed with ZeRO stage 3 only, got stage {zero_stage(config)}: stages 0-2 "
            "step their optimizer from their own backward hooks, which ES never runs. Use "
            '"zero_optimization": {"stage": 3}, or plain DDP (no DeepSpeed config) for a model that fits.'
        )
    if perturbation == "low_rank":
        raise ValueError(
            "perturbation='low_rank' is not supported under DeepSpeed ZeRO-3 (its batched members need the full "
            "weight matrices); use perturbation='full' or 'lora'."
        )
    return check_deepspeed_config(config)


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


class ZeRO3Space(InPlaceSpace):
    """The ``full`` / ``lora`` space for parameters partitioned by DeepSpeed ZeRO-3 (one member per forward).

    It is :class:`~trl_es.core.InPlaceSpace` with only the local view changed: a tensor's local numbers are this
    rank's unpadded ``ds_tensor`` shard, and its noise is the full tensor's seeded noise cut to that shard (drawn from
    the noise chunks the shard overlaps). Perturb,
    restore and the pseudo-gradient run the base class's code on those views, so a ZeRO-3 run moves exactly the
    numbers an unsharded run does, on any number of ranks.

    Args:
        named_params: the ZeRO-3 parameters to evolve, with the same names as the non-DeepSpeed run (they seed the
            noise).
        noise: member -> seeded direction mapping.
        engine: returns the DeepSpeed engine once the Trainer has built it (``None`` before ``train()``).
        restore: ``"copy"`` (bit-exact; holds a copy of this rank's shards) or ``"subtract"``.
    """

    #: Every forward gathers all ranks' shards, so all ranks must evaluate the same member at the same time (the
    #: trainer then splits the prompts over ranks instead of the population).
    ranks_share_members = True
    #: Under DeepSpeed the engine, not the Trainer's optimizer wrapper, applies the update (:meth:`step_optimizer`).
    steps_own_optimizer = True
    #: The engine's optimizer steps fp32 master partitions of its own: editing ``ds_tensor`` in place would be
    #: overwritten by them, so the update always goes through the engine.
    supports_apply_update = False

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        noise: MemberNoise,
        engine: Callable[[], object],
        restore: str = "copy",
    ):
        missing = [name for name, param in named_params if not hasattr(param, "ds_tensor")]
        if missing:
            raise ValueError(f"not ZeRO-3 partitioned parameters: {missing[:5]}")
        super().__init__(named_params, noise, restore=restore)
        self.engine = engine

    def num_parameters(self) -> int:
        return sum(param.ds_numel for _, param in self.named_params)

    def _full_shape(self, param) -> tuple[int, ...]:
        return tuple(param.ds_shape)

    def _local(self, param) -> tuple[torch.Tensor, int]:
        """(the real, unpadded part of this rank's shard, its offset in the flattened tensor).

        ``param.ds_tensor`` is read each time: DeepSpeed's optimizer re-points it into its flat buffers.
        """
        from deepspeed import comm as dist

        partition = param.ds_tensor.ds_numel
        start = dist.get_rank(group=param.ds_process_group) * partition
        length = max(0, min(partition, param.ds_numel - start))
        return param.ds_tensor.narrow(0, 0, length), start

    def _store_gradient(self, param, grad: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_local_grad

        # fp32, padded to the partition size DeepSpeed expects (the padding's gradient is zero).
        padded = torch.zeros(param.ds_tensor.ds_numel, dtype=torch.float32, device=param.ds_tensor.device)
        padded[: grad.numel()] = grad
        safe_set_local_grad(param, padded)

    def _before_edit(self) -> None:
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

    def sum_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        return _sum_over_ranks(value, self.named_params[0][1])

    def step_optimizer(self) -> None:
        step_engine(self.engine())

    def apply_update(self, step, coefficients, lr, weight_decay=0.0) -> float:
        raise NotImplementedError(
            "ZeRO3Space has no in-place update: DeepSpeed's optimizer keeps fp32 master partitions that an in-place "
            "edit of the shards would not reach; the engine steps the pseudo-gradient (inplace_update=False)."
        )


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
