"""CLIP's byte-level BPE tokenizer (49,408 tokens); gives the same ids as OpenAI's for any text.

Text is repaired with ftfy, HTML entities are unescaped twice, runs of whitespace become one space, and the
result is lower-cased. A regex cuts it into letter runs, single digits, punctuation runs and English
contractions; each piece's UTF-8 bytes are spelled with 256 printable characters, "</w>" marks the end
of the piece, and adjacent symbols are merged in the order of bpe_simple_vocab_16e6.txt.gz (OpenAI's
file, see LICENSE_bpe_simple_vocab.txt). Every text is wrapped in <|startoftext|> ... <|endoftext|>.
"""
import gzip
import html
import os
from functools import lru_cache

import ftfy
import regex
import torch

VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # vocabulary = 256 bytes, 256 word-final bytes, the merges, SOT, EOT
SOT, EOT = 49406, 49407
SPECIAL = {"<|startoftext|>": SOT, "<|endoftext|>": EOT}
PIECES = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
                       regex.IGNORECASE)


def byte_alphabet():
    """Byte -> printable character: printable Latin-1 bytes stand for themselves, the other 68 for chr(256+n)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    spare = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(spare)) for b in range(256)}


class Tokenizer:
    def __init__(self, vocab_file=VOCAB_FILE):
        with gzip.open(vocab_file, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]  # line 0 is a version header
        self.alphabet = byte_alphabet()
        symbols = sorted(self.alphabet.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL)
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.merge = lru_cache(maxsize=1 << 16)(self._merge)

    def _merge(self, piece):
        """Byte-spelled piece -> its BPE tokens: repeatedly join every occurrence of the best-ranked pair."""
        parts = [*piece[:-1], piece[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.ids[p] for p in parts)

    def encode(self, text):
        """Text -> token ids, without SOT/EOT."""
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for piece in PIECES.findall(text):
            if piece in SPECIAL:
                ids.append(SPECIAL[piece])
            else:
                ids.extend(self.merge("".join(self.alphabet[b] for b in piece.encode("utf-8"))))
        return ids


@lru_cache(maxsize=None)
def default_tokenizer():
    return Tokenizer()


def tokenize(texts, context_length=77, truncate=False):
    """A string or a list of strings -> LongTensor [N, context_length]: SOT, tokens, EOT, zero padding.

    A text longer than context_length raises RuntimeError, unless truncate=True, which keeps the first
    context_length tokens and makes the last one EOT.
    """
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = default_tokenizer()
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [SOT, *tokenizer.encode(text), EOT]
        if len(ids) > context_length:
            if not truncate:
                shown = text if len(text) <= 80 else text[:77] + "..."
                raise RuntimeError(f"text {shown!r} is {len(ids)} tokens long, more than the context length "
                                   f"{context_length}; shorten it or pass truncate=True")
            ids = ids[:context_length]
            ids[-1] = EOT
        out[i, :len(ids)] = torch.tensor(ids)
    return out
