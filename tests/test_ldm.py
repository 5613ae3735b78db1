"""Latent diffusion trained here: a tiny run on digits end to end (autoencoder → CLIP → U-Net),
its diffusers-layout folder read back by ``load_pipeline`` unchanged, ``difflab sample
--prompt`` (same seed ⇒ same image; bad prompts and flags ⇒ one line, exit 2), and the latent
objective's frozen parts and caption dropout."""

import json

import pytest
import torch

from difflab.cli import main
from difflab.data import load_dataset
from difflab.errors import ConfigError
from difflab.interop import load_pipeline
from difflab.io import load_tensors
from difflab.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflab.models.clip_text import CLIPTextConfig, CLIPTextModel
from difflab.pipelines import TextToImage
from difflab.runs.ldm import LDMConfig, build_unet, stage_train_configs, train_ldm
from difflab.training import TrainConfig
from difflab.training.objectives import DiffusionConfig, LatentDiffusionObjective

TINY = dict(vae_channels=(16, 32, 32), unet_channels=(16, 32), unet_heads=2, sample_steps=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ldm")
    train, test = load_dataset("digits"), load_dataset("digits", "test")
    r = train_ldm(train, test, out_dir=out, cfg=LDMConfig(**TINY),
                  train_cfg=TrainConfig(max_steps=3, batch_size=16, progress=False))
    return r


def test_run_writes_a_pipeline_folder_that_load_pipeline_reads(run):
    out = run.out_dir
    for f in ("pipeline/model_index.json", "pipeline/unet/config.json",
              "pipeline/unet/diffusion_pytorch_model.safetensors", "pipeline/vae/config.json",
              "pipeline/text_encoder/model.safetensors", "pipeline/tokenizer/vocab.json",
              "pipeline/tokenizer/merges.txt", "pipeline/scheduler/scheduler_config.json",
              "pipeline/captions.json", "vae/model/config.json", "clip/model/captions.json",
              "report.html", "t2i_grid.png", "reconstructions.png", "metrics.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["stages"]) == {"autoencoder", "clip", "unet"}
    assert m["stages"]["autoencoder"]["latent_shape"] == [4, 4, 4]  # 8×8 digits: f = 2
    pipe = load_pipeline(out / "pipeline")
    assert isinstance(pipe, TextToImage)
    # its sampler is the SDE DPM-Solver++ (heun), written in diffusers' own config keys
    sc = json.loads((out / "pipeline/scheduler/scheduler_config.json").read_text())
    assert (sc["_class_name"], sc["algorithm_type"], sc["solver_type"]) == \
        ("DPMSolverMultistepScheduler", "sde-dpmsolver++", "heun")
    assert (pipe.scheduler.config["algorithm_type"], pipe.scheduler.config["solver_type"]) == \
        ("sde-dpmsolver++", "heun")
    assert pipe.vae.config.scaling_factor == pytest.approx(
        m["stages"]["autoencoder"]["scaling_factor"])
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    # the text encoder and the autoencoder were frozen: the pipeline holds them unchanged
    clip = load_tensors(out / "clip" / "model" / "model.safetensors")
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(v, clip[f"text_encoder.{k}"]), k
    vae = load_tensors(out / "vae" / "model" / "model.safetensors")
    assert all(torch.equal(v, vae[k]) for k, v in pipe.vae.state_dict().items())
    x = pipe(["a thick seven", "an eight"], num_inference_steps=2, guidance_scale=3.0,
             generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and 0 <= x.min() and x.max() <= 1


def test_sample_cli_same_seed_same_image(run, tmp_path, capsys):
    a, b, c = (tmp_path / f"{n}.png" for n in "abc")
    argv = ["sample", "--ckpt", str(run.out_dir), "--prompt", "a thick seven",
            "--negative-prompt", "a thin seven", "--guidance", "5", "--scheduler", "dpm++",
            "--steps", "3", "--n", "4"]
    assert main([*argv, "--out", str(a)]) == 0
    assert main([*argv, "--out", str(b)]) == 0
    assert main([*argv, "--seed", "1", "--out", str(c)]) == 0
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert main([*argv, "--mixed-precision", "bf16", "--out", str(b)]) == 0
    assert main([*argv, "--mixed-precision", "bf16", "--out", str(c)]) == 0
    assert b.read_bytes() == c.read_bytes()  # bf16 autocast: deterministic too
    assert main(["sample", "--ckpt", str(run.pipeline), "--class", "3", "--steps", "2",
                 "--n", "2", "--scheduler", "ddim", "--out", str(c)]) == 0
    assert "'a three'" in capsys.readouterr().out
    assert main(["sample", "--ckpt", str(run.out_dir), "--prompt", "a large seven",
                 "--init-image", str(a), "--strength", "0.5", "--steps", "4", "--n", "2",
                 "--out", str(c)]) == 0


@pytest.mark.parametrize("extra", [
    ["--prompt", "a zebra"],  # a word the captions never used
    ["--prompt", " ".join(["a large thick seven"] * 8)],  # more tokens than positions
    ["--prompt", "a seven", "--negative-prompt", "a purple seven"],
    ["--prompt", "a seven", "--eta", "0.5"],
    ["--prompt", "a seven", "--trajectory"],
    ["--prompt", "a seven", "--class", "3"],
    [],  # no prompt
    ["--prompt", "a seven", "--init-image", "/nonexistent.png"],
    ["--prompt", "a seven", "--init-image", "x.png", "--strength", "0.1", "--steps", "3"],
    ["--prompt", "a seven", "--strength", "0.5"],  # img2img's flag without --init-image
])
def test_bad_prompts_and_flags_exit_2_one_line(run, extra, capsys):
    assert main(["sample", "--ckpt", str(run.out_dir), "--steps", "2", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: error:") and "\n" not in err, err


def test_eval_says_an_ldm_folder_is_not_what_it_scores(run, tmp_path, capsys):
    for metric in ("fid", "nll"):
        assert main(["eval", "--ckpt", str(run.out_dir), "--metric", metric,
                     "--out", str(tmp_path / "m.json")]) == 2
        assert "latent diffusion (text-to-image) folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "ldm", "--p-uncond", "2"],
                                  ["train", "ldm", "--guidance", "0"],
                                  ["sample", "--ckpt", "x", "--strength", "1.5"]])
def test_bad_ldm_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_train_ldm_reusing_vae_and_clip(run, tmp_path, capsys):
    out = tmp_path / "again"
    base = ["train", "ldm", "--data", "digits", "--out", str(out), "--vae", str(run.out_dir),
            "--clip", str(run.out_dir / "clip")]
    assert main([*base, "--minutes", "2", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert set(cfg["train"]) == {"unet"} and cfg["train"]["unet"]["minutes"] == 2
    assert cfg["train"]["unet"]["mixed_precision"] == "auto"  # the recipe: bf16 where it pays
    assert main([*base, "--steps", "2", "--batch-size", "8", "--sample-steps", "2",
                 "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "reused" in m["stages"]["clip"] and m["stages"]["unet"]["steps"] == 2
    assert (out / "pipeline" / "model_index.json").is_file()


def test_stage_budgets():
    cfg = LDMConfig()
    split = stage_train_configs(TrainConfig(minutes=10.0, lr=5e-4), cfg, ["vae", "clip", "unet"])
    assert sum(c.minutes for c in split.values()) == pytest.approx(10.0)
    assert split["unet"].minutes == pytest.approx(6.0) and split["unet"].lr == 5e-4
    assert split["vae"].lr != 5e-4  # the optimiser flags are the U-Net's
    only = stage_train_configs(TrainConfig(minutes=3.0), cfg, ["unet"])
    assert only["unet"].minutes == pytest.approx(3.0)
    steps = stage_train_configs(TrainConfig(max_steps=7), cfg, ["vae", "clip", "unet"])
    assert {c.max_steps for c in steps.values()} == {7}
    assert not any(c.deterministic for c in steps.values())
    det = stage_train_configs(TrainConfig(max_steps=7, deterministic=True), cfg,
                              ["vae", "clip", "unet"])
    assert all(c.deterministic for c in det.values())  # --deterministic: every stage
    auto = stage_train_configs(TrainConfig(max_steps=7, mixed_precision="auto"), cfg,
                               ["vae", "clip", "unet"])
    assert {c.mixed_precision for c in auto.values()} == {"auto"}  # the precision: every stage


def test_ldm_config_round_trip_and_validation():
    cfg = LDMConfig(unet_channels=(32, 64), p_uncond=0.2)
    assert LDMConfig.from_dict(json.loads(cfg.to_json())) == cfg
    for bad in (dict(unet_channels=(30, 64)), dict(p_uncond=1.0), dict(unet_heads=3),
                dict(stage_fractions=(1.0, 0.0, 1.0)), dict(prediction_type="x0")):
        with pytest.raises(ConfigError):
            LDMConfig(**bad)


class _RecordingTokenizer:
    def __init__(self):
        self.seen = []

    def __call__(self, texts):
        self.seen += list(texts)
        return torch.full((len(texts), 4), 3, dtype=torch.long)


def test_latent_objective_trains_only_the_unet_and_drops_captions():
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderKLConfig(image_size=8, block_out_channels=(8, 8),
                                            norm_num_groups=4, scaling_factor=0.5))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=8, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=4, eos_token_id=7))
    unet = build_unet(vae, 16, LDMConfig(unet_channels=(16, 16), unet_heads=2))
    tok = _RecordingTokenizer()
    task = LatentDiffusionObjective(unet, DiffusionConfig(p_uncond=1.0), vae=vae,
                                    text_encoder=text, tokenizer=tok,
                                    captioner=lambda x, y, g: ["a seven"] * len(x))
    task.train()
    assert not vae.training and not text.training and unet.training
    batch = {"images": torch.rand(4, 1, 8, 8) * 2 - 1, "labels": torch.zeros(4, dtype=torch.long)}
    loss = task.training_loss(batch, torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    assert tok.seen == [""] * 4  # p_uncond = 1: every caption is the empty prompt
    assert all(p.grad is None for p in (*vae.parameters(), *text.parameters()))
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    again = task.training_loss(batch, torch.Generator().manual_seed(0))["loss"]
    assert float(again.detach()) == float(loss.detach())  # same generator ⇒ same loss
    seen = []
    noised = task.noised
    task.noised = lambda z0, g: seen.append(z0.dtype) or noised(z0, g)
    with torch.autocast("cpu", torch.bfloat16):  # the VAE's latents come out in bf16
        task.training_loss(batch, torch.Generator().manual_seed(0))
    assert seen == [torch.float32]  # noise and z_t drawn in float32, as for pixels


@pytest.mark.slow
def test_diffusers_reads_the_folder(run):
    """diffusers' own StableDiffusionPipeline loads the folder and draws (nearly) our image."""
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        run.pipeline, safety_checker=None, feature_extractor=None)
    theirs.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=5, guidance_scale=4.0)
    ref = theirs(["a thick seven"], generator=torch.Generator().manual_seed(0), height=8,
                 width=8, output_type="pt", **kw).images
    ours = load_pipeline(run.pipeline)(["a thick seven"],
                                       generator=torch.Generator().manual_seed(0), **kw)
    assert (ref - ours).abs().max() < 2e-2
