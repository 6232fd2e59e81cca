"""Model adapter: the one place that knows where a transformers LLaVA keeps its parts.

The engine and the methods reach the vision tower, projector, decoder layers, rotary embedding,
final norm, LM head and processor only through `ModelAdapter`, so supporting another family means
extending this file, not the engine.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.contract import TowerState
from harness.files import safetensors_problem
from harness.layers import Rows
from harness.models.embedded import EMBEDDED_DIR

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
DEVICE_ENV = "TWIGBENCH_DEVICE"  # where models go when no device is named (the tests' --device sets it)


class ModelError(ValueError):
    """A model path, dtype or attention implementation the harness cannot use."""


def default_device() -> str:
    """The device `load_model` uses when none is named: $TWIGBENCH_DEVICE where it is set (the test
    suite's --device sets it, so sweeps, tools and subprocesses follow the suite), else "cuda" where
    torch sees a GPU, else "cpu"."""
    return os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")


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


def read_config(p: Path) -> dict:
    """config.json of a checkpoint folder, checked to be a LLaVA config; ModelError otherwise."""
    try:
        cfg = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"model path {str(p)!r}: config.json is not valid JSON (line {e.lineno}, column "
                         f"{e.colno}: {e.msg}); allowed: a transformers LLaVA checkpoint's config.json") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"model path {str(p)!r}: config.json cannot be read ({e}); allowed: a readable "
                         f"transformers checkpoint folder") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"model path {str(p)!r}: config.json holds a {type(cfg).__name__}, not a mapping; "
                         f"allowed: a transformers LLaVA checkpoint's config.json")
    family_of(cfg.get("model_type"))
    missing = [k for k in ("vision_config", "text_config") if not isinstance(cfg.get(k), dict)]
    if missing:
        raise ModelError(f"model path {str(p)!r}: config.json has no {' or '.join(missing)}; allowed: a LLaVA "
                         f"config with both (as save_pretrained writes it)")
    return cfg


def check_weights(p: Path) -> None:
    """Every safetensors file of the checkpoint is complete (headers only; no weight is loaded)."""
    files = sorted(p.glob("*.safetensors"))
    if not files and not any(p.glob("*.bin")):
        raise ModelError(f"model path {str(p)!r} has no weights (*.safetensors or *.bin); allowed: a "
                         f"checkpoint folder written by save_pretrained")
    for f in files:
        problem = safetensors_problem(f)
        if problem:
            raise ModelError(f"model weights {str(f)!r}: {problem}; allowed: complete safetensors files "
                             f"(download or copy the checkpoint again)")


def read_shape(path: str, checkpoint: str | None = None) -> dict:
    """Layer count and visual-token count, without loading weights (LLaVA-NeXT and Video-LLaVA:
    the processor's count for the embedded benchmark's image size); checks the config and that
    the weight files are complete."""
    from transformers import AutoConfig

    p = resolve_model_path(path, checkpoint)
    family = family_of(read_config(p).get("model_type"))
    check_weights(p)
    cfg = AutoConfig.from_pretrained(p)  # the defaults that config.json leaves out filled in
    if family == "llava":
        m = visual_token_count(cfg.vision_config.image_size, cfg.vision_config.patch_size,
                               cfg.vision_feature_select_strategy)
    else:
        m = ADAPTERS[family].count_visual(load_processor(p, family), cfg)
    return {"num_layers": cfg.text_config.num_hidden_layers, "num_visual": m}


FAMILIES = {"llava": "llava", "llava_next": "llava-next", "video_llava": "video-llava"}


def family_of(model_type: str | None) -> str:
    if model_type not in FAMILIES:
        raise ModelError(f"model type {model_type!r} is not supported; allowed: {', '.join(FAMILIES)} "
                         f"(LLaVA-1.5, LLaVA-NeXT, Video-LLaVA)")
    return FAMILIES[model_type]


def load_processor(path: Path, family: str):
    if family == "video-llava":
        from harness.models.families import VideoProcessor

        return VideoProcessor.from_pretrained(path)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def _blank_image():
    from PIL import Image

    from harness.data.synthetic import IMAGE_SIZE

    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))


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

    family = "llava"

    @property
    def num_visual(self) -> int:
        if not hasattr(self, "_num_visual"):
            self._num_visual = self.count_visual(self.processor, self.model.config)
        return self._num_visual

    @staticmethod
    def count_visual(processor, config) -> int:
        return visual_token_count(config.vision_config.image_size, config.vision_config.patch_size,
                                  config.vision_feature_select_strategy)

    @property
    def image_token_id(self) -> int:
        """The placeholder token the visual tokens replace in the prompt."""
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

    @property
    def implicit_causal(self) -> bool:
        """Whether the attention kernel applies its own causal mask when queries equal keys (SDPA)."""
        return self.attn_implementation == "sdpa"

    def rows(self, tokens: list[int], start: int) -> Rows:
        """Token embeddings at consecutive positions from `start`, with their rotary embeddings."""
        hidden = self.embed(torch.tensor([tokens], device=self.device))
        positions = torch.arange(start, start + len(tokens), device=self.device)
        cos, sin = self.rotary(hidden, positions[None])
        return Rows(hidden, positions, cos, sin)

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
    def tower(self):
        return self.model.model.vision_tower

    @property
    def vision_layers(self):
        return getattr(self.tower, "vision_model", self.tower).encoder.layers

    @property
    def feature_layer(self) -> int:
        """0-based index of the vision-tower layer whose output feeds the projector."""
        f = self.model.config.vision_feature_layer
        if not isinstance(f, int):
            raise ModelError(f"vision_feature_layer {f!r}: only a single feature layer is supported")
        return f - 1 if f >= 0 else len(self.vision_layers) + f

    def tower_images(self, pixel_values) -> torch.Tensor:
        """(P, 3, H, W): every image the tower encodes for one sample (LLaVA: 1)."""
        return pixel_values

    def vision_hidden_states(self, pixel_values) -> tuple[torch.Tensor, ...]:
        """The tower's hidden states, (P, N+1, Dv) each: entry i is the input of layer i."""
        return self.tower(self.tower_images(pixel_values), output_hidden_states=True).hidden_states

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def default_features(self, hidden_states) -> torch.Tensor:
        """(M, D) visual tokens of the sample: feature layer, CLS dropped by "default", projected."""
        feats = hidden_states[self.feature_layer + 1][0]
        if self.model.config.vision_feature_select_strategy == "default":
            feats = feats[1:]
        return self.project(feats)

    def token_index(self, n_tower_tokens: int) -> torch.Tensor:
        """(P, N+1): for every tower token (CLS first) its index among the M visual tokens the
        model feeds the LLM, -1 where it feeds none (CLS dropped, padding removed)."""
        if self.model.config.vision_feature_select_strategy == "default":
            return torch.arange(-1, n_tower_tokens - 1)[None]
        return torch.arange(n_tower_tokens)[None]

    def grids(self) -> list[torch.Tensor]:
        """The spatial grids of the M visual tokens: (rows, cols) tensors of token indices, each
        covering the whole image (tokens outside every grid, e.g. newlines or CLS, are not spatial)."""
        v = self.model.config.vision_config
        side = v.image_size // v.patch_size
        first = 0 if self.model.config.vision_feature_select_strategy == "default" else 1  # "full": CLS first
        return [first + torch.arange(side * side).view(side, side)]

    def tower_state(self, hidden_states):
        """The feature layer's output, CLS-query attention per head, and head-averaged keys, for
        every tower image, computed from its own layer norm and q/k projections (no eager attention)."""
        i = self.feature_layer
        attn = self.vision_layers[i].self_attn
        x = self.vision_layers[i].layer_norm1(hidden_states[i])  # (P, N+1, Dv)
        p, n = x.shape[:2]
        heads, d = attn.num_heads, attn.head_dim
        q = attn.q_proj(x[:, :1]).view(p, 1, heads, d).transpose(1, 2)  # (P, H, 1, d)
        k = attn.k_proj(x).view(p, n, heads, d).transpose(1, 2)  # (P, H, N+1, d)
        cls = ((q.float() @ k.float().transpose(-1, -2)) * attn.scale).softmax(-1)[:, :, 0]  # (P, H, N+1)
        return TowerState(hidden=hidden_states[i + 1], cls_attention=cls, keys=k.mean(1),
                          token_index=self.token_index(n).to(x.device))

    def decode(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


@dataclass
class VisualInput:
    """Pixels plus what a family needs beside them (LLaVA-NeXT: the image sizes)."""
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor | None = None


class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT (anyres): a base view and the crops of the best grid pinpoint go through the
    tower; the model packs them as base tokens, then the unpadded crop grid with a newline token
    after each row. Its own `pack_image_features` does the packing, here too."""
    family = "llava-next"

    @staticmethod
    def count_visual(processor, config) -> int:
        x = processor(images=_blank_image(), text="<image>", return_tensors="pt")
        return int((x["input_ids"] == config.image_token_id).sum())

    def inputs(self, image, question: str) -> dict:
        x = self.processor(images=image, text=self.prompt(question), return_tensors="pt")
        return {"input_ids": x["input_ids"].to(self.device),
                "pixel_values": VisualInput(x["pixel_values"].to(self.device, self.model.dtype),
                                            x["image_sizes"].to(self.device))}

    def _crops(self, image_sizes) -> int:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return image_size_to_num_patches(image_sizes[0], cfg.image_grid_pinpoints, cfg.vision_config.image_size)

    def tower_images(self, pixel_values: VisualInput) -> torch.Tensor:
        return pixel_values.pixel_values[0][: self._crops(pixel_values.image_sizes)]

    def vision_hidden_states(self, pixel_values: VisualInput):
        self._image_sizes = pixel_values.image_sizes  # the packing below needs them
        return super().vision_hidden_states(pixel_values)

    def _pack(self, per_image: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        packed, _ = self.model.model.pack_image_features([per_image], self._image_sizes,
                                                         self.model.config.vision_feature_select_strategy,
                                                         image_newline=newline)
        return packed[0]

    def default_features(self, hidden_states) -> torch.Tensor:
        feats = hidden_states[self.feature_layer + 1]
        if self.model.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return self._pack(self.project(feats), self.model.model.image_newline)

    def _packed_ids(self, p: int, n: int) -> torch.Tensor:
        """Which tower token (p * n + j) each packed position holds; -1: a newline. Computed once
        per image size (it runs the model's packing on ids)."""
        cache = self.__dict__.setdefault("_packed_cache", {})
        key = (tuple(self._image_sizes[0].tolist()), p, n)
        if key not in cache:
            ids = torch.arange(p * n, dtype=torch.float64).view(p, n, 1)
            cache[key] = self._pack(ids, torch.tensor([-1.0], dtype=torch.float64))[:, 0].round().long()
        return cache[key]

    def token_index(self, n_tower_tokens: int) -> torch.Tensor:
        p = self._crops(self._image_sizes)
        cls = self.model.config.vision_feature_select_strategy == "default"
        n = n_tower_tokens - cls
        packed = self._packed_ids(p, n)
        index = torch.full((p * n,), -1, dtype=torch.long)
        where = (packed >= 0).nonzero().flatten()
        index[packed[where]] = where
        index = index.view(p, n)
        return torch.cat([torch.full((p, 1), -1), index], 1) if cls else index

    def grids(self) -> list[torch.Tensor]:
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        if getattr(self, "_image_sizes", None) is None:  # no sample seen yet: the benchmark's image size
            self._image_sizes = self.processor(images=_blank_image(), text="<image>",
                                               return_tensors="pt")["image_sizes"].to(self.device)
        crops = self._packed_ids(self._crops(self._image_sizes), side * side)[side * side:]
        base = torch.arange(side * side).view(side, side)
        if not len(crops):
            return [base]
        rows = int((crops < 0).sum())  # one newline per row
        grid = (side * side + torch.arange(len(crops)).view(rows, len(crops) // rows))[:, :-1]
        return [base, grid]


class VideoLlavaAdapter(ModelAdapter):
    """Video-LLaVA: the frames of a video through the video tower, every frame's tokens with CLS
    (Video-LLaVA keeps it for video), in frame order. On the embedded benchmark the image is shown
    as a still video of `config.num_frames` frames (default 8)."""
    family = "video-llava"

    @staticmethod
    def count_visual(processor, config) -> int:
        v = config.vision_config
        return getattr(config, "num_frames", 8) * ((v.image_size // v.patch_size) ** 2 + 1)

    @property
    def frames(self) -> int:
        return getattr(self.model.config, "num_frames", 8)

    @property
    def image_token_id(self) -> int:
        return self.model.config.video_token_id

    @property
    def tower(self):
        return self.model.model.video_tower

    def prompt(self, question: str) -> str:
        return f"USER: <video>\n{question} ASSISTANT:"

    def inputs(self, image, question: str) -> dict:
        frames = image if isinstance(image, list) else [image] * self.frames
        x = self.processor(frames, self.prompt(question), self.num_visual // self.frames)
        return {"input_ids": x["input_ids"].to(self.device),
                "pixel_values": VisualInput(x["pixel_values_videos"].to(self.device, self.model.dtype))}

    def tower_images(self, pixel_values: VisualInput) -> torch.Tensor:
        return pixel_values.pixel_values[0]

    def default_features(self, hidden_states) -> torch.Tensor:
        return self.project(hidden_states[self.feature_layer + 1]).flatten(0, 1)

    def token_index(self, n_tower_tokens: int) -> torch.Tensor:
        return torch.arange(self.frames * n_tower_tokens).view(self.frames, n_tower_tokens)

    def grids(self) -> list[torch.Tensor]:
        per = self.num_visual // self.frames
        side = math.isqrt(per - 1)
        return [f * per + 1 + torch.arange(side * side).view(side, side) for f in range(self.frames)]


ADAPTERS = {"llava": ModelAdapter, "llava-next": LlavaNextAdapter, "video-llava": VideoLlavaAdapter}


def load_model(path: str = "embedded", dtype: str = "float32", attn_implementation: str = "sdpa",
               device: str | None = None, checkpoint: str | None = None) -> ModelAdapter:
    import transformers

    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ModelError(f"attention implementation {attn_implementation!r} is not supported; "
                         f"allowed: {', '.join(ATTN_IMPLEMENTATIONS)}")
    p = resolve_model_path(path, checkpoint)
    family = family_of(read_config(p).get("model_type"))
    cls = {"llava": "LlavaForConditionalGeneration", "llava-next": "LlavaNextForConditionalGeneration",
           "video-llava": "VideoLlavaForConditionalGeneration"}[family]
    device = device or default_device()
    model = getattr(transformers, cls).from_pretrained(
        p, dtype=DTYPES[dtype], attn_implementation=attn_implementation).to(device).eval()
    return ADAPTERS[family](model, load_processor(p, family), path, dtype, attn_implementation)
