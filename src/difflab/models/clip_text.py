"""CLIP's text encoder (Radford et al. 2021, §2.4): the τ_θ(y) that conditions Stable Diffusion.

A GPT-2-style transformer (Radford et al. 2019) over token ids (B, N):

    x = token_embedding[ids] + position_embedding[0..N)                      (B, N, D)
    L × { x = x + SelfAttn(LN₁(x), causal mask);  x = x + MLP(LN₂(x)) }      pre-LayerNorm
    last_hidden_state = LN_final(x)                                          (B, N, D)
    pooler_output     = last_hidden_state at the end-of-text token           (B, D)

with MLP = fc2(act(fc1(·))), act = quick_gelu(x) = x·σ(1.702x) (OpenAI's CLIP) or exact GELU
(OpenCLIP, SD 2.x). The attention is causal: token i sees tokens ≤ i, so the padding after
``<|endoftext|>`` never changes the tokens before it. Stable Diffusion cross-attends to the whole
``last_hidden_state`` (B, 77, 768 for SD v1's ViT-L/14 encoder).

Parameter names are transformers' ``CLIPTextModel`` names (``text_model.embeddings.
token_embedding``, ``text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``layer_norm1``,
``mlp.fc1`` …, ``text_model.final_layer_norm``), as stored in Stable Diffusion checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.config import Config, check_choice, check_positive
from difflab.errors import ConfigError
from difflab.models.base import ModelMixin

ACTIVATIONS = ("quick_gelu", "gelu")
# transformers' CLIPTextConfig defaults, for keys a config.json may lack (difflab's own
# defaults are SD v1's text encoder, a different model).
TRANSFORMERS_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "eos_token_id": 49407,
}


@dataclass(kw_only=True)
class CLIPTextConfig(Config):
    vocab_size: int = 49408  # BPE vocabulary (OpenAI CLIP: 49,152 merges + 256 bytes ×2 + 2)
    hidden_size: int = 768  # width D (SD v1: 768; SD 2.x OpenCLIP-H: 1024)
    intermediate_size: int = 3072  # MLP width (4·D)
    num_hidden_layers: int = 12  # transformer layers L
    num_attention_heads: int = 12  # heads; D must be a multiple
    max_position_embeddings: int = 77  # context length (CLIP: 77 tokens)
    hidden_act: str = "quick_gelu"  # MLP activation: quick_gelu (OpenAI CLIP) | gelu (OpenCLIP)
    layer_norm_eps: float = 1e-5  # LayerNorm ε
    # Which position pooler_output reads: 2 (the value in old configs, e.g. SD v1) means the
    # largest id (end-of-text has the largest id in CLIP's vocab); otherwise the first position
    # holding this id — transformers' rule since its PR #24773.
    eos_token_id: int = 49407

    def validate(self) -> None:
        o = "CLIPTextConfig"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "layer_norm_eps"):
            check_positive(o, name, getattr(self, name))
        check_choice(o, "hidden_act", self.hidden_act, ACTIVATIONS)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{o}.num_attention_heads={self.num_attention_heads} does not "
                              f"divide hidden_size={self.hidden_size}")

    @classmethod
    def from_transformers_config(cls, cfg: dict[str, Any]) -> CLIPTextConfig:
        """Build from a transformers ``text_encoder/config.json`` dict (``CLIPTextModel``).

        The architecture keys are read; training-only and generation keys (dropout, init
        ranges, ``projection_dim``, the many legacy keys of old configs) do not change the
        forward pass at inference and are ignored. An activation difflab lacks is an error.
        """
        if cfg.get("model_type") not in (None, "clip_text_model"):
            raise ConfigError(f"text encoder config: model_type={cfg['model_type']!r}; "
                              "difflab reads CLIP text models ('clip_text_model')")
        fields = cls.__dataclass_fields__
        cfg = {**TRANSFORMERS_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
        kwargs = {k: cfg[k] for k in fields if k in cfg}
        if "hidden_act" in kwargs and kwargs["hidden_act"] not in ACTIVATIONS:
            raise ConfigError(f"text encoder config: hidden_act={kwargs['hidden_act']!r} is not "
                              f"supported; allowed: {list(ACTIVATIONS)}")
        return cls(**kwargs)


@dataclass
class CLIPTextOutput:
    last_hidden_state: Tensor  # (B, N, D)
    pooler_output: Tensor  # (B, D): the state at the end-of-text token

    def __getitem__(self, i: int) -> Tensor:  # transformers-style ``out[0]``
        return (self.last_hidden_state, self.pooler_output)[i]


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: x (B, N, D), mask (B, 1, N, N) bool → (B, N, D)."""

    def __init__(self, c: CLIPTextConfig) -> None:
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, d)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class CLIPMLP(nn.Module):
    def __init__(self, c: CLIPTextConfig) -> None:
        super().__init__()
        self.quick = c.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)  # quick_gelu ≈ GELU
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, c: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPEncoder(nn.Module):
    def __init__(self, c: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """Holds the modules under transformers' ``text_model.`` prefix."""

    def __init__(self, c: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class CLIPTextModel(ModelMixin):
    """input_ids (B, N) [, attention_mask (B, N)] → ``.last_hidden_state`` (B, N, D),
    ``.pooler_output`` (B, D)."""

    config_class = CLIPTextConfig

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> CLIPTextOutput:
        tm = self.text_model
        b, n = input_ids.shape
        if n > self.config.max_position_embeddings:
            raise ValueError(f"{n} tokens; the text encoder takes at most "
                             f"{self.config.max_position_embeddings}")
        x = tm.embeddings(input_ids)  # (B, N, D)
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None]  # causal
        if attention_mask is not None:  # also hide padding keys
            mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, N, N)
        for layer in tm.encoder.layers:
            x = layer(x, mask)
        x = tm.final_layer_norm(x)
        rows = torch.arange(b, device=x.device)
        if self.config.eos_token_id == 2:  # legacy configs: end-of-text has the largest id
            eos_pos = input_ids.argmax(dim=-1)
        else:
            eos_pos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return CLIPTextOutput(last_hidden_state=x, pooler_output=x[rows, eos_pos.to(x.device)])
