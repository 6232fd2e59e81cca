"""The twig: T decoder layers grown after backbone layer K, with their own final norm and LM head.

Draft model = backbone layers 0..K-1 + twig. The backbone is never modified; the twig is a small
separate module stored next to (not inside) the checkpoint:

    <dir>/twig.safetensors   layers.0..T-1.*, norm.weight, lm_head.weight
    <dir>/twig.json          K, T, init, the backbone it was trained on, training record

Initialisation (`init`): "copy" (TwigVLM's default: backbone layers K..K+T-1, the final norm and
the LM head), "last" (the last T backbone layers) or "random" (fresh layers; norm and head still
copied), the three arms of the paper's ablation. Released TwigVLM checkpoints use
`model.layers.i.*`, `model.norm.weight`, `lm_head.weight`; `load_twig` remaps those too.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

INITS = ("copy", "last", "random")


class TwigError(ValueError):
    """A twig file, setting or shape that does not fit the model."""


class Twig(nn.Module):
    def __init__(self, text_config, K: int, T: int):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

        if K < 0 or T < 1:
            raise TwigError(f"twig: K={K}, T={T}; allowed: K >= 0, T >= 1")
        self.K, self.T = K, T
        # the twig's own cache numbers its layers 0..T-1
        self.layers = nn.ModuleList(LlamaDecoderLayer(text_config, layer_idx=i) for i in range(T))
        self.norm = LlamaRMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)

    @classmethod
    def grow(cls, model, K: int, T: int, init: str = "copy", seed: int = 0) -> "Twig":
        """A twig for a LlavaForConditionalGeneration, initialised the way `init` names."""
        if init not in INITS:
            raise TwigError(f"twig init {init!r}; allowed: {', '.join(INITS)}")
        lm = model.model.language_model
        L = len(lm.layers)
        if K + T > L and init == "copy":
            raise TwigError(f"twig: K={K} + T={T} exceeds the model's {L} layers")
        # on the model's device and in its dtype, as load_twig makes it (the weights are copied below)
        twig = cls(lm.config, K, T).to(device=lm.norm.weight.device, dtype=lm.norm.weight.dtype)
        if init == "random":
            g = torch.Generator().manual_seed(seed)
            std = getattr(lm.config, "initializer_range", 0.02)
            with torch.no_grad():
                for name, p in twig.layers.named_parameters():
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=g) * std)  # CPU generator: same on every device
                    else:
                        p.fill_(1.0)  # RMSNorm weights
        else:
            first = K if init == "copy" else L - T
            for i, layer in enumerate(twig.layers):
                state = copy.deepcopy(lm.layers[first + i].state_dict())
                layer.load_state_dict(state)
        twig.norm.load_state_dict(lm.norm.state_dict())
        twig.lm_head.load_state_dict(model.lm_head.state_dict())
        twig.init = init
        return twig

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def save_twig(twig: Twig, directory: str | Path, meta: dict) -> None:
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in twig.state_dict().items()}
    tmp = d / "twig.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(d / "twig.safetensors")
    (d / "twig.json").write_text(json.dumps({"K": twig.K, "T": twig.T, **meta}, indent=1))


def _remap_released(state: dict) -> dict:
    """TwigVLM's released layout (model.layers.i, model.norm, lm_head) -> this module's."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.layers."):
            out["layers." + k[len("model.layers."):]] = v
        elif k == "model.norm.weight":
            out["norm.weight"] = v
        else:
            out[k] = v
    return out


def load_twig(directory: str | Path, model, K: int | None = None) -> Twig:
    """Load a twig saved by `save_twig`, or a released TwigVLM twig (then K must be given)."""
    from safetensors.torch import load_file

    d = Path(directory)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise TwigError(f"twig directory {str(d)!r} has no .safetensors file; allowed: a directory "
                        f"written by train_twig or a released TwigVLM twig")
    meta = json.loads((d / "twig.json").read_text()) if (d / "twig.json").exists() else {}
    state = _remap_released({k: v for f in files for k, v in load_file(str(f)).items()})
    T = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    K = meta.get("K", K)
    if K is None:
        raise TwigError(f"twig {str(d)!r} does not say after which layer it grows; pass K")
    lm = model.model.language_model
    twig = Twig(lm.config, K, T).to(device=lm.norm.weight.device, dtype=lm.norm.weight.dtype)
    missing, unexpected = twig.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TwigError(f"twig {str(d)!r} does not fit this model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    twig.init = meta.get("init", "released")
    twig.meta = meta
    return twig.eval()
