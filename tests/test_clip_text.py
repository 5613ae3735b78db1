"""difflab's CLIPTextModel is transformers' CLIPTextModel (the oracle), name for name and number
for number, with both end-of-text pooling conventions."""

from __future__ import annotations

import json

import pytest
import torch

from difflab.errors import ConfigError
from difflab.models.clip_text import CLIPTextConfig, CLIPTextModel

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=998,
            pad_token_id=999)


def _transformers_model(**overrides):
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel

    torch.manual_seed(0)
    cfg = HFConfig(**{**TINY, **overrides})
    return HFModel(cfg).eval(), json.loads(cfg.to_json_string())


def _ours_from(ref, cfg: dict) -> CLIPTextModel:
    ours = CLIPTextModel(CLIPTextConfig.from_transformers_config(cfg)).eval()
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v
             for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(state)
    return ours


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 998, (3, 77), generator=g)
    lengths = torch.tensor([10, 76, 40])  # index of the end-of-text token per row
    ids[:, 0] = 998
    pos = torch.arange(77)[None]
    ids = torch.where(pos >= lengths[:, None], torch.full_like(ids, 999), ids)  # eos + padding
    return ids, (pos <= lengths[:, None]).long()


@pytest.mark.parametrize("eos_token_id", [2, 999], ids=["legacy-argmax", "eos-id"])
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_matches_transformers(eos_token_id, act):
    ref, cfg = _transformers_model(eos_token_id=eos_token_id, hidden_act=act)
    ours = _ours_from(ref, cfg)
    ids, mask = _ids()
    with torch.no_grad():
        for attention_mask in (None, mask):
            a = ref(ids, attention_mask=attention_mask)
            b = ours(ids, attention_mask=attention_mask)
            scale = a.last_hidden_state.abs().max()
            assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= 1e-5 * scale
            assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-5 * scale
    assert set(ours.state_dict()) == {k if k.startswith("text_model.") else f"text_model.{k}"
                                      for k in ref.state_dict() if "position_ids" not in k}


def test_causal_padding_never_changes_earlier_tokens():
    ours = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in TINY.items()
                                           if k not in ("bos_token_id", "pad_token_id")},
                                        eos_token_id=999)).eval()
    ids, _ = _ids()
    other = ids.clone()
    other[0, 20:] = 5  # change only tokens after position 19
    with torch.no_grad():
        a, b = ours(ids).last_hidden_state, ours(other).last_hidden_state
    assert torch.equal(a[0, :20], b[0, :20]) and not torch.equal(a[0, 20:], b[0, 20:])


def test_config_errors():
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPTextConfig.from_transformers_config({**TINY, "hidden_act": "relu"})
    with pytest.raises(ConfigError, match="model_type"):
        CLIPTextConfig.from_transformers_config({**TINY, "model_type": "t5"})
    with pytest.raises(ConfigError, match="num_attention_heads"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=4))
    with pytest.raises(ValueError, match="at most 4"):
        model(torch.zeros(1, 5, dtype=torch.long))
