"""Randomly initialised (vision-)language models of real architectures, built offline for tests and benchmarks.

No multimodal weights install offline (no model hub is reachable), so the `hf` teacher is checked the way transformers'
own tests check models: with tiny configs of real architectures (`ARCHITECTURES`) and a small byte-level BPE tokenizer
that has Yes/No tokens, the architecture's special tokens and a chat template shaped like the released model's.
`save_random_vlm` writes model + processor to a folder that loads through `AutoProcessor` /
`AutoModelForImageTextToText`, i.e. exactly the path a user's hub model takes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

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
    "<think>", "</think>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|START_OF_IMG|>", "<|END_OF_IMG|>",
    "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL",
]

_QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
_IDEFICS_TOKENS = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                   "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
NAMED_TOKENS: dict[str, dict[str, str]] = {
    "llava": {"image_token": "<image>"},
    "llava_next": {"image_token": "<image>"},
    "llava_onevision": {"image_token": "<image>", "video_token": "<video>"},
    "qwen2_vl": _QWEN_TOKENS, "qwen2_5_vl": _QWEN_TOKENS, "qwen3_vl": _QWEN_TOKENS,
    "idefics3": _IDEFICS_TOKENS, "smolvlm": _IDEFICS_TOKENS,
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"},
    "gemma3": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    "mistral3": {"image_token": "[IMG]"},
    "aya_vision": {"image_token": "<image>"},
    "paligemma": {"image_token": "<image>"},
}

# Chat templates shaped like the released models' (image first, generation prompt after the user turn). The
# InternVL one carries Qwen3's `enable_thinking` switch, which the teacher must turn off.
NL = "{{ '\\n' }}"  # a literal newline: transformers renders templates with trim_blocks, which eats raw ones
_CONTENT = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
            "{% if item['type'] == 'image' %}IMAGE{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
            "{% endfor %}{% endif %}")
_LLAVA = ("{% for message in messages %}{% if message['role'] == 'system' %}" + _CONTENT + NL + "{% else %}"
          "{{ message['role'] | upper }}: " + _CONTENT.replace("IMAGE", "<image>" + NL) + NL + "{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
_QWEN = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system" + NL + "You are a helpful assistant.<|im_end|>"
         + NL + "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}" + NL
         + _CONTENT.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>") + "<|im_end|>" + NL
         + "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant" + NL + "{% endif %}")
_IDEFICS = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
            + _CONTENT.replace("IMAGE", "<image>") + "<end_of_utterance>" + NL + "{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")
CHAT_TEMPLATES = {
    "llava": _LLAVA,
    "llava_next": _LLAVA,
    "llava_onevision": ("{% for message in messages %}<|im_start|>{{ message['role'] }}" + NL
                        + _CONTENT.replace("IMAGE", "<image>" + NL) + "<|im_end|>" + NL + "{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant" + NL + "{% endif %}"),
    "qwen2_vl": _QWEN, "qwen2_5_vl": _QWEN, "qwen3_vl": _QWEN,
    "idefics3": _IDEFICS, "smolvlm": _IDEFICS,
    "internvl": ("{% for message in messages %}<|im_start|>{{ message['role'] }}" + NL
                 + _CONTENT.replace("IMAGE", "<IMG_CONTEXT>" + NL) + "<|im_end|>" + NL + "{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant" + NL
                 + "{% if enable_thinking is defined and enable_thinking is false %}<think>" + NL + NL + "</think>" + NL + NL
                 + "{% endif %}{% endif %}"),
    "gemma3": ("{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
               "else 'user' }}" + NL + _CONTENT.replace("IMAGE", "<start_of_image>") + "<end_of_turn>" + NL + "{% endfor %}"
               "{% if add_generation_prompt %}<start_of_turn>model" + NL + "{% endif %}"),
    "mistral3": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
                 + _CONTENT.replace("IMAGE", "[IMG]") + "[/INST]{% endif %}{% endfor %}"),
    "aya_vision": ("{{ bos_token }}{% for message in messages %}<|START_OF_TURN_TOKEN|><|USER_TOKEN|>"
                   + _CONTENT.replace("IMAGE", "<image>") + "<|END_OF_TURN_TOKEN|>{% endfor %}"
                   "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"),
    # PaliGemma's processor itself puts BOS after the image tokens and a newline after the prompt.
    "paligemma": "{% for message in messages %}" + _CONTENT.replace("IMAGE", "<image>") + "{% endfor %}",
}


def build_tokenizer(arch: str, vocab_size: int = 700, base: Any = None, pad: bool = True,
                    style: Literal["bpe", "metaspace"] = "bpe") -> Any:
    """A tokenizer trained on `CORPUS` — or `base`, a real tokenizer (the benchmark uses SmolLM2's, as SmolVLM does)
    — with the architecture's special tokens and chat template; `pad=False`: no pad token, as Llama- and
    Mistral-family tokenizers ship. `style`: byte-level BPE (GPT-2, Qwen, SmolLM), or SentencePiece-style BPE with a
    metaspace pre-tokenizer (Llama 2, Mistral, Gemma: a word-start piece "▁" before words, so "yes" after a newline
    and "yes" at the start of a string are different tokens)."""
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
    if style == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        extra = {}
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet, extra = [], {"unk_token": "<unk>"}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*extra.values(), *SPECIAL_TOKENS],
                                  show_progress=False, initial_alphabet=alphabet)
    tok.train_from_iterator([CORPUS] * 3, trainer)
    eos = "<eos>" if arch in ("gemma3", "paligemma") else "<|im_end|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token=eos, pad_token="<pad>" if pad else None,
        extra_special_tokens=named, chat_template=CHAT_TEMPLATES[arch], model_max_length=1 << 16, **extra)


def _text(tok: Any, **overrides: Any) -> dict[str, Any]:
    """A small decoder; `overrides` scale it (the benchmark uses SmolLM2-135M's shape)."""
    base = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192,
            "tie_word_embeddings": False}
    return {**base, **overrides}


def _vision(**overrides: Any) -> dict[str, Any]:
    base = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    return {**base, **overrides}


def _mrope(t: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Qwen-VL rope parameters: the head's rotary half split over (time, height, width)."""
    half = t.get("head_dim", t["hidden_size"] // t["num_attention_heads"]) // 2
    section = [half // 2, half // 4, half - half // 2 - half // 4]
    return {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, **extra}}


def _llava(tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    patch = 8
    config = LlavaConfig(
        text_config={"model_type": "llama", **_text(tok, **text)},
        vision_config={"model_type": "clip_vision_model", **_vision(image_size=image, patch_size=patch, **vision)},
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, **UNTIED)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image}),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATES["llava"])
    return LlavaForConditionalGeneration(config), processor


def _llava_next(tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    """AnyRes: the image is split into a grid of `image` px crops (best fit among the pinpoints) plus a base view."""
    import transformers as hf

    patch = 8
    pinpoints = [[image, 2 * image], [2 * image, image], [2 * image, 2 * image]]
    config = hf.LlavaNextConfig(
        text_config={"model_type": "llama", **_text(tok, **text)},
        vision_config={"model_type": "clip_vision_model", **_vision(image_size=image, patch_size=patch, **vision)},
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, image_grid_pinpoints=pinpoints, image_seq_length=(image // patch) ** 2,
        **UNTIED)
    image_processor = hf.LlavaNextImageProcessor(size={"shortest_edge": image}, image_grid_pinpoints=pinpoints,
                                                 crop_size={"height": image, "width": image})
    processor = hf.LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      chat_template=CHAT_TEMPLATES["llava_next"])
    return hf.LlavaNextForConditionalGeneration(config), processor


def _llava_onevision(tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    import transformers as hf

    patch = 8
    pinpoints = [[image, image], [image, 2 * image], [2 * image, image], [2 * image, 2 * image]]
    config = hf.LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **_text(tok, **text)},
        vision_config={"model_type": "siglip_vision_model", **_vision(image_size=image, patch_size=patch, **vision)},
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
        **UNTIED)
    image_processor = hf.LlavaOnevisionImageProcessor(size={"height": image, "width": image},
                                                      image_grid_pinpoints=pinpoints)
    processor = hf.LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok,
                                           video_processor=hf.LlavaOnevisionVideoProcessor(),
                                           num_image_tokens=(image // patch) ** 2, vision_feature_select_strategy="full",
                                           chat_template=CHAT_TEMPLATES["llava_onevision"])
    return hf.LlavaOnevisionForConditionalGeneration(config), processor


def _qwen_vl(arch: str, tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    """Qwen2-VL, Qwen2.5-VL (windowed vision attention) and Qwen3-VL (DeepStack, interleaved M-RoPE): dynamic
    resolution, 2x2 patch merging, 3-D rotary positions in the language model."""
    import transformers
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor

    names = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}[arch]
    video = getattr(transformers, f"{'Qwen3VL' if arch == 'qwen3_vl' else 'Qwen2VL'}VideoProcessor")
    t = _text(tok, **text)
    v = _vision(**vision)
    patch = 16 if arch == "qwen3_vl" else 14
    vision_config = {"depth": v["num_hidden_layers"], "hidden_size": v["hidden_size"], "num_heads": v["num_attention_heads"],
                     "patch_size": patch, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if arch == "qwen2_vl":
        vision_config.update(embed_dim=v["hidden_size"], hidden_size=t["hidden_size"],
                             mlp_ratio=v["intermediate_size"] // v["hidden_size"])
        t.update(_mrope(t))
    elif arch == "qwen2_5_vl":
        vision_config.update(intermediate_size=v["intermediate_size"], out_hidden_size=t["hidden_size"],
                             window_size=2 * patch * 2, fullatt_block_indexes=[v["num_hidden_layers"] - 1])
        t.update(_mrope(t))
    else:
        vision_config.update(intermediate_size=v["intermediate_size"], out_hidden_size=t["hidden_size"],
                             num_position_embeddings=16, deepstack_visual_indexes=[0])
        t.update(head_dim=8, **_mrope({**t, "head_dim": 8}, mrope_interleaved=True))
    config = getattr(transformers, f"{names}Config")(
        text_config={"model_type": f"{arch}_text", **t}, vision_config=vision_config,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), **UNTIED)
    pixels = image * image
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels // 2, max_pixels=pixels, patch_size=patch, merge_size=2,
                                            temporal_patch_size=2)
    processor = getattr(transformers, f"{names}Processor")(image_processor=image_processor, tokenizer=tok,
                                                           video_processor=video(), chat_template=CHAT_TEMPLATES[arch])
    return getattr(transformers, f"{names}ForConditionalGeneration")(config), processor


def _idefics3(tok: Any, text: dict, vision: dict, image: int, smol: bool = False) -> tuple[Any, Any]:
    """Idefics3 / SmolVLM image splitting: an image up to 2x`image` px becomes up to 4 tiles of `image` px plus a
    global view."""
    import transformers

    name = "SmolVLM" if smol else "Idefics3"
    patch, scale = 8, 2
    config = getattr(transformers, f"{name}Config")(
        text_config={"model_type": "llama", **_text(tok, **text)},
        vision_config={"model_type": f"{'smolvlm' if smol else 'idefics3'}_vision",
                       **_vision(image_size=image, patch_size=patch, **vision)},
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale, **UNTIED)
    image_processor = getattr(transformers, f"{name}ImageProcessor")(
        size={"longest_edge": 2 * image}, max_image_size={"longest_edge": image}, do_image_splitting=True)
    video = {"video_processor": transformers.SmolVLMVideoProcessor()} if smol else {}
    processor = getattr(transformers, f"{name}Processor")(
        image_processor=image_processor, tokenizer=tok, image_seq_len=(image // patch) ** 2 // scale**2,
        chat_template=CHAT_TEMPLATES["smolvlm" if smol else "idefics3"], **video)
    return getattr(transformers, f"{name}ForConditionalGeneration")(config), processor


def _internvl(tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    """Dynamic tiling as in InternVL2.5/3: up to 4 tiles of `image` px plus a thumbnail; a Qwen2 language model."""
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
        image_seq_length=(image // patch) ** 2 // 4, **UNTIED)
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
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"), **UNTIED)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": image, "width": image}),
                                tokenizer=tok, image_seq_length=tokens, chat_template=CHAT_TEMPLATES["gemma3"])
    return Gemma3ForConditionalGeneration(config), processor


def _mistral3(tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    """Mistral Small 3.x: Pixtral vision (native aspect ratio, [IMG_BREAK] per row, 2x2 patch merging), Mistral LM."""
    import transformers as hf

    patch, merge = 8, 2
    v = _vision(**vision)
    config = hf.Mistral3Config(
        text_config={"model_type": "mistral", **_text(tok, **{"head_dim": 8, **text})},
        vision_config={"model_type": "pixtral", **v, "head_dim": v["hidden_size"] // v["num_attention_heads"],
                       "image_size": 2 * image, "patch_size": patch},
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=merge, vision_feature_layer=-1,
        **UNTIED)
    image_processor = hf.PixtralImageProcessor(size={"longest_edge": 2 * image},
                                               patch_size={"height": patch * merge, "width": patch * merge})
    processor = hf.PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                    spatial_merge_size=merge, chat_template=CHAT_TEMPLATES["mistral3"])
    return hf.Mistral3ForConditionalGeneration(config), processor


def _aya_vision(tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    """Aya Vision 8B: SigLIP tiles + thumbnail, pixel-shuffle downsampling, a Cohere2 LM (sliding-window layers with
    the released 4096-token window, longer than these prompts)."""
    import transformers as hf

    patch, down = 8, 2
    t = _text(tok, **{"head_dim": 8, "layer_types": ["sliding_attention", "full_attention"], **text})
    config = hf.AyaVisionConfig(
        text_config={"model_type": "cohere2", **t},
        vision_config={"model_type": "siglip_vision_model",
                       **_vision(image_size=image, patch_size=patch, vision_use_head=False, **vision)},
        image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"), downsample_factor=down,
        vision_feature_select_strategy="full", **UNTIED)
    image_processor = hf.GotOcr2ImageProcessor(size={"height": image, "width": image}, crop_to_patches=True,
                                               min_patches=1, max_patches=4)
    processor = hf.AyaVisionProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch, img_size=image,
                                      downsample_factor=down, chat_template=CHAT_TEMPLATES["aya_vision"])
    return hf.AyaVisionForConditionalGeneration(config), processor


def _paligemma(tok: Any, text: dict, vision: dict, image: int) -> tuple[Any, Any]:
    """PaliGemma: a prefix-LM (image AND prompt tokens attend to each other both ways), so no prefix can be shared;
    its processor returns `labels` next to the inputs."""
    import transformers as hf

    patch = 8
    image_processor = hf.SiglipImageProcessor(size={"height": image, "width": image})
    image_processor.image_seq_length = (image // patch) ** 2
    processor = hf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok,
                                      chat_template=CHAT_TEMPLATES["paligemma"])  # adds location tokens to `tok`
    t = _text(tok, **{"head_dim": 8, **text})
    config = hf.PaliGemmaConfig(
        text_config={"model_type": "gemma", **t},
        vision_config={"model_type": "siglip_vision_model",
                       **_vision(image_size=image, patch_size=patch, projection_dim=t["hidden_size"], **vision)},
        image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=t["hidden_size"],
        **UNTIED)
    return hf.PaliGemmaForConditionalGeneration(config), processor


Builder = Callable[[Any, dict, dict, int], tuple[Any, Any]]
BUILDERS: dict[str, Builder] = {
    "llava": _llava, "llava_next": _llava_next, "llava_onevision": _llava_onevision,
    "qwen2_vl": lambda *a: _qwen_vl("qwen2_vl", *a), "qwen2_5_vl": lambda *a: _qwen_vl("qwen2_5_vl", *a),
    "qwen3_vl": lambda *a: _qwen_vl("qwen3_vl", *a), "idefics3": _idefics3,
    "smolvlm": lambda *a: _idefics3(*a, smol=True), "internvl": _internvl, "gemma3": _gemma3, "mistral3": _mistral3,
    "aya_vision": _aya_vision, "paligemma": _paligemma,
}
UNTIED = {"tie_word_embeddings": False}  # the output head is scaled apart from the input embeddings (seeded_init)
WEIGHT_STD = 0.2
LOGIT_STD = 4.0  # answers vary by 0.3-5 in log-odds with the image and the question (tests/test_hf_teacher.py)
PROBE = "Is the object a living animal ? Answer with Yes or No ."  # seeded_init's probe prompt
IMAGE_SIZES = {"qwen2_vl": 56, "qwen2_5_vl": 56, "qwen3_vl": 64}  # multiples of patch x merge; the others: 32

# Test variants: (architecture, language-model overrides, whether the tokenizer has a pad token).
VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    # An InternVL on a Qwen2 backbone with Qwen2's sliding window switched on for its second layer, the window
    # (16 tokens) shorter than every prompt: the packed suffixes' single mask cannot express it.
    "internvl_sliding": ("internvl", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, True),
    # Llama and Mistral tokenizers ship without a pad token.
    "llava_next": ("llava_next", {}, False),
    "mistral3": ("mistral3", {}, False),
}
ARCHITECTURES = (*BUILDERS, *(v for v in VARIANTS if v not in BUILDERS))


def build_random_vlm(arch: str, *, text: dict | None = None, vision: dict | None = None, image: int | None = None,
                     seed: int = 0, tokenizer: Any = None, std: float | None = None) -> tuple[Any, Any]:
    """(model, processor) of `arch` (an architecture or a variant) with `seeded_init`'s weights; `text`/`vision`
    override the sizes (wider models want a smaller `std`: 0.02 as released models are initialised)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
    base, overrides, pad = VARIANTS.get(arch, (arch, {}, True))
    tok = tokenizer or build_tokenizer(base, pad=pad)
    model, processor = BUILDERS[base](tok, {**overrides, **(text or {})}, vision or {}, image or IMAGE_SIZES.get(base, 32))
    return seeded_init(model, tok.encode(PROBE, add_special_tokens=False), seed, std or WEIGHT_STD), processor


def seeded_init(model: Any, probe: list[int], seed: int = 0, std: float = WEIGHT_STD,
                logit_std: float = LOGIT_STD) -> Any:
    """Every weight drawn here, from `seed`, whatever the installed transformers' own initialisation does (its
    changes once made a test model's answers nearly constant): matrices and non-constant vectors ~ N(0, std);
    constant vectors (norm scales, zero biases) stay as the architecture defines them. Then the output head is
    scaled so that the logits after the `probe` token ids have a standard deviation of `logit_std`: the answers then move by
    a wide margin with the image and the question whatever scale the architecture puts on its logits (Cohere's
    logit_scale of 1/16, Gemma's embedding scaling). Parameters go in name order (independent of registration
    order)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in sorted(model.named_parameters()):
            if param.ndim == 1 and bool((param == param.flatten()[0]).all()):
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        head = model.get_output_embeddings()
        if logit_std and head.weight is not model.get_input_embeddings().weight:
            logits = model.eval()(input_ids=torch.tensor([probe])).logits[0, -1].float()
            head.weight.mul_(logit_std / float(logits.std()))
    return model.eval()


def save_random_vlm(arch: str, folder: str | Path, **kwargs: Any) -> Path:
    """Write a random `arch` model + processor (safetensors, JSON) to `folder`; returns it."""
    model, processor = build_random_vlm(arch, **kwargs)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_random_lm(folder: str | Path, *, seed: int = 0, pad: bool = True, style: Literal["bpe", "metaspace"] = "bpe",
                   **text: Any) -> Path:
    """A random Llama-architecture causal LM with the same tokenizer (ChatML template), for the text teacher."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer("qwen2_vl", pad=pad, style=style)
    model = seeded_init(LlamaForCausalLM(LlamaConfig(**_text(tok, **text))), tok.encode(PROBE, add_special_tokens=False),
                        seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
