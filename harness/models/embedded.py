"""The embedded model: a tiny LLaVA-1.5 (CLIP vision tower, MLP projector, Llama decoder).

Stock transformers classes only (`LlavaForConditionalGeneration`, `LlavaProcessor`, a word-level
fast tokenizer, `CLIPImageProcessorPil`), so the engine runs it through exactly the code path a
7B checkpoint takes. Its shape keeps LLaVA-1.5-7B's proportions where pruning depends on them:
144 visual tokens (12x12 patches; 88.9 % pruning keeps 16) and 16 decoder layers, so that the
paper's K = 2 of 32 layers becomes K = 1 of 16 and every budget of the paper is reachable under
the equal-token convention (which needs K * M <= L * R).
"""
from __future__ import annotations

from pathlib import Path

from harness.data import synthetic as syn

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded" / "llava-tiny-shapes"

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PROMPT_WORDS = ["USER:", "ASSISTANT:", "what", "color", "shape", "size", "is", "the", "at", "object",
                "how", "many", "objects", "shapes", "are", "there", "is", "a", "where", "letter",
                "written", "in", "image", "describe", "?", ".", ";"]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def vocabulary() -> list[str]:
    words = list(PROMPT_WORDS)
    words += list(syn.COLORS) + ["white"] + list(syn.SHAPES) + list(syn.SIZES) + list(syn.LETTERS)
    words += [w for p in syn.POSITIONS for w in p.split()] + list(syn.COUNT_WORDS) + ["yes", "no"]
    seen, out = set(SPECIAL_TOKENS), list(SPECIAL_TOKENS)
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"}, padding_side="left")


def build_processor():
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": syn.IMAGE_SIZE},
        crop_size={"height": syn.IMAGE_SIZE, "width": syn.IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                          patch_size=syn.PATCH, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")


def build_config(num_layers: int = 16, vocab_size: int | None = None, vision_layers: int = 4):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = vocabulary()
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=syn.IMAGE_SIZE,
                              patch_size=syn.PATCH, projection_dim=128)
    text = LlamaConfig(vocab_size=vocab_size or len(vocab), hidden_size=128, intermediate_size=384,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=vocab.index("<s>"), eos_token_id=vocab.index("</s>"),
                       pad_token_id=vocab.index("<pad>"))
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_id=vocab.index("<image>"), projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=syn.NUM_PATCHES, tie_word_embeddings=False)


def prompt(question: str) -> str:
    """LLaVA-1.5's single-turn template."""
    return f"USER: <image>\n{question} ASSISTANT:"
