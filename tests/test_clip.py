"""CLIP from scratch: InfoNCE against a float64 hand computation, the caption tokenizer (with
transformers' CLIPTokenizer as the oracle), zero-shot accuracy and retrieval on a fake model
with known embeddings, save/load, a loss that decreases, and the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from difflab.cli import main
from difflab.data import load_dataset
from difflab.data.captions import Captioner
from difflab.models.clip import (
    CLIPConfig,
    CLIPModel,
    caption_tokenizer,
    clip_loss,
    retrieve,
    save_tokenizer,
    zero_shot_accuracy,
)
from difflab.models.tokenizer import CLIPTokenizer
from difflab.runs.clip import DEFAULT_TRAIN, CaptionedCLIP, build_clip, load_clip, train_clip
from difflab.training import TrainConfig, train

TINY = dict(image_channels=(8, 16), text_width=32, text_layers=1, text_heads=2,
            projection_dim=16)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits"), load_dataset("digits", "test")


# ----------------------------------------------------------------------------------- loss

def _hand_infonce(logits, pos):
    """½ Σ_directions mean_rows −Σ_j target_ij log softmax_ij, with plain Python floats."""
    n = len(logits)

    def direction(L, P):
        total = 0.0
        for i in range(n):
            z = math.log(sum(math.exp(L[i][j]) for j in range(n)))
            k = sum(P[i])
            total += -sum(P[i][j] / k * (L[i][j] - z) for j in range(n))
        return total / n

    LT = [[logits[j][i] for j in range(n)] for i in range(n)]
    PT = [[pos[j][i] for j in range(n)] for i in range(n)]
    return (direction(logits, pos) + direction(LT, PT)) / 2


def test_infonce_matches_hand_computation_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 4, generator=g, dtype=torch.float64) * 3
    eye = torch.eye(4, dtype=torch.bool)
    want = _hand_infonce(logits.tolist(), eye.int().tolist())
    got = clip_loss(logits.double(), eye)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # = CLIP's pseudocode (Fig. 3): mean of the two cross-entropies
    ce = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    assert float(got) == pytest.approx(float(ce) / 2, rel=1e-6)
    # images 0 and 2 share a caption: both texts are positives of both images
    pos = eye.clone()
    pos[0, 2] = pos[2, 0] = True
    want = _hand_infonce(logits.tolist(), pos.int().tolist())
    assert float(clip_loss(logits, pos)) == pytest.approx(want, rel=1e-6)


def test_training_loss_uses_equal_captions_as_positives():
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(vocab_size=40, eos_token_id=39, context_length=6, **TINY))
    ids = torch.tensor([[38, 5, 39, 39, 39, 39], [38, 6, 39, 39, 39, 39],
                        [38, 5, 39, 39, 39, 39]])
    x = torch.randn(3, 1, 8, 8)
    out = model.training_loss({"images": x, "input_ids": ids})
    pos = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        want = float(clip_loss(model(x, ids), pos))
    assert float(out["loss"].detach()) == pytest.approx(want, rel=1e-6)
    assert float(out["temperature"]) == pytest.approx(0.07, rel=1e-5)


def test_temperature_is_clamped_at_100():
    model = CLIPModel(CLIPConfig(vocab_size=40, eos_token_id=39, **TINY))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model.scale().detach()) == pytest.approx(100.0)
    # training clamps the parameter itself (OpenCLIP), so its gradient does not die at the cap
    ids = torch.tensor([[38, 5, 39], [38, 6, 39]])
    model.training_loss({"images": torch.randn(2, 1, 8, 8), "input_ids": ids})["loss"].backward()
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100.0))
    assert float(model.logit_scale.grad) != 0.0


# ------------------------------------------------------------------------------ tokenizer

def test_caption_tokenizer_one_token_per_word_and_transformers_agree(tmp_path, digits):
    ds, _ = digits
    cap = Captioner.fit(ds.images, ds.class_names)
    tok = caption_tokenizer(cap.vocabulary(), model_max_length=24)
    for word in cap.vocabulary():
        assert len(tok.encode(word)) == 3, word  # <bos> word <eos>
    save_tokenizer(tok, tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    texts = ["a small thin seven on the left", "", "an eight at the top", "a zebra!"]
    assert torch.equal(again(texts), tok(texts))
    assert again.decode(tok.encode(texts[0])) == texts[0]
    transformers = pytest.importorskip("transformers")
    oracle = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    ref = oracle(texts, padding="max_length", max_length=24, truncation=True).input_ids
    assert tok(texts).tolist() == ref


# ------------------------------------------------------------------------ zero-shot, retrieval

class FakeCLIP(torch.nn.Module):
    """Known embeddings: an image's embedding is row ``images[:, 0, 0, 0]`` of a table; a text's
    is the table row of its second token id (the class word)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def get_image_features(self, images):
        return self.table[images[:, 0, 0, 0].long()]

    def get_text_features(self, ids):
        return self.table[ids[:, 1]]


class FakeTokenizer:
    def __call__(self, texts):
        return torch.tensor([[0, int(t.split()[-1])] for t in texts])


def test_zero_shot_accuracy_on_known_embeddings():
    table = torch.eye(3) * 2 + 0.1  # three classes, near-orthogonal directions
    model = FakeCLIP(table)
    images = torch.zeros(5, 1, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([0, 1, 2, 1, 0])  # each image looks like this class
    labels = torch.tensor([0, 1, 2, 2, 1])  # the last two are "wrong"
    prompts = ["a 0", "a 1", "a 2"]
    acc, pred = zero_shot_accuracy(model, FakeTokenizer(), images, labels, prompts)
    assert pred.tolist() == [0, 1, 2, 1, 0]
    assert acc == pytest.approx(3 / 5)
    top = retrieve(model, FakeTokenizer(), images, ["a 1", "a 0"], k=2)
    assert sorted(top[0].tolist()) == [1, 3] and sorted(top[1].tolist()) == [0, 4]


# ---------------------------------------------------------------------- save / load, training

def test_save_load_round_trip(tmp_path, digits):
    ds, _ = digits
    torch.manual_seed(0)
    model, tok, cap = build_clip(ds, **TINY)
    ids = tok(cap(ds.images[:6], ds.labels[:6]))
    model.save_pretrained(tmp_path / "m")
    again = CLIPModel.from_pretrained(tmp_path / "m")
    assert torch.equal(model(ds.images[:6], ids), again(ds.images[:6], ids))
    assert again.config == model.config


def test_caption_task_loss_decreases(digits):
    ds, _ = digits
    torch.manual_seed(0)
    model, tok, cap = build_clip(ds, **TINY)
    cfg = TrainConfig(**{**DEFAULT_TRAIN, "max_steps": 100, "batch_size": 32, "lr": 3e-3,
                         "warmup_steps": 5, "progress": False})
    hist = train(CaptionedCLIP(model, cap, tok), ds.images, ds.labels, cfg).history
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < first - 0.3, (first, last)


def test_train_clip_writes_checkpoint_and_report(tmp_path, digits):
    ds, test = digits
    cfg = TrainConfig(**{**DEFAULT_TRAIN, "max_steps": 3, "batch_size": 32, "progress": False})
    run = train_clip(ds, test, out_dir=tmp_path, train_cfg=cfg, model_overrides=TINY)
    for f in ("model/config.json", "model/model.safetensors", "model/vocab.json",
              "model/merges.txt", "model/tokenizer_config.json", "model/captions.json",
              "report.html", "loss.png", "retrieval.png", "confusion.png", "metrics.json"):
        assert (tmp_path / f).is_file(), f
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["zero_shot_accuracy"] <= 1 and metrics["steps"] == 3
    b = load_clip(tmp_path)
    acc, _ = zero_shot_accuracy(b.model, b.tokenizer, test.images, test.labels,
                                b.captioner.class_prompts())
    assert acc == pytest.approx(metrics["zero_shot_accuracy"])
    ids = run.bundle.tokenizer(["a thick seven"])
    assert torch.equal(b.model.get_text_features(ids), run.bundle.model.get_text_features(ids))


def test_cli_train_clip(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["train", "clip", "--data", "digits", "--out", str(out), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["batch_size"] == 128
    assert not out.exists()
    assert main(["train", "clip", "--data", "digits", "--out", str(out), "--steps", "2",
                 "--batch-size", "16", "--no-progress"]) == 0
    assert "zero-shot" in capsys.readouterr().out and (out / "model" / "captions.json").is_file()
    for argv in (["train", "clip", "--data", "nope-data", "--steps", "1"],
                 ["sample", "--ckpt", str(out), "--prompt", "a seven"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("difflab: error:") and "\n" not in err, err
