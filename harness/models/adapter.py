"""Model adapter: the one place that knows where a transformers LLaVA keeps its parts.

The engine and the methods reach the vision tower, projector, decoder layers, rotary embedding,
final norm, LM head and processor only through `ModelAdapter`, so supporting another family means
extending this file, not the engine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.models.embedded import EMBEDDED_DIR

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class ModelError(ValueError):
    """A model path, dtype or attention implementation the harness cannot use."""


def resolve_model_path(path: str, checkpoint: str | None = None) -> Path:
    """'embedded' names the model shipped with the project; a local directory is used as it is; a
    hub id ("llava-hf/llava-1.5-7b-hf") is looked up in the local Hugging Face cache only.
    `checkpoint` (the hub id an experiment expects at `path`) only improves the error message."""
    if path == "embedded":
        return EMBEDDED_DIR
    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        return p
    if not p.exists() and path.count("/") == 1 and not path.startswith((".", "~")):
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(path, local_files_only=True))
            if (cached / "config.json").is_file():
                return cached
        except Exception:  # not in the cache (or no hub client): fall through to the error
            pass
    hint = (f"; this experiment expects {checkpoint} there: fetch it where there is internet "
            f"(huggingface-cli download {checkpoint} --local-dir {path}) and copy it"
            if checkpoint else "")
    raise ModelError(f"model path {path!r} is not a checkpoint directory with config.json{hint} "
                     f"(allowed: 'embedded', a local transformers checkpoint, or a hub id already in "
                     f"the local cache; nothing is downloaded at run time)")


def visual_token_count(image_size: int, patch_size: int, select_strategy: str) -> int:
    """Visual tokens per image: the patch grid, plus CLS unless the "default" strategy drops it."""
    return (image_size // patch_size) ** 2 + (0 if select_strategy == "default" else 1)


def read_shape(path: str, checkpoint: str | None = None) -> dict:
    """Layer count and visual-token count from config.json, without loading weights."""
    cfg = json.loads((resolve_model_path(path, checkpoint) / "config.json").read_text())
    vision = cfg["vision_config"]
    return {"num_layers": cfg["text_config"]["num_hidden_layers"],
            "num_visual": visual_token_count(vision["image_size"], vision["patch_size"],
                                             cfg.get("vision_feature_select_strategy", "default"))}


@dataclass
class ModelAdapter:
    model: torch.nn.Module
    processor: object
    name: str
    dtype_name: str
    attn_implementation: str

    # ---- parts -------------------------------------------------------------------------------
    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def layers(self):
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_visual(self) -> int:
        cfg = self.model.config
        return visual_token_count(cfg.vision_config.image_size, cfg.vision_config.patch_size,
                                  cfg.vision_feature_select_strategy)

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def eos_token_id(self) -> int:
        return self.processor.tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return self.model.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.language_model.norm(hidden))

    # ---- inputs ------------------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        """LLaVA-1.5's conversation template (the one the embedded model was trained with)."""
        return f"USER: <image>\n{question} ASSISTANT:"

    def inputs(self, image, question: str) -> dict:
        x = self.processor(images=image, text=self.prompt(question), return_tensors="pt")
        return {"input_ids": x["input_ids"].to(self.device),
                "pixel_values": x["pixel_values"].to(self.device, self.model.dtype)}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens (n_images, M, D) as the model's own forward computes them."""
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = out.pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    # ---- vision tower, step by step (what vision-stage methods need) ----------------------
    @property
    def vision_layers(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    @property
    def feature_layer(self) -> int:
        """0-based index of the vision-tower layer whose output feeds the projector."""
        f = self.model.config.vision_feature_layer
        if not isinstance(f, int):
            raise ModelError(f"vision_feature_layer {f!r}: only a single feature layer is supported")
        return f - 1 if f >= 0 else len(self.vision_layers) + f

    def vision_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tower's hidden states: entry i is the input of layer i (entry 0: the embeddings)."""
        return self.model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def default_features(self, hidden_states) -> torch.Tensor:
        """(M, D) visual tokens of the first image: feature layer, CLS dropped by "default", projected."""
        feats = hidden_states[self.feature_layer + 1][0]
        if self.model.config.vision_feature_select_strategy == "default":
            feats = feats[1:]
        return self.project(feats)

    def tower_state(self, hidden_states):
        """The feature layer's output, CLS-query attention per head, and head-averaged keys,
        computed from its own layer norm and q/k projections (no eager attention needed)."""
        from methods.base import TowerState

        i = self.feature_layer
        attn = self.vision_layers[i].self_attn
        x = self.vision_layers[i].layer_norm1(hidden_states[i][0])  # (N+1, Dv)
        heads, d = attn.num_heads, attn.head_dim
        q = attn.q_proj(x[:1]).view(1, heads, d).transpose(0, 1)  # (H, 1, d)
        k = attn.k_proj(x).view(-1, heads, d).transpose(0, 1)  # (H, N+1, d)
        cls = ((q.float() @ k.float().transpose(-1, -2)) * attn.scale).softmax(-1)[:, 0]  # (H, N+1)
        return TowerState(hidden=hidden_states[i + 1][0], cls_attention=cls, keys=k.mean(0))

    def decode(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def load_model(path: str = "embedded", dtype: str = "float32", attn_implementation: str = "sdpa",
               device: str | None = None, checkpoint: str | None = None) -> ModelAdapter:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ModelError(f"attention implementation {attn_implementation!r} is not supported; "
                         f"allowed: {', '.join(ATTN_IMPLEMENTATIONS)}")
    p = resolve_model_path(path, checkpoint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = LlavaForConditionalGeneration.from_pretrained(
        p, dtype=DTYPES[dtype], attn_implementation=attn_implementation).to(device).eval()
    processor = AutoProcessor.from_pretrained(p)
    return ModelAdapter(model, processor, path, dtype, attn_implementation)
