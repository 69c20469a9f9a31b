"""Local transformers models for teachers and question LLMs: where they come from, device/dtype, loading with
one-line errors, provenance, chat-prompt helpers.

Loading never passes `trust_remote_code=True` unless the user set the option: a model repository's own Python
code runs only when asked for.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic

from makd.clients.gguf_cache import load_gguf
from makd.effects import EXECUTION, RESULTS
from makd.errors import MakdError, first_line
from makd.launchers import device_for_process, from_env, processes_on_node

DTYPES = ("float32", "bfloat16", "float16")
REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # what a hub model id looks like (a path with more parts does not)
HUB_PROBE_SECONDS = 5.0


class HFModelOptions(pydantic.BaseModel):
    """Where a local transformers model comes from and where it runs (teachers and question generators)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = pydantic.Field(min_length=1, json_schema_extra=RESULTS, description="hub id or local folder")
    revision: str | None = pydantic.Field(None, json_schema_extra=RESULTS, description="hub branch, tag or commit")
    gguf_file: str | None = pydantic.Field(None, json_schema_extra=RESULTS, description="a .gguf file inside `model` "
                                           "(transformers dequantises it on load)")
    trust_remote_code: bool = pydantic.Field(False, json_schema_extra=RESULTS, description="run the model "
                                             "repository's own code: only when you trust it")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = pydantic.Field(
        "auto", json_schema_extra=RESULTS, description="auto: bfloat16 on CUDA, float32 on CPU")
    device: str = pydantic.Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", json_schema_extra=EXECUTION,
                                 description="auto: this process's GPU when there is one, else the CPU")
    attn_implementation: str | None = pydantic.Field(None, json_schema_extra=EXECUTION, description="e.g. sdpa, "
                                                     "eager, flash_attention_2 (hf teacher: suffixes then batched)")
    chat_template_kwargs: dict[str, Any] = pydantic.Field(
        default_factory=lambda: {"enable_thinking": False}, json_schema_extra=RESULTS,
        description="variables for the chat template; enable_thinking=false switches thinking templates off")


def resolve_device(device: str, option: str = "teacher.device") -> str:
    """auto/cuda: this process's own GPU (cuda:<local rank> under torchrun, srun or a local worker pool), else the
    CPU; an explicit cuda:<i>, cpu or mps as written."""
    return device_for_process(device, option)


def device_map_kwargs(device_map: str | dict[str, Any]) -> dict[str, Any]:
    """from_pretrained's placement arguments for a model spread over several GPUs by accelerate, for THIS process:
    one process per group of GPUs. `auto` spreads the model over this process's group (`gpu_group`); a dict
    ({module: device}) is used as given."""
    import torch

    if device_map != "auto" or not torch.cuda.is_available():
        return {"device_map": device_map}
    gpus = gpu_group(from_env().local_rank, *node_layout(torch.cuda.device_count()))
    # What is free now (other processes, this one's CUDA context) with 10 % left for activations: given a max_memory,
    # accelerate keeps no margin of its own.
    memory = {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in gpus}
    return {"device_map": "auto", "max_memory": memory}


def gpu_group(local_rank: int, local_processes: int, gpus: int, own: bool = False) -> list[int]:
    """The GPUs of local process `local_rank` of `local_processes` that see `gpus` GPUs: equal consecutive groups
    (torchrun's 4 processes on 8 GPUs take 2 each), or every GPU it sees when they are its `own` (a Slurm task
    given its GPUs with --gpus-per-task sees only those)."""
    if own or local_processes == 1:
        return list(range(gpus))
    if local_processes > gpus:
        raise MakdError(f"teacher.device_map: {local_processes} processes on this node but {gpus} GPUs: start one "
                        "process per group of GPUs (e.g. torchrun --nproc_per_node=<GPUs / GPUs per model>)")
    size = gpus // local_processes
    return list(range(local_rank * size, (local_rank + 1) * size))


def node_layout(gpus: int, env: Mapping[str, str] | None = None) -> tuple[int, int, bool]:
    """(processes on this node, GPUs this process sees, whether they are its own: srun's SLURM_GPUS_PER_TASK binds
    GPUs to each task)."""
    env = os.environ if env is None else env
    return processes_on_node(env), gpus, bool(env.get("SLURM_GPUS_PER_TASK"))


def resolve_dtype(dtype: str, device: str) -> str:
    """auto: bfloat16 on GPUs (fast, the released models' dtype), float32 on CPUs (bf16 matmuls are slow there)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def load_pretrained(loader: Any, o: HFModelOptions, what: str, section: str = "teacher", **kwargs: Any) -> Any:
    """`loader.from_pretrained(o.model, ...)` with a one-line MakdError naming the option on failure; a hub id
    with the hub out of reach loads from the local cache only, or fails at once (`hub_offline`)."""
    extra = {"gguf_file": o.gguf_file} if o.gguf_file else {}
    offline = hub_offline(o.model)
    try:
        if o.gguf_file and not o.trust_remote_code and Path(o.model).expanduser().is_dir():
            return load_gguf(loader, o.model, o.gguf_file, **kwargs)  # dequantised once, then from makd's cache
        return loader.from_pretrained(o.model, revision=o.revision, trust_remote_code=o.trust_remote_code, **extra,
                                      **({"local_files_only": True} if offline else {}), **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        if offline:
            raise MakdError(offline_message(o.model, offline, section)) from None
        hint = "" if o.trust_remote_code or "trust_remote_code" not in str(exc) else \
            f" (this model needs its own code: set {section}.trust_remote_code=true if you trust it)"
        raise MakdError(f"{section}.model: cannot load the {what} of {o.model!r}: {first_line(exc)}{hint}") from None


def hub_offline(model: str) -> str | None:
    """Why the Hugging Face hub cannot serve `model`, or None when it can or need not (a local folder, a path).

    Without a network, huggingface_hub retries every file for minutes before it gives up; a single quick request
    to the endpoint (through the same proxies) tells at once, so loading falls back to the local cache only.
    """
    from huggingface_hub import constants

    if Path(model).expanduser().exists() or not REPO_ID.fullmatch(model):
        return None
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _endpoint_unreachable(constants.ENDPOINT)


@functools.lru_cache(maxsize=None)
def _endpoint_unreachable(endpoint: str) -> str | None:
    import httpx

    try:
        httpx.head(endpoint, timeout=HUB_PROBE_SECONDS)
    except httpx.HTTPError as exc:
        return f"the hub at {endpoint} cannot be reached ({type(exc).__name__})"
    return None


def offline_message(model: str, reason: str, section: str) -> str:
    alternative = ", or the offline teacher `teacher: {name: bridge}`" if section == "teacher" else ""
    return (f"{section}.model: {model!r} is not a local folder nor in the Hugging Face cache, and {reason}: give the "
            f"folder of a downloaded model{alternative}")


def model_fingerprint(o: HFModelOptions) -> dict[str, Any]:
    """What identifies the weights: the hub commit when the model comes from the hub cache, plus the config's
    hash and the weight files' sizes (cheap; hashing gigabytes of weights on every start is not)."""
    from transformers.utils import cached_file

    name = o.gguf_file or "config.json"
    offline = hub_offline(o.model)
    try:
        path = Path(cached_file(o.model, name, revision=o.revision, local_files_only=bool(offline)))
    except (OSError, ValueError) as exc:
        if offline:
            raise MakdError(offline_message(o.model, offline, "teacher")) from None
        raise MakdError(f"teacher.model: cannot find {name} of {o.model!r}: {str(exc).splitlines()[0]}") from None
    commit = path.parent.name if path.parent.parent.name == "snapshots" else None
    folder = path.parent
    weights = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
               if p.suffix in (".safetensors", ".bin", ".gguf", ".pt")}
    digest = hashlib.sha256(path.read_bytes() if name == "config.json" else str(weights).encode()).hexdigest()[:16]
    return {"commit": commit, "config_sha256": digest if name == "config.json" else None, "weight_files": weights}


def chat_messages(content: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """One user turn (optionally after a system turn), content in the list-of-parts form processors expect."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return [*messages, {"role": "user", "content": content}]


def template_kwargs(template: Any, wanted: dict[str, Any]) -> dict[str, Any]:
    """The chat-template variables (e.g. enable_thinking=False) this template actually reads: transformers treats
    the others as processor arguments and warns."""
    text = template if isinstance(template, str) else str(template)
    return {k: v for k, v in wanted.items() if k in text}


def pad_with_eos(tokenizer: Any, section: str = "teacher") -> bool:
    """The one pad-token rule for every local model, applied once at load: a tokenizer without a pad token pads
    with its EOS token. Which token pads never changes an answer (left pads are masked out, right pads come after
    the answer position). Returns whether the fallback applied, for provenance."""
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.eos_token is None:
        raise MakdError(f"{section}.model: its tokenizer has neither a pad token nor an EOS token to pad batches with")
    tokenizer.pad_token = tokenizer.eos_token
    return True


def adds_special_tokens(tokenizer: Any, prompt: str) -> bool:
    """Whether tokenising `prompt` should add BOS: not when the chat template already wrote it (as transformers'
    own `apply_chat_template(tokenize=True)` decides)."""
    return not (tokenizer.bos_token is not None and prompt.startswith(tokenizer.bos_token))


def common_prefix_length(sequences: list[list[int]]) -> int:
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return i
    return n
