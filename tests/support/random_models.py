"""Randomly initialised (vision-)language models of real architectures, built offline for tests and benchmarks.

No multimodal weights install offline (no model hub is reachable), so the `hf` teacher is checked the way transformers'
own tests check models: with tiny configs of real architectures (LLaVA, Qwen2-VL, Idefics3, InternVL, Gemma 3)
and a small byte-level BPE tokenizer that has Yes/No tokens, the architecture's special tokens and a chat
template shaped like the released model's. `save_random_vlm` writes model + processor to a folder that loads
through `AutoProcessor` / `AutoModelForImageTextToText`, i.e. exactly the path a user's hub model takes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

ARCHITECTURES = ("llava", "qwen2_vl", "idefics3", "internvl", "gemma3")

# Words the BPE tokenizer is trained on: answer words (so "Yes", " Yes", "no"... are single tokens) and the
# vocabulary of typical aspect questions.
CORPUS = (
    "Yes yes No no YES NO Answer with Yes or No . The answer must always be either Yes or No . "
    "Is the object a living animal ? Does the object have wheels ? Does the object have fur ? "
    "Is the object primarily used for transportation ? Is it worn on the feet ? Does the item have sleeves ? "
    "Is this a photo of a cat , a dog , a car , a shoe , a shirt , a bag or a boot ? Does it have legs ? "
    "What is in the image ? Is the item red , green , blue , black or white ? Is it made of metal or wood ? "
    "You are a helpful assistant . user assistant system model User Assistant USER ASSISTANT think "
)

# Special tokens of every architecture; each tokenizer also gets its architecture's named tokens below.
SPECIAL_TOKENS = [
    "<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "<image>", "<end_of_utterance>",
    "<fake_token_around_image>", "<global-img>", *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<img>", "</img>", "<IMG_CONTEXT>",
    "<video>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
    "<think>", "</think>",
]

NAMED_TOKENS: dict[str, dict[str, str]] = {
    "llava": {"image_token": "<image>"},
    "qwen2_vl": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
                 "vision_end_token": "<|vision_end|>"},
    "idefics3": {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                 "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"},
    "gemma3": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
}

# Chat templates shaped like the released models' (image first, generation prompt after the user turn). The
# InternVL one carries Qwen3's `enable_thinking` switch, which the teacher must turn off.
NL = "{{ '\\n' }}"  # a literal newline: transformers renders templates with trim_blocks, which eats raw ones
_CONTENT = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
            "{% if item['type'] == 'image' %}IMAGE{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
            "{% endfor %}{% endif %}")
CHAT_TEMPLATES = {
    "llava": ("{% for message in messages %}{% if message['role'] == 'system' %}" + _CONTENT + NL + "{% else %}"
              "{{ message['role'] | upper }}: " + _CONTENT.replace("IMAGE", "<image>" + NL) + NL + "{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"),
    "qwen2_vl": ("{% if messages[0]['role'] != 'system' %}<|im_start|>system" + NL + "You are a helpful assistant.<|im_end|>"
                 + NL + "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}" + NL
                 + _CONTENT.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>") + "<|im_end|>" + NL
                 + "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant" + NL + "{% endif %}"),
    "idefics3": ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
                 + _CONTENT.replace("IMAGE", "<image>") + "<end_of_utterance>" + NL + "{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}"),
    "internvl": ("{% for message in messages %}<|im_start|>{{ message['role'] }}" + NL
                 + _CONTENT.replace("IMAGE", "<IMG_CONTEXT>" + NL) + "<|im_end|>" + NL + "{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant" + NL
                 + "{% if enable_thinking is defined and enable_thinking is false %}<think>" + NL + NL + "</think>" + NL + NL
                 + "{% endif %}{% endif %}"),
    "gemma3": ("{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
               "else 'user' }}" + NL + _CONTENT.replace("IMAGE", "<start_of_image>") + "<end_of_turn>" + NL + "{% endfor %}"
               "{% if add_generation_prompt %}<start_of_turn>model" + NL + "{% endif %}"),
}


def build_tokenizer(arch: str, vocab_size: int = 700, base: Any = None) -> Any:
    """A byte-level BPE tokenizer trained on `CORPUS` — or `base`, a real tokenizer (the benchmark uses SmolLM2's,
    as SmolVLM does) — with the architecture's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    named = NAMED_TOKENS[arch]
    if base is not None:
        base.add_special_tokens({"extra_special_tokens": [t for t in SPECIAL_TOKENS if t not in base.get_vocab()]},
                                replace_extra_special_tokens=False)
        for key, value in named.items():
            setattr(base, key, value)
        base.chat_template = CHAT_TEMPLATES[arch]
        base.pad_token = base.pad_token or "<pad>"
        return base
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 3, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<|im_end|>" if arch != "gemma3" else "<eos>",
        pad_token="<pad>", extra_special_tokens=named, chat_template=CHAT_TEMPLATES[arch], model_max_length=1 << 16)


def _text(tok: Any, **overrides: Any) -> dict[str, Any]:
    """A small decoder; `overrides` scale it (the benchmark uses SmolLM2-135M's shape)."""
    base = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192,
            "initializer_range": 0.2, "tie_word_embeddings": False}
    return {**base, **overrides}


def _vision(**overrides: Any) -> dict[str, Any]:
    base = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "initializer_range": 0.2}
    return {**base, **overrides}


def _llava(tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    patch = 8
    config = LlavaConfig(
        text_config={"model_type": "llama", **_text(tok, **text)},
        vision_config={"model_type": "clip_vision_model", **_vision(image_size=image, patch_size=patch, **vision)},
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, initializer_range=0.2)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image}),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATES["llava"])
    return LlavaForConditionalGeneration(config), processor


def _qwen2_vl(tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl import (
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    t = _text(tok, **text)
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    section = [head_dim // 4, head_dim // 8, head_dim // 2 - head_dim // 4 - head_dim // 8]  # M-RoPE t/h/w split
    v = _vision(**vision)
    config = Qwen2VLConfig(
        text_config={"model_type": "qwen2_vl_text", **t, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                     "mrope_section": section}},
        vision_config={"depth": v["num_hidden_layers"], "embed_dim": v["hidden_size"], "hidden_size": t["hidden_size"],
                       "num_heads": v["num_attention_heads"], "mlp_ratio": v["intermediate_size"] // v["hidden_size"],
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "initializer_range": 0.2},
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), initializer_range=0.2)
    pixels = image * image
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels // 2, max_pixels=pixels, patch_size=14, merge_size=2,
                                            temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=CHAT_TEMPLATES["qwen2_vl"])
    return Qwen2VLForConditionalGeneration(config), processor


def _idefics3(tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    """Image splitting: an image up to 2x`image` px becomes up to 4 tiles of `image` px plus a global view."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    patch, scale = 8, 2
    config = Idefics3Config(
        text_config={"model_type": "llama", **_text(tok, **text)},
        vision_config={"model_type": "idefics3_vision", **_vision(image_size=image, patch_size=patch, **vision)},
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale, initializer_range=0.2)
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 2 * image}, max_image_size={"longest_edge": image},
                                             do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=(image // patch) ** 2 // scale**2, chat_template=CHAT_TEMPLATES["idefics3"])
    return Idefics3ForConditionalGeneration(config), processor


def _internvl(tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    """Dynamic tiling as in InternVL2.5/3: up to 4 tiles of `image` px plus a thumbnail."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )
    from transformers.models.internvl import InternVLVideoProcessor

    patch = 8
    config = InternVLConfig(
        text_config={"model_type": "qwen2", **_text(tok, **text)},
        vision_config={"model_type": "internvl_vision", **_vision(image_size=[image, image], patch_size=[patch, patch],
                                                                   **vision)},
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
        image_seq_length=(image // patch) ** 2 // 4, initializer_range=0.2)
    image_processor = GotOcr2ImageProcessor(size={"height": image, "width": image}, crop_to_patches=True,
                                            min_patches=1, max_patches=4)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=InternVLVideoProcessor(),
                                  image_seq_length=(image // patch) ** 2 // 4, chat_template=CHAT_TEMPLATES["internvl"])
    return InternVLForConditionalGeneration(config), processor


def _gemma3(tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    """Gemma 3: alternating sliding-window and global attention (a window shorter than the image prefix)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    patch, tokens = 8, 4
    t = _text(tok, **{"num_hidden_layers": 3, "head_dim": 8, "sliding_window": 8, **text})
    t["layer_types"] = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(t["num_hidden_layers"])]
    config = Gemma3Config(
        text_config={"model_type": "gemma3_text", **t},
        vision_config={"model_type": "siglip_vision_model", **_vision(image_size=image, patch_size=patch, **vision)},
        mm_tokens_per_image=tokens, boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"), initializer_range=0.2)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": image, "width": image}),
                                tokenizer=tok, image_seq_length=tokens, chat_template=CHAT_TEMPLATES["gemma3"])
    return Gemma3ForConditionalGeneration(config), processor


BUILDERS: dict[str, Callable[[Any, dict, dict, int], tuple[Any, Any]]] = {
    "llava": _llava, "qwen2_vl": _qwen2_vl, "idefics3": _idefics3, "internvl": _internvl, "gemma3": _gemma3}
IMAGE_SIZES = {"llava": 32, "qwen2_vl": 56, "idefics3": 32, "internvl": 32, "gemma3": 32}


def build_random_vlm(arch: str, *, text: dict | None = None, vision: dict | None = None, image: int | None = None,
                     seed: int = 0, tokenizer: Any = None) -> tuple[Any, Any]:
    """(model, processor) of `arch`, randomly initialised with a fixed seed; `text`/`vision` override the sizes."""
    import torch

    if arch not in BUILDERS:
        raise ValueError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
    torch.manual_seed(seed)
    tok = tokenizer or build_tokenizer(arch)
    model, processor = BUILDERS[arch](tok, text or {}, vision or {}, image or IMAGE_SIZES[arch])
    with torch.no_grad():  # zero-initialised matrices (Gemma 3's image projection) would make the image invisible
        for param in model.parameters():
            if param.ndim >= 2 and not param.any():
                param.normal_(0.0, 0.2)
    return model.eval(), processor


def save_random_vlm(arch: str, folder: str | Path, **kwargs: Any) -> Path:
    """Write a random `arch` model + processor (safetensors, JSON) to `folder`; returns it."""
    model, processor = build_random_vlm(arch, **kwargs)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_random_lm(folder: str | Path, *, seed: int = 0, **text: Any) -> Path:
    """A random Llama-architecture causal LM with the same tokenizer (ChatML template), for the text teacher."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = build_tokenizer("qwen2_vl")
    model = LlamaForCausalLM(LlamaConfig(**_text(tok, **text))).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
