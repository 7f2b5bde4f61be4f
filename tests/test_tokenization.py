"""Byte-level BPE from GGUF metadata: Qwen2's pre-tokenizer and token types on a small synthetic GGUF
(no asset needed), the chat formats, and the real Qwen2.5 tokenizer (mark `real`)."""
import numpy as np
import pytest

from ms_dfkd.tokenization import bpe_tokenizer_from_gguf, qwen2_chat_prompt, smollm2_chat_prompt


def byte_to_unicode():
    """GPT-2's reversible map of the 256 bytes to printable characters: printable Latin-1 bytes stand for
    themselves, the others take the code points from 256 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


SPECIALS = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<tool_call>", 4), ("[PAD300]", 5)]


def write_tokenizer_gguf(path, pre="qwen2"):
    """A GGUF holding only a tokenizer: the 256 byte symbols, merges for ' t', ' th', ' the', 'he', then the
    special tokens of SPECIALS (ids 260...)."""
    import gguf
    symbols = list(byte_to_unicode().values())
    merges = ["Ġ t", "Ġt h", "Ġth e", "h e"]
    tokens = symbols + [a + b for a, b in (m.split(" ") for m in merges)] + [s for s, _ in SPECIALS]
    types = [1] * (len(tokens) - len(SPECIALS)) + [t for _, t in SPECIALS]
    wr = gguf.GGUFWriter(str(path), arch="qwen2")
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre(pre)
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_token_merges(merges)
    wr.add_eos_token_id(tokens.index("<|im_end|>"))
    wr.add_bos_token_id(tokens.index("<|endoftext|>"))
    wr.add_pad_token_id(tokens.index("<|endoftext|>"))
    wr.add_chat_template("{{ messages }}")
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return tokens


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "qwen2_tok.gguf"
    tokens = write_tokenizer_gguf(path)
    return bpe_tokenizer_from_gguf(path), tokens


def pieces(tok, text):
    return [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(tok.backend.normalizer.normalize_str(text))]


def test_qwen2_pre_tokenizer_splits(small):
    """What the qwen2 regex does that GPT-2's does not: single digits, case-blind contractions, a letter
    run takes one leading non-letter, newlines stay with the punctuation before them."""
    tok, _ = small
    u = byte_to_unicode()
    sp, nl = u[ord(" ")], u[ord("\n")]
    assert pieces(tok, "year 2024") == ["year", sp, "2", "0", "2", "4"]
    assert pieces(tok, "I'LL say it's") == ["I", "'LL", f"{sp}say", f"{sp}it", "'s"]
    assert pieces(tok, "(hello)") == ["(hello", ")"]
    assert pieces(tok, "end.\n\nNext") == ["end", f".{nl}{nl}", "Next"]
    assert pieces(tok, "a  b") == ["a", sp, f"{sp}b"]
    assert pieces(tok, "cafe\u0301") == ["caf" + u[0xC3] + u[0xA9]]   # NFC first: é is one code point, 2 bytes


def test_bpe_merges_round_trip_and_token_types(small):
    tok, tokens = small
    the = tokens.index("Ġthe")
    assert tok.encode(" the") == [the] and tok.encode("he") == [tokens.index("he")]
    for s in ["Hello, world!", " the theme", "digits 2024\n\n", "naïve café 中文 😀", "\t tab  spaces ", ""]:
        assert tok.decode(tok.encode(s)) == s, s
    start, end, call, pad = (tokens.index(t) for t in ("<|im_start|>", "<|im_end|>", "<tool_call>", "[PAD300]"))
    ids = tok.encode("<|im_start|>user\n<tool_call>x<|im_end|>")
    assert ids[0] == start and call in ids and ids[-1] == end                 # never split
    assert tok.decode(ids) == "user\n<tool_call>x"                           # CONTROL skipped, USER_DEFINED kept
    assert tok.encode("[PAD300]") == [pad] and tok.decode([pad]) == ""       # UNUSED: special as well
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (end, tokens.index("<|endoftext|>"),
                                                                   tokens.index("<|endoftext|>"), len(tokens))
    assert tok.chat_format == "qwen2" and tok.extra["pre"] == "qwen2"
    ids, mask = tok.encode_batch(["a", " the", "ab"], padding_side="left")
    assert ids.tolist() == [[tok.pad_id, ord("a")], [tok.pad_id, the], [ord("a"), ord("b")]]
    assert mask.tolist() == [[0, 1], [0, 1], [1, 1]]


def test_chat_prompts():
    assert qwen2_chat_prompt("Hi") == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                                       "helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                       "<|im_start|>assistant\n")
    assert qwen2_chat_prompt("Hi", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert smollm2_chat_prompt("Hi").startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_tokenizer_chat_prompt_follows_the_gguf(small, tmp_path):
    from ms_dfkd import build
    tok, _ = small
    assert tok.chat_prompt("Hi") == qwen2_chat_prompt("Hi")
    assert build.generator_tokenizer().chat_prompt("Hi") == smollm2_chat_prompt("Hi")   # SmolLM2: "smollm"
    with pytest.raises(ValueError, match="no chat format"):
        build.teacher_tokenizer().chat_prompt("Hi")
    other = tmp_path / "other.gguf"
    write_tokenizer_gguf(other, pre="deepseek-llm")
    with pytest.raises(ValueError, match=r"other\.gguf: tokenizer\.ggml\.pre is 'deepseek-llm'; supported: 'smollm'"):
        bpe_tokenizer_from_gguf(other)


@pytest.mark.real
def test_qwen_bpe_ids_round_trip_and_specials(asset_or_skip):
    """Ids as HF's Qwen2TokenizerFast gives them (built by transformers 4.57 from the same GGUF, equal
    on 52,686 corpus and review texts), round trips, and the chat prompt's special tokens."""
    tok = bpe_tokenizer_from_gguf(asset_or_skip("qwen2.5-coder-0.5b"))
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == ("bpe", 151936, 151643, 151645, 151643)
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("The capital of France is") == [785, 6722, 315, 9625, 374]
    assert tok.encode("I'm here, it's 2024!\n\nNew  line") == [40, 2776, 1588, 11, 432, 594, 220, 17, 15, 17, 19,
                                                              2219, 3564, 220, 1555]
    for s in ["Hello, world!", "  two  spaces\tand a tab", "digits 2024 and 3.14159", "line one\nline two\n\n",
              "café, naïve, Ærøskøbing", "中文字符测试", "emoji 😀🎉 done", "it's a \"quote\" (x) [y] {z} #1!", "",
              "def f(x):\n    return x ** 2  # square"]:
        assert tok.decode(tok.encode(s)) == s, s
    chat = tok.encode(tok.chat_prompt("Hi"))
    assert chat[:3] == [151644, 8948, 198] and chat[-3:] == [151644, 77091, 198]
    assert chat.count(151644) == 3 and chat.count(151645) == 2
    assert tok.decode(chat) == "system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n" \
                               "user\nHi\nassistant\n"
    ids, mask = tok.encode_batch(["a b c", "a"], padding_side="left")
    assert ids.dtype == np.int32 and ids[1, 0] == 151643 and mask.sum() == 4


def test_bucket_padding_rounds_the_longest_row_up_to_16_and_stops_at_max_length(tmp_path):
    from ms_dfkd.tokenization import BUCKET, wordpiece_tokenizer
    words = [f"w{i}" for i in range(40)]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words) + "\n")
    tok = wordpiece_tokenizer(tmp_path / "vocab.txt")
    text = lambda n: " ".join(words[:n])  # n words: n + 2 tokens with [CLS] and [SEP]
    for n_words, max_length, want in [(1, 48, 16), (14, 48, 16), (15, 48, 32), (30, 48, 32), (31, 48, 48),
                                      (40, 48, 48), (30, 40, 32), (35, 40, 40), (3, 10, 10)]:
        ids, mask = tok.encode_batch([text(n_words), text(1)], max_length=max_length, padding="bucket")
        assert ids.shape == mask.shape == (2, want), (n_words, max_length)
        assert mask[0].sum() == min(n_words + 2, max_length) and mask[1].sum() == 3
        assert (ids[1, 3:] == tok.pad_id).all()
    assert BUCKET == 16
    with pytest.raises(ValueError, match="bucket"):
        tok.encode_batch(["w1"], padding="bucket")
