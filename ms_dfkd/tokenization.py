"""Tokenizers on the Rust ``tokenizers`` library, built offline.

``Tokenizer`` is the one interface the rest of ms-dfkd uses: batch encoding to
numpy with padding and truncation, decoding, and the generator's chat prompt. Two
constructors build it: WordPiece for the BERT family and byte-level BPE from a GGUF
file's metadata (SmolLM2's and Qwen2's pre-tokenizers).
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


BUCKET = 16  # padding="bucket" rounds the longest row up to a multiple of this


def _padded_length(rows, padding, max_length):
    """The batch length: the longest row ("longest"), max_length ("max_length"), or the longest row rounded
    up to a multiple of BUCKET and at most max_length ("bucket": a jitted graph compiles once per bucket,
    and rows far shorter than max_length are not padded to it)."""
    if padding == "max_length":
        if max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        return max_length
    longest = max([len(r) for r in rows] + [1])
    if padding == "longest":
        return longest
    if padding == "bucket":
        if max_length is None:
            raise ValueError("padding='bucket' needs max_length")
        return min(-(-longest // BUCKET) * BUCKET, max_length)
    raise ValueError(f"padding must be 'longest', 'bucket' or 'max_length', got {padding!r}")


@dataclass
class Tokenizer:
    backend: object                    # tokenizers.Tokenizer
    pad_id: int
    bos_id: int = None                 # [CLS] for WordPiece
    eos_id: int = None                 # [SEP] for WordPiece
    unk_id: int = None
    kind: str = "wordpiece"            # "wordpiece" | "bpe"
    chat_template: str = None          # the GGUF's Jinja template, kept for reference (not rendered)
    chat_format: str = None            # "smollm2" | "qwen2": which chat_prompt wraps a user turn
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

        padding: "longest" (pad to the longest row), "max_length" (pad to max_length) or "bucket" (the longest
        row rounded up to a multiple of BUCKET, at most max_length).
        Truncation keeps the first max_length tokens (the last special token is kept
        for WordPiece so that [SEP] still closes the sequence).
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, not a string")
        rows = [self._truncate(self.encode(t, add_special_tokens=add_special_tokens), max_length,
                               add_special_tokens)[0] for t in texts]
        L = _padded_length(rows, padding, max_length)
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

    def _truncate(self, row, max_length, add_special_tokens, *aligned):
        """The first max_length tokens of a row (WordPiece keeps its closing [SEP]), and the same positions of
        each list in ``aligned`` (e.g. the tokens' word ids). Returns (row, *aligned)."""
        rows = (row, *aligned)
        if max_length is None or len(row) <= max_length:
            return rows
        if add_special_tokens and self.kind == "wordpiece" and row[-1] == self.eos_id:
            return tuple(r[:max_length - 1] + [r[-1]] for r in rows)
        return tuple(r[:max_length] for r in rows)

    def encode_words_batch(self, words_batch, max_length=None, padding="longest", add_special_tokens=True):
        """Pre-split words (one list of words per row) -> (ids, attention_mask, word_ids), int32 [B, L].

        word_ids[b, j] is the index in row b's word list of the word that token j comes from, or -1 for
        special tokens and padding. A word may give several sub-tokens (the tokenizer's pre-tokenizer and
        WordPiece still split it: "don't" -> don ' t) or none (a word the normalizer deletes, e.g. a lone
        zero-width space). Truncation and right padding follow encode_batch (WordPiece keeps its [SEP]),
        so the words past the cut have no token.
        """
        if isinstance(words_batch, str) or any(isinstance(w, str) for w in words_batch):
            raise TypeError("encode_words_batch takes a list of word lists, not strings")
        rows, wids = [], []
        for words in words_batch:
            enc = self.backend.encode(list(words), is_pretokenized=True, add_special_tokens=add_special_tokens)
            r, w = self._truncate(list(enc.ids), max_length, add_special_tokens,
                                  [-1 if i is None else i for i in enc.word_ids])
            rows.append(r)
            wids.append(w)
        L = _padded_length(rows, padding, max_length)
        ids = np.full((len(rows), L), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), L), dtype=np.int32)
        word_ids = np.full((len(rows), L), -1, dtype=np.int32)
        for i, (r, w) in enumerate(zip(rows, wids)):
            ids[i, :len(r)], mask[i, :len(r)], word_ids[i, :len(r)] = r, 1, w
        return ids, mask, word_ids

    def decode(self, ids, skip_special_tokens=True):
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch, skip_special_tokens=True):
        return [self.decode(r, skip_special_tokens) for r in batch]

    def chat_prompt(self, user_text):
        """One user turn in this generator's chat format, ending where the assistant starts writing."""
        if self.chat_format not in CHAT_PROMPTS:
            raise ValueError(f"the {self.kind} tokenizer from {self.extra.get('source')} has no chat format "
                             f"(chat_format={self.chat_format!r}; known: {sorted(CHAT_PROMPTS)})")
        return CHAT_PROMPTS[self.chat_format](user_text)


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
# So does Qwen2.5's (Qwen2.5-Coder-*-Instruct included).
QWEN2_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2's pre-tokenizer: contractions, letters with one leading non-letter, single digits,
# punctuation runs, newlines, spaces (llama.cpp's "qwen2" pre-type; the pattern of HF's
# Qwen2TokenizerFast). Its pieces then go through the byte-to-unicode map without a regex.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def _pre_tokenizer(pre, path):
    """(normalizer, pre-tokenizer) of a GGUF's tokenizer.ggml.pre value."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    if pre == "smollm":   # every digit its own piece, then the GPT-2 regex
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre == "qwen2":
        return normalizers.NFC(), pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ValueError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: 'smollm' (SmolLM2), 'qwen2' (Qwen2/2.5)")


def bpe_tokenizer_from_gguf(path):
    """Byte-level BPE ``Tokenizer`` from a GGUF file's ``tokenizer.ggml.*`` metadata (GPT-2 style).

    The pre-tokenizer follows ``tokenizer.ggml.pre``: SmolLM2's ("smollm": every digit is its
    own pre-token, then the GPT-2 ByteLevel regex) or Qwen2's ("qwen2": NFC, then the
    QWEN2_SPLIT regex, single digits included), then the byte-to-unicode map (no prefix
    space), BPE over the GGUF merges, ByteLevel decoder. No BOS/EOS is added by ``encode``
    (both GGUFs say add_bos_token false; the chat prompt carries the special tokens).
    CONTROL tokens (e.g. <|im_start|>) and UNUSED ones (Qwen's [PAD151665]... fillers up to
    the embedding's row count) are registered as special: never split, skipped by
    ``decode``, empty rows of the vocabulary bridge. USER_DEFINED tokens (Qwen's
    <tool_call>) are never split but are text. pad_id is the GGUF padding_token_id, else eos
    (SmolLM2: 2 = <|im_end|>; Qwen: 151643 = <|endoftext|>); pad positions are always
    masked, so the id only needs to be valid. The Jinja chat template string is kept in
    ``chat_template``; ``chat_prompt`` writes out the same text for one user turn.
    """
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models
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
    pre = meta("tokenizer.ggml.pre")
    normalizer, pre_tokenizer = _pre_tokenizer(pre, path)
    types = meta("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]

    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if normalizer is not None:
        backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    special = [tok for tok, t in zip(tokens, types) if t in (_CONTROL, _UNUSED)]
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in special])
    user = [tok for tok, t in zip(tokens, types) if t == _USER_DEFINED]
    if user:
        backend.add_tokens([AddedToken(tok, special=False, normalized=False) for tok in user])

    eos = int(meta("tokenizer.ggml.eos_token_id", 2))
    return Tokenizer(
        backend=backend,
        pad_id=int(meta("tokenizer.ggml.padding_token_id", eos)),
        bos_id=int(meta("tokenizer.ggml.bos_token_id", 1)),
        eos_id=eos,
        unk_id=meta("tokenizer.ggml.unknown_token_id"),
        kind="bpe",
        chat_template=meta("tokenizer.chat_template"),
        chat_format={"smollm": "smollm2", "qwen2": "qwen2"}[pre],
        extra={"source": str(path), "pre": pre},
    )


def _chatml(system, user_text):
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{user_text}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def smollm2_chat_prompt(user_text, system=None):
    """SmolLM2 chat formatting of one user turn, ending where the assistant starts writing.

    Same string as the GGUF's Jinja template with add_generation_prompt=True;
    system=None uses the template's default system message.
    """
    return _chatml(SMOLLM2_DEFAULT_SYSTEM if system is None else system, user_text)


def qwen2_chat_prompt(user_text, system=None):
    """Qwen2.5 ChatML of one user turn, ending where the assistant starts writing.

    Same string as the GGUF's Jinja template with add_generation_prompt=True and no tools;
    system=None uses the template's default system message, as the model saw in training.
    """
    return _chatml(QWEN2_DEFAULT_SYSTEM if system is None else system, user_text)


CHAT_PROMPTS = {"smollm2": smollm2_chat_prompt, "qwen2": qwen2_chat_prompt}
