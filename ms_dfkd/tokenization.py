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


# SmolLM2's chat template puts this system message first when the caller gives none.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def bpe_tokenizer_from_gguf(path):
    """Byte-level BPE ``Tokenizer`` from a GGUF file's ``tokenizer.ggml.*`` metadata (GPT-2 style).

    Pipeline as SmolLM2 ships it: every digit is its own pre-token, then the GPT-2
    ByteLevel regex and byte-to-unicode map (no prefix space), BPE over the GGUF merges,
    ByteLevel decoder. No BOS/EOS is added by ``encode`` (the GGUF says add_bos_token
    false; the chat template carries the special tokens). CONTROL tokens
    (token_type 3, e.g. <|im_start|>) are registered as special so they are never split
    and ``decode`` skips them. pad_id is the GGUF padding_token_id, else eos (SmolLM2:
    2 = <|im_end|>); pad positions are always masked, so the id only needs to be valid.
    The Jinja chat template string, if present, is kept in ``chat_template``.
    """
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from .models.gguf_file import read_gguf

    meta = read_gguf(path).get  # FileNotFoundError / GGUFError name the file

    model_kind = meta("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model_kind!r}; only byte-level BPE ('gpt2') "
                         f"is supported")
    tokens = meta("tokenizer.ggml.tokens")
    merges = meta("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = meta("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]

    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    control = [tok for tok, t in zip(tokens, types) if t == 3]  # GGUF token type 3 = CONTROL
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in control])

    eos = int(meta("tokenizer.ggml.eos_token_id", 2))
    return Tokenizer(
        backend=backend,
        pad_id=int(meta("tokenizer.ggml.padding_token_id", eos)),
        bos_id=int(meta("tokenizer.ggml.bos_token_id", 1)),
        eos_id=eos,
        unk_id=meta("tokenizer.ggml.unknown_token_id"),
        kind="bpe",
        chat_template=meta("tokenizer.chat_template"),
        extra={"source": str(path), "pre": meta("tokenizer.ggml.pre")},
    )


def smollm2_chat_prompt(user_text, system=None):
    """SmolLM2 chat formatting of one user turn, ending where the assistant starts writing.

    Same string as the GGUF's Jinja template with add_generation_prompt=True;
    system=None uses the template's default system message.
    """
    system = SMOLLM2_DEFAULT_SYSTEM if system is None else system
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{user_text}<|im_end|>\n"
            f"<|im_start|>assistant\n")
