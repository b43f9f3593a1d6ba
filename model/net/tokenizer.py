"""CLIP tokenizers from files on disk, and a word-level one built from a word list.

The tokenizer itself is transformers' ``CLIPTokenizer``; this file only gets one from a folder in
either layout a model may carry (``tokenizer.json``, or ITHQ's ``vocab.json`` + ``merges.txt``)
and writes both, so older loaders read what we save. ``word_tokenizer`` builds a small CLIP BPE
vocabulary in which every given word is one token, for models trained here on a closed vocabulary;
``caption_tokenizer`` builds that one over the words of a set of captions (what a fresh trainer does).
"""

from __future__ import annotations

import copy
import json
import re
import string
from dataclasses import replace
from pathlib import Path

from transformers import CLIPTokenizer

from vqdiff.model.config import TextEncoderConfig

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
ALPHABET = string.ascii_lowercase + string.digits + ".,;:!?'-()&/"


def word_tokenizer(words: list[str], alphabet: str = ALPHABET, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer where each of ``words`` is a single token; other text is spelt by character."""
    bad = sorted({ch for w in words for ch in w if ch not in alphabet})
    if bad:
        raise ValueError(f"word_tokenizer: characters {bad} are not in the alphabet {alphabet!r}")
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in dict.fromkeys(w.lower() for w in words if w):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: ((w0 w1) w2) ... so each word ends as one symbol
            pair = (parts[0], parts[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            parts = [pair[0] + pair[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def caption_words(captions: list[str]) -> list[str]:
    """The words of the captions (lowercased, split at anything outside the tokenizer's alphabet)."""
    words: dict[str, None] = {}
    for c in captions:
        for w in re.split(r"[^a-z0-9']+", c.lower()):
            if w and all(ch in ALPHABET for ch in w):
                words.setdefault(w)
    return list(words)


def caption_tokenizer(c: TextEncoderConfig, captions: list[str]) -> tuple[CLIPTokenizer, TextEncoderConfig]:
    """A word-level tokenizer over the captions' words, and ``c`` with room for its vocabulary."""
    tokenizer = word_tokenizer(caption_words(captions))
    return tokenizer, c if len(tokenizer) <= c.vocab_size else replace(c, vocab_size=len(tokenizer))


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """Read a tokenizer folder (offline). Raises FileNotFoundError naming what is missing."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = json.loads((folder / "vocab.json").read_text())
        lines = (folder / "merges.txt").read_text().splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        special = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                special.update(json.loads((folder / name).read_text()))
        tokens = {k: _token(special[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in special}
        tok = CLIPTokenizer(vocab=vocab, merges=merges, **tokens)
    else:
        raise FileNotFoundError(
            f"{folder}: no tokenizer found: expected tokenizer.json, or vocab.json and merges.txt"
        )
    if not 0 < tok.model_max_length <= 4096:  # unset (transformers' huge sentinel): CLIP's 77
        tok.model_max_length = MAX_LENGTH
    return tok


def save_tokenizer(tok: CLIPTokenizer, folder: Path, max_length: int = MAX_LENGTH) -> None:
    """tokenizer.json (transformers 5) plus vocab.json/merges.txt/special_tokens_map.json (older readers).
    ``max_length`` (the text encoder's positions) is recorded as model_max_length; ``tok`` is not changed."""
    folder = Path(folder)
    tok = copy.deepcopy(tok)
    tok.model_max_length = max_length
    tok.save_pretrained(folder)
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    special = {k: str(getattr(tok, k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _token(value) -> str:
    return value["content"] if isinstance(value, dict) else value
