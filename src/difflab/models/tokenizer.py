"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, §2.5; Sennrich et al. 2016), from scratch.

Text → ids, in the order transformers' ``CLIPTokenizer`` does it (its ids are the oracle,
tests/test_tokenizer.py):

1. the special tokens ``<|startoftext|>`` / ``<|endoftext|>`` written in the prompt, and any
   added token stored un-normalised, are cut out first and become their ids;
2. every other piece is normalised: Unicode NFC, then lowercase (transformers also collapses
   whitespace runs; whitespace only separates pre-tokens, so that changes no ids); added tokens
   stored normalised (textual-inversion words such as ``<cat-toy>``) are cut out of that
   normalised text, leftmost first, the longest where several start at one place;
3. pre-tokenised by CLIP's pattern ``'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``
   (whitespace separates and is dropped);
4. each pre-token's UTF-8 bytes are spelled with GPT-2's printable byte alphabet
   (:func:`bytes_to_unicode`), the last symbol gets the end-of-word mark ``</w>``, and the
   learned merges (``merges.txt``, best first) join adjacent symbols until none applies;
5. ``[<|startoftext|>] + ids + [<|endoftext|>]``, truncated to ``model_max_length`` (77) and
   padded with the pad token (SD v1: ``<|endoftext|>``; SD v2: ``!``).

Files: ``vocab.json`` + ``merges.txt`` (the CLIP / SD layout), or a ``tokenizer.json`` holding the
same BPE model; ``tokenizer_config.json`` / ``special_tokens_map.json`` (optional) give the pad
token and the maximum length; added tokens come from ``tokenizer.json`` (``added_tokens``),
``tokenizer_config.json`` (``added_tokens_decoder``) or ``added_tokens.json``. ftfy "fixing" of
mojibake, which the original OpenAI code applies and transformers does not, is left out.
"""

from __future__ import annotations

import json
import unicodedata
from functools import lru_cache
from pathlib import Path

import torch

from difflab.errors import CheckpointError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
END_OF_WORD = "</w>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (Radford et al. 2019, encoder.py).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards, so that
    no byte is whitespace or a control character and BPE never sees them.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Python's str.isspace() also holds for the information separators U+001C…U+001F, which are
# not Unicode White_Space and so not matched by the regex's \s: transformers keeps them.
_NOT_WHITESPACE = frozenset("\x1c\x1d\x1e\x1f")


def _kind(ch: str) -> str:
    """'s' whitespace, 'L' letter, 'N' number, 'o' anything else (CLIP's three classes)."""
    if ch.isspace() and ch not in _NOT_WHITESPACE:
        return "s"
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "o"


def pre_tokenize(text: str) -> list[str]:
    """Split normalised text like CLIP's regex; alternatives are tried in the regex's order."""
    out, i, n = [], 0, len(text)
    while i < n:
        kind = _kind(text[i])
        if kind == "s":
            i += 1
            continue
        for c in CONTRACTIONS:  # 's 't 're 've 'm 'll 'd
            if text.startswith(c, i):
                out.append(c)
                i += len(c)
                break
        else:
            j = i + 1
            if kind == "L":  # \p{L}+
                while j < n and _kind(text[j]) == "L":
                    j += 1
            elif kind == "o":  # [^\s\p{L}\p{N}]+ ; a number is one digit per token
                while j < n and _kind(text[j]) == "o":
                    j += 1
            out.append(text[i:j])
            i = j
    return out


def normalize(text: str) -> str:
    """NFC, then lowercase character by character (as transformers' ``Lowercase``).

    transformers also collapses whitespace runs into one space; :func:`pre_tokenize` drops all
    whitespace anyway, so that step changes no ids and is left out.
    """
    return "".join(ch.lower() for ch in unicodedata.normalize("NFC", text))


class CLIPTokenizer:
    """Text → ``(B, model_max_length)`` token ids; see the module docstring."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                 pad_token: str = EOS, model_max_length: int = 77,
                 added_tokens: dict[str, tuple[int, bool]] | None = None) -> None:
        """``added_tokens``: ``{text: (id, normalized)}`` beyond or over the BPE vocabulary
        (``normalized``: matched in the NFC-lowercased text, as transformers does)."""
        vocab = dict(vocab)
        raw: dict[str, int] = {}
        normalized: dict[str, int] = {}
        for text, (i, norm) in (added_tokens or {}).items():
            vocab[text] = i
            if norm:  # two that normalise alike: the first (lowest id) wins, as on reload
                normalized.setdefault(normalize(text), i)
            else:
                raw[text] = i
        for tok in (BOS, EOS, pad_token):
            if tok not in vocab:
                raise CheckpointError(f"tokenizer: the vocabulary has no {tok!r} token")
        self.raw_added = {BOS: vocab[BOS], EOS: vocab[EOS], **raw}  # cut out as written
        self.normalized_added = normalized  # cut out of the normalised pieces
        self.encoder = vocab
        self.decoder = {i: t for t, i in vocab.items()}
        self.bpe_ranks = {pair: r for r, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.bos_token_id = vocab[BOS]
        self.eos_token_id = vocab[EOS]
        self.pad_token_id = vocab[pad_token]
        self.unk_token_id = vocab[EOS]  # CLIP's unknown token is <|endoftext|>
        self.model_max_length = model_max_length
        self._cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CLIPTokenizer:
        """Read ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``) from ``folder``."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [_merge_pair(line, folder / "merges.txt") for line in lines
                      if line and not line.startswith("#version")]
        elif (folder / "tokenizer.json").is_file():
            vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
        else:
            raise CheckpointError(f"{folder}: no CLIP tokenizer files (vocab.json + merges.txt "
                                  "or tokenizer.json)")
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
            if (folder / name).is_file():
                settings.update(_read_json(folder / name))
        added = _read_added_tokens(folder, settings)
        pad = settings.get("pad_token", EOS)
        pad = pad.get("content", EOS) if isinstance(pad, dict) else pad
        max_len = settings.get("model_max_length", 77)
        if not isinstance(max_len, int) or max_len > 10_000:  # transformers' "no limit" value
            max_len = 77
        return cls(vocab, merges, pad_token=pad, model_max_length=max_len, added_tokens=added)

    # ---------------------------------------------------------------------------- encoding

    def bpe(self, token: str) -> list[str]:
        """Merge the symbols of one pre-token (byte-alphabet string), best-ranked pair first."""
        word = [*token[:-1], token[-1] + END_OF_WORD]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _encode_piece(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _split(normalize(text), self.normalized_added):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(self._encode_words(piece))
        return ids

    def _encode_words(self, text: str) -> list[int]:
        ids = []
        for token in pre_tokenize(text):
            if token not in self._cache:
                spelled = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
                self._cache[token] = [self.encoder.get(s, self.unk_token_id)
                                      for s in self.bpe(spelled)]
            ids.extend(self._cache[token])
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with ``<|startoftext|>`` … ``<|endoftext|>``, untruncated."""
        ids: list[int] = []
        for piece in _split(text, self.raw_added):  # special tokens written in the text
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(self._encode_piece(piece))
        return [self.bos_token_id, *ids, self.eos_token_id]

    def __call__(self, texts: str | list[str], max_length: int | None = None) -> torch.Tensor:
        """Ids ``(B, max_length)`` (default ``model_max_length`` = 77), truncated and padded
        like ``tokenizer(texts, padding="max_length", truncation=True)`` in transformers."""
        if isinstance(texts, str):
            texts = [texts]
        n = max_length or self.model_max_length
        rows = []
        for text in texts:
            ids = self.encode(text)
            if len(ids) > n:
                ids = [*ids[:n - 1], self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (n - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Ids → text (special tokens dropped; ``</w>`` → space)."""
        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in specials)
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        byte_decoder[" "] = ord(" ")  # the end-of-word marks become spaces
        raw = bytearray(byte_decoder[c] for c in text.replace(END_OF_WORD, " "))
        return " ".join(raw.decode("utf-8", errors="replace").split())

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def max_token_id(self) -> int:
        """The largest id this tokenizer can emit (the text encoder must embed it)."""
        return max(self.encoder.values())


def _split(text: str, tokens: dict[str, int]) -> list[str | int]:
    """``text`` with every occurrence of a key of ``tokens`` replaced by its id: the leftmost
    match first, the longest of those starting there."""
    out: list[str | int] = []
    while tokens:
        hits = [(pos, -len(t), t) for t in tokens if (pos := text.find(t)) >= 0]
        if not hits:
            break
        pos, _, token = min(hits)
        if pos:
            out.append(text[:pos])
        out.append(tokens[token])
        text = text[pos + len(token):]
    if text:
        out.append(text)
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _read_added_tokens(folder: Path, settings: dict) -> dict[str, tuple[int, bool]]:
    """Tokens added after training (textual inversion, DreamBooth): ``{text: (id, normalized)}``
    from whichever of transformers' three places hold them."""
    entries: list[dict] = []
    if (folder / "tokenizer.json").is_file():
        entries += _read_json(folder / "tokenizer.json").get("added_tokens") or []
    for i, entry in (settings.get("added_tokens_decoder") or {}).items():
        entries.append({**entry, "id": int(i)})
    if (folder / "added_tokens.json").is_file():  # transformers 4's slow tokenizers: {text: id}
        entries += [{"content": t, "id": i, "normalized": True}
                    for t, i in _read_json(folder / "added_tokens.json").items()]
    added: dict[str, tuple[int, bool]] = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("content"), str) \
                or not isinstance(e.get("id"), int):
            raise CheckpointError(f"{folder}: bad added-token entry {e!r}")
        if e.get("single_word"):
            raise CheckpointError(f"{folder}: added token {e['content']!r} has single_word=true, "
                                  "which difflab's tokenizer does not implement")
        special = e.get("special") or e["content"] in (BOS, EOS)  # always matched as written
        if e["content"] not in added:  # tokenizer.json first: it is what transformers 5 reads
            added[e["content"]] = (e["id"], not special and bool(e.get("normalized", True)))
    return added


def _merge_pair(line: str, path: Path) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise CheckpointError(f"{path}: bad merge line {line!r} (expected two symbols)")
    return parts[0], parts[1]


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = _read_json(path).get("model", {})
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
        raise CheckpointError(f"{path}: not a CLIP BPE tokenizer (model type "
                              f"{model.get('type')!r}, end_of_word_suffix "
                              f"{model.get('end_of_word_suffix')!r})")
    merges = [tuple(m) if isinstance(m, list) else _merge_pair(m, path)
              for m in model.get("merges", [])]
    return dict(model["vocab"]), merges  # type: ignore[return-value]
