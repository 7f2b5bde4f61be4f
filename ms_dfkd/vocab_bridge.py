"""The vocabulary bridge B: a sparse V_G x V_T matrix from generator tokens to teacher word-pieces.

Row g spreads generator token g uniformly over the word-pieces of its text
(row-normalised), so that a distribution over generator tokens becomes one over
teacher word-pieces and E_hat = B @ E is a soft embedding table in the generator's
vocabulary. It is the identity when both sides use the same tokenizer.

Cost: one batch encode of V_G short strings. Qwen2.5's 151,936 tokens into MiniLM's
uncased WordPiece (30,522) take 2-3 s on 2 CPU cores; the matrix has 282k entries (about
3 MB), and each bridged table B @ E is V_G x H float32 (233 MB for Qwen and a 384-wide
encoder). Qwen's large non-Latin share (CJK, Thai, Hangul: about 25k
tokens) maps to [UNK] only: ``ascii_coverage`` reports the English-text tokens apart.
"""
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class VocabBridge:
    matrix: sp.csr_matrix         # [V_G, V_T], float32, rows sum to 1 or 0
    coverage: float               # share of tokens with text that map to at least one known word-piece
    empty_rows: int               # special / whitespace-only tokens: no embedding contribution
    unk_rows: int                 # tokens whose text maps only to [UNK]
    identity: bool = False
    ascii_coverage: float = None  # coverage among the tokens whose text is ASCII

    @property
    def shape(self):
        return self.matrix.shape

    def table(self, embedding):
        """E_hat = B @ E for an embedding table [V_T, H] (numpy) -> [V_G, H] float32."""
        embedding = np.asarray(embedding, dtype=np.float32)
        if embedding.shape[0] != self.matrix.shape[1]:
            raise ValueError(f"vocab bridge maps to {self.matrix.shape[1]} target tokens but the embedding "
                             f"table has {embedding.shape[0]} rows")
        if self.identity:
            return embedding.copy()
        return np.asarray(self.matrix @ embedding, dtype=np.float32)

    def summary(self):
        ascii_part = "" if self.ascii_coverage is None else f" ({self.ascii_coverage:.1%} of ASCII tokens)"
        return (f"vocab bridge {self.shape[0]} -> {self.shape[1]}: coverage {self.coverage:.1%}{ascii_part}, "
                f"{self.empty_rows} empty rows, {self.unk_rows} [UNK]-only rows"
                + (" (identity)" if self.identity else ""))


def _same_vocab(a, b):
    return a.vocab_size == b.vocab_size and a.backend.get_vocab() == b.backend.get_vocab()


def build_vocab_bridge(gen_tok, tgt_tok):
    """Bridge from the generator tokenizer to the teacher tokenizer (both ms_dfkd.tokenization.Tokenizer)."""
    V_G, V_T = gen_tok.vocab_size, tgt_tok.vocab_size
    if _same_vocab(gen_tok, tgt_tok):
        return VocabBridge(sp.identity(V_G, dtype=np.float32, format="csr"), 1.0, 0, 0, identity=True)
    special = set(getattr(gen_tok.backend, "get_added_tokens_decoder", lambda: {})().keys())
    # Decode each generator token on its own: byte-level BPE gives " great" for "Ġgreat".
    texts = ["" if g in special else gen_tok.backend.decode([g], skip_special_tokens=False) for g in range(V_G)]
    encs = tgt_tok.backend.encode_batch(texts, add_special_tokens=False)
    unk = tgt_tok.unk_id
    rows, cols, vals = [], [], []
    empty = unk_only = with_text = ascii_text = ascii_unk = 0
    for g, enc in enumerate(encs):
        ids = [i for i in enc.ids]
        if not texts[g].strip() or not ids:
            empty += 1
            continue
        with_text += 1
        is_ascii = texts[g].isascii()
        ascii_text += is_ascii
        if all(i == unk for i in ids):
            unk_only += 1
            ascii_unk += is_ascii
        w = 1.0 / len(ids)
        for i in ids:
            rows.append(g)
            cols.append(i)
            vals.append(w)
    m = sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(V_G, V_T), dtype=np.float32)
    m.sum_duplicates()
    coverage = (with_text - unk_only) / max(with_text, 1)
    return VocabBridge(m, coverage, empty, unk_only, ascii_coverage=(ascii_text - ascii_unk) / max(ascii_text, 1))
