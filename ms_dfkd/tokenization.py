"""Tokenizers on the Rust ``tokenizers`` library, built offline.

``Tokenizer`` is the one interface the rest of ms-dfkd uses: batch encoding to
numpy with padding and truncation, and decoding. Two constructors build it:
WordPiece for the BERT family and byte-level BPE from a GGUF file's metadata.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Tokenizer:
    backend: object                    # tokenizers.Tokenizer
    pad_id: int
    bos_id: int = None                 # [CLS] for WordPiece
    eos_id: int = None                 # [SEP] for WordPiece
    unk_id: int = None
    kind: str = "wordpiece"            # "wordpiece" | "bpe"
    chat_template: str = None          # jinja-free template string, see apply_chat_template
    extra: dict = field(default_factory=dict)

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, tok):
        return self.backend.token_to_id(tok)

    def id_to_token(self, i):
        return self.backend.id_to_token(int(i))

    def encode(self, text, add_special_tokens=True):
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts, max_length=None, padding="longest", add_special_tokens=True,
                     pad_to_multiple_of=None, padding_side="right"):
        """Return (ids int32 [B, L], attention_mask int32 [B, L]).

        padding: "longest" (pad to the longest row) or "max_length" (pad to max_length).
        Truncation keeps the first max_length tokens (the last special token is kept
        for WordPiece so that [SEP] still closes the sequence).
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, not a string")
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if max_length is not None:
            cut = []
            for r in rows:
                if len(r) > max_length:
                    keep_last = add_special_tokens and self.kind == "wordpiece" and r[-1] == self.eos_id
                    r = r[: max_length - 1] + [r[-1]] if keep_last else r[:max_length]
                cut.append(r)
            rows = cut
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            L = max_length
        elif padding == "longest":
            L = max([len(r) for r in rows] + [1])
        else:
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if pad_to_multiple_of:
            L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
        ids = np.full((len(rows), L), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), L), dtype=np.int32)
        for i, r in enumerate(rows):
            if padding_side == "left":
                ids[i, L - len(r):] = r
                mask[i, L - len(r):] = 1
            else:
                ids[i, :len(r)] = r
                mask[i, :len(r)] = 1
        return ids, mask

    def decode(self, ids, skip_special_tokens=True):
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch, skip_special_tokens=True):
        return [self.decode(r, skip_special_tokens) for r in batch]


def wordpiece_tokenizer(path):
    """BERT uncased WordPiece ``Tokenizer`` from a ``vocab.txt``, a ``tokenizer.json`` or a
    folder holding one of them (tokenizer.json preferred).

    vocab.txt gets the standard BERT pipeline: BertNormalizer (lowercase), BertPreTokenizer,
    WordPiece with [UNK], "[CLS] x [SEP]". A tokenizer.json keeps its own pipeline, but its
    built-in padding/truncation are switched off: encode_batch pads and truncates itself.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("tokenizer.json", "vocab.txt") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"WordPiece tokenizer file not found: {path}")

    if path.suffix == ".json":
        backend = HFTokenizer.from_file(str(path))
        backend.no_padding()
        backend.no_truncation()
    else:
        vocab = {}
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                vocab[line.rstrip("\n")] = i
        for tok in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if tok not in vocab:
                raise ValueError(f"{path} has no {tok} token; is it a BERT vocab.txt?")
        backend = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        backend.decoder = decoders.WordPiece(prefix="##")
        # special tokens are never split into word-pieces and are skipped by decode
        backend.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])

    ids = {t: backend.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"{path}: special tokens {missing} are not in the vocabulary")
    return Tokenizer(backend=backend, pad_id=ids["[PAD]"], bos_id=ids["[CLS]"], eos_id=ids["[SEP]"],
                     unk_id=ids["[UNK]"], kind="wordpiece", extra={"source": str(path)})
