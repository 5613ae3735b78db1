"""Writing Stable Diffusion formats: a random tiny difflab TextToImage saved with
``save_pipeline`` / ``save_single_file`` loads back (``load_pipeline`` / ``load_single_file``)
to the same images, and diffusers' own ``StableDiffusionPipeline.from_pretrained`` reads the
folder and draws the same images too (the oracle that the files really are in SD's format)."""

from __future__ import annotations

import json

import pytest
import torch

from difflab.interop import load_pipeline, load_single_file, save_pipeline, save_single_file
from difflab.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflab.models.clip import caption_tokenizer
from difflab.models.clip_text import CLIPTextConfig, CLIPTextModel
from difflab.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel
from difflab.pipelines import TextToImage
from difflab.schedulers import DDIMScheduler

PROMPTS = ["a red fox in the fog", "an astronaut riding a horse"]
SIZE = 16
TOL = 1e-4


def tiny_random_pipeline(seed: int = 0) -> TextToImage:
    torch.manual_seed(seed)
    tok = caption_tokenizer(PROMPTS, model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                        intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, eos_token_id=tok.eos_token_id))
    unet = UNet2DConditionModel(UNet2DConditionConfig(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=4))
    vae = AutoencoderKL(AutoencoderKLConfig(in_channels=3, image_size=SIZE,
                                            block_out_channels=(16, 32), latent_channels=4,
                                            scaling_factor=0.18215))
    with torch.no_grad():  # zero-initialised output layers would make every image the same
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    return TextToImage(tok, text.eval(), unet.eval(), vae.eval(), sched)


def _images(pipe: TextToImage) -> torch.Tensor:
    return pipe(PROMPTS, num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("writer")
    pipe = tiny_random_pipeline()
    return pipe, _images(pipe), save_pipeline(pipe, root / "tiny-sd")


def test_folder_round_trip(saved):
    pipe, ref, folder = saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    back = load_pipeline(folder)
    assert isinstance(back.scheduler, DDIMScheduler)
    for a, b in ((pipe.unet, back.unet), (pipe.vae, back.vae),
                 (pipe.text_encoder, back.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert back.tokenizer(PROMPTS).tolist() == pipe.tokenizer(PROMPTS).tolist()
    got = _images(back)
    assert ref.std() > 0.01  # the random model draws something, not a flat image
    assert torch.equal(got, ref)
    save_pipeline(back, folder)  # overwriting a folder replaces it whole
    assert torch.equal(_images(load_pipeline(folder)), ref)


def test_diffusers_reads_the_folder(saved):
    import diffusers

    _, ref, folder = saved
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                               requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    out = theirs(PROMPTS, num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (out - ref).abs().max() <= TOL


def test_single_file_round_trip(saved, tmp_path):
    pipe, ref, folder = saved
    path = save_single_file(pipe, tmp_path / "tiny.safetensors")
    configs = {part: json.loads((folder / part / "config.json").read_text())
               for part in ("unet", "vae", "text_encoder")}
    configs["scheduler"] = pipe.scheduler.config
    back = load_single_file(path, tokenizer=folder / "tokenizer", configs=configs,
                            scheduler="ddim")
    assert torch.equal(_images(back), ref)
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(pipe, tmp_path / "tiny.ckpt")
