"""Loading Stable Diffusion weights: diffusers folders and original LDM single files.

Oracles: diffusers' and transformers' own full-size SD v1.5 modules (built on the meta device:
names and shapes), diffusers' LDM → diffusers converters (``single_file_utils``: an independent
implementation of the LDM names), and the tiny diffusers pipeline of tests/test_text_to_image.py
(numbers).
"""

from __future__ import annotations

import pickle
import shutil
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflab.errors import CheckpointError, ConfigError
from difflab.interop import config_counts_sd15, load_pipeline
from difflab.interop.sd_single_file import (
    SD15,
    ldm_names,
    ldm_state_from_models,
    load_single_file,
    sd15_models,
    unet_ldm_name,
    vae_ldm_name,
)
from test_text_to_image import PROMPTS, SCHEDULER, SIZE, diffusers_images, tiny_sd

TOL = 1e-4


@lru_cache(maxsize=1)
def _sd15_configs():
    unet, vae, _ = sd15_models("meta")
    return unet.config, vae.config


def _shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# --------------------------------------------------------------------- full size, on meta

def test_sd15_parameter_counts():
    counts = config_counts_sd15()
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_sd15_names_and_shapes_match_diffusers_and_transformers():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        ref_unet = UNet2DConditionModel(**SD15["unet"])
        ref_vae = AutoencoderKL(**SD15["vae"])
        ref_text = CLIPTextModel(CLIPTextConfig(**SD15["text_encoder"]))
    unet, vae, text = sd15_models("meta")
    assert _shapes(unet.state_dict()) == _shapes(ref_unet.state_dict())
    assert _shapes(vae.state_dict()) == _shapes(ref_vae.state_dict())
    ref_text_shapes = {k if k.startswith("text_model.") else f"text_model.{k}": s
                       for k, s in _shapes(ref_text.state_dict()).items()
                       if not k.endswith("position_ids")}
    assert _shapes(text.state_dict()) == ref_text_shapes


def test_sd15_ldm_names_through_diffusers_converters():
    """Write each difflab tensor under the LDM name difflab reads it from; diffusers' LDM →
    diffusers converters must put every one back under its own (= difflab's) name."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    models = sd15_models("meta")
    ldm = ldm_state_from_models(*models)
    names = ldm_names(*models)
    assert len(ldm) == sum(len(n) for n in names.values())  # 1:1, no two on one key
    converted = (convert_ldm_unet_checkpoint(ldm, dict(SD15["unet"])),
                 convert_ldm_vae_checkpoint(ldm, dict(SD15["vae"])),
                 convert_ldm_clip_checkpoint(ldm))
    for part, model, back in zip(("unet", "vae", "text_encoder"), models, converted):
        own = model.state_dict()
        assert _shapes(back) == _shapes(own), part
        for key in own:
            if back[key] is not ldm[names[part][key]]:  # only the VAE's 1×1 convs are sliced
                assert ".mid.attn_1." in names[part][key], key


@pytest.mark.parametrize("key,ldm", [
    ("conv_in.weight", "input_blocks.0.0.weight"),
    ("time_embedding.linear_2.bias", "time_embed.2.bias"),
    ("down_blocks.1.resnets.0.conv1.weight", "input_blocks.4.0.in_layers.2.weight"),
    ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
    ("down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
     "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight"),
    ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
    ("down_blocks.3.resnets.1.time_emb_proj.bias", "input_blocks.11.0.emb_layers.1.bias"),
    ("mid_block.resnets.1.norm2.weight", "middle_block.2.out_layers.0.weight"),
    ("mid_block.attentions.0.proj_in.weight", "middle_block.1.proj_in.weight"),
    ("up_blocks.0.resnets.2.conv2.weight", "output_blocks.2.0.out_layers.3.weight"),
    ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
    ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
    ("up_blocks.3.attentions.2.proj_out.weight", "output_blocks.11.1.proj_out.weight"),
    ("conv_norm_out.weight", "out.0.weight"),
])
def test_known_unet_names(key, ldm):
    """Spot checks against the original LDM module tree (CompVis/stable-diffusion)."""
    assert unet_ldm_name(key, _sd15_configs()[0]) == ldm


@pytest.mark.parametrize("key,ldm", [
    ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
     "encoder.down.1.block.0.nin_shortcut.weight"),
    ("encoder.down_blocks.2.downsamplers.0.conv.bias", "encoder.down.2.downsample.conv.bias"),
    ("encoder.mid_block.attentions.0.to_q.weight", "encoder.mid.attn_1.q.weight"),
    ("decoder.mid_block.attentions.0.to_out.0.bias", "decoder.mid.attn_1.proj_out.bias"),
    ("decoder.mid_block.resnets.1.conv1.weight", "decoder.mid.block_2.conv1.weight"),
    ("decoder.up_blocks.0.resnets.2.norm1.weight", "decoder.up.3.block.2.norm1.weight"),
    ("decoder.up_blocks.2.upsamplers.0.conv.weight", "decoder.up.1.upsample.conv.weight"),
    ("decoder.conv_norm_out.bias", "decoder.norm_out.bias"),
    ("post_quant_conv.weight", "post_quant_conv.weight"),
])
def test_known_vae_names(key, ldm):
    assert vae_ldm_name(key, _sd15_configs()[1]) == ldm


# ------------------------------------------------------------------ tiny, with numbers

@pytest.fixture(scope="module")
def tiny():
    pipe, folder, vocab_dir, configs = tiny_sd()
    ours = load_pipeline(folder)
    return pipe, folder, vocab_dir, configs, ours


@pytest.fixture(scope="module")
def ldm_state(tiny):
    """The tiny pipeline in the LDM single-file layout, certified by diffusers' converters."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    pipe, _, _, configs, ours = tiny
    state = ldm_state_from_models(ours.unet, ours.vae, ours.text_encoder)
    for ref, back in ((pipe.unet, convert_ldm_unet_checkpoint(state, configs["unet"])),
                      (pipe.vae, convert_ldm_vae_checkpoint(state, configs["vae"])),
                      (pipe.text_encoder, convert_ldm_clip_checkpoint(state))):
        expected = {k if k.startswith("text_model.") or ref is not pipe.text_encoder
                    else f"text_model.{k}": v for k, v in ref.state_dict().items()
                    if not k.endswith("position_ids")}
        assert set(back) == set(expected)
        assert all(torch.equal(back[k], expected[k]) for k in expected)
    return state


def _single_file_images(path: Path, vocab_dir: Path, configs: dict, **kw) -> torch.Tensor:
    ours = load_single_file(path, tokenizer=vocab_dir, configs=configs, **kw)
    return ours(PROMPTS, num_inference_steps=4, height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(0))


def test_single_file_matches_diffusers(tiny, ldm_state, tmp_path):
    pipe, _, vocab_dir, configs, _ = tiny
    extras = {"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
              "cond_stage_model.transformer.text_model.embeddings.position_ids":
                  torch.arange(77)[None]}  # skipped: not weights of the three networks
    save_file({**ldm_state, **extras}, str(tmp_path / "tiny.safetensors"))
    ref = diffusers_images(pipe, "dpm++")  # the single-file default scheduler
    got = _single_file_images(tmp_path / "tiny.safetensors", vocab_dir, configs)
    assert (ref - got).abs().max() <= TOL

    torch.save({"state_dict": ldm_state, "global_step": 1}, tmp_path / "tiny.ckpt")
    got_ckpt = _single_file_images(tmp_path / "tiny.ckpt", vocab_dir, configs)
    assert torch.equal(got, got_ckpt)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_ckpt_is_refused_and_not_run(tiny, tmp_path):
    _, _, vocab_dir, configs, _ = tiny
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(marker)}}, f)
    torch.save({"state_dict": {"x": _Payload(marker)}}, tmp_path / "evil2.ckpt")
    for name in ("evil.ckpt", "evil2.ckpt"):
        with pytest.raises(CheckpointError, match="refused"):
            load_single_file(tmp_path / name, tokenizer=vocab_dir, configs=configs)
    assert not marker.exists()


def test_single_file_errors(tiny, ldm_state, tmp_path):
    _, _, vocab_dir, configs, _ = tiny
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    bad = dict(ldm_state)
    bad[key] = torch.zeros(32, 32, 3, 3)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"input_blocks\.1\.1\.proj_in\.weight.*"
                       r"\(32, 32, 3, 3\).*\(32, 32, 1, 1\)"):
        load_single_file(tmp_path / "shape.safetensors", tokenizer=vocab_dir, configs=configs)

    missing = {k: v for k, v in ldm_state.items() if "first_stage_model.decoder.up.0" not in k}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="vae tensors missing.*decoder.up.0"):
        load_single_file(tmp_path / "missing.safetensors", tokenizer=vocab_dir, configs=configs)

    extra = {**ldm_state, "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="label_emb"):
        load_single_file(tmp_path / "extra.safetensors", tokenizer=vocab_dir, configs=configs)

    save_file(ldm_state, str(tmp_path / "sd.safetensors"))
    with pytest.raises(CheckpointError, match="--tokenizer"):
        load_single_file(tmp_path / "sd.safetensors", configs=configs)
    shutil.copytree(vocab_dir, tmp_path / "tokenizer")  # found beside the file
    pipe = load_single_file(tmp_path / "sd.safetensors", configs=configs, scheduler="euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(CheckpointError, match="not a Stable Diffusion v1"):  # real SD v1 sizes
        load_pipeline(tmp_path / "sd.safetensors")


# ------------------------------------------------------------------- diffusers folders

@pytest.fixture
def folder_copy(tiny, tmp_path) -> Path:
    dst = tmp_path / "sd"
    shutil.copytree(tiny[1], dst)
    return dst


def _first_image(pipe) -> torch.Tensor:
    return pipe(PROMPTS[:1], num_inference_steps=2, height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(0))


def test_legacy_files_bin_weights_old_names_pndm(tiny, folder_copy):
    """transformers 4 text-encoder keys (text_model. + position_ids), diffusers < 0.14 VAE
    attention names, .bin weights (weights_only), and a scheduler difflab lacks (PNDM)."""
    reference = _first_image(load_pipeline(tiny[1], scheduler="ddim"))
    te = folder_copy / "text_encoder"
    state = load_file(str(te / "model.safetensors"))
    state = {f"text_model.{k}": v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    (te / "model.safetensors").unlink()
    torch.save(state, te / "pytorch_model.bin")
    vae = folder_copy / "vae" / "diffusion_pytorch_model.safetensors"
    old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
           .replace("to_out.0.", "proj_attn."): v for k, v in load_file(str(vae)).items()}
    save_file(old, str(vae))
    cfg_path = folder_copy / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(cfg_path.read_text().replace("DDIMScheduler", "PNDMScheduler"))
    with pytest.warns(UserWarning, match="no PNDMScheduler"):
        pipe = load_pipeline(folder_copy)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    pipe.scheduler = type(load_pipeline(tiny[1]).scheduler).from_config(SCHEDULER)
    assert torch.equal(_first_image(pipe), reference)


def test_folder_errors(folder_copy):
    unet = folder_copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(unet))
    state["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    save_file(state, str(unet))
    with pytest.raises(CheckpointError, match=r"conv_in\.weight.*\(32, 4, 1, 1\).*"
                                              r"\(32, 4, 3, 3\)"):
        load_pipeline(folder_copy)
    del state["conv_in.weight"]
    save_file(state, str(unet))
    with pytest.raises(CheckpointError, match=r"1 missing \['conv_in.weight'\]"):
        load_pipeline(folder_copy)

    cfg = folder_copy / "unet" / "config.json"
    cfg.write_text(cfg.read_text().replace('"addition_embed_type": null',
                                           '"addition_embed_type": "text_time"'))
    with pytest.raises(ConfigError, match="addition_embed_type"):
        load_pipeline(folder_copy)

    index = folder_copy / "model_index.json"
    index.write_text(index.read_text().replace('"CLIPTextModel"', '"T5EncoderModel"'))
    with pytest.raises(CheckpointError, match="text_encoder"):
        load_pipeline(folder_copy)
    with pytest.raises(CheckpointError, match="no such file"):
        load_pipeline(folder_copy / "nope")


def test_missing_config_keys_take_the_peers_defaults():
    """A key a config.json lacks (diffusers < 0.11 wrote no VAE scaling_factor) means the
    peer's default — diffusers' or transformers' —, never difflab's own training default."""
    import inspect

    import diffusers
    import transformers

    from difflab.interop.diffusers_format import vae_config_from_diffusers
    from difflab.models.clip_text import CLIPTextConfig
    from difflab.models.unet_condition import UNet2DConditionConfig

    ref = {k: p.default for k, p in inspect.signature(diffusers.AutoencoderKL).parameters.items()}
    vae = vae_config_from_diffusers({})
    assert vae.scaling_factor == ref["scaling_factor"] == 0.18215
    assert vae.image_size == ref["sample_size"]
    for key in ("in_channels", "block_out_channels", "layers_per_block", "latent_channels",
                "norm_num_groups", "use_quant_conv", "use_post_quant_conv",
                "mid_block_add_attention"):
        assert getattr(vae, key) == ref[key], key
    ref = {k: p.default for k, p in
           inspect.signature(diffusers.UNet2DConditionModel).parameters.items()}
    unet = UNet2DConditionConfig.from_diffusers_config({})
    for key in set(unet.to_dict()) - {"sample_size"}:  # diffusers: None (no default size)
        assert getattr(unet, key) == ref[key], key
    ref = transformers.CLIPTextConfig()
    text = CLIPTextConfig.from_transformers_config({})
    for key in text.to_dict():
        assert getattr(text, key) == getattr(ref, key), key


def test_added_token_textual_inversion(tiny, folder_copy, tmp_path):
    """A pipeline with a token added after training (textual inversion: the tokenizer gets
    ``<cat-toy>``, the text encoder one more embedding row) encodes prompts as diffusers does;
    a tokenizer whose ids the text encoder cannot embed is refused."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder_copy)
    pipe.tokenizer.add_tokens(["<cat-toy>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[-1] = torch.randn(32)
    pipe.save_pretrained(tmp_path / "ti", safe_serialization=True)
    ours = load_pipeline(tmp_path / "ti")
    prompts = ["a <cat-toy> photo", "a photo of a cat"]
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        got = ours.encode_prompt(prompts)
    assert ours.tokenizer(prompts[:1])[0, 2] == len(pipe.tokenizer) - 1
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)

    pipe.tokenizer.save_pretrained(folder_copy / "tokenizer")  # text encoder not resized
    with pytest.raises(CheckpointError, match="embeds only"):
        load_pipeline(folder_copy)


def test_image_conditioned_unets_are_refused(folder_copy):
    """An inpainting U-Net (9 input channels: latents + mask + masked image) or one attending
    to another text width is refused when loading, not halfway through sampling."""
    cfg = folder_copy / "unet" / "config.json"
    text = cfg.read_text()
    cfg.write_text(text.replace('"in_channels": 4', '"in_channels": 9'))
    with pytest.raises(CheckpointError, match="text-to-image"):
        load_pipeline(folder_copy)
    cfg.write_text(text.replace('"cross_attention_dim": 32', '"cross_attention_dim": 48'))
    with pytest.raises(CheckpointError, match="attends to width 48"):
        load_pipeline(folder_copy)


def test_full_precision_weights_before_the_fp16_variant(tiny, folder_copy):
    """diffusers loads full precision, single or sharded, unless asked for a variant: so does
    difflab, even with an fp16 file beside sharded float32 weights; fp16 alone (single or
    sharded: ``…safetensors.index.fp16.json``) still loads."""
    import json

    reference = _first_image(tiny[4])
    unet = folder_copy / "unet"
    state = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)

    def shard(dtype, names, index):
        weight_map = {}
        for i, name in enumerate(names):
            part = {k: state[k].to(dtype).contiguous() for k in keys[i::len(names)]}
            save_file(part, str(unet / name))
            weight_map.update(dict.fromkeys(part, name))
        (unet / index).write_text(json.dumps({"weight_map": weight_map}))

    shard(torch.float32, ["a.safetensors", "b.safetensors"],
          "diffusion_pytorch_model.safetensors.index.json")
    save_file({k: torch.zeros_like(v, dtype=torch.float16) for k, v in state.items()},
              str(unet / "diffusion_pytorch_model.fp16.safetensors"))
    assert torch.equal(_first_image(load_pipeline(folder_copy)), reference)
    for f in ("a.safetensors", "b.safetensors", "diffusion_pytorch_model.safetensors.index.json",
              "diffusion_pytorch_model.fp16.safetensors"):
        (unet / f).unlink()
    shard(torch.float16, ["a.fp16.safetensors", "b.fp16.safetensors"],
          "diffusion_pytorch_model.safetensors.index.fp16.json")
    image = _first_image(load_pipeline(folder_copy))
    assert not torch.equal(image, reference)
    torch.testing.assert_close(image, reference, atol=2e-2, rtol=0)


def test_dtype_cast(tiny):
    pipe = load_pipeline(tiny[1], torch.bfloat16)
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)
            for p in m.parameters()} == {torch.bfloat16}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = _first_image(pipe)
    assert images.dtype == torch.float32 and images.isfinite().all()


# -------------------------------------------------------------------------------- CLI

def test_cli_sd(tiny, tmp_path, capsys):
    from PIL import Image

    from difflab.cli import main

    out = tmp_path / "fox.png"
    assert main(["sd", "--model", str(tiny[1]), "--prompt", "a red fox", "--steps", "2",
                 "--height", "16", "--width", "24", "--scheduler", "euler", "--seed", "1",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (24, 16)
    assert main(["sd", "--model", str(tiny[1]), "--prompt", "x", "--height", "12",
                 "--out", str(out)]) == 2
    assert "multiples of 8" in capsys.readouterr().err
    assert main(["sd", "--model", str(tmp_path / "none"), "--prompt", "x"]) == 2
