"""difflab's CLIP BPE tokenizer gives transformers' CLIPTokenizer ids (the oracle).

The vocabulary is built here in CLIP's own format: the 256 byte symbols, the same with ``</w>``,
merges learned on a small corpus by plain BPE (Sennrich et al. 2016), then the two specials.
``write_clip_vocab`` is also used by the pipeline and interop tests.
"""

from __future__ import annotations

import collections
import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from difflab.errors import CheckpointError
from difflab.models.tokenizer import CLIPTokenizer, bytes_to_unicode, normalize, pre_tokenize

CORPUS = (
    "a photograph of an astronaut riding a horse on the moon, highly detailed, 4k; "
    "the quick brown fox jumps over the lazy dog. it's a painting of a cat's hat. "
    "portrait of a woman in a red dress, oil on canvas, trending on artstation, "
    "mountains lake sunset landscape beautiful lighting cinematic photo realistic, "
    "a watercolor of a small thin seven, a dark ankle boot, an old castle in the fog, "
    "sharp focus, studio lighting, octane render, unreal engine, concept art, illustration"
)

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A PHOTO of a Cat's hat!!",
    "  lots   of\tspaces\n\nnewlines ",
    "",
    "it's 2024: 4k, 8K uhd, 1080p",
    "naïve café résumé",
    "emoji 🐱🚀 and 中文字符",
    "don't won't they'll we've i'm you'd",
    "..'s ''quoted'' \"double\"",
    "a<|endoftext|>b <|startoftext|> c",
    "x²+y³ ⅓ Ⅳ",
    "hyphen-ated_words and under_score",
    "ΣΊΣΥΦΟΣ greek",
    "long " * 100,
    "ﬁ ligature and Å",
    "e\u0301 combining accent",
    "<|ENDOFTEXT|> upper",
    "mixed123abc456",
    "!!!???...",
    "sharp focus, studio lighting, octane render, unreal engine, concept art",
    "a\x1cb \x1f c",  # str.isspace() holds for U+001C…U+001F; the regex's \s does not
]


def _learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair."""
    b2u = bytes_to_unicode()
    words: collections.Counter = collections.Counter()
    for token in pre_tokenize(normalize(text)):
        spelled = "".join(b2u[b] for b in token.encode("utf-8"))
        words[(*spelled[:-1], spelled[-1] + "</w>")] += 1
    merges = []
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: collections.Counter = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    base = list(bytes_to_unicode().values())
    merges = _learn_merges(CORPUS, 400)
    tokens = base + [b + "</w>" for b in base] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_vocab(folder: Path) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` in CLIP's format into ``folder``; returns it."""
    vocab, merges = _vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    return write_clip_vocab(tmp_path_factory.mktemp("clip_vocab"))


def _hf_ids(tok, prompts: list[str]) -> list[list[int]]:
    return tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids


def test_ids_match_transformers_vocab_files(vocab_dir):
    from transformers import CLIPTokenizer as HFTokenizer

    hf = HFTokenizer.from_pretrained(vocab_dir, model_max_length=77)
    ours = CLIPTokenizer.from_pretrained(vocab_dir)
    assert ours(PROMPTS).tolist() == _hf_ids(hf, PROMPTS)
    assert len(_vocab_and_merges()[1]) > 150  # the merges really are exercised


def test_ids_match_transformers_tokenizer_json(vocab_dir, tmp_path):
    """transformers ≥ 5 saves only tokenizer.json (+ tokenizer_config.json)."""
    from transformers import CLIPTokenizer as HFTokenizer

    hf = HFTokenizer.from_pretrained(vocab_dir, model_max_length=77)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    assert ours(PROMPTS).tolist() == _hf_ids(hf, PROMPTS)


def test_padding_truncation_and_specials(vocab_dir):
    tok = CLIPTokenizer.from_pretrained(vocab_dir)
    ids = tok(["a cat", "long " * 100])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    row = ids[0].tolist()
    assert row[0] == tok.bos_token_id and tok.eos_token_id in row
    assert row[row.index(tok.eos_token_id):] == [tok.eos_token_id] * (77 - row.index(
        tok.eos_token_id))  # SD v1 pads with <|endoftext|>
    assert ids[1, 0] == tok.bos_token_id and ids[1, -1] == tok.eos_token_id  # truncated
    assert tok.decode(tok.encode("a photo of a cat, 4k!")) == "a photo of a cat , 4 k !"


def test_pad_token_from_tokenizer_config(vocab_dir, tmp_path):
    """SD 2.x tokenizers pad with "!" (set in tokenizer_config.json)."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((vocab_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"pad_token": {"content": "!", "lstrip": False}, "model_max_length": 77}))
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.pad_token_id == tok.encoder["!"]
    assert tok(["a"])[0, -1] == tok.encoder["!"]


def test_missing_or_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no CLIP tokenizer files"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(CheckpointError, match="no '<|startoftext|>' token"):
        CLIPTokenizer.from_pretrained(tmp_path)


ADDED = ["<cat-toy>", "sks", "<cat-toy-xl>"]  # textual inversion, DreamBooth, a longer overlap
ADDED_PROMPTS = ["a <cat-toy> photo", "a <CAT-TOY> photo", "x<cat-toy>y", "<cat-toy><cat-toy>",
                 "sks dog sksdog", "A SKS dog", "<cat-toy-xl> x", "the <cat-toy>s",
                 "a<|endoftext|>b <cat-toy>"]


def test_added_tokens_match_transformers(vocab_dir, tmp_path):
    """Tokens added after training are cut out of the normalised text (leftmost, longest) in
    all three places transformers keeps them: tokenizer.json (transformers 5),
    tokenizer_config.json's added_tokens_decoder and added_tokens.json (transformers 4)."""
    from transformers import CLIPTokenizer as HFTokenizer

    hf = HFTokenizer.from_pretrained(vocab_dir, model_max_length=77)
    hf.add_tokens(ADDED)
    hf.save_pretrained(tmp_path / "v5")
    expected = _hf_ids(hf, ADDED_PROMPTS)
    assert expected != _hf_ids(HFTokenizer.from_pretrained(vocab_dir), ADDED_PROMPTS)
    ours = CLIPTokenizer.from_pretrained(tmp_path / "v5")
    assert ours(ADDED_PROMPTS).tolist() == expected
    assert ours.max_token_id == len(hf) - 1

    ids = {t: hf.convert_tokens_to_ids(t) for t in ADDED}
    for name, content in (
            ("added_tokens.json", ids),
            ("tokenizer_config.json", {"added_tokens_decoder": {
                str(i): {"content": t, "normalized": True, "special": False}
                for t, i in ids.items()}})):
        folder = tmp_path / name
        for f in ("vocab.json", "merges.txt"):
            (folder / f).parent.mkdir(exist_ok=True)
            (folder / f).write_bytes((vocab_dir / f).read_bytes())
        (folder / name).write_text(json.dumps(content))
        assert CLIPTokenizer.from_pretrained(folder)(ADDED_PROMPTS).tolist() == expected, name

    (folder / name).write_text(json.dumps({"added_tokens_decoder": {"900": {
        "content": "<x>", "single_word": True}}}))
    with pytest.raises(CheckpointError, match="single_word"):
        CLIPTokenizer.from_pretrained(folder)
