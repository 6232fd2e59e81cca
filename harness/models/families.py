"""Tiny random-weight checkpoints of the real model families, for tests and dry runs.

    python -m harness.models.families --family llava-next --out build/tiny-llava-next

Each is the stock transformers class with the embedded model's tokenizer and vision/text sizes,
so that the engine and every method run through exactly the code path the 7B checkpoints take:
- "llava"       LlavaForConditionalGeneration (LLaVA-1.5): one 96 px image, 144 tokens;
- "llava-next"  LlavaNextForConditionalGeneration (anyres): the 96 px image resized onto the best of
                the grid pinpoints [[96, 192], [192, 96]], i.e. a base view + 2 crops, unpadded,
                with a newline token after each row of the crop grid (144 + 12 x 12 + 12 = 300);
- "video-llava" VideoLlavaForConditionalGeneration: the image as a still video of 4 frames, every
                frame's tokens with CLS (4 x 145 = 580).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harness.data import synthetic as syn
from harness.models import embedded

FAMILIES = ("llava", "llava-next", "video-llava")
NEXT_PINPOINTS = [[syn.IMAGE_SIZE, 2 * syn.IMAGE_SIZE], [2 * syn.IMAGE_SIZE, syn.IMAGE_SIZE]]
VIDEO_FRAMES = 4


def _image_processor(cls=None, **extra):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cls = cls or CLIPImageProcessorPil
    return cls(size={"shortest_edge": syn.IMAGE_SIZE}, crop_size={"height": syn.IMAGE_SIZE, "width": syn.IMAGE_SIZE},
               image_mean=embedded.CLIP_MEAN, image_std=embedded.CLIP_STD, **extra)


def build(family: str, num_layers: int = 4, seed: int = 0):
    """(model, processor) of a tiny random-weight checkpoint of `family`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(FAMILIES)}")
    base = embedded.build_config(num_layers=num_layers)
    base.text_config.initializer_range = 0.3
    base.vision_config.initializer_range = 0.3
    tokenizer = embedded.build_tokenizer()
    if family == "llava":
        from transformers import LlavaForConditionalGeneration

        config, cls, processor = base, LlavaForConditionalGeneration, embedded.build_processor()
    elif family == "llava-next":
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        config = LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config,
                                 image_token_id=base.image_token_id, projector_hidden_act="gelu",
                                 vision_feature_layer=-2, vision_feature_select_strategy="default",
                                 image_grid_pinpoints=NEXT_PINPOINTS, tie_word_embeddings=False)
        cls = LlavaNextForConditionalGeneration
        ip = _image_processor(LlavaNextImageProcessorPil, image_grid_pinpoints=NEXT_PINPOINTS)
        processor = LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=syn.PATCH,
                                       vision_feature_select_strategy="default", image_token="<image>",
                                       num_additional_image_tokens=1)
    else:
        from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

        tokenizer.add_tokens(["<video>"], special_tokens=True)
        video_id = tokenizer.convert_tokens_to_ids("<video>")
        base.text_config.vocab_size = video_id + 1
        config = VideoLlavaConfig(vision_config=base.vision_config, text_config=base.text_config,
                                  image_token_index=base.image_token_id, video_token_index=video_id,
                                  projector_hidden_act="gelu", vision_feature_layer=-2,
                                  vision_feature_select_strategy="default",
                                  image_seq_length=syn.NUM_PATCHES,
                                  video_seq_length=VIDEO_FRAMES * (syn.NUM_PATCHES + 1), tie_word_embeddings=False)
        config.num_frames = VIDEO_FRAMES
        cls = VideoLlavaForConditionalGeneration
        processor = VideoProcessor(_image_processor(), tokenizer)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    return model.eval(), processor


class VideoProcessor:
    """Video-LLaVA's inputs without torchvision: every frame through the CLIP image processor, and
    the `<video>` placeholder expanded to frames x (patches + CLS) tokens."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def save_pretrained(self, directory):
        d = Path(directory)
        self.image_processor.save_pretrained(d)
        self.tokenizer.save_pretrained(d)

    @classmethod
    def from_pretrained(cls, directory):
        from transformers import AutoTokenizer
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return cls(CLIPImageProcessorPil.from_pretrained(directory), AutoTokenizer.from_pretrained(directory))

    def __call__(self, frames, text: str, tokens_per_frame: int):
        pixels = self.image_processor(frames, return_tensors="pt")["pixel_values"][None]  # (1, F, 3, H, W)
        text = text.replace("<video>", "<video>" * (len(frames) * tokens_per_frame))
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        return {"input_ids": ids, "pixel_values_videos": pixels}


def save(family: str, out: str | Path, num_layers: int = 4, seed: int = 0) -> Path:
    model, processor = build(family, num_layers, seed)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=FAMILIES, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args(argv)
    print(save(a.family, a.out, a.layers))


if __name__ == "__main__":
    main()
