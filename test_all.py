"""
test_all.py -- every nanostack test, one section per script, in reading order.

    python -m pytest -q test_all.py            # the whole suite (CPU, about a minute on 2 cores)
    python -m pytest -q test_all.py -k bpe     # one section

Tests are hermetic: tiny corpora built in tmp_path, no network (downloads are tested
against a local http.server), CPU only, float32 where numbers are compared.
"""
import os

# The Triton kernel's tests (model.py section 5b) run in Triton's CPU interpreter, which must be
# switched on before anything imports triton: its library functions are defined at import.
os.environ["TRITON_INTERPRET"] = "1"

import base64
import collections
import copy
import ctypes
import dataclasses
import errno
import functools
import hashlib
import http.server
import io
import json
import math
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import types
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import bpe
import model as M
import prepare
import sample
import train
from model import GPT, GPTConfig
from model import MoE, dense_hidden, moe_capacity, moe_reference
from train import NS_BAND, NS_BAND_FROM, NS_COEFFS, AdamW, Muon, muon_scale, newton_schulz5


# =============================================================================
# 1. bpe.py: the tokenizer
# =============================================================================

def _bpe_corpus():
    """A small corpus with repetition (so merges have something to learn), Unicode and emoji."""
    lines = [
        "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!\n",
        "def add(a, b):\n    return a + b  # 12345 + 678\n\n",
        "Café crème, naïve façade, Grüße aus Köln. 日本語のテキスト。 Emoji: 😀🎉👍🏽\n",
        "It's what they'll say: we're sure you've seen it, I'm told he'd agree.\n",
        "    indented\tline with\ttabs   and   spaces\r\nwindows line\r\n",
    ]
    return [(line * 3) + f"document {k} ends here\n" for k, line in enumerate(lines * 4)]


def _bpe_trained(vocab_size=400, **kw):
    return bpe.Tokenizer.train(_bpe_corpus(), vocab_size, quiet=True, **kw)


def _bpe_texts():
    """Round-trip material: ASCII, Unicode, emoji with modifiers, control chars, long runs."""
    return ["", " ", "hello world", "The quick brown fox.\n\n\n", "Grüße, naïve café — ½ ∑ ∞",
            "日本語のテキスト", "😀🎉👍🏽👨‍👩‍👧 flags 🇫🇷", "\x00\x01\x7f\t\r\n",
            "a" * 300 + " " * 50 + "9" * 20,
            "it's IT'S we'll 'll ''", "  leading and trailing  \n  ", "<|endoftext|> inside text"]


# --- the split pattern ---------------------------------------------------------------------------

def test_bpe_gpt4_pattern_splits_a_sentence_as_worked_out_by_hand():
    # letters take one leading non-letter (the space); numbers go in groups of <= 3; a punctuation
    # run takes a leading space and trailing newlines; whitespace before a word leaves one space
    # to it; contractions are their own chunk.
    chunks = bpe.regex.findall(bpe.GPT4_PATTERN, "Hello world123456 !!!\n\n  x's")
    assert chunks == ["Hello", " world", "123", "456", " !!!\n\n", " ", " x", "'s"]
    chunks2 = bpe.regex.findall(bpe.GPT2_PATTERN, "Hello world123456 !!!\n\n  x's")
    assert chunks2 == ["Hello", " world", "123456", " !!!", "\n\n ", " x", "'s"]


@pytest.mark.parametrize("name", ["gpt4", "gpt2"])
def test_bpe_ascii_fast_path_splits_exactly_like_regex(name):
    """The `re` twin of a built-in pattern must give regex's chunks on every ASCII text.
    Random strings over all 128 ASCII characters (control characters included: `re`'s \\s
    also matches \\x1c-\\x1f, regex's does not), weighted towards the characters the
    alternatives care about (quotes for contractions, spaces, newlines, digits)."""
    pattern = bpe.resolve_pattern(name)
    slow, fast = bpe.regex.compile(pattern).findall, bpe.re.compile(bpe.ASCII_TWINS[pattern]).findall
    split = bpe.chunk_splitter(name)
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(128)] + list(" \n\n\r\t  'sStTlLvVeErRdDmM09aZ!.") * 3
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert fast(text) == slow(text), repr(text)
    for text in _bpe_corpus() + _bpe_texts() + ["\x1c\x1d x \x1e\x1f\n"]:
        assert split(text) == slow(text), repr(text)   # non-ASCII texts take regex itself
    assert fast("\x1c\x1d x") == slow("\x1c\x1d x") == ["\x1c\x1d", " x"]
    custom = r"\w+|\W"  # a custom pattern has no twin and splits with regex
    assert custom not in bpe.ASCII_TWINS and bpe.chunk_splitter(custom)("ab, c") == ["ab", ",", " ", "c"]


# --- training --------------------------------------------------------------------------------------

def test_bpe_training_example_worked_out_by_hand():
    # Chunks: "aaab" x2 (the special token is cut out, never merged), "ab" x1.
    #   counts (a,a)=4 (a,b)=3                  -> merge 1: a+a   -> 256 "aa"   (count 4)
    #   words [aa,a,b] x2, [a,b]: (a,b)=3 (aa,a)=2 -> merge 2: a+b   -> 257 "ab"   (count 3)
    #   words [aa,ab] x2, [ab]: (aa,ab)=2       -> merge 3: aa+ab -> 258 "aaab" (count 2)
    # then every chunk is one token: the 4th requested merge cannot happen (early stop).
    a, b = ord("a"), ord("b")
    expected = [(a, a, 4), (a, b, 3), (256, 257, 2)]
    counts = bpe.count_chunks(["aaab<|endoftext|>aaab", "ab"], bpe.GPT4_PATTERN, (bpe.EOT,))
    assert counts == {"aaab": 2, "ab": 1}
    words, word_counts = bpe.chunks_to_words(counts)
    assert bpe.train_merges(words, word_counts, 4) == expected
    assert bpe.train_merges_reference(words, word_counts, 4) == expected
    tok = bpe.Tokenizer.train(["aaab<|endoftext|>aaab", "ab"], vocab_size=261, quiet=True)
    assert tok.merges == [(a, a, 256), (a, b, 257), (256, 257, 258)]
    assert tok.special_tokens == {bpe.EOT: 259}  # right after the last merge, even when stopping early
    assert tok.vocab_size == 260 and tok.eot_id == 259
    # " aab": merge 1 (a+a) comes first, then nothing applies to aa+b
    assert tok.encode("aaab ab aab") == [258, 32, 257, 32, 256, ord("b")]


def test_bpe_tie_break_prefers_greatest_bytes():
    # every pair occurs once: the winner is the greatest (left bytes, right bytes)
    words, counts = bpe.chunks_to_words({"ab": 1, "cd": 1, "ca": 1})
    merges = bpe.train_merges(words, counts, 3)
    assert [(chr(x), chr(y)) for x, y, _ in merges] == [("c", "d"), ("c", "a"), ("a", "b")]
    # a prefix sorts before its extensions: after merge 1 (c+d, count 6) the pairs cd+x and c+x
    # both occur once, and b"cd" > b"c", so cd+x wins the tie
    words, counts = bpe.chunks_to_words({"cd": 5, "cdx": 1, "cx": 1})
    expected = [(ord("c"), ord("d"), 6), (256, ord("x"), 1), (ord("c"), ord("x"), 1)]
    assert bpe.train_merges(words, counts, 3) == expected
    assert bpe.train_merges_reference(words, counts, 3) == expected


def test_bpe_fast_training_equals_the_textbook_loop_on_random_corpora():
    # guards the incremental updates (neighbours, touching occurrences like "aaaa", stale heap
    # entries) and the tie-break: small alphabets make repeated letters and equal counts common
    rng = random.Random(0)
    for trial in range(25):
        alphabet = "ab" if trial % 3 == 0 else "abcé " if trial % 3 == 1 else "aaab\n"
        docs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(30)]
        words, counts = bpe.chunks_to_words(bpe.count_chunks(docs, bpe.GPT4_PATTERN))
        assert bpe.train_merges(words, counts, 60) == bpe.train_merges_reference(words, counts, 60), trial


def test_bpe_encoding_training_chunks_replays_the_merges():
    # encode() applies merges by rank per chunk (_bpe); the trainer applied them in order to all
    # words. The two must agree, or the model would see different ids than the trainer counted;
    # train() also seeds the encode cache with the trainer's words, which is only valid if so.
    docs = _bpe_corpus()
    tok = bpe.Tokenizer.train(docs, 420, quiet=True)
    counts = bpe.count_chunks(docs, tok.pattern, (bpe.EOT,))
    words, word_counts = bpe.chunks_to_words(counts)
    final = []
    bpe.train_merges(words, word_counts, 420 - 257, final_words=final)
    assert len(tok._cache) == len(words)  # seeded
    for w, trained in zip(words, final):
        replayed = list(w)
        for a, b, z in tok.merges:
            replayed = bpe._merge_word(replayed, a, b, z)
        assert tok._bpe(list(w)) == replayed == trained
        assert tok._cache[bytes(w).decode("utf-8", "surrogateescape")] == tuple(trained)
    fresh = bpe.Tokenizer(tok.pattern, tok.merges, tok.special_tokens)  # cold cache, same ids
    text = "".join(docs)
    assert fresh.encode(text) == tok.encode(text)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_bpe_parallel_equals_serial(monkeypatch, start):
    if start == "spawn":  # what macOS and Windows get
        monkeypatch.setattr(bpe, "_use_fork", lambda: False)
    docs = _bpe_corpus() * 3
    serial = bpe.count_chunks(docs, bpe.GPT4_PATTERN, (bpe.EOT,), num_proc=1)
    parallel = bpe.count_chunks(docs, bpe.GPT4_PATTERN, (bpe.EOT,), num_proc=2, batch_chars=500)
    assert serial == parallel
    t1 = bpe.Tokenizer.train(docs, 350, num_proc=1, quiet=True)
    t2 = bpe.Tokenizer.train(iter(docs), 350, num_proc=2, quiet=True)  # a generator works too
    assert t1.fingerprint == t2.fingerprint


def test_bpe_training_is_deterministic_and_sizes_are_exact():
    t1, t2 = _bpe_trained(), _bpe_trained()
    assert t1.fingerprint == t2.fingerprint and t1.merges == t2.merges
    assert t1.vocab_size == 400 and len(t1.merges) == 400 - 256 - 1
    t3 = bpe.Tokenizer.train(_bpe_corpus(), 300, special_tokens=(), quiet=True)
    assert t3.vocab_size == 300 and t3.special_tokens == {}
    with pytest.raises(bpe.UserError, match="endoftext"):
        t3.eot_id


def test_bpe_training_errors_are_one_line_user_errors(capsys):
    with pytest.raises(bpe.UserError, match="too small"):
        bpe.Tokenizer.train(["abc"], 256, quiet=True)  # no room for <|endoftext|>
    with pytest.raises(bpe.UserError, match="empty"):
        bpe.Tokenizer.train([], 300, quiet=True)
    with pytest.raises(bpe.UserError, match="empty"):
        bpe.Tokenizer.train(["", "<|endoftext|>"], 300, quiet=True)
    tok = bpe.Tokenizer.train(["abab"], 1000, quiet=True)  # runs out of pairs: stops and says so
    assert "stopped early" in capsys.readouterr().err
    assert tok.vocab_size == 256 + 2 + 1


# --- encoding and decoding --------------------------------------------------------------------------

def test_bpe_round_trips_unicode_emoji_and_arbitrary_bytes():
    tok = _bpe_trained()
    for text in _bpe_texts():
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert sum(tok.token_bytes()[i] for i in ids) == len(text.encode("utf-8"))
    rng = random.Random(1)
    for _ in range(50):  # random bytes, most of them invalid UTF-8, survive via surrogateescape
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 80)))
        ids = tok.encode(raw.decode("utf-8", "surrogateescape"))
        assert tok.decode_bytes(ids) == raw
        assert tok.decode(ids) == raw.decode("utf-8", "replace")


def test_bpe_decode_replaces_invalid_utf8_and_rejects_unknown_ids():
    tok = _bpe_trained()
    half_euro = list("€".encode())[:2]  # byte tokens of an unfinished 3-byte character
    assert tok.decode([ord("a"), *half_euro, ord("b")]) == "a\ufffdb"
    assert tok.decode_bytes([0xFF]) == b"\xff"
    for bad in (tok.vocab_size, -1):
        with pytest.raises(bpe.UserError, match="not in this tokenizer"):
            tok.decode([1, bad])


def test_bpe_special_tokens_are_plain_text_unless_allowed():
    tok = _bpe_trained()
    text = "one<|endoftext|>two"
    plain = tok.encode(text)
    assert tok.eot_id not in plain and tok.decode(plain) == text  # default "none": no injection
    assert plain == tok.encode_ordinary(text)
    allowed = tok.encode(text, allowed_special="all")
    assert allowed == tok.encode("one") + [tok.eot_id] + tok.encode("two")
    assert tok.encode(text, allowed_special={bpe.EOT}) == allowed
    assert tok.decode(allowed) == text
    assert tok.token_bytes()[tok.eot_id] == 0
    with pytest.raises(bpe.UserError, match="unknown"):
        tok.encode(text, allowed_special={"<|im_start|>"})
    with pytest.raises(bpe.UserError, match="'none', 'all'"):
        tok.encode(text, allowed_special=bpe.EOT)


def test_bpe_chat_tokens_extend_a_tokenizer_and_typed_ones_stay_text():
    """A trained tokenizer gains the chat tokens at new ids after its last one (the worked example
    of with_special_tokens, on a small vocabulary): every old id keeps its meaning, the fingerprint
    changes, extends() recognises the extension and nothing else; text that looks like a chat
    token is bytes unless allowed."""
    base = _bpe_trained()                                   # vocab 400, <|endoftext|> = 399
    tok = base.with_special_tokens(bpe.CHAT_TOKENS)
    assert [tok.special_tokens[t] for t in bpe.CHAT_TOKENS] == [400, 401, 402, 403]
    assert tok.vocab_size == 404 and tok.eot_id == base.eot_id == 399
    assert tok.fingerprint != base.fingerprint
    assert tok.extends(base) and not base.extends(tok) and tok.extends(tok)
    assert tok.with_special_tokens(bpe.CHAT_TOKENS).fingerprint == tok.fingerprint   # nothing new
    other = _bpe_trained(vocab_size=380).with_special_tokens(bpe.CHAT_TOKENS)
    assert not other.extends(base)                                                 # other merges
    moved = bpe.Tokenizer(base.pattern, base.merges, {bpe.EOT: 450, bpe.USER: 399})
    assert not moved.extends(base)                                                 # an old id re-used
    text = "hi <|user|> and <|end|>"
    assert tok.encode(text) == base.encode(text)            # typed: plain bytes, the old ids
    assert not set(tok.encode(text)) & set(tok.special_tokens.values())
    assert tok.encode(text, allowed_special="all").count(tok.special_tokens[bpe.END_OF_TURN]) == 1
    reloaded = bpe.Tokenizer.from_vocab_merges(**tok.as_vocab_merges())
    assert reloaded.fingerprint == tok.fingerprint and reloaded.extends(base)


def test_bpe_encode_iterable_equals_encode_for_any_line_split():
    # guards the hold-back of the last chunks: the regex looks ahead ("  x" -> " ", " x" but a
    # final "  " stays whole), so chunks near the end of what was read may still change
    tok = _bpe_trained()
    rng = random.Random(2)
    alphabet = [" ", " ", "\n", "\r", "\t", "a", "Bc", "1", "234", "!", "'", "'ll", "é", "😀", "<|"]
    for t in (tok, bpe.Tokenizer(bpe.GPT2_PATTERN, [])):
        t.STREAM_BLOCK = 8  # a pass every few characters: many cut points
        for _ in range(200):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 12))))
            pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
            assert list(t.encode_iterable(pieces)) == t.encode(text), repr(text)
    lines = _bpe_texts() * 5
    assert list(tok.encode_iterable(iter(lines))) == tok.encode("".join(lines))


def test_bpe_encode_iterable_streams_allowed_specials_like_encode():
    # Guards: encode_iterable could only do encode_ordinary, so a stream with special tokens
    # allowed was impossible. Now it must equal encode(joined text, allowed_special) for any cut,
    # including a special token cut across pieces ("<|end" + "oftext|>") and a special that is
    # the prefix of a longer one ("<|a|>" and "<|a|>x": only more text tells them apart).
    tok = bpe.Tokenizer(bpe.GPT4_PATTERN, [(ord("<"), ord("|"), 256)],
                        {bpe.EOT: 257, "<|a|>": 258, "<|a|>x": 259})
    tok.STREAM_BLOCK = 8  # a pass every few characters: many cut points
    rng = random.Random(3)
    alphabet = [" ", "  ", "\n", "a", "Bc", "12", "!", "'ll", "é", "x", "<", "|", "<|", "|>", "a|",
                "endoftext", bpe.EOT, "<|a|>", "<|a|>x"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 15))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        for allowed in ("none", "all", {"<|a|>"}):
            assert list(tok.encode_iterable(pieces, allowed_special=allowed)) == \
                tok.encode(text, allowed_special=allowed), (pieces, allowed)
    # by hand: one character per piece, the special token arrives in 13 pieces
    assert list(tok.encode_iterable(list("hi<|endoftext|>"), allowed_special="all")) == \
        [ord("h"), ord("i"), 257]
    assert list(tok.encode_iterable(["<|a|", ">", "x"], allowed_special="all")) == [259]
    assert list(tok.encode_iterable(["<|a|", ">", "y"], allowed_special="all")) == [258, ord("y")]
    with pytest.raises(bpe.UserError, match="unknown"):
        list(tok.encode_iterable(["a"], allowed_special={"<|nope|>"}))


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_bpe_encode_batch_parallel_equals_serial(monkeypatch, start):
    """fork: workers inherit the texts from the parent; spawn (macOS, Windows): they are
    pickled to them. Documents of very different lengths, so the character-balanced job
    boundaries fall in odd places; the order of the results must still be the input's.
    The parent encodes jobs too; here it is slowed down so that the worker surely takes
    some (its ids come back as arrays), and we check that it did."""
    tok = _bpe_trained()
    docs = _bpe_corpus() + _bpe_texts() + ["x" * 5000, "", "tail"] + _bpe_texts()[:2]
    expected = [tok.encode(d) for d in docs]
    monkeypatch.setattr(bpe, "PARALLEL_MIN_CHARS", 0)  # force worker processes on tiny input
    if start == "spawn":
        monkeypatch.setattr(bpe, "_use_fork", lambda: False)
    parent, in_parent, encode = os.getpid(), [], bpe.Tokenizer.encode

    def slow_in_parent(self, text, allowed_special="none"):  # a forked worker inherits this too
        if os.getpid() == parent:
            in_parent.append(text)
            time.sleep(0.05)
        return encode(self, text, allowed_special)
    monkeypatch.setattr(bpe.Tokenizer, "encode", slow_in_parent)
    assert tok.encode_batch(docs, num_proc=2) == expected
    assert 0 < len(in_parent) < len(docs)  # both processes took jobs
    monkeypatch.setattr(bpe.Tokenizer, "encode", encode)
    both = tok.encode_batch(docs, num_proc=2, allowed_special="all")
    assert both == [tok.encode(d, allowed_special="all") for d in docs]
    # ids above 65535 (they travel back as uint32, smaller ones as uint16)
    big = bpe.Tokenizer(tok.pattern, tok.merges, {bpe.EOT: 70000})
    assert big.encode_batch(docs, num_proc=2, allowed_special="all") == \
        [big.encode(d, allowed_special="all") for d in docs]
    assert any(70000 in ids for ids in big.encode_batch(docs, num_proc=2, allowed_special="all"))


def test_bpe_stream_decoder_never_emits_replacement_for_valid_text():
    # one token per byte is the hardest case: every character boundary and every byte in
    # between is a separate push
    text = "naïve café — ∑ 日本 😀👍🏽 end"
    for tok in (bpe.Tokenizer(bpe.GPT4_PATTERN, []), _bpe_trained()):
        ids = tok.encode(text)
        d = tok.stream_decoder()
        pieces = [d.push(i) for i in ids] + [d.flush()]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == text
    d = bpe.Tokenizer(bpe.GPT4_PATTERN, []).stream_decoder()
    raw = text.encode()
    for cut in range(len(raw) + 1):  # any split of the bytes into two tokens
        pieces = [d.push(b) for b in raw[:cut]] + [d.push(b) for b in raw[cut:]]
        assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert d.push(0xFF) == "\ufffd" and d.push(0xE2) == "" and d.flush() == "\ufffd"  # invalid stays visible


# --- files ----------------------------------------------------------------------------------------

def test_bpe_save_load_round_trip_and_fingerprint(tmp_path):
    tok = _bpe_trained()
    path = tmp_path / "tok.bpe"
    tok.save(path)
    assert os.listdir(tmp_path) == ["tok.bpe"]  # no temp file left behind
    text = path.read_text()
    assert text.splitlines()[3] == "nanostack-bpe 1"  # after the 3 comment lines
    a, b, z = tok.merges[0]  # merges are written as ids and as readable, escaped bytes
    assert f"\n{z} {a} {b} {bpe.escape_token(bytes([a]))} {bpe.escape_token(bytes([b]))}\n" in text
    back = bpe.Tokenizer.load(path)
    assert back.fingerprint == tok.fingerprint and back.vocab_size == tok.vocab_size
    assert back.special_tokens == tok.special_tokens
    for t in _bpe_texts():
        assert back.encode(t, allowed_special="all") == tok.encode(t, allowed_special="all")
    other = _bpe_trained(vocab_size=401)
    assert other.fingerprint != tok.fingerprint


def test_bpe_fingerprint_is_sha256_of_the_text_and_sees_every_change(tmp_path):
    # Replaces `int(fp, 16) >= 0`, which could not fail. The recipe (Tokenizer._serialize's
    # comment): sha256 of the file's text without its '#' comment lines, worked out here by hand
    # for one merge a+a -> 256 and <|endoftext|> = 257.
    tok = bpe.Tokenizer(bpe.GPT4_PATTERN, [(97, 97, 256)], {bpe.EOT: 257})
    by_hand = ("nanostack-bpe 1\n"
               f"pattern {json.dumps(bpe.GPT4_PATTERN)}\n"
               "byte_ids identity\n"
               "merges 1\n"
               "256 97 97 a a\n"
               "specials 1\n"
               '257 "<|endoftext|>"\n')
    assert tok.fingerprint == hashlib.sha256(by_hand.encode()).hexdigest()
    tok.save(tmp_path / "t.bpe")
    body = "".join(line for line in (tmp_path / "t.bpe").read_text().splitlines(True) if not line.startswith("#"))
    assert body == by_hand and bpe.Tokenizer.load(tmp_path / "t.bpe").fingerprint == tok.fingerprint
    # any change a model would notice changes it: a merge, a special's name or id, the pattern,
    # the byte ids
    variants = [bpe.Tokenizer(bpe.GPT4_PATTERN, [(97, 98, 256)], {bpe.EOT: 257}),
                bpe.Tokenizer(bpe.GPT4_PATTERN, [(97, 97, 256)], {"<|eot|>": 257}),
                bpe.Tokenizer(bpe.GPT4_PATTERN, [(97, 97, 256)], {bpe.EOT: 258}),
                bpe.Tokenizer(bpe.GPT4_PATTERN, [(97, 97, 256)], {}),
                bpe.Tokenizer(bpe.GPT2_PATTERN, [(97, 97, 256)], {bpe.EOT: 257}),
                bpe.Tokenizer(bpe.GPT4_PATTERN, [(97, 97, 256)], {bpe.EOT: 257},
                              byte_ids=[255 - b for b in range(256)])]
    fingerprints = {tok.fingerprint} | {v.fingerprint for v in variants}
    assert len(fingerprints) == 1 + len(variants)


@pytest.mark.parametrize("damage, message", [
    (lambda t: "hello\n", "not a nanostack tokenizer"),
    (lambda t: t.replace("nanostack-bpe 1", "nanostack-bpe 9"), "version"),
    (lambda t: t[: len(t) // 2], "ends where|line \\d+: expected"),
    (lambda t: t.replace("\nmerges ", "\nmerges 9", 1), "merges|ends where|line"),
    (lambda t: t.replace(" 97 ", " 9999 ", 1), "unknown id|bytes do not match"),
], ids=["not-ours", "version", "truncated", "merge-count", "unknown-id"])
def test_bpe_load_rejects_damaged_files_with_one_line(tmp_path, damage, message):
    tok = _bpe_trained(vocab_size=300)
    path = tmp_path / "tok.bpe"
    tok.save(path)
    path.write_text(damage(path.read_text()))
    with pytest.raises(bpe.UserError, match=message) as e:
        bpe.Tokenizer.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(bpe.UserError, match="not found"):
        bpe.Tokenizer.load(tmp_path / "missing.bpe")


def test_bpe_escape_token_round_trips_every_byte():
    allbytes = bytes(range(256))
    s = bpe.escape_token(allbytes)
    assert " " not in s and s.isascii() and bpe.unescape_token(s) == allbytes
    assert bpe.escape_token(b" the\\") == "\\x20the\\\\"
    with pytest.raises(ValueError):
        bpe.unescape_token("a b")


# --- interop: (vocab, merges), GPT-2 and tiktoken files -------------------------------------------

def _bpe_gpt2_files(tmp_path):
    """A miniature GPT-2 tokenizer: the 256 byte tokens in GPT-2's order, 3 merges, 1 special."""
    table = bpe.gpt2_bytes_to_unicode()
    encoder = {ch: k for k, ch in enumerate(table.values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for left, right in merges:
        encoder[left + right] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    (tmp_path / "encoder.json").write_text(json.dumps(encoder))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{l} {r}\n" for l, r in merges))
    return tmp_path / "encoder.json", tmp_path / "vocab.bpe"


def _bpe_gpt2_reference(word, merges):
    """GPT-2's original algorithm on text symbols: merge the lowest-ranked adjacent pair."""
    rank = {m: r for r, m in enumerate(merges)}
    parts = list(word)
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: rank.get(p, float("inf")))
        if pair not in rank:
            break
        out, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                out.append(parts[i] + parts[i + 1])
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


def test_bpe_gpt2_files_give_gpt2_ids(tmp_path):
    tok = bpe.Tokenizer.from_gpt2(*_bpe_gpt2_files(tmp_path))
    # GPT-2's byte ids, checkable by hand: '!' (0x21) is id 0, 't' is 0x74 - 0x21 = 83; the 68
    # non-printable bytes follow the 188 printable ones, so ' ' (the 33rd) is 188 + 32 = 220 and
    # '\n' is 188 + 10 = 198, exactly as in the real GPT-2 vocabulary.
    assert tok.encode("!") == [0] and tok.encode("t") == [83]
    assert tok.encode(" ") == [220] and tok.encode("\n") == [198]
    assert tok.encode(" the") == [258] and tok.encode("the") == [83, 257]
    assert tok.special_tokens == {"<|endoftext|>": 259} and tok.eot_id == 259
    assert tok.pattern == bpe.GPT2_PATTERN and tok.vocab_size == 260
    encoder = json.loads((tmp_path / "encoder.json").read_text())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    table = bpe.gpt2_bytes_to_unicode()
    text = "the other then hethe theta 😀 x"
    expected = []
    for chunk in bpe.regex.findall(bpe.GPT2_PATTERN, text):
        symbols = "".join(table[b] for b in chunk.encode())
        expected += [encoder[s] for s in _bpe_gpt2_reference(symbols, merges)]
    assert tok.encode(text) == expected and tok.decode(expected) == text
    # survives our own file format (byte ids are not the identity here)
    tok.save(tmp_path / "gpt2.bpe")
    assert bpe.Tokenizer.load(tmp_path / "gpt2.bpe").encode(text) == expected


def test_bpe_tiktoken_files_hand_made_and_round_trip(tmp_path):
    # a hand-made rank file: byte b has rank (b + 7) % 256, then "ab" = 300 and "abc" = 301
    lines = [f"{base64.b64encode(bytes([b])).decode()} {(b + 7) % 256}" for b in range(256)]
    lines += [f"{base64.b64encode(b'ab').decode()} 300", f"{base64.b64encode(b'abc').decode()} 301"]
    (tmp_path / "hand.tiktoken").write_text("\n".join(lines) + "\n")
    tok = bpe.Tokenizer.from_tiktoken(tmp_path / "hand.tiktoken", special_tokens={"<|endoftext|>": 400})
    assert tok.encode("abcab") == [301, 300] and tok.encode("a") == [(ord("a") + 7) % 256]
    assert tok.encode("<|endoftext|>", allowed_special="all") == [400]
    # export and import of a trained tokenizer gives the same tokenizer
    trained = _bpe_trained()
    trained.save_tiktoken(tmp_path / "t.tiktoken")
    first = (tmp_path / "t.tiktoken").read_text().splitlines()[ord("A")]
    assert first == f"{base64.b64encode(b'A').decode()} {ord('A')}"
    back = bpe.Tokenizer.from_tiktoken(tmp_path / "t.tiktoken")
    assert back.fingerprint == trained.fingerprint
    (tmp_path / "bad.tiktoken").write_text("not base64!! 1\n")
    with pytest.raises(bpe.UserError, match="tiktoken"):
        bpe.Tokenizer.from_tiktoken(tmp_path / "bad.tiktoken")


def test_bpe_vocab_table_and_from_vocab_merges_round_trip(tmp_path):
    # The (vocab: id -> bytes, merges: [(bytes, bytes)]) form of other tokenizer tools, both ways:
    # a trained tokenizer, a GPT-2 one (byte ids shuffled) and a tiktoken one (ids with gaps).
    trained = _bpe_trained()
    gpt2 = bpe.Tokenizer.from_gpt2(*_bpe_gpt2_files(tmp_path))
    for tok in (trained, gpt2):
        vocab = dict(tok.vocab)
        assert len(vocab) == tok.vocab_size and all(vocab[i] == tok.decode_bytes([i]) for i in vocab)
        merges = [(tok.vocab[a], tok.vocab[b]) for a, b, _ in tok.merges]
        back = bpe.Tokenizer.from_vocab_merges(vocab, merges, tok.special_tokens, pattern=tok.pattern)
        assert back.fingerprint == tok.fingerprint
        for text in _bpe_texts():
            assert back.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    with pytest.raises(TypeError):
        trained.vocab[0] = b"x"  # read-only: it is the tokenizer's own table
    # by hand: the 256 bytes at ids 0..255, "ab" = 256, "abc" = 257, a special at 300 (a gap)
    vocab = {b: bytes([b]) for b in range(256)} | {256: b"ab", 257: b"abc", 300: b"<|endoftext|>"}
    tok = bpe.Tokenizer.from_vocab_merges(vocab, [(b"a", b"b"), (b"ab", b"c")], {bpe.EOT: 300})
    assert tok.encode("abcab<|endoftext|>", allowed_special="all") == [257, 256, 300]
    assert tok.vocab_size == 301 and tok.eot_id == 300


@pytest.mark.parametrize("vocab_edit, merges, specials, message", [
    (lambda v: v.pop(ord("z")), [(b"a", b"b")], {}, "no token for byte 0x7a"),
    (lambda v: None, [(b"a", b"q")], {}, r"result b'aq' is not in vocab"),
    (lambda v: None, [(b"ab", b"c"), (b"a", b"b")], {}, "not a token made before it"),
    (lambda v: None, [(b"a", b"b"), (b"a", b"b")], {}, "already made"),
    (lambda v: None, [(b"a", b"b")], {}, r"vocab id 257 \(b'abc'\) is neither a byte"),
    (lambda v: v.update({258: b"ab"}), [(b"a", b"b"), (b"ab", b"c")], {}, "both b'ab'"),
    (lambda v: v.update({258: b"<|x|>"}), [(b"a", b"b"), (b"ab", b"c")], {"<|y|>": 258}, "special token"),
    (lambda v: v.update({"259": b"q"}), [(b"a", b"b"), (b"ab", b"c")], {}, "bad vocab entry"),
    (lambda v: None, [(b"a", b"b", b"c")], {}, "merge 0 is"),
], ids=["missing-byte", "result-missing", "order", "twice", "unmade-id", "duplicate", "special-bytes",
        "str-id", "triple"])
def test_bpe_from_vocab_merges_rejects_bad_input_with_one_line(vocab_edit, merges, specials, message):
    vocab = {b: bytes([b]) for b in range(256)} | {256: b"ab", 257: b"abc"}
    vocab_edit(vocab)
    with pytest.raises(bpe.UserError, match=message) as e:
        bpe.Tokenizer.from_vocab_merges(vocab, merges, specials)
    assert "\n" not in str(e.value)


def _bpe_tokenizer_json(tok, tmp_path, edit=None, name="tokenizer.json"):
    """tok written as a tokenizer.json, with edit(data) applied to the JSON; returns the path."""
    data = tok.to_tokenizer_json()
    if edit:
        edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_bpe_tokenizer_json_round_trip_same_ids_on_mixed_text(tmp_path):
    # Hugging Face's tokenizer.json, both ways: code, Unicode, emoji, control characters and
    # special tokens get identical ids; the GPT-2 pattern travels as ByteLevel's own regex too,
    # and merges may be written "a b" or ["a", "b"].
    mixed = ("def café(x):\n\treturn x  # ½ ∑ 🙂👍🏽 日本語<|endoftext|>ROMEO:   \n\n  "
             + "".join(_bpe_texts()))
    for pattern in ("gpt4", "gpt2"):
        tok = _bpe_trained(pattern=pattern)
        path = _bpe_tokenizer_json(tok, tmp_path)
        data = json.loads(path.read_text(encoding="utf-8"))
        # by hand: the token " the" is written "Ġthe" (a space is U+0120 in GPT-2's byte alphabet)
        the = tok.encode(" the")
        assert len(the) == 1 and data["model"]["vocab"]["Ġthe"] == the[0]
        assert data["added_tokens"][0]["content"] == bpe.EOT and data["added_tokens"][0]["id"] == tok.eot_id
        back = bpe.Tokenizer.from_tokenizer_json(str(path))
        assert back.fingerprint == tok.fingerprint
        for allowed in ("all", "none"):
            assert back.encode(mixed, allowed_special=allowed) == tok.encode(mixed, allowed_special=allowed)
        assert tok.eot_id in tok.encode(mixed, allowed_special="all")
    gpt2_style = _bpe_tokenizer_json(tok, tmp_path, lambda d: (
        d.update(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}),
        d["model"].update(merges=[m.split(" ") for m in d["model"]["merges"]])))
    assert bpe.Tokenizer.from_tokenizer_json(str(gpt2_style)).fingerprint == tok.fingerprint


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"].update(type="Unigram"), "model is Unigram"),
    (lambda d: d["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda d: d.update(normalizer={"type": "Lowercase"}), "normalizes text first with Lowercase"),
    (lambda d: d.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "pre-tokenizer is Metaspace"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"].insert(0, {"type": "Digits", "individual_digits": True}),
     "Digits \\+ Split \\+ ByteLevel"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"), "Split is Removed"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "add_prefix_space"),
    (lambda d: d["model"]["vocab"].update({"▁the": 9999}), "not written in the byte-level alphabet"),
    (lambda d: d["added_tokens"][0].update(lstrip=True), "strips spaces"),
    (lambda d: d["model"]["merges"].append("Ġ t x"), "not a pair"),
    (lambda d: d["decoder"].update(type="Metaspace"), "decoder is Metaspace"),
], ids=["unigram", "byte-fallback", "lowercase", "metaspace", "digits", "split-removed", "prefix-space",
        "sentencepiece-token", "lstrip", "triple-merge", "decoder"])
def test_bpe_tokenizer_json_refuses_what_is_not_byte_level_bpe(tmp_path, edit, message):
    path = _bpe_tokenizer_json(_bpe_trained(300), tmp_path, edit)
    with pytest.raises(bpe.UserError, match=message) as e:
        bpe.Tokenizer.from_tokenizer_json(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_bpe_nfc_normalizer_from_tokenizer_json(tmp_path):
    # Qwen's tokenizer.json files declare an NFC normalizer: "e" + U+0301 (combining acute) and the
    # single character "é" (U+00E9) must then get the same ids, in encode, encode_iterable and
    # after a round trip through our own file and the (vocab, merges) form of checkpoints.
    tok = _bpe_trained(400)
    nfc = bpe.Tokenizer.from_tokenizer_json(str(_bpe_tokenizer_json(
        tok, tmp_path, lambda d: d.update(normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"}]}))))
    composed, decomposed = "Café crème", "Cafe\u0301 cre\u0300me"
    assert tok.encode(decomposed) != tok.encode(composed)      # no normalizer: other bytes, other ids
    assert nfc.encode(decomposed) == nfc.encode(composed) == tok.encode(composed)
    assert nfc.fingerprint != tok.fingerprint and nfc.normalizer == "NFC"
    nfc.save(str(tmp_path / "nfc.bpe"))
    for back in (bpe.Tokenizer.load(str(tmp_path / "nfc.bpe")), bpe.Tokenizer.from_vocab_merges(**nfc.as_vocab_merges()),
                 bpe.Tokenizer.from_tokenizer_json(str(_bpe_tokenizer_json(nfc, tmp_path, name="again.json")))):
        assert back.fingerprint == nfc.fingerprint and back.encode(decomposed) == nfc.encode(composed)
    text = ("Cafe\u0301 " * 50 + "<|endoftext|>na\u0308i\u0308ve\n") * 40
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]   # cuts between letters and their marks
    nfc.STREAM_BLOCK = 64
    assert list(nfc.encode_iterable(pieces, allowed_special="all")) == nfc.encode(text, allowed_special="all")


def test_bpe_tokenizer_json_ignore_merges_checked_by_hand(tmp_path):
    # ignore_merges (Llama 3's files): a chunk that is a whole vocab token becomes that token, no
    # merging. By hand: merges b+c (rank 0), a+b (rank 1), ab+c (rank 2). The chunk "abc" merges
    # b+c first (lowest rank) and stops at [a, bc]: the token "abc" is never what its own merges
    # make, so ignore_merges would give another id than our merges -> refused; without it, read.
    vocab = {b: bytes([b]) for b in range(256)} | {256: b"bc", 257: b"ab", 258: b"abc"}
    tok = bpe.Tokenizer.from_vocab_merges(vocab, [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")])
    assert tok.encode("abc") == [ord("a"), 256]
    plain = _bpe_tokenizer_json(tok, tmp_path)
    assert bpe.Tokenizer.from_tokenizer_json(str(plain)).encode("abc") == [ord("a"), 256]
    ignoring = _bpe_tokenizer_json(tok, tmp_path, lambda d: d["model"].update(ignore_merges=True), "ignoring.json")
    with pytest.raises(bpe.UserError, match="ignore_merges is on and token b'abc'"):
        bpe.Tokenizer.from_tokenizer_json(str(ignoring))
    trained = _bpe_tokenizer_json(_bpe_trained(300), tmp_path, lambda d: d["model"].update(ignore_merges=True))
    assert bpe.Tokenizer.from_tokenizer_json(str(trained)).fingerprint == _bpe_trained(300).fingerprint


# --- command line ---------------------------------------------------------------------------------

def _bpe_run(*args, cwd):
    return subprocess.run([sys.executable, os.path.abspath(bpe.__file__), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_bpe_command_line_trains_demo_help_and_errors(tmp_path):
    for k, doc in enumerate(_bpe_corpus()[:5]):
        (tmp_path / f"doc{k}.txt").write_text(doc, encoding="utf-8")
    r = _bpe_run("--train=*.txt", "--vocab_size=300", "--out=tok.bpe", "--quiet=True", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tok = bpe.Tokenizer.load(tmp_path / "tok.bpe")
    assert tok.vocab_size == 300 and tok.eot_id == 299
    r = _bpe_run("--vocab_size=100", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "at least 256" in r.stderr
    r = _bpe_run("--train=nothing*.txt", cwd=tmp_path)
    assert r.returncode == 2 and "no file matches" in r.stderr
    r = _bpe_run("--help", cwd=tmp_path)
    assert r.returncode == 0 and "--vocab_size=4096" in r.stdout
    r = _bpe_run(cwd=tmp_path)  # the teaching demo
    assert r.returncode == 0 and "merge  1:" in r.stdout and "decode(ids) == text: True" in r.stdout


def test_bpe_bad_inputs_are_user_errors():
    with pytest.raises(bpe.UserError, match="bad split pattern"):
        bpe.Tokenizer.train(["abc"], 300, pattern="(", quiet=True)
    with pytest.raises(bpe.UserError, match="distinct"):
        bpe.Tokenizer(bpe.GPT4_PATTERN, [(97, 98, 256)], {"<|x|>": 256})  # special reuses a merge id
    tok = _bpe_trained(vocab_size=300)
    with pytest.raises(bpe.UserError, match="not in this tokenizer"):
        tok.stream_decoder().push(tok.vocab_size)
    assert tok.encode_batch([]) == [] and tok.encode("") == [] and tok.decode([]) == ""
    shuffled = bpe.Tokenizer(bpe.GPT2_PATTERN, [], byte_ids=[(b + 1) % 256 for b in range(256)])
    assert shuffled.encode("\x00\xff") == [1, 0xC3 + 1, 0xBF + 1]  # byte b has id b + 1; ÿ is C3 BF in UTF-8


def test_bpe_encode_iterable_is_lazy_and_decode_takes_arrays(capsys):
    import itertools
    import numpy as np
    tok = _bpe_trained()
    endless = itertools.cycle(["first line\n", "  second, indented\n"])  # a "file" larger than memory
    head = list(itertools.islice(tok.encode_iterable(endless), 500))
    assert len(head) == 500 and tok.decode(head).startswith("first line\n  second, indented\nfirst")
    ids = tok.encode("numpy and torch ids decode too")
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "numpy and torch ids decode too"
    bpe.Tokenizer.train(_bpe_corpus(), 300, quiet=False)  # progress goes to stderr, not stdout
    out = capsys.readouterr()
    assert out.out == "" and "bpe: merges 43/43" in out.err and "distinct" in out.err



# --- shared helpers, and the file read as a text -------------------------------------------------

def test_bpe_parse_settings_docstring_example_is_true():
    # Guards: the example named --lr_rate -> --lr, a setting no script has. The example quoted
    # in parse_settings' docstring must be what the parser really says, for one of the scripts.
    example = re.search(r'(--\w+=\S+) -> "([^"]+)"', bpe.parse_settings.__doc__)
    assert example, bpe.parse_settings.__doc__
    arg, message = example.groups()
    said = []
    for cls in (bpe.Settings, prepare.Settings, train.TrainConfig):
        with pytest.raises(bpe.SettingsError) as e:
            bpe.parse_settings(cls, [arg])
        said.append(str(e.value))
    assert message in said, said


def _names_used_before_definition(path):
    """Module-level names of a script that code above their definition refers to (the style
    guide's "define before use": a reader never has to jump ahead)."""
    import ast
    tree = ast.parse(Path(path).read_text())
    defined = {}  # name -> line of the statement that first defines it
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        else:  # assignments: NAME = ..., NAME: type = ..., A, B = ...
            targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
            names = [n.id for t in targets if t is not None for n in ast.walk(t) if isinstance(n, ast.Name)]
        for name in names:
            defined.setdefault(name, node.lineno)
    return sorted({(n.id, n.lineno) for node in tree.body for n in ast.walk(node)
                   if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                   and defined.get(n.id, 0) > node.lineno})


def test_bpe_defines_every_name_before_use():
    # Guards: UserError was raised ~1,200 lines above its definition.
    assert _names_used_before_definition(bpe.__file__) == []


def test_bpe_remove_stale_temp_files_spares_live_writers(tmp_path):
    # atomic_write's temp files of a process that died mid-write (kill -9) go; a live one stays
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name in (f".last.pt.tmp{dead}", f".meta.json.tmp{os.getpid()}", "keep.tmp1", "tmp"):
        (tmp_path / name).write_text("x")
    assert bpe.remove_stale_temp_files(tmp_path) == [f".last.pt.tmp{dead}"]
    assert sorted(os.listdir(tmp_path)) == sorted([f".meta.json.tmp{os.getpid()}", "keep.tmp1", "tmp"])
    assert bpe.remove_stale_temp_files(tmp_path / "missing") == []


def test_bpe_progress_and_peak_memory(capsys, monkeypatch):
    monkeypatch.setattr(bpe, "PROGRESS_LOG_SECONDS", 0.0)  # stderr is not a terminal here
    p = bpe.Progress("tokenizing", total=4_000_000, scale=1e6, unit=" MB")
    p.add(1_000_000)
    p.add(1_000_000, note="2 docs")
    p.done()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" |")[0] for line in lines] == ["tokenizing 1.0/4.0 MB", "tokenizing 2.0/4.0 MB",
                                                        "tokenizing 2.0/4.0 MB"]
    assert "ETA" in lines[0] and lines[1].endswith("| 2 docs")
    bpe.Progress("quiet", quiet=True).done()
    assert capsys.readouterr().err == ""
    before = bpe.peak_rss_mb()
    block = bytearray(64 << 20)  # 64 MiB, touched so that it is resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert bpe.peak_rss_mb() - before > 50 and bpe.peak_rss_mb(children=True) >= 0


def test_bpe_default_corpus_is_stdlib_without_tests():
    # the one home of the corpus walk that bpe.py's benchmark and prepare.py's default share
    root, paths = bpe.stdlib_files()
    rel = [os.path.relpath(p, root) for p in paths]
    assert len(paths) > 100 and all(p.endswith(".py") for p in paths)
    assert rel == sorted(rel) and "os.py" in rel                      # same order on every machine
    for r in rel:
        assert not {"test", "tests", "site-packages"} & set(r.split(os.sep)[:-1]), r
    first = next(bpe.stdlib_documents())
    assert first == Path(paths[0]).read_text(encoding="utf-8", errors="replace")

# =============================================================================
# 2. prepare.py: corpus to token shards
# =============================================================================

# Tests for prepare.py: shard format, reader API, corpus -> shards pipeline, downloads.
# Everything runs on tiny corpora in tmp_path with a 300-token vocab; downloads go to
# an http.server on 127.0.0.1 in a thread, never to the internet.




def _prepare_docs():
    """Six small documents with enough repetition for a 300-token BPE. One contains
    the special token's text, one is non-ASCII."""
    words = "the quick brown fox jumps over the lazy dog while a cat sleeps".split()
    docs = []
    for d in range(6):
        lines = [" ".join(words[(d + i) % len(words):] + words[:(d + i) % len(words)]) for i in range(30)]
        docs.append(f"# doc {d}\n" + "\n".join(lines) + "\n")
    docs[2] += "a literal <|endoftext|> inside the text must stay text\n"
    docs[4] += "unicode: caf\u00e9 \u65e5\u672c \U0001f600\n"
    return docs


def _prepare_write_corpus(root, docs):
    root.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (root / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
    return str(root / "*.txt")


def _prepare_settings(tmp_path, pattern, **kw):
    kw.setdefault("out_dir", str(tmp_path / "out"))
    kw.setdefault("download_dir", str(tmp_path / "downloads"))
    kw.setdefault("vocab_size", 300)
    kw.setdefault("num_proc", 1)
    return prepare.Settings(input=pattern, **kw)


def _prepare_quiet(*a, **k):
    pass


def _prepare_split_docs(data_dir, split):
    """All documents of a split as token arrays (BOS included), stitched across shards
    using only the document index (documents may continue into the next shard)."""
    shards = prepare.load_split(data_dir, split)
    tokens = np.concatenate([np.asarray(s.tokens) for s in shards])
    offsets = np.cumsum([0] + [len(s.tokens) for s in shards[:-1]])
    starts = np.concatenate([s.doc_starts + o for s, o in zip(shards, offsets)])
    bounds = list(starts) + [len(tokens)]
    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# -----------------------------------------------------------------------------
# shard format and reader


def test_prepare_shard_header_round_trip(tmp_path):
    fp = "ab" * 32
    docs = [np.array([7, 1, 2, 3]), np.array([7, 4]), np.array([7, 5, 6, 1, 2])]  # 7 = BOS
    with prepare.ShardWriter(str(tmp_path), "train", np.dtype("<u2"), 5, 300, 7, fp) as w:
        w.add(np.concatenate(docs[:2]), [4, 2])
        w.add(docs[2], [5])
    assert w.names == ["train_0000.bin", "train_0001.bin", "train_0002.bin"]  # 11 tokens, 5 per shard
    shards = [prepare.open_shard(str(tmp_path / n), fp) for n in w.names]
    # the checksum by hand: CRC-32 of the body, the 5 uint16 tokens then the 2 int64 index entries
    body = np.array([7, 1, 2, 3, 7], "<u2").tobytes() + np.array([0, 4], "<i8").tobytes()
    assert shards[0].header == dict(version=3, dtype="uint16", n_tokens=5, n_docs=2, vocab_size=300,
                                    bos_id=7, fingerprint=fp, checksum=zlib.crc32(body), flags=0)
    assert shards[0].mask is None  # pretraining shards carry no loss mask
    assert open(shards[0].path, "rb").read()[prepare.SHARD_HEADER_BYTES:] == body
    assert shards[0].tokens.dtype == np.uint16
    assert np.concatenate([s.tokens for s in shards]).tolist() == np.concatenate(docs).tolist()
    # Worked by hand: starts 0, 4, 6 in the stream -> shard0 [0, 4], shard1 [1] (6 - 5), shard2 none.
    assert [s.doc_starts.tolist() for s in shards] == [[0, 4], [1], []]
    assert os.path.getsize(shards[0].path) == prepare.SHARD_HEADER_BYTES + 5 * 2 + 2 * 8


def test_prepare_uint32_path_for_large_vocab(tmp_path):
    # Guards: ids >= 65536 silently wrapping when written as uint16.
    assert prepare.choose_dtype(50257).name == "uint16"
    assert prepare.choose_dtype(65536).name == "uint16"
    assert prepare.choose_dtype(65537).name == "uint32"
    with pytest.raises(bpe.UserError, match="uint16"):
        prepare.choose_dtype(70000, "uint16")
    ids = np.array([69999, 1, 65536, 69999, 70000 - 2, 3], dtype=np.int64)  # BOS = 69999
    with prepare.ShardWriter(str(tmp_path), "val", prepare.choose_dtype(70000), 100, 70000, 69999, "f" * 64) as w:
        w.add(ids, [3, 3])
    shard = prepare.open_shard(str(tmp_path / "val_0000.bin"), "f" * 64)
    assert shard.tokens.dtype == np.uint32 and shard.header["dtype"] == "uint32"
    assert shard.tokens.tolist() == ids.tolist() and shard.doc_starts.tolist() == [0, 3]


def test_prepare_truncated_foreign_and_wrong_fingerprint_refused(tmp_path):
    fp = "c" * 64
    with prepare.ShardWriter(str(tmp_path), "train", np.dtype("<u2"), 100, 300, 9, fp) as w:
        w.add(np.array([9, 1, 2, 9, 3]), [3, 2])
    good = tmp_path / "train_0000.bin"
    data = good.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-3])
    with pytest.raises(prepare.ShardError, match=r"cut\.bin.*truncated.*re-run prepare\.py"):
        prepare.open_shard(str(tmp_path / "cut.bin"))
    (tmp_path / "foreign.bin").write_bytes(b"\x00" * 300)
    with pytest.raises(prepare.ShardError, match=r"foreign\.bin.*not a nanostack.*re-run prepare\.py"):
        prepare.open_shard(str(tmp_path / "foreign.bin"))
    with pytest.raises(prepare.ShardError, match=r"train_0000\.bin.*tokenizer.*re-run prepare\.py"):
        prepare.open_shard(str(good), expected_fingerprint="d" * 64)
    # A document index that points at a non-BOS token is caught too.
    bad = bytearray(data)
    bad[-8:] = np.array([1], "<i8").tobytes()
    (tmp_path / "badindex.bin").write_bytes(bytes(bad))
    with pytest.raises(prepare.ShardError, match="index"):
        prepare.open_shard(str(tmp_path / "badindex.bin"))
    assert prepare.open_shard(str(good), fp).tokens.tolist() == [9, 1, 2, 9, 3]


def _prepare_shard(tmp_path, tokens, starts, vocab_size=300, bos=9, name="train"):
    with prepare.ShardWriter(str(tmp_path), name, np.dtype("<u2"), 100, vocab_size, bos, "c" * 64) as w:
        w.add(np.array(tokens), np.diff([*starts, len(tokens)]))
    return str(tmp_path / f"{name}_0000.bin")


def test_prepare_token_id_out_of_range_refused_on_open(tmp_path):
    # Guards (issue 15, finding 6): ids >= vocab in a shard body crashed training far away with an
    # IndexError. Opening the shard must refuse it in one line naming the file.
    path = _prepare_shard(tmp_path, [9, 1, 300, 9, 2], [0, 3])
    with pytest.raises(prepare.ShardError, match=r"train_0000\.bin: holds token id 300, but the vocabulary "
                                                 r"has 300 ids") as e:
        prepare.open_shard(path)
    assert "\n" not in str(e.value)
    with pytest.raises(prepare.ShardError, match="header says vocab_size 500, the data directory 300"):
        prepare.open_shard(_prepare_shard(tmp_path, [9, 1, 2], [0], vocab_size=500, name="val"),
                           vocab_size=300)  # the header's vocab must be meta.json's (load_split passes it)
    ok = _prepare_shard(tmp_path, [9, 1, 299, 9, 2], [0, 3], name="ok")
    assert prepare.open_shard(ok).tokens.max() == 299        # the largest id that fits


def test_prepare_changed_token_caught_by_checksum_and_verified_once(tmp_path, monkeypatch):
    # Guards (issue 15, finding 10): a changed token id in a shard trained silently. The body's
    # CRC-32 is verified once per file identity (verified.json), so later starts skip the pass.
    path = _prepare_shard(tmp_path, [9, 1, 2, 9, 3, 4], [0, 3])
    passes = []
    real = prepare.scan_body
    monkeypatch.setattr(prepare, "scan_body", lambda *a: passes.append(1) or real(*a))
    prepare.open_shard(path)
    prepare.open_shard(path)
    assert len(passes) == 1 and "train_0000.bin" in json.loads((tmp_path / "verified.json").read_text())["shards"]
    time.sleep(0.05)  # the change gets a new timestamp even on a coarse file-system clock
    with open(path, "r+b") as f:   # token 1 (id 1) becomes id 5: in range, same size, same index
        f.seek(prepare.SHARD_HEADER_BYTES + 2)
        f.write(np.array([5], "<u2").tobytes())
    with pytest.raises(prepare.ShardError, match=r"train_0000\.bin: its bytes do not match the checksum") as e:
        prepare.open_shard(path)
    assert len(passes) == 2 and "\n" not in str(e.value) and "re-run prepare.py" in str(e.value)
    # a damaged cache file only costs a new pass
    (tmp_path / "verified.json").write_text("{not json")
    good = _prepare_shard(tmp_path, [9, 7], [0], name="val")
    assert prepare.open_shard(good).tokens.tolist() == [9, 7] and len(passes) == 3


@pytest.mark.parametrize("version", [1, 2, 4])
def test_prepare_unknown_shard_version_refused(tmp_path, version):
    # Version 2 added the checksum, version 3 the flags and the loss mask: older shards and
    # future ones are refused in one line that says what to do.
    path = _prepare_shard(tmp_path, [9, 1, 2], [0])
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", version))
    with pytest.raises(prepare.ShardError, match=f"format version {version} .*re-run prepare.py") as e:
        prepare.open_shard(path)
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# the pipeline


def test_prepare_oversized_document_is_refused(tmp_path, monkeypatch):
    # Guards: a huge file without --doc_sep silently becoming one giant in-memory document.
    monkeypatch.setattr(prepare, "MAX_DOC_BYTES", 100)
    (tmp_path / "big.txt").write_text("x" * 500)
    with pytest.raises(bpe.UserError, match="--doc_sep"):
        list(prepare.iter_documents([str(tmp_path / "big.txt")]))
    with pytest.raises(bpe.UserError, match="--doc_sep"):
        list(prepare.iter_documents([str(tmp_path / "big.txt")], "SEP"))


def test_prepare_max_doc_bytes_counts_bytes_not_characters(tmp_path, monkeypatch):
    # Guards: MAX_DOC_BYTES was compared with a count of characters, so 40 "é" (80 bytes of
    # UTF-8) passed a 50-byte limit. Both ways of cutting documents must count bytes.
    monkeypatch.setattr(prepare, "MAX_DOC_BYTES", 50)
    monkeypatch.setattr(prepare, "READ_BLOCK_CHARS", 16)   # the tail grows over several blocks
    (tmp_path / "e.txt").write_text("é" * 40, encoding="utf-8")
    for sep in ("", "SEP"):
        with pytest.raises(bpe.UserError, match="--doc_sep"):
            list(prepare.iter_documents([str(tmp_path / "e.txt")], sep))
    (tmp_path / "ok.txt").write_text("é" * 25 + "SEP" + "é" * 25, encoding="utf-8")   # 50 bytes each side
    assert list(prepare.iter_documents([str(tmp_path / "ok.txt")], "SEP")) == ["é" * 25] * 2
    (tmp_path / "ok2.txt").write_text("é" * 25, encoding="utf-8")
    assert list(prepare.iter_documents([str(tmp_path / "ok2.txt")])) == ["é" * 25]


def test_prepare_round_trip_bos_and_exact_decode(tmp_path):
    docs = _prepare_docs()
    pattern = _prepare_write_corpus(tmp_path / "src", docs)
    # Small shards so documents run across shard boundaries.
    s = _prepare_settings(tmp_path, pattern, shard_tokens=700, val_fraction=0.2)
    meta = prepare.build(s, log=_prepare_quiet, quiet=True)
    out = s.out_dir
    tok = prepare.load_tokenizer(out)
    assert meta["vocab_size"] == tok.vocab_size == 300 and meta["bos_id"] == tok.eot_id
    assert len(meta["splits"]["train"]["shards"]) > 1
    decoded = {}
    for split in ("train", "val"):
        split_docs = _prepare_split_docs(out, split)
        assert len(split_docs) == meta["splits"][split]["docs"]
        total = 0
        for d in split_docs:
            assert d[0] == tok.eot_id                      # every document starts with BOS
            assert (d[1:] != tok.eot_id).all()             # ... and the literal text never becomes BOS
            decoded.setdefault(split, []).append(tok.decode(d[1:].tolist()))
            total += len(d)
        assert total == meta["splits"][split]["tokens"]
    assert sorted(decoded["train"] + decoded["val"]) == sorted(docs)   # exact, nothing lost or added
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in docs)
    with open(os.path.join(out, "meta.json")) as f:
        on_disk = json.load(f)
    for key in ("tokenizer", "fingerprint", "vocab_size", "bos_id", "splits", "bytes_per_token",
                "sources", "settings", "created"):
        assert key in on_disk


def test_prepare_split_disjoint_deterministic_and_never_empty(tmp_path):
    docs = _prepare_docs()
    pattern = _prepare_write_corpus(tmp_path / "src", docs)
    runs = []
    for i, frac in enumerate((0.3, 0.3, 0.0)):
        s = _prepare_settings(tmp_path, pattern, out_dir=str(tmp_path / f"o{i}"), val_fraction=frac,
                              force=True)
        prepare.build(s, log=_prepare_quiet, quiet=True)
        tok = prepare.load_tokenizer(s.out_dir)
        runs.append({sp: sorted(tok.decode(d[1:].tolist()) for d in _prepare_split_docs(s.out_dir, sp))
                     for sp in ("train", "val")})
    assert runs[0] == runs[1]                                    # deterministic
    assert not set(runs[0]["train"]) & set(runs[0]["val"])       # disjoint
    expected_val = sorted(d for d in docs if prepare.doc_hash(d)[0] < 0.3)
    assert runs[0]["val"] == expected_val or (not expected_val and len(runs[0]["val"]) == 1)
    assert len(runs[2]["val"]) == 1 and len(runs[2]["train"]) == len(docs) - 1   # fraction 0 -> still 1 val doc


def test_prepare_rerun_reuses_and_force_rebuilds(tmp_path):
    pattern = _prepare_write_corpus(tmp_path / "src", _prepare_docs())
    s = _prepare_settings(tmp_path, pattern)
    prepare.build(s, log=_prepare_quiet, quiet=True)
    shard = os.path.join(s.out_dir, "train_0000.bin")
    mtime = os.stat(shard).st_mtime_ns
    lines = []
    prepare.build(s, log=lines.append, quiet=True)
    assert any("reusing" in line for line in lines) and os.stat(shard).st_mtime_ns == mtime
    # Changing only how shards are cut rebuilds shards but reuses the trained tokenizer.
    lines = []
    prepare.build(_prepare_settings(tmp_path, pattern, shard_tokens=500), log=lines.append, quiet=True)
    assert any("reusing" in line and "tokenizer" in line for line in lines)
    assert len(prepare.load_meta(s.out_dir)["splits"]["train"]["shards"]) > 1
    lines = []
    prepare.build(_prepare_settings(tmp_path, pattern, shard_tokens=500, force=True), log=lines.append, quiet=True)
    assert not any("reusing" in line for line in lines)
    # Editing a source file invalidates the build; here it also changes the trained tokenizer,
    # which only --force=True may replace (see the refusal test below).
    (tmp_path / "src" / "doc00.txt").write_text("something else entirely, " * 50)
    with pytest.raises(bpe.UserError, match="would be replaced"):
        prepare.build(_prepare_settings(tmp_path, pattern, shard_tokens=500), log=_prepare_quiet, quiet=True)
    lines = []
    meta = prepare.build(_prepare_settings(tmp_path, pattern, force=True), log=lines.append, quiet=True)
    assert not any("reusing" in line for line in lines)
    # shards of the older, larger build do not linger beside the new one
    assert sorted(n for n in os.listdir(s.out_dir) if n.endswith(".bin")) == \
        sorted(meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"])


def _prepare_files(folder):
    """{name: bytes} of every file in a folder (to show that nothing changed)."""
    return {n: (Path(folder) / n).read_bytes() for n in sorted(os.listdir(folder))}


def _prepare_side_folders(tmp_path):
    return [n for n in os.listdir(tmp_path) if ".build" in n or ".old" in n]


def test_prepare_interrupted_write_leaves_no_valid_looking_shard(tmp_path, monkeypatch):
    # Guards: a crash mid-shard leaving train_0000.bin (or meta.json) that the loader accepts,
    # and (issue 15, finding 4) a crash mid-rebuild making the previous, good dataset unusable.
    pattern = _prepare_write_corpus(tmp_path / "src", _prepare_docs())
    s = _prepare_settings(tmp_path, pattern, shard_tokens=400)
    calls = []
    real = prepare.ShardWriter._write_tokens

    def failing(self, tokens):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of a shard
        real(self, tokens)

    monkeypatch.setattr(prepare.ShardWriter, "_write_tokens", failing)
    with pytest.raises(KeyboardInterrupt):   # a first build, interrupted: nothing is left
        prepare.build(s, log=_prepare_quiet, quiet=True)
    assert not os.path.exists(s.out_dir) and _prepare_side_folders(tmp_path) == []
    with pytest.raises(prepare.ShardError, match="meta.json"):
        prepare.load_split(s.out_dir, "train")
    monkeypatch.setattr(prepare.ShardWriter, "_write_tokens", real)
    prepare.build(s, log=_prepare_quiet, quiet=True)           # a complete build is present...
    before = _prepare_files(s.out_dir)
    calls.clear()
    monkeypatch.setattr(prepare.ShardWriter, "_write_tokens", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare.build(_prepare_settings(tmp_path, pattern, shard_tokens=400, force=True), log=_prepare_quiet,
                      quiet=True)
    assert _prepare_files(s.out_dir) == before and _prepare_side_folders(tmp_path) == []
    assert prepare.load_split(s.out_dir, "train")              # ...and stays whole and usable
    monkeypatch.setattr(prepare.ShardWriter, "_write_tokens", real)
    lines = []
    prepare.build(s, log=lines.append, quiet=True)              # a plain re-run finds it up to date
    assert any("up to date" in line for line in lines)


def test_prepare_disk_full_mid_rebuild_keeps_the_old_dataset(tmp_path, monkeypatch):
    # Guards (issue 15, findings 4 and 7): prepare.py deleted meta.json before rebuilding, so a
    # full disk left the good dataset unusable, with an OSError traceback. Now: one line that
    # names the folder and the space needed, and the old dataset exactly as it was.
    pattern = _prepare_write_corpus(tmp_path / "src", _prepare_docs())
    s = _prepare_settings(tmp_path, pattern, shard_tokens=400)
    prepare.build(s, log=_prepare_quiet, quiet=True)
    before = _prepare_files(s.out_dir)
    real = prepare.ShardWriter._write_tokens
    calls = []

    def disk_full(self, tokens):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, tokens)

    monkeypatch.setattr(prepare.ShardWriter, "_write_tokens", disk_full)
    with pytest.raises(bpe.UserError) as e:
        prepare.build(_prepare_settings(tmp_path, pattern, shard_tokens=400, force=True), log=_prepare_quiet,
                      quiet=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith("disk full while writing")
    assert str(tmp_path) in message and re.search(r"needs about \d+\.\d MB there", message)
    assert "nothing was changed" in message
    assert _prepare_files(s.out_dir) == before and _prepare_side_folders(tmp_path) == []
    assert prepare.load_tokenizer(s.out_dir) and prepare.load_split(s.out_dir, "val")
    # the same at the very last write (meta.json), and on a first build: nothing written at all
    monkeypatch.setattr(prepare.ShardWriter, "_write_tokens", real)
    real_write = bpe.atomic_write_bytes

    def meta_disk_full(path, data):
        if os.path.basename(path) == "meta.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(bpe, "atomic_write_bytes", meta_disk_full)
    with pytest.raises(bpe.UserError, match="disk full.*nothing was changed"):
        prepare.build(_prepare_settings(tmp_path, pattern, force=True), log=_prepare_quiet, quiet=True)
    assert _prepare_files(s.out_dir) == before
    with pytest.raises(bpe.UserError, match="disk full.*nothing was written"):
        prepare.build(_prepare_settings(tmp_path, pattern, out_dir=str(tmp_path / "new")), log=_prepare_quiet,
                      quiet=True)
    assert not os.path.exists(tmp_path / "new") and _prepare_side_folders(tmp_path) == []


def test_prepare_refuses_to_replace_the_tokenizer_without_force(tmp_path):
    # Guards (issue 15, finding 4): a rebuild with another vocab_size silently replaced
    # tokenizer.bpe, and checkpoints trained on the directory could no longer be sampled.
    pattern = _prepare_write_corpus(tmp_path / "src", _prepare_docs())
    s = _prepare_settings(tmp_path, pattern)
    prepare.build(s, log=_prepare_quiet, quiet=True)
    old_fp = prepare.load_tokenizer(s.out_dir).fingerprint
    (tmp_path / "out" / "notes.txt").write_text("mine")          # a file the user keeps there
    before = _prepare_files(s.out_dir)
    with pytest.raises(bpe.UserError) as e:
        prepare.build(_prepare_settings(tmp_path, pattern, vocab_size=310), log=_prepare_quiet, quiet=True)
    message = str(e.value)
    assert "\n" not in message and os.path.join(s.out_dir, "tokenizer.bpe") in message
    assert old_fp[:16] in message and "checkpoints" in message and "--force=True" in message
    assert _prepare_files(s.out_dir) == before and _prepare_side_folders(tmp_path) == []
    # --force=True replaces it, keeps the old tokenizer beside the new one, and the user's file
    lines = []
    meta = prepare.build(_prepare_settings(tmp_path, pattern, vocab_size=310, force=True), log=lines.append,
                         quiet=True)
    assert meta["vocab_size"] == 310 and prepare.load_tokenizer(s.out_dir).vocab_size == 310
    kept = tmp_path / "out" / f"tokenizer-{old_fp[:16]}.bpe"
    assert bpe.Tokenizer.load(kept).fingerprint == old_fp and any(str(kept) in line for line in lines)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine" and _prepare_side_folders(tmp_path) == []
    # a rebuild with the same tokenizer needs no --force (only the shards change)
    meta = prepare.build(_prepare_settings(tmp_path, pattern, vocab_size=310, shard_tokens=500), log=_prepare_quiet,
                         quiet=True)
    assert len(meta["splits"]["train"]["shards"]) > 1 and kept.exists()


def test_prepare_rebuild_through_a_symlinked_out_dir(tmp_path):
    # data on another disk, reached through a link: the rebuild replaces the folder the link
    # points to, and the link stays a link
    pattern = _prepare_write_corpus(tmp_path / "src", _prepare_docs())
    (tmp_path / "big").mkdir()
    os.symlink(tmp_path / "big" / "data", tmp_path / "link")
    s = _prepare_settings(tmp_path, pattern, out_dir=str(tmp_path / "link"))
    prepare.build(s, log=_prepare_quiet, quiet=True)
    prepare.build(dataclasses.replace(s, shard_tokens=500), log=_prepare_quiet, quiet=True)
    assert os.path.islink(tmp_path / "link") and (tmp_path / "big" / "data" / "meta.json").exists()
    assert len(prepare.load_split(str(tmp_path / "link"), "train")) > 1


def test_prepare_recovers_what_a_killed_build_left(tmp_path):
    # kill -9 at any moment: the next run finishes the dead process's work (its pid is gone)
    pattern = _prepare_write_corpus(tmp_path / "src", _prepare_docs())
    s = _prepare_settings(tmp_path, pattern)
    prepare.build(s, log=_prepare_quiet, quiet=True)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    before = _prepare_files(s.out_dir)
    # killed mid-build: a half build folder; and a temp file of a killed verified.json writer
    (tmp_path / f".out.build{dead}").mkdir()
    (tmp_path / f".out.build{dead}" / "train_0000.bin").write_bytes(b"half")
    (tmp_path / "out" / f".verified.json.tmp{dead}").write_text("{")
    lines = []
    prepare.build(s, log=lines.append, quiet=True)
    assert any("up to date" in line for line in lines) and _prepare_side_folders(tmp_path) == []
    assert _prepare_files(s.out_dir).keys() == before.keys()
    # killed between the two renames of the swap: the data directory is missing
    os.rename(tmp_path / "out", tmp_path / f".out.old{dead}")
    prepare.build(s, log=lines.append, quiet=True)
    assert _prepare_files(s.out_dir) == before and any("restored" in line for line in lines)
    # killed after the swap, before the old folder was retired: the user's file moves across
    (tmp_path / f".out.old{dead}").mkdir()
    (tmp_path / f".out.old{dead}" / "meta.json").write_text("{}")
    (tmp_path / f".out.old{dead}" / "notes.txt").write_text("mine")
    prepare.build(s, log=_prepare_quiet, quiet=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine" and _prepare_side_folders(tmp_path) == []
    assert prepare.load_meta(s.out_dir)["fingerprint"] == prepare.load_tokenizer(s.out_dir).fingerprint


def test_prepare_parallel_equals_serial_and_max_doc_tokens(tmp_path):
    pattern = _prepare_write_corpus(tmp_path / "src", _prepare_docs() * 2)
    outs = []
    for n in (1, 2):
        s = _prepare_settings(tmp_path, pattern, out_dir=str(tmp_path / f"p{n}"), num_proc=n, chunk_mb=0.0005)
        prepare.build(s, log=_prepare_quiet, quiet=True)
        outs.append(s.out_dir)
    for name in prepare.load_meta(outs[0])["splits"]["train"]["shards"]:
        assert open(os.path.join(outs[0], name), "rb").read() == open(os.path.join(outs[1], name), "rb").read()
    s = _prepare_settings(tmp_path, pattern, out_dir=str(tmp_path / "cap"), max_doc_tokens=20)
    meta = prepare.build(s, log=_prepare_quiet, quiet=True)
    lengths = [len(d) for sp in ("train", "val") for d in _prepare_split_docs(s.out_dir, sp)]
    assert max(lengths) == 20 and meta["splits"]["train"]["tokens"] == 20 * meta["splits"]["train"]["docs"]


def test_prepare_doc_sep_val_input_and_bad_utf8(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first doc\n\n\n\nsecond doc\n\n\n\n\n\n   \n\n\n\nthird doc, caf", encoding="utf-8")
    with open(src / "a.txt", "ab") as f:
        f.write(b"\xe9 au lait\n")                               # Latin-1 byte: not UTF-8
    (tmp_path / "held.txt").write_text("held out one\n\n\n\nheld out two\n", encoding="utf-8")
    monkeypatch.setattr(prepare, "READ_BLOCK_CHARS", 5)         # separators straddle read blocks
    expected = ["first doc", "second doc", "third doc, caf\ufffd au lait"]
    assert list(prepare.iter_documents([str(src / "a.txt")], "\n\n\n\n")) == expected
    s = _prepare_settings(tmp_path, str(src / "a.txt"), doc_sep="\\n\\n\\n\\n", val_input=str(tmp_path / "held.txt"),
                          vocab_size=270)
    assert s.doc_sep == "\n\n\n\n"                              # CLI escapes are turned into newlines
    meta = prepare.build(s, log=_prepare_quiet, quiet=True)
    tok = prepare.load_tokenizer(s.out_dir)
    got = {sp: [tok.decode(d[1:].tolist()) for d in _prepare_split_docs(s.out_dir, sp)] for sp in ("train", "val")}
    assert got == {"train": expected, "val": ["held out one", "held out two"]}
    assert meta["replaced_chars"] == 1


def test_prepare_gpt2_tokenizer_files(tmp_path):
    # A miniature GPT-2 style encoder.json/vocab.bpe: the 256 byte symbols, one merge, EOT.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_char = {b: chr(c) for b, c in zip(bs, cs)}
    encoder = {byte_char[b]: i for i, b in enumerate(range(256))}
    encoder[byte_char[ord("h")] + byte_char[ord("e")]] = 256
    encoder["<|endoftext|>"] = 257
    gdir = tmp_path / "gpt2"
    gdir.mkdir()
    (gdir / "encoder.json").write_text(json.dumps(encoder))
    (gdir / "vocab.bpe").write_text("#version: 0.2\nh e\n")
    pattern = _prepare_write_corpus(tmp_path / "src", ["hello there\n", "he said hi\n"])
    s = _prepare_settings(tmp_path, pattern, tokenizer=str(gdir / "encoder.json"))
    meta = prepare.build(s, log=_prepare_quiet, quiet=True)
    assert meta["vocab_size"] == 258 and meta["bos_id"] == 257
    docs = [d for sp in ("train", "val") for d in _prepare_split_docs(s.out_dir, sp)]
    assert sorted(d.tolist() for d in docs)[0][:2] == [257, 256]   # BOS, then the merged "he"


def test_prepare_one_line_errors(tmp_path):
    with pytest.raises(bpe.UserError, match="matches no files"):
        prepare.resolve_globs(str(tmp_path / "nothing" / "*.txt"))
    (tmp_path / "bin").mkdir()
    for i in range(3):
        (tmp_path / "bin" / f"x{i}.dat").write_bytes(b"\x00\x01\x02" * 10)
    with pytest.raises(bpe.UserError, match="binary"):
        prepare.resolve_globs(str(tmp_path / "bin"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    with pytest.raises(bpe.UserError, match="empty"):
        prepare.resolve_globs(str(tmp_path / "empty" / "*.txt"))
    pattern = _prepare_write_corpus(tmp_path / "src", _prepare_docs())
    (tmp_path / "bad.bpe").write_text("this is not a tokenizer\n")
    with pytest.raises(bpe.UserError):
        prepare.build(_prepare_settings(tmp_path, pattern, tokenizer=str(tmp_path / "bad.bpe")),
                      log=_prepare_quiet, quiet=True)
    assert not os.path.exists(tmp_path / "out" / "meta.json")
    with pytest.raises(bpe.UserError, match="not found"):
        prepare.build(_prepare_settings(tmp_path, pattern, tokenizer=str(tmp_path / "missing.bpe")),
                      log=_prepare_quiet)
    with pytest.raises(bpe.UserError, match="uint16"):
        prepare.build(_prepare_settings(tmp_path, pattern, dtype="uint16", vocab_size=70000), log=_prepare_quiet)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "only.txt").write_text("a single document cannot be split\n")
    with pytest.raises(bpe.UserError, match="single document"):
        prepare.build(_prepare_settings(tmp_path, str(tmp_path / "one" / "*.txt")), log=_prepare_quiet)
    assert not os.path.exists(tmp_path / "out")                     # nothing written for any of these
    # Through the real command line: exit code 2 and exactly one line on stderr.
    here = os.path.dirname(os.path.abspath(prepare.__file__))
    for args in ([f"--input={tmp_path / 'nothing' / '*.txt'}"], ["--vocab_sise=300"]):
        r = subprocess.run([sys.executable, os.path.join(here, "prepare.py"), *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr


def test_prepare_defines_every_name_before_use():
    # Guards: Settings checked --dataset against DATASETS, defined ~200 lines further down.
    assert _names_used_before_definition(prepare.__file__) == []


def test_prepare_tokenizer_without_eot_gets_its_message(tmp_path):
    # Guards: check_tokenizer's message could never print (getattr(tok, "eot_id", None) meets
    # bpe's UserError, not AttributeError), so the user saw bpe's generic line instead.
    pattern = _prepare_write_corpus(tmp_path / "src", _prepare_docs())
    bpe.Tokenizer(bpe.GPT4_PATTERN, [], {}).save(tmp_path / "noeot.bpe")
    with pytest.raises(bpe.UserError, match=r"--tokenizer=.*noeot\.bpe: the tokenizer has no <\|endoftext\|> "
                                            r"token, which marks document starts"):
        prepare.build(_prepare_settings(tmp_path, pattern, tokenizer=str(tmp_path / "noeot.bpe")),
                      log=_prepare_quiet, quiet=True)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("damage, what", [
    ("{}", "'format_version' is missing"),
    ('{"format_version": 2, "tokenizer": "tokenizer.bpe", "fingerprint": "ab", "vocab_size": 300, '
     '"bos_id": 299, "splits": {"train": {"shards": ["../../etc/passwd"]}, "val": {"shards": []}}}',
     "'splits.train.shards' is missing or not a list of file names"),
    ("[1, 2]", "not a JSON object"),
    ('{"tokenizer"', "cannot be read"),
], ids=["empty", "path-in-shards", "list", "truncated"])
def test_prepare_damaged_meta_json_is_one_line(tmp_path, damage, what):
    # Guards (issue 15, finding 7): meta.json = {} gave KeyError 'tokenizer' with a traceback.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_text(damage)
    for read in (prepare.load_meta, prepare.load_tokenizer, lambda d: prepare.load_split(d, "train")):
        with pytest.raises(prepare.ShardError) as e:
            read(str(tmp_path / "d"))
        assert what in str(e.value) and "re-run prepare.py" in str(e.value) and "\n" not in str(e.value)


def test_prepare_verify_rechecks_every_shard(tmp_path, capsys):
    # --verify=True ignores verified.json: damage that kept a file's identity is found too
    pattern = _prepare_write_corpus(tmp_path / "src", _prepare_docs())
    s = _prepare_settings(tmp_path, pattern, shard_tokens=500)
    prepare.build(s, log=_prepare_quiet, quiet=True)
    remembered = json.loads((tmp_path / "out" / "verified.json").read_text())["shards"]
    assert sorted(remembered) == sorted(n for n in os.listdir(s.out_dir) if n.endswith(".bin"))
    prepare.main([f"--out_dir={s.out_dir}", "--verify=True"])
    assert re.search(r"all \d+ shards verified", capsys.readouterr().err)
    shard = tmp_path / "out" / "train_0000.bin"
    st = os.stat(shard)
    data = bytearray(shard.read_bytes())
    data[prepare.SHARD_HEADER_BYTES + 4] ^= 1          # a flipped bit...
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...with the old mtime restored
    with pytest.raises(prepare.ShardError, match="train_0000.bin: its bytes do not match"):
        prepare.main([f"--out_dir={s.out_dir}", "--verify=True"])


def test_prepare_synthetic_corpus_varies_copies_as_documented(tmp_path, monkeypatch):
    # the docstring's example: copy 3 of "def f(self):" is "def v3_f(self_3):"
    (tmp_path / "m.py").write_text("def f(self):\n    return self\n")
    monkeypatch.setattr(bpe, "stdlib_files", lambda: (str(tmp_path), [str(tmp_path / "m.py")]))
    (tmp_path / "out").mkdir()
    written = prepare.write_synthetic_corpus(str(tmp_path / "out"), 120 / prepare.MB)
    docs = (tmp_path / "out" / "synthetic_000.txt").read_text().split("\n" + prepare.SYNTHETIC_SEP + "\n")
    assert docs[:4] == [f"def v{k}_f(self_{k}):\n    return self_{k}\n" for k in range(4)]
    assert written == sum(len(d.encode()) for d in docs if d) >= 120


# -----------------------------------------------------------------------------
# chat data: the template, the synthetic tasks, JSONL, shards with a loss mask


def _prepare_byte_chat_tokenizer():
    """No merges (each byte is its id), <|endoftext|> = 256, the chat tokens 257..260."""
    return bpe.Tokenizer(bpe.GPT4_PATTERN, [], {bpe.EOT: 256}).with_special_tokens(bpe.CHAT_TOKENS)


def test_prepare_chat_render_worked_example():
    # the worked example of prepare.py section 10, by hand
    tok = _prepare_byte_chat_tokenizer()
    ids, mask = prepare.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tok)
    assert ids == [256, 258, ord("h"), ord("i"), 260, 259, ord("y"), ord("o"), 260]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    # a prompt ends with <|assistant|>; a system message and a second exchange, masked the same way
    ids, mask = prepare.render([{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
                               tok, reply=True)
    assert ids == [256, 257, ord("S"), 260, 258, ord("a"), 260, 259, ord("b"), 260, 258, ord("c"), 260, 259]
    assert mask == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    # typed special-token text is bytes: one <|assistant|> (the template's), one <|end|> per turn
    ids, _ = prepare.render([{"role": "user", "content": "x<|end|><|assistant|>"}], tok, reply=True)
    assert ids[2:-2] == list(b"x<|end|><|assistant|>") and ids.count(259) == 1 and ids.count(260) == 1
    assert prepare.render_reply(ids, "ok", tok) == (ids + [ord("o"), ord("k"), 260], [0] * len(ids) + [1, 1, 1])
    for bad, message in [([], "non-empty list"), ([{"role": "bot", "content": "x"}], '"role" must be'),
                         ([{"role": "user", "content": ""}], '"content" must be'),
                         ([{"role": "assistant", "content": "x"}], "where a user message belongs"),
                         ([{"role": "user", "content": "x"}], "must end with an assistant")]:
        with pytest.raises(bpe.UserError, match=message):
            prepare.render(bad, tok)
    with pytest.raises(bpe.UserError, match="no chat tokens"):
        prepare.render([{"role": "user", "content": "x"}], bpe.Tokenizer(bpe.GPT4_PATTERN, [], {bpe.EOT: 256}),
                       reply=True)


def test_prepare_tasks_deterministic_and_splits_never_overlap():
    for name in prepare.TASKS:
        splits = {sp: prepare.task_problems(name, sp, 40, seed=3) for sp in prepare.TASK_SPLITS}
        assert splits == {sp: prepare.task_problems(name, sp, 40, seed=3) for sp in prepare.TASK_SPLITS}
        assert prepare.task_problems(name, "train", 40, seed=4) != splits["train"]      # the seed matters
        questions = {sp: {p.question for p in ps} for sp, ps in splits.items()}
        assert not questions["train"] & questions["val"] and not questions["train"] & questions["test"]
        assert not questions["val"] & questions["test"]
        assert len(questions["val"]) == len(questions["test"]) == 40                    # distinct
        # the split is the question's: another seed's test questions are test questions too
        assert all(prepare.task_split(p.question) == "test" for p in prepare.task_problems(name, "test", 40, 9))
    with pytest.raises(bpe.UserError, match="test problems.*raise --task_digits"):
        prepare.task_problems("add", "test", 50, digits=1)       # 1-digit sums: 81 questions in all
    with pytest.raises(bpe.UserError, match="unknown task.*choose from add, sub"):
        prepare.task_names("tasks:add,mul")


@pytest.mark.parametrize("name, data, right, wrong", [
    ("add", (482, 317), ["799", " 799\n"], ["798", "799.", "It is 799", "+799", "", "7 99"]),
    ("sub", (731, 284), ["447", "447 "], ["-447", "448", "447!"]),
    ("count", ("kalamo", "a"), ["2"], ["1", "3", "two", "2 times"]),
    ("count", ("kalamo", "z"), ["0"], ["1", "", "O"]),
    ("reverse", ("kalamo",), ["omalak", " omalak "], ["kalamo", "omalka", "Omalak", "o m a l a k"]),
    ("sort", (42, 7, 19), ["7, 19, 42", "7,19,42"], ["7, 42, 19", "42, 19, 7", "7, 19", "7; 19; 42"]),
])
def test_prepare_task_checkers_right_and_wrong(name, data, right, wrong):
    # answers worked out by hand; every task's own answer and its plausible wrong reply, checked too
    task, p = prepare.TASKS[name], prepare.Problem(name, "?", "", data)
    assert all(task.check(p, r) for r in right) and not any(task.check(p, r) for r in wrong)
    rng = random.Random(0)
    for p in prepare.task_problems(name, "train", 50, seed=1):
        assert task.check(p, p.answer) and not task.check(p, task.wrong(p, rng)), p


def _prepare_chat_tokenizer_file(tmp_path):
    tok = bpe.Tokenizer.train(_prepare_docs(), vocab_size=300, quiet=True)
    tok.save(str(tmp_path / "base.bpe"))
    return tok, str(tmp_path / "base.bpe")


def test_prepare_chat_jsonl_errors_carry_file_and_line_and_write_nothing(tmp_path):
    _, base = _prepare_chat_tokenizer_file(tmp_path)
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    cases = [('{"messages": [', "not valid JSON"), ("[1, 2]", "expected a JSON object"),
             ('{"text": "hi"}', 'expected {"messages"'),
             ('{"messages": [{"role": "bot", "content": "x"}]}', r'messages\[0\]: "role" must be'),
             ('{"messages": [{"role": "user", "content": "x"}]}', "the conversation must end with an assistant")]
    for line, message in cases:
        path = tmp_path / "convs.jsonl"
        path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
        with pytest.raises(bpe.UserError, match=f"{re.escape(str(path))}:4: {message}") as e:
            prepare.main([f"--chat={path}", f"--tokenizer={base}", f"--out_dir={tmp_path / 'sft'}"])
        assert "\n" not in str(e.value)
    pair = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    for edit, message in [(dict(rejected="4"), "the same reply"), (dict(chosen=""), '"chosen" must be'),
                          (dict(prompt=[{"role": "assistant", "content": "x"}]), '"prompt" must be'),
                          (dict(chosen=None, rejected=None), '"chosen" must be')]:
        path = tmp_path / "pairs.jsonl"
        path.write_text(json.dumps(pair) + "\n" + json.dumps({**pair, **edit}) + "\n")
        with pytest.raises(bpe.UserError, match=f"pairs.jsonl:2: .*{message}"):
            prepare.main([f"--pairs={path}", f"--tokenizer={base}", f"--out_dir={tmp_path / 'dpo'}"])
    (tmp_path / "bad.jsonl").write_bytes(b"\xff\n")
    with pytest.raises(bpe.UserError, match="bad.jsonl:1: not UTF-8"):
        prepare.main([f"--chat={tmp_path / 'bad.jsonl'}", f"--tokenizer={base}", f"--out_dir={tmp_path / 'sft'}"])
    assert not (tmp_path / "sft").exists() and not (tmp_path / "dpo").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []    # no build folder left
    with pytest.raises(bpe.SettingsError, match="need --tokenizer=PATH"):
        bpe.parse_settings(prepare.Settings, ["--chat=tasks:add"])


def test_prepare_chat_shards_carry_the_loss_mask_under_the_checksum(tmp_path):
    base, base_path = _prepare_chat_tokenizer_file(tmp_path)
    convs = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}!"}]}
             for i in range(12)]
    (tmp_path / "convs.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    out = tmp_path / "sft"
    prepare.main([f"--chat={tmp_path / 'convs.jsonl'}", f"--tokenizer={base_path}", f"--out_dir={out}",
                  "--val_fraction=0.2"])
    tok, meta = prepare.load_tokenizer(str(out)), prepare.load_meta(str(out))
    assert tok.extends(base) and meta["kind"] == "chat" and meta["chat"]["base_fingerprint"] == base.fingerprint
    rendered = {tuple(prepare.render(c["messages"], tok)[0]): prepare.render(c["messages"], tok)[1] for c in convs}
    docs = [d for sp in ("train", "val") for d in train.documents(prepare.load_split(str(out), sp))]
    assert len(docs) == 12 and all(rendered[tuple(t.tolist())] == m.tolist() for t, m in docs)
    # the mask is under the checksum: one flipped mask byte is caught on open
    shard = out / "train_0000.bin"
    n_tokens = prepare.read_header(str(shard))["n_tokens"]
    raw = bytearray(shard.read_bytes())
    raw[prepare.SHARD_HEADER_BYTES + 2 * n_tokens] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(prepare.ShardError, match="do not match the checksum"):
        prepare.load_split(str(out), "train")
    # ... and a mask byte that is not 0/1 is refused even with a matching checksum
    raw[prepare.SHARD_HEADER_BYTES + 2 * n_tokens] = 2
    header = prepare.read_header(str(shard))
    body = bytes(raw[prepare.SHARD_HEADER_BYTES:])
    raw[:prepare.SHARD_HEADER_BYTES] = prepare.pack_header(np.dtype("<u2"), n_tokens, header["n_docs"], 304,
                                                           header["bos_id"], header["fingerprint"],
                                                           zlib.crc32(body), prepare.HAS_MASK)
    shard.write_bytes(bytes(raw))
    with pytest.raises(prepare.ShardError, match="loss mask holds the value 2"):
        prepare.load_split(str(out), "train")
    # synthetic pairs: chosen then rejected, both masked on the reply alone, same prompt
    prepare.main(["--pairs=tasks:add", f"--tokenizer={base_path}", f"--out_dir={tmp_path / 'dpo'}",
                  "--task_examples=6", "--task_val_examples=2", "--task_digits=2"])
    docs = train.documents(prepare.load_split(str(tmp_path / "dpo"), "train"))
    assert len(docs) == 12
    for (c, cm), (r, rm) in zip(docs[0::2], docs[1::2]):
        start = cm.tolist().index(1)
        assert c[:start].tolist() == r[:start].tolist() and rm.tolist().index(1) == start
        p = prepare.Problem("add", "", "", tuple(map(int, re.findall(r"\d+", tok.decode(c[:start].tolist())))))
        assert prepare.check_add(p, tok.decode(c[start:-1].tolist()))
        assert not prepare.check_add(p, tok.decode(r[start:-1].tolist()))


# -----------------------------------------------------------------------------
# downloads against a local http.server


class _PrepareHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files with Range support; server.plan scripts failures:
    "500" answers an error, "cut" sends half the body then drops the connection."""

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        action = srv.plan.pop(0) if srv.plan else "ok"
        if data is None or action == "500":
            self.send_error(404 if data is None else 500)
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        if start >= len(data):
            self.send_error(416)
            return
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if action == "cut" else body)
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def _prepare_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PrepareHandler)
    srv.files, srv.plan, srv.requests = {}, [], []
    thread = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _prepare_remote(srv, name, data, **kw):
    srv.files["/" + name] = data
    kw.setdefault("size", len(data))
    kw.setdefault("sha256", hashlib.sha256(data).hexdigest())
    return prepare.Remote(srv.url + "/" + name, name, **kw)


def test_prepare_download_resume_retry_and_cache(tmp_path, _prepare_server):
    srv = _prepare_server
    data = bytes(range(256)) * 400
    remote = _prepare_remote(srv, "d.txt", data)
    # A .part from an interrupted run: the download continues with a Range request.
    (tmp_path / "d.txt.part").write_bytes(data[:1000])
    path = prepare.download(remote, str(tmp_path), backoff=0, log=_prepare_quiet)
    assert open(path, "rb").read() == data and srv.requests == [("/d.txt", "bytes=1000-")]
    assert not os.path.exists(tmp_path / "d.txt.part")
    # Cached: no second request.
    prepare.download(remote, str(tmp_path), backoff=0, log=_prepare_quiet)
    assert len(srv.requests) == 1
    # A server error, then a connection cut mid-body: retried, then resumed where it broke.
    remote2 = _prepare_remote(srv, "e.txt", data[::-1])
    srv.plan, srv.requests = ["500", "cut"], []
    path = prepare.download(remote2, str(tmp_path), backoff=0, log=_prepare_quiet)
    assert open(path, "rb").read() == data[::-1]
    assert [r[1] for r in srv.requests] == [None, None, f"bytes={len(data) // 2}-"]


def test_prepare_download_sha_mismatch_404_and_offline(tmp_path, _prepare_server):
    srv = _prepare_server
    bad = _prepare_remote(srv, "f.txt", b"hello world\n", sha256="0" * 64)
    with pytest.raises(bpe.UserError, match="sha256"):
        prepare.download(bad, str(tmp_path), backoff=0, log=_prepare_quiet)
    assert not os.path.exists(tmp_path / "f.txt") and not os.path.exists(tmp_path / "f.txt.part")
    with pytest.raises(bpe.UserError, match="HTTP 404"):
        prepare.download(prepare.Remote(srv.url + "/missing", "m.txt"), str(tmp_path), backoff=0,
                         log=_prepare_quiet)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()                                            # nothing listens there now
    with pytest.raises(bpe.UserError, match="offline") as e:
        prepare.download(prepare.Remote(f"http://127.0.0.1:{port}/x", "x.txt"), str(tmp_path), retries=2,
                         backoff=0, log=_prepare_quiet)
    assert "\n" not in str(e.value)


def test_prepare_cached_download_is_checked_by_sha256(tmp_path, _prepare_server):
    # Guards (issue 15, finding 8): a cached file was checked by size only, so a same-size
    # damaged file was used. Now it is downloaded again, with a message.
    srv = _prepare_server
    data = bytes(range(256)) * 40
    remote = _prepare_remote(srv, "c.txt", data)
    prepare.download(remote, str(tmp_path), backoff=0, log=_prepare_quiet)
    damaged = bytearray(data)
    damaged[100] ^= 0xFF
    (tmp_path / "c.txt").write_bytes(bytes(damaged))            # same size, one byte changed
    lines = []
    path = prepare.download(remote, str(tmp_path), backoff=0, log=lines.append)
    assert open(path, "rb").read() == data and len(srv.requests) == 2
    assert any("does not match its pinned sha256" in line for line in lines)
    lines = []
    prepare.download(remote, str(tmp_path), backoff=0, log=lines.append)   # intact: used as is
    assert len(srv.requests) == 2 and lines == [f"using cached {path}"]


def test_prepare_disk_full_during_download_is_one_line(tmp_path, _prepare_server, monkeypatch):
    # Guards (issue 15, finding 7): ENOSPC while downloading was retried as a network error
    # and ended with "are you offline?". Now one line that says the disk is full, and the
    # .part keeps what arrived, for the next run to resume.
    srv = _prepare_server
    data = b"x" * (3 * prepare.DOWNLOAD_BLOCK)
    remote = _prepare_remote(srv, "big.txt", data)
    real_open = open

    class FullDisk(io.FileIO):
        def write(self, b):
            if self.tell() >= prepare.DOWNLOAD_BLOCK:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    monkeypatch.setattr(prepare, "open", lambda p, mode="r", *a, **k: FullDisk(p, mode.replace("b", ""))
                        if str(p).endswith(".part") else real_open(p, mode, *a, **k), raising=False)
    with pytest.raises(bpe.UserError) as e:
        prepare.download(remote, str(tmp_path), backoff=0, log=_prepare_quiet)
    message = str(e.value)
    assert message.startswith("disk full while downloading") and str(tmp_path) in message
    assert "MB more are needed" in message and "\n" not in message and len(srv.requests) == 1
    assert os.path.getsize(tmp_path / "big.txt.part") == prepare.DOWNLOAD_BLOCK


def test_prepare_dataset_download_end_to_end(tmp_path, _prepare_server, monkeypatch):
    srv = _prepare_server
    text = "".join(f"SPEAKER {i}:\nwords and more words, line {i}\n\n" for i in range(60)).encode()
    remote = _prepare_remote(srv, "tiny.txt", text)
    monkeypatch.setitem(prepare.DATASETS, "tinyshakespeare", dict(train=[remote], val=[], doc_sep="\n\n"))
    s = prepare.Settings(dataset="tinyshakespeare", out_dir=str(tmp_path / "ts"), vocab_size=280, num_proc=1,
                         download_dir=str(tmp_path / "dl"))
    meta = prepare.build(s, log=_prepare_quiet, quiet=True)
    assert os.path.exists(tmp_path / "dl" / "tiny.txt")
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 60
    assert meta["splits"]["val"]["docs"] >= 1

# =============================================================================
# 3. model.py: the transformer and its KV cache
# =============================================================================

_MODEL_ATOL = 2e-5


def _model_one_thread(test):
    """Run a test on one torch thread. These models are tiny: on a busy 2-core machine two
    OpenMP threads mostly wait for each other (measured: a fwd+bwd of the overfit model took
    1.3 ms on 1 thread and 260 ms on 2)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return test(*args, **kwargs)
        finally:
            torch.set_num_threads(old)
    return run


def _model_cfg(**kw):
    """A tiny config; every test model is small enough to run in milliseconds."""
    base = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
                logit_softcap=0.0)
    base.update(kw)
    return M.GPTConfig(**base)


def _model_make(seed=0, **kw):
    """A model whose parameters are ALL random (the real init zeroes every c_proj, which would
    turn each block into the identity and make attention tests vacuous)."""
    torch.manual_seed(seed)
    m = M.GPT(_model_cfg(**kw))
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.size(-1) ** -0.5)
    return m.eval()


def _model_twin(m, **kw):
    """Same weights, different config fields (e.g. attn_impl="manual")."""
    twin = M.GPT(dataclasses.replace(m.config, **kw))
    twin.load_state_dict(m.state_dict())
    return twin.eval()


def _model_tokens(B, T, vocab=61, seed=1):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _model_decode(m, idx, prefill, window=None, doc_ids=None, chunk=1):
    """Logits from a cached run: prefill idx[:, :prefill], then `chunk` tokens per step."""
    B, T = idx.shape
    cache = m.make_cache(B, T)
    outs = [m(idx[:, :prefill], cache=cache, window=window,
              doc_ids=None if doc_ids is None else doc_ids[:, :prefill])]
    for t in range(prefill, T, chunk):
        d = None if doc_ids is None else doc_ids[:, t:t + chunk]
        outs.append(m(idx[:, t:t + chunk], cache=cache, window=window, doc_ids=d))
    assert cache.pos == T
    return torch.cat(outs, dim=1)

# ---------------------------------------------------------------------------- config


@_model_one_thread
def test_model_config_validation_one_line_errors():
    cases = [dict(n_embd=30, n_head=4), dict(n_head=4, n_kv_head=3), dict(n_embd=12, n_head=4),
             dict(mlp="tanh"), dict(rope_scaling="ntk"), dict(rope_factor=2.0),
             dict(window=-1), dict(n_experts=4, top_k=5), dict(attn_softcap=float("nan"))]
    for kw in cases:
        with pytest.raises(ValueError) as e:
            _model_cfg(**kw)
        assert "\n" not in str(e.value) and str(e.value)
    with pytest.raises(bpe.SettingsError, match="divisible"):
        bpe.parse_settings(M.GPTConfig, ["--n_embd=100", "--n_head=3"])


@_model_one_thread
def test_model_runtime_decided_once_from_capabilities(monkeypatch, tmp_path):
    """One Runtime for train.py and sample.py. Precision comes from the CPU's feature flags, never
    from a timing (regression: --dtype=auto timed matmuls and chose bf16 for a run and float32
    for its resume); a resumed checkpoint's saved choices replace "auto"; the model receives the
    hardware choices as Kernels instead of sniffing devices; bad devices are one line."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        flags = tmp_path / "cpuinfo"
        flags.write_text("processor : 0\nflags : fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n")
        assert M.cpu_has_bf16_matmul(str(flags))
        flags.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
        assert not M.cpu_has_bf16_matmul(str(flags))
        monkeypatch.setattr(M, "cpu_has_bf16_matmul", lambda: False)
        rt = M.setup_runtime("cpu", "auto", compile="false")
        assert rt.dtype == torch.float32 and rt.kernels == M.Kernels() and rt.ns_dtype == torch.float32
        with rt.autocast():
            assert not torch.is_autocast_enabled("cpu")
        assert rt.deterministic and torch.are_deterministic_algorithms_enabled()  # CPU default
        monkeypatch.setattr(M, "cpu_has_bf16_matmul", lambda: True)
        rt = M.setup_runtime("cpu", "auto", compile="true")
        assert rt.dtype == torch.bfloat16 and rt.ns_dtype == torch.bfloat16
        assert rt.kernels == M.Kernels(sdpa_fp32=True, softcap_sigmoid=True, moe_padded=False)
        with rt.autocast():
            assert torch.is_autocast_enabled("cpu")
        saved = {"dtype": "float32", "compile": False, "threads": 1, "deterministic": False}
        rt = M.setup_runtime("cpu", "auto", compile="auto", deterministic="auto", saved=saved)
        assert rt.settings() == saved and torch.get_num_threads() == 1
        assert not torch.are_deterministic_algorithms_enabled()
        rt = M.setup_runtime("cpu", "bfloat16", saved=saved)  # an explicit setting still wins
        assert rt.dtype == torch.bfloat16 and rt.dtype_reason == "set by --dtype"
        for device, message in (("tpu", "not a device"), ("meta", "only cpu, cuda and mps")):
            with pytest.raises(bpe.UserError, match=message):
                M.setup_runtime(device)
        if not torch.cuda.is_available():
            with pytest.raises(bpe.UserError, match="--device=cpu"):
                M.setup_runtime("cuda")
        with pytest.raises(bpe.UserError, match="needs CUDA"):
            M.setup_runtime("cpu", "float16")
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def test_model_kernels_change_how_not_what():
    """Kernels (the Runtime's hardware choices) never change the function: the sigmoid form of the
    softcap equals tanh's, float32 SDPA inside bf16 autocast stays close to the plain path, and
    the MoE's padded experts equal the grouped ones (float32)."""
    x = torch.linspace(-60, 60, 1001, dtype=torch.float64)
    assert torch.allclose(M.tanh_softcap(x, 15.0, sigmoid=True), M.tanh_softcap(x, 15.0), atol=1e-12)
    cfg = M.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                      n_experts=4, top_k=2, capacity_factor=1.5)
    torch.manual_seed(0)
    plain = M.GPT(cfg)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.2)   # non-zero output projections: the experts matter
    other = M.GPT(cfg, M.Kernels(sdpa_fp32=True, softcap_sigmoid=True, moe_padded=True))
    other.load_state_dict(plain.state_dict())
    idx = torch.randint(64, (2, 16))
    assert torch.allclose(plain(idx, idx)[0], other(idx, idx)[0], atol=1e-5)   # training: capacity
    assert other.transformer.h[0].mlp.kernels.moe_padded
    assert plain.use_kernels(M.Kernels(moe_padded=True)).transformer.h[1].mlp.kernels.moe_padded


def test_model_doc_ids_from_bos_example():
    idx = torch.tensor([[5, 0, 7, 8, 0, 9]])
    assert M.doc_ids_from_bos(idx, 0).tolist() == [[0, 1, 1, 1, 2, 2]]

# ---------------------------------------------------------------------------- attention


@_model_one_thread
def test_model_causality():
    """Changing token t never changes the logits at positions < t (every mask type)."""
    for kw in [{}, dict(window=4, n_global=2), dict(attn_softcap=5.0), dict(n_kv_head=1)]:
        m = _model_make(**kw)
        idx = _model_tokens(2, 20)
        base = m(idx)
        for t in (0, 7, 19):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 61
            out = m(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=_MODEL_ATOL, rtol=0)
            assert (out[:, t] - base[:, t]).abs().max() > 1e-4  # and token t itself matters


@_model_one_thread
def test_model_sliding_window_mask_equals_explicit_loop():
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    got = M.attention_mask(torch.arange(4), torch.arange(4), window=2)[0, 0]
    assert torch.equal(got, expected)  # the docstring's worked example
    for window, n_global in [(3, 0), (3, 2), (1, 1), (0, 0)]:
        T = 9
        mask = M.attention_mask(torch.arange(T), torch.arange(T), window, n_global)[0, 0]
        for i in range(T):
            for j in range(T):
                ok = j <= i and (window == 0 or i - j < window or j < n_global)
                assert bool(mask[i, j]) == ok, (window, n_global, i, j)


@_model_one_thread
def test_model_sliding_window_equals_explicit_mask_attention():
    """A model with a window gives the same logits as hand-written attention fed a mask built
    by explicit loops (guards against an off-by-one in the window)."""
    m = _model_make(window=5)
    idx = _model_tokens(2, 16)
    T = 16
    explicit = torch.tensor([[j <= i and i - j < 5 for j in range(T)] for i in range(T)])
    captured = {}
    original = M.manual_attention

    def spy(q, k, v, mask=None, softcap=0.0, record=None, softcap_sigmoid=False):
        captured["mask"] = mask
        return original(q, k, v, explicit, softcap, record, softcap_sigmoid)
    manual = _model_twin(m, attn_impl="manual")
    M.manual_attention = spy
    try:
        ref = manual(idx)
    finally:
        M.manual_attention = original
    torch.testing.assert_close(m(idx), ref, atol=_MODEL_ATOL, rtol=0)
    assert torch.equal(captured["mask"][0, 0], explicit)
    # the run-time override equals the config field
    full = _model_twin(m, window=0)
    torch.testing.assert_close(full(idx, window=5), ref, atol=_MODEL_ATOL, rtol=0)
    assert (full(idx) - ref).abs().max() > 1e-4


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@_model_one_thread
def test_model_sdpa_equals_manual_every_mask(n_kv_head):
    m = _model_make(n_kv_head=n_kv_head)
    hand = _model_twin(m, attn_impl="manual")
    idx = _model_tokens(2, 20)
    docs = M.doc_ids_from_bos(idx, 3) + torch.tensor([[0], [5]])
    for kw in [{}, dict(window=4), dict(window=1), dict(doc_ids=docs), dict(window=6, doc_ids=docs)]:
        torch.testing.assert_close(m(idx, **kw), hand(idx, **kw), atol=_MODEL_ATOL, rtol=0)
    for kw in [dict(window=4), dict(window=4, n_global=3)]:  # n_global is a config field
        a, b = _model_twin(m, **kw), _model_twin(hand, **kw)
        torch.testing.assert_close(a(idx), b(idx), atol=_MODEL_ATOL, rtol=0)
    # cached paths: chunked prefill (explicit mask) and one-token steps (no mask)
    torch.testing.assert_close(_model_decode(m, idx, 5, chunk=3), _model_decode(hand, idx, 5, chunk=3),
                               atol=_MODEL_ATOL, rtol=0)


@_model_one_thread
def test_model_sdpa_under_cpu_bf16_autocast():
    """On CPU under bf16 autocast the SDPA path runs attention in float32 (the bf16 flash
    backward is slow there): the layer must still give bf16 out and finite gradients in,
    and the model must match the hand-written path to bf16 precision."""
    m = _model_make()
    hand = _model_twin(m, attn_impl="manual")
    idx = _model_tokens(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn = m.transformer.h[0].attn
        layout = m._layout(2, 16, 0, 0, None, None, idx.device)
        x = torch.randn(2, 16, m.config.n_embd, requires_grad=True)
        y = attn(x, layout)
        fast, slow = m(idx), hand(idx)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(fast, slow, atol=0.05, rtol=0.02)
    assert (fast - m(idx)).abs().max() > 0      # autocast really ran (bf16 differs from fp32)


@_model_one_thread
def test_model_document_masking_equals_separate_documents():
    m = _model_make(n_kv_head=2)
    bos = 0
    docs = [torch.tensor(d) for d in ([bos, 5, 9, 11, 4], [bos, 7, 7, 2], [bos, 1, 2, 3, 8, 6, 5])]
    packed = torch.cat(docs)[None]                                       # (1, 16)
    doc_ids = M.doc_ids_from_bos(packed, bos)
    for impl in ("sdpa", "manual"):
        mm = _model_twin(m, attn_impl=impl)
        together = mm(packed, doc_ids=doc_ids)
        apart = torch.cat([mm(d[None]) for d in docs], dim=1)
        # positions stay absolute in the packed row, but RoPE only sees offsets between tokens
        # of the same document, so the logits match the separate runs exactly
        torch.testing.assert_close(together, apart, atol=_MODEL_ATOL, rtol=0)
        assert (mm(packed) - apart).abs().max() > 1e-4  # without doc_ids they differ


@_model_one_thread
def test_model_softcap_bounds_logits(monkeypatch):
    m = _model_make(logit_softcap=2.0)
    eager = m(_model_tokens(1, 8))
    assert eager.abs().max() < 2.0
    # under torch.compile the cap is written with sigmoid (faster in inductor's CPU code):
    # the same function, so the same logits and gradients
    x = torch.linspace(-60, 60, 241, dtype=torch.float64, requires_grad=True)
    y_tanh = M.tanh_softcap(x, 15.0)
    (g_tanh,) = torch.autograd.grad(y_tanh.sum(), x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y_sig = M.tanh_softcap(x, 15.0)
    (g_sig,) = torch.autograd.grad(y_sig.sum(), x)
    torch.testing.assert_close(y_sig, y_tanh, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_sig, g_tanh, rtol=0, atol=1e-12)
    torch.testing.assert_close(m(_model_tokens(1, 8)), eager, rtol=0, atol=1e-5)

@_model_one_thread
def test_model_record_attention_equals_hand_softmax():
    """record_attention (sample.py's attention maps) hands out what each layer really attends
    with. Layer 0's recorded probabilities equal softmax(q k^T / sqrt(D)) under the causal mask,
    with q and k computed here by hand (c_attn columns, RMSNorm, RoPE angles p * theta^(-2i/D),
    kv heads shared by groups of query heads); the logits are the default path's; and outside the
    context nothing is recorded."""
    m = _model_make(n_kv_head=2)
    B, T, H, Hkv, D = 2, 12, 4, 2, 8
    idx = _model_tokens(B, T)
    with M.record_attention(m) as probs:
        logits = m(idx)
    assert len(probs) == m.config.n_layer and probs[0].shape == (B, H, T, T)
    torch.testing.assert_close(logits, m(idx), atol=_MODEL_ATOL, rtol=0)
    attn = m.transformer.h[0].attn
    assert attn.record is None
    with torch.no_grad():
        x = m.transformer.wte(idx)
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)            # ln_1, no gain
        qkv = x @ attn.c_attn.weight.T                                          # (B, T, (H + 2 Hkv) D)
        q = qkv[..., :H * D].view(B, T, H, D).transpose(1, 2)
        k = qkv[..., H * D:(H + Hkv) * D].view(B, T, Hkv, D).transpose(1, 2)
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)             # QK-norm
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6)
        angle = torch.tensor([[p * 10000.0 ** (-2 * i / D) for i in range(D // 2)] for p in range(T)])

        def rope(t):
            a, b = t[..., :D // 2], t[..., D // 2:]
            return torch.cat([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1)
        q, k = rope(q), rope(k).repeat_interleave(H // Hkv, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        hand = scores.softmax(-1)
    torch.testing.assert_close(probs[0], hand, atol=1e-5, rtol=0)
    assert probs[0].triu(1).abs().max() == 0 and torch.allclose(probs[0].sum(-1), torch.ones(B, H, T))
    assert hand[0, 0, 5].min() < 0.5 * hand[0, 0, 5, :6].max()     # not uniform: the check has teeth


# ---------------------------------------------------------------------------- RoPE


@_model_one_thread
def test_model_rope_relative():
    """q_m . k_n after RoPE depends only on m - n."""
    cfg = _model_cfg(block_size=64)
    cos, sin = M.rope_tables(cfg)
    D = cfg.head_dim
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(m, n):
        qm = M.apply_rope(q, cos[m:m + 1], sin[m:m + 1])  # q at position m
        kn = M.apply_rope(k, cos[n:n + 1], sin[n:n + 1])  # k at position n
        return (qm * kn).sum()
    for m, n, s in [(5, 2, 7), (10, 10, 30), (3, 9, 40)]:
        torch.testing.assert_close(score(m, n), score(m + s, n + s), atol=1e-5, rtol=0)
    assert abs(score(5, 2) - score(6, 2)) > 1e-4
    torch.testing.assert_close(score(0, 0), (q * k).sum(), atol=1e-6, rtol=0)  # position 0: no turn


@_model_one_thread
def test_model_rope_scaling_identity_and_yarn_ramp():
    plain, s1 = M.rope_frequencies(16, 10000.0)
    for scaling in ("linear", "yarn"):
        w, scale = M.rope_frequencies(16, 10000.0, scaling, 1.0, train_len=32)
        assert torch.equal(w, plain) and scale == 1.0
    m = _model_make()
    idx = _model_tokens(1, 20)
    for scaling in ("linear", "yarn"):
        torch.testing.assert_close(_model_twin(m, rope_scaling=scaling)(idx), m(idx), atol=0, rtol=0)
    # factor 4: linear divides every frequency; YaRN keeps the fastest pairs and divides the slowest
    lin, _ = M.rope_frequencies(16, 10000.0, "linear", 4.0, train_len=32)
    torch.testing.assert_close(lin, plain / 4)
    yarn, scale = M.rope_frequencies(16, 10000.0, "yarn", 4.0, train_len=1024)
    assert yarn[0] == plain[0] and torch.isclose(yarn[-1], plain[-1] / 4)
    assert scale == pytest.approx(0.1 * math.log(4) + 1)
    # the extended model runs past block_size; the plain one refuses with a one-line UserError
    long = _model_tokens(1, 100)
    assert _model_twin(m, rope_scaling="yarn", rope_factor=4.0)(long).shape == (1, 100, 61)
    with pytest.raises(bpe.UserError, match="rope_factor"):
        m(long)

# ---------------------------------------------------------------------------- GQA and the cache


@_model_one_thread
def test_model_gqa_equals_mha_with_repeated_kv_weights():
    """GQA (2 kv heads for 4 query heads) equals MHA whose kv heads are copies: query head h
    must read kv head h // 2, the same grouping SDPA's enable_gqa uses."""
    for n_kv in (2, 1):
        gqa = _model_make(n_kv_head=n_kv)
        mha = M.GPT(dataclasses.replace(gqa.config, n_kv_head=4)).eval()
        sd = gqa.state_dict()
        C, D, H = 32, 8, 4
        for key in list(sd):
            if key.endswith("c_attn.weight"):
                w = sd[key]
                q, k, v = w.split([H * D, n_kv * D, n_kv * D])
                rep = lambda t: t.view(n_kv, D, C).repeat_interleave(H // n_kv, dim=0).reshape(H * D, C)
                sd[key] = torch.cat([q, rep(k), rep(v)])
        mha.load_state_dict(sd)
        idx = _model_tokens(2, 12)
        for impl in ("sdpa", "manual"):
            torch.testing.assert_close(_model_twin(gqa, attn_impl=impl)(idx),
                                       _model_twin(mha, attn_impl=impl)(idx), atol=_MODEL_ATOL, rtol=0)


@pytest.mark.parametrize("kw", [dict(n_kv_head=4), dict(n_kv_head=2), dict(n_kv_head=1),
                                dict(n_kv_head=2, window=5), dict(window=4, n_global=2),
                                dict(attn_softcap=4.0, n_kv_head=2)])
@_model_one_thread
def test_model_cached_decode_equals_full_forward(kw):
    m = _model_make(**kw)
    idx = _model_tokens(2, 24)
    full = m(idx)
    torch.testing.assert_close(_model_decode(m, idx, 7), full, atol=_MODEL_ATOL, rtol=0)
    torch.testing.assert_close(_model_decode(m, idx, 1, chunk=5), full, atol=_MODEL_ATOL, rtol=0)
    cache = m.make_cache(2, 24)
    for store in cache.layers:                                   # keys and values of each layer:
        assert [p.shape for p in store.parts] == [(2, m.config.n_kv_head, 24, 8)] * 2   # kv heads only


@_model_one_thread
def test_model_cached_decode_with_docs_and_runtime_window():
    m = _model_make(n_kv_head=2)
    idx = _model_tokens(1, 20)
    idx[0, [0, 6, 13]] = 0
    docs = M.doc_ids_from_bos(idx, 0)
    torch.testing.assert_close(_model_decode(m, idx, 9, doc_ids=docs), m(idx, doc_ids=docs),
                               atol=_MODEL_ATOL, rtol=0)
    # doc_ids given only at prefill: later tokens continue the last document
    cache = m.make_cache(1, 20)
    out = [m(idx[:, :15], cache=cache, doc_ids=docs[:, :15])]
    out += [m(idx[:, t:t + 1], cache=cache) for t in range(15, 20)]
    torch.testing.assert_close(torch.cat(out, 1), m(idx, doc_ids=docs), atol=_MODEL_ATOL, rtol=0)
    torch.testing.assert_close(_model_decode(m, idx, 4, window=3), m(idx, window=3), atol=_MODEL_ATOL, rtol=0)


@_model_one_thread
def test_model_cache_branch_equals_fresh_runs():
    m = _model_make(n_kv_head=2, window=6)
    prompt = _model_tokens(1, 9)
    cache = m.make_cache(1, 20)
    m(prompt, cache=cache)
    branched = cache.branch(3)
    assert branched.batch_size == 3 and branched.pos == 9 and cache.pos == 9
    cont = _model_tokens(3, 6, seed=5)
    got = torch.cat([m(cont[:, t:t + 1], cache=branched) for t in range(6)], dim=1)
    full = m(torch.cat([prompt.expand(3, -1), cont], dim=1))[:, 9:]
    torch.testing.assert_close(got, full, atol=_MODEL_ATOL, rtol=0)
    cache.reset()
    assert cache.pos == 0
    with pytest.raises(bpe.UserError, match="cache"):
        m(_model_tokens(1, 21), cache=cache)


@_model_one_thread
def test_model_kv_cache_bytes_per_token_matches_cache():
    m = _model_make(n_kv_head=2)
    for dtype in (torch.float32, torch.bfloat16):
        cache = m.make_cache(1, 10, dtype=dtype)
        real = sum(p.numel() * p.element_size() for store in cache.layers for p in store.parts) / 10
        assert m.kv_cache_bytes_per_token(dtype) == real

# ---------------------------------------------------------------------------- loss, MTP, accounting


@_model_one_thread
def test_model_loss_ignore_index_and_reduction():
    m = _model_make()
    idx = _model_tokens(2, 10)
    tgt = idx.roll(-1, 1)
    tgt[:, -1] = -1
    mean, aux = m(idx, tgt)
    none, _ = m(idx, tgt, reduction="none")
    total, _ = m(idx, tgt, reduction="sum")
    assert none.shape == (2, 10) and aux == {} and (none[:, -1] == 0).all()
    torch.testing.assert_close(mean, none.sum() / 18)
    torch.testing.assert_close(total, none.sum())
    logits = m(idx)
    torch.testing.assert_close(mean, F.cross_entropy(logits[:, :-1].reshape(-1, 61), tgt[:, :-1].reshape(-1)))


@_model_one_thread
def test_model_mtp_head_predicts_t_plus_2():
    m = _model_make(mtp=True)
    idx = _model_tokens(2, 10)
    tgt = idx.roll(-1, 1)
    loss, aux = m(idx, tgt)
    # by hand: hidden states before ln_f, the mtp block, shared ln_f + lm_head, targets shifted
    x = m.transformer.wte(idx)
    layout = m._layout(2, 10, 0, 0, None, None, idx.device)
    for b in m.transformer.h:
        x = b(x, layout)
    h2 = m.mtp(x, m.transformer.wte(tgt), layout)
    logits = m.lm_head(m.transformer.ln_f(h2))[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, 61), tgt[:, 1:].reshape(-1))
    torch.testing.assert_close(aux["mtp"], expected, atol=1e-5, rtol=0)
    aux["mtp"].backward()
    assert m.mtp.proj.weight.grad.abs().sum() > 0
    # an ignored target at t drops the t+2 prediction made from it
    tgt2 = tgt.clone()
    tgt2[:, 3] = -1
    _, aux2 = m(idx, tgt2)
    assert torch.isfinite(aux2["mtp"]) and not torch.isclose(aux2["mtp"], aux["mtp"])
    # a positive ignore_index (not a valid token id) must not reach the embedding lookup
    tgt3 = tgt.clone()
    tgt3[:, 4] = 99
    loss3, aux3 = m(idx, tgt3, ignore_index=99)
    assert torch.isfinite(loss3) and torch.isfinite(aux3["mtp"])


@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=True, norm_gain=True),
                                dict(mlp="swiglu", mtp=True, norm_gain=True),
                                dict(mlp="gelu", mlp_hidden=50, n_kv_head=1, qk_norm=False, norm_gain=True),
                                dict(window=8, mtp=True)])
@_model_one_thread
def test_model_param_formulas_match_count(kw):
    m = M.GPT(_model_cfg(**kw))
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    assert sum(m.num_params(by_component=True).values()) == m.num_params()
    assert m.flops_per_token() == m.flops_per_token(m.config.block_size)


def _model_counted_flops(B=2, T=16, **kw):
    """(model, config, B, T, {op name: FLOPs}) of one forward + backward of a hand-written-path
    model, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    m = M.GPT(_model_cfg(attn_impl="manual", **kw))
    idx = torch.randint(m.config.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        loss, aux = m(idx, idx)
        (loss + sum(aux.values())).backward()
    return m, m.config, B, T, {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@_model_one_thread
@pytest.mark.parametrize("kw", [{}, dict(n_kv_head=1, window=5), dict(mtp=True, mlp="swiglu"),
                                dict(mtp=True, tie_embeddings=True),
                                dict(n_experts=4, top_k=2, n_shared_experts=1, moe_hidden=24),
                                dict(n_experts=4, top_k=1, mtp=True, tie_embeddings=True),
                                dict(hc_streams=2, engram_layers="1", engram_rows=40, engram_dim=4),
                                dict(hc_streams=3, hc_dynamic=True, hc_sinkhorn=True, mtp=True,
                                     engram_layers="0,1", engram_heads=1, engram_rows=40, engram_dim=4,
                                     n_experts=4, top_k=1)])
def test_model_flops_counted_by_torch(kw):
    """flops_per_token against a count of the real thing: torch.utils.flop_counter counts every
    matmul of one forward + backward (the hand-written attention, so that the score matmuls are
    plain bmm calls). The weight matmuls (mm, addmm) must give 6 N_matmul per token exactly, MTP's
    second lm_head pass and the MoE experts each token really used included. The attention
    matmuls compute every (query, key) score, masked or not: 12 * layers * H * D * T per token;
    the formula keeps the visible share of it, ctx / T. Hyper-connections add their reads, mixes
    and dynamic projections as more mm and bmm calls; Engram's table lookups are no matmul."""
    m, c, B, T, by_op = _model_counted_flops(**kw)
    weights = (by_op.pop("aten.mm", 0) + by_op.pop("aten.addmm", 0)) / (B * T)
    batched = by_op.pop("aten.bmm", 0) / (B * T)
    assert not by_op, by_op   # no other kind of matmul went uncounted
    layers = c.n_layer + (1 if c.mtp else 0)
    scores = 12 * layers * c.n_head * c.head_dim * T
    assert batched == scores if c.hc_streams == 1 else batched > scores
    w = c.window if 0 < c.window < T else T
    visible = sum(min(t + 1, w) for t in range(T)) / T       # mean keys a query may see
    assert m.flops_per_token(T) == pytest.approx(weights + batched - scores + scores * visible / T, abs=1)


@_model_one_thread
def test_model_flops_hand_example():
    """By hand: 1 layer, C=8, 2 heads of 4, V=10, untied, relu2 (hidden 32), T=4.
    matmul params: c_attn 8*24 + c_proj 8*8 + c_fc 8*32 + c_proj 32*8 + lm_head 8*10 = 848.
    attention: ctx = (1+2+3+4)/4 = 2.5 keys; 12 * 1 layer * 2 heads * 4 dims * 2.5 = 240.
    total = 6 * 848 + 240 = 5328.
    With mtp=True: its block's matmuls 192 + 64 + 256 + 256 = 768, its proj (16 -> 8) 128, and
    lm_head again for the 3 of 4 positions that have a token t+2: 80 * 3/4 = 60; so
    6 * (848 + 768 + 128 + 60) = 10824, and attention in 2 layers, 480: total 11304."""
    cfg = M.GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_kv_head=2, n_embd=8)
    assert M.GPT(cfg).flops_per_token() == 5328
    assert M.GPT(dataclasses.replace(cfg, mtp=True)).flops_per_token() == 11304


@_model_one_thread
def test_model_optim_groups_cover_every_parameter_once():
    for kw in [{}, dict(tie_embeddings=True, norm_gain=True, mtp=True)]:
        m = M.GPT(_model_cfg(**kw))
        groups = m.optim_groups()
        seen = [id(p) for g in groups for p in g["params"]]
        assert sorted(seen) == sorted(id(p) for p in m.parameters())
        by = {g["name"]: g for g in groups}
        assert all(p.ndim == 2 for p in by["matrix"]["params"]) and by["matrix"]["optimizer"] == "muon"
        assert by["embed"]["params"] == [m.transformer.wte.weight] and by["embed"]["optimizer"] == "adamw"
        assert ("head" in by) == (not m.config.tie_embeddings)
        assert ("scalar" in by) == m.config.norm_gain
        assert all(g["optimizer"] == "adamw" for g in groups if g["name"] != "matrix")


@_model_one_thread
def test_model_init_starts_near_uniform():
    """Zero-initialised c_proj: every block starts as the identity, and the loss is ~ln(V)."""
    torch.manual_seed(0)
    m = M.GPT(_model_cfg())
    for b in m.transformer.h:
        assert (b.attn.c_proj.weight == 0).all() and (b.mlp.c_proj.weight == 0).all()
    idx = _model_tokens(2, 16)
    loss, _ = m(idx, idx)
    assert abs(loss.item() - math.log(61)) < 0.05


@_model_one_thread
def test_model_tiny_overfits_one_batch():
    torch.manual_seed(0)
    m = M.GPT(_model_cfg(vocab_size=32, n_embd=32, block_size=16, n_layer=1))
    idx = _model_tokens(4, 17, vocab=32, seed=3)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(300):
        loss, _ = m(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step + 1} steps"

# ---------------------------------------------------------------------------- the attention family

# One config per kind of layer (and a hybrid of all five letters): the parity tests run each.
_MODEL_KINDS = {
    "mla": dict(attn="mla", kv_lora_rank=12, qk_rope_head_dim=4),
    "mla_q_lora": dict(attn="mla", q_lora_rank=16, attn_gate="output", norm_gain=True),
    "linear_kernel": dict(attn="linear", linear_chunk=4),
    "linear_decay": dict(attn="linear", linear_kind="decay", linear_chunk=5, n_kv_head=2),
    "sparse": dict(sparse_block=4, sparse_local=1, sparse_global=1, n_kv_head=2),
    "hybrid": dict(layer_pattern="GWSML", n_layer=5, window=5, sparse_block=4, sparse_local=0,
                   linear_chunk=3, attn_gate="output_head", n_kv_head=2),
}


@pytest.mark.parametrize("case, bad, words", [
    ("a window with linear attention", dict(attn="linear", window=8), "window=8"),
    ("a letter that is no kind", dict(layer_pattern="LXG"), "'X' is not a layer kind"),
    ("a pattern longer than the model", dict(layer_pattern="LLLGG", n_layer=4), "more letters than n_layer"),
    ("a pattern and attn at once", dict(layer_pattern="LG", attn="mla"), "leave attn=softmax"),
    ("W layers without a window", dict(layer_pattern="WG"), "set window > 0"),
    ("a window no layer uses", dict(layer_pattern="GL", window=8), "add W to layer_pattern"),
    ("S layers without blocks", dict(layer_pattern="SG"), "set sparse_block > 0"),
    ("blocks no layer uses", dict(attn="mla", sparse_block=8), "sparse_block=0"),
    ("window and blocks at once", dict(window=8, sparse_block=8), "choose one of them"),
    ("an MLA width without MLA", dict(kv_lora_rank=16), "attn=mla"),
    ("an odd rope width", dict(attn="mla", qk_rope_head_dim=3), "qk_rope_head_dim=3 must be even"),
    ("a latent wider than K and V", dict(attn="mla", kv_lora_rank=999), "choose kv_lora_rank <= 64"),
    ("a query latent too wide", dict(attn="mla", q_lora_rank=999), "choose q_lora_rank <="),
    ("softcap on linear layers only", dict(attn="linear", attn_softcap=5.0), "attn_softcap=0"),
    ("an unknown kind", dict(attn="flash"), "choose one of softmax, mla, linear"),
    ("an unknown gate", dict(attn_gate="input"), "none, output, output_head"),
    ("an unknown linear form", dict(attn="linear", linear_kind="elu"), "kernel, decay"),
    ("an empty chunk", dict(attn="linear", linear_chunk=0), "linear_chunk=0"),
    ("the Triton kernel with no layer it runs", dict(attn="mla", attn_impl="triton"), "use attn_impl=sdpa"),
])
def test_model_attention_settings_rejected_with_one_line(case, bad, words):
    """Every bad combination of the attention family is one line that names the setting and says
    what to choose instead (through the command line too: a SettingsError)."""
    with pytest.raises(ValueError) as e:
        _model_cfg(**bad)
    assert words in str(e.value) and "\n" not in str(e.value), case
    argv = [f"--{k}={v}" for k, v in {**dict(vocab_size=61, n_embd=32), **bad}.items()]
    with pytest.raises(bpe.SettingsError, match=re.escape(words)):
        bpe.parse_settings(M.GPTConfig, argv)


@_model_one_thread
def test_model_layer_pattern_repeats_and_builds_each_kind():
    cfg = _model_cfg(layer_pattern="LLG", n_layer=5)
    assert cfg.layer_kinds == "LLGLL"
    m = M.GPT(_model_cfg(**_MODEL_KINDS["hybrid"]))
    kinds = [type(b.attn).__name__ + ":" + getattr(b.attn, "view", "") for b in m.transformer.h]
    assert kinds == ["CausalSelfAttention:full", "CausalSelfAttention:window", "CausalSelfAttention:sparse",
                     "MultiHeadLatentAttention:", "LinearAttention:"]
    moe = M.GPT(_model_cfg(layer_pattern="LG", n_layer=4, n_experts=4, top_k=1, moe_every=2))
    assert [type(b.mlp).__name__ for b in moe.transformer.h] == ["MLP", "MoE", "MLP", "MoE"]   # moe_every holds
    assert _model_cfg(window=4).layer_kinds == "WW" and _model_cfg(attn="linear").layer_kinds == "LL"
    # the run-time window reaches the window layers only; a model without any refuses it
    with pytest.raises(ValueError, match="no layer of this model .* is a sliding-window layer"):
        M.GPT(_model_cfg(layer_pattern="GL"))(_model_tokens(1, 8), window=4)
    with pytest.raises(bpe.SettingsError, match="--window_schedule changes the window of sliding-window layers"):
        bpe.parse_settings(train.TrainConfig, ["--attn=linear", "--window_schedule=[(0, 64)]"])


@pytest.mark.parametrize("kind", list(_MODEL_KINDS))
@_model_one_thread
def test_model_cached_decode_equals_full_forward_every_kind(kind):
    """The cache, for every kind and a hybrid of all five: prefill then one token at a time,
    prefill of 1 then chunks of 5 (past the window of 5, across sparse blocks and linear chunks),
    with packed documents, and branching one prompt into 3 rows; float32, tight."""
    m = _model_make(**_MODEL_KINDS[kind])
    idx = _model_tokens(2, 24)
    full = m(idx)
    torch.testing.assert_close(_model_decode(m, idx, 7), full, atol=_MODEL_ATOL, rtol=0)
    torch.testing.assert_close(_model_decode(m, idx, 1, chunk=5), full, atol=_MODEL_ATOL, rtol=0)
    idx[:, [0, 6, 13]] = 0
    docs = M.doc_ids_from_bos(idx, 0)
    torch.testing.assert_close(_model_decode(m, idx, 9, doc_ids=docs, chunk=2), m(idx, doc_ids=docs),
                               atol=_MODEL_ATOL, rtol=0)
    prompt, cont = idx[:1, :9], _model_tokens(3, 6, seed=5)
    cache = m.make_cache(1, 20)
    m(prompt, cache=cache)
    branched = cache.branch(3)
    got = torch.cat([m(cont[:, t:t + 1], cache=branched) for t in range(6)], dim=1)
    torch.testing.assert_close(got, m(torch.cat([prompt.expand(3, -1), cont], 1))[:, 9:],
                               atol=_MODEL_ATOL, rtol=0)
    cache.reset()      # after a reset the cache must forget everything (linear states too)
    torch.testing.assert_close(torch.cat([m(cont[:1, :4], cache=cache), m(cont[:1, 4:], cache=cache)], 1),
                               m(cont[:1]), atol=_MODEL_ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["mla", "linear_kernel", "linear_decay"])
@_model_one_thread
def test_model_document_masking_equals_separate_documents_every_kind(kind):
    """Packed documents with doc_ids give each document's logits as if it ran alone (for linear
    layers: a document start resets the state, inside a chunk and across chunks). Block-sparse
    layers are not in the list: their blocks are counted from the row's position 0, so a packed
    document's blocks depend on where it starts (section 5.1)."""
    m = _model_make(**_MODEL_KINDS[kind])
    docs = [torch.tensor(d) for d in ([0, 5, 9, 11, 4, 3, 8], [0, 7, 7, 2], [0, 1, 2, 3, 8, 6, 5, 9, 4])]
    packed = torch.cat(docs)[None]                                             # (1, 20)
    apart = torch.cat([m(d[None]) for d in docs], dim=1)
    torch.testing.assert_close(m(packed, doc_ids=M.doc_ids_from_bos(packed, 0)), apart, atol=_MODEL_ATOL, rtol=0)
    assert (m(packed) - apart).abs().max() > 1e-4                              # without doc_ids they differ


@_model_one_thread
def test_model_block_sparse_equals_dense_mask():
    """The gathered-blocks form of section 5.1 equals the same pattern as a dense mask, for
    queries at block boundaries or not (a cached chunk, one decoded token), with GQA, documents,
    both inner paths; and the worked examples of sparse_block_table and attention_mask hold."""
    ids, valid = M.sparse_block_table(1, 3, local=1, n_global=1)
    assert ids.tolist() == [[0, 0, 1], [0, 1, 2], [0, 2, 3]]
    assert valid.tolist() == [[True, False, True], [True, True, True], [True, True, True]]
    mask = M.attention_mask(torch.arange(6), torch.arange(6), sparse=(2, 0, 1))[0, 0]
    assert mask[5].tolist() == [1, 1, 0, 0, 1, 1] and mask[3].tolist() == [1, 1, 1, 1, 0, 0]
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D = 2, 4, 2, 8
    for sparse in [(4, 1, 1), (4, 0, 2), (3, 2, 0), (5, 0, 0)]:
        for pos, T in [(0, 23), (9, 1), (5, 11), (16, 4)]:
            q = torch.randn(B, H, T, D, generator=g)
            k, v = torch.randn(B, Hkv, pos + T, D, generator=g), torch.randn(B, Hkv, pos + T, D, generator=g)
            docs = torch.randint(0, 2, (B, pos + T), generator=g).cumsum(1) // 3     # a few documents
            for k_doc in (None, docs):
                q_doc = None if k_doc is None else k_doc[:, pos:]
                ref = M.block_sparse_reference(q, k, v, pos, sparse, q_doc, k_doc)
                for manual in (False, True):
                    got = M.block_sparse_attention(q, k, v, pos, sparse, k_doc, manual=manual)
                    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{sparse} {pos} {T}")
    # and it is sparse: a full causal mask gives other numbers at T = 23
    full = M.manual_attention(q, k, v, torch.ones(T, pos + T, dtype=torch.bool).tril(pos))
    assert (full - ref).abs().max() > 1e-3


@_model_one_thread
def test_model_mla_plain_absorbed_and_reference_agree():
    """MLA three ways: mla_reference (every head's keys and values materialised, one head at a
    time, as the paper writes it) == the layer's training form == cached decoding in the plain
    form (keys and values rebuilt from the cached latents) == cached decoding in the absorbed form
    (W_UK folded into the query, W_UV after the weighted sum; wkv_b never runs as a layer). The
    cache holds only the latent and the shared rope key per token."""
    for kw in (_MODEL_KINDS["mla"], _MODEL_KINDS["mla_q_lora"], dict(attn="mla", attn_softcap=3.0)):
        m = _model_make(**kw)
        attn = m.transformer.h[0].attn
        x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(2))
        layout = m._layout(2, 12, 0, 0, None, None, x.device)
        ref = M.mla_reference(attn, x, layout.mla_cos, layout.mla_sin)
        torch.testing.assert_close(attn(x, layout), ref, atol=_MODEL_ATOL, rtol=0)
        idx = _model_tokens(2, 16)
        full = m(idx)
        outs = {}
        for absorb in (False, True):
            for layer in m.transformer.h:
                layer.attn.absorb = absorb
            calls = []
            hook = attn.wkv_b.register_forward_hook(lambda *a: calls.append(1))
            outs[absorb] = _model_decode(m, idx, 5)
            hook.remove()
            assert bool(calls) == (not absorb)      # the absorbed form never rebuilds K and V
            torch.testing.assert_close(outs[absorb], full, atol=_MODEL_ATOL, rtol=0)
        _, r, _, dr, _ = m.config.mla_dims
        assert attn.absorbed_is_cheaper(1, 16) and not attn.absorbed_is_cheaper(400, 400)
        cache = m.make_cache(2, 16)
        assert [p.shape for p in cache.layers[0].parts] == [(2, 1, 16, r + dr)]
        assert m.kv_cache_bytes_per_token(torch.float32) == m.config.n_layer * (r + dr) * 4


@_model_one_thread
def test_model_linear_chunked_parallel_recurrent_agree():
    """Linear attention three ways (section 5.5): the O(T^2) parallel form, the token-by-token
    recurrence and the chunked form (any chunk size, with and without decay and documents, and
    split into two calls that hand the state over) give the same outputs; decay_matrix's worked
    example holds; and the kernel form's weights, normalised, are a causal distribution."""
    half = math.log(0.5)
    torch.testing.assert_close(M.decay_matrix(torch.tensor([half]), 3)[0],
                               torch.tensor([[1, 0, 0], [0.5, 1, 0], [0.25, 0.5, 1]]))
    g = torch.Generator().manual_seed(0)
    B, H, T, D, E = 2, 3, 13, 4, 5
    q, k = torch.rand(B, H, T, D, generator=g), torch.rand(B, H, T, D, generator=g)
    v = torch.randn(B, H, T, E, generator=g)
    docs = torch.tensor([[0] * 5 + [1] * 8, [0] * 2 + [1] * 9 + [2] * 2])
    for log_decay in (None, -torch.rand(H, generator=g)):
        for doc in (None, docs):
            par, w = M.linear_attention_parallel(q, k, v, log_decay, doc)
            torch.testing.assert_close(M.linear_attention_recurrent(q, k, v, log_decay, doc), par,
                                       atol=1e-5, rtol=0)
            for chunk in (1, 4, 6, 13, 20):
                y, _ = M.linear_attention_chunked(q, k, v, log_decay, chunk, doc=doc)
                torch.testing.assert_close(y, par, atol=1e-5, rtol=0)
            y1, state = M.linear_attention_chunked(q[:, :, :7], k[:, :, :7], v[:, :, :7], log_decay, 3,
                                                   doc=None if doc is None else doc[:, :7], need_state=True)
            y2, _ = M.linear_attention_chunked(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], log_decay, 4, state,
                                               None if doc is None else doc[:, 7:],
                                               None if doc is None else doc[:, 6:7])
            torch.testing.assert_close(torch.cat([y1, y2], 2), par, atol=1e-5, rtol=0)
    w = w / w.sum(-1, keepdim=True)            # the kernel form's weights (no decay, last doc set)
    assert (w >= 0).all() and w.triu(1).abs().max() == 0
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, T))
    x = torch.linspace(-30, 30, 121, dtype=torch.float64)
    torch.testing.assert_close(M.linear_feature(x), torch.where(x > 0, x + 1, x.exp()), rtol=0, atol=1e-12)


@_model_one_thread
def test_model_linear_decoding_state_has_a_constant_size():
    """A linear layer's cache is its state: the same tensor shape after 1 or 40 tokens, no
    per-position storage (no keys, no document ids), 0 KV bytes per token; and the decay form
    starts at RetNet's decays 1 - 2^-(5+h)."""
    m = _model_make(attn="linear", linear_kind="decay", block_size=64)
    cache = m.make_cache(1, 64)
    assert cache.doc is None and all(isinstance(s, M.StateStore) for s in cache.layers)
    m(_model_tokens(1, 1), cache=cache)
    shapes = [s.state.shape for s in cache.layers]
    for _ in range(39):
        m(_model_tokens(1, 1), cache=cache)
    assert [s.state.shape for s in cache.layers] == shapes == [(1, 4, 8, 8)] * 2
    assert m.kv_cache_bytes_per_token() == 0 and m.cache_state_bytes() == 2 * 4 * 8 * 8 * 4
    assert m.cache_bytes(4096) == m.cache_bytes(16)
    fresh = M.GPT(_model_cfg(attn="linear", linear_kind="decay"))
    gamma = torch.sigmoid(fresh.transformer.h[0].attn.decay.double())
    torch.testing.assert_close(gamma, 1 - 2.0 ** -torch.arange(5.0, 9.0, dtype=torch.float64))


@pytest.mark.parametrize("gate", ["output", "output_head"])
@_model_one_thread
def test_model_gate_starts_at_one_half(gate):
    """The output gate's initialisation (section 5.2): a fresh model's gate weights are zero, so
    every gate is exactly sigmoid(0) = 0.5 and a gated layer computes what the ungated one does
    with c_proj halved (for every kind); gradients reach the gate weights."""
    fresh = M.GPT(_model_cfg(layer_pattern="GML", n_layer=3, attn_gate=gate))
    assert all((b.attn.gate.weight == 0).all() for b in fresh.transformer.h)
    for kw in (dict(), dict(attn="mla"), dict(attn="linear"), dict(sparse_block=4)):
        plain = _model_make(**kw)
        gated = M.GPT(_model_cfg(attn_gate=gate, **kw))
        state = dict(plain.state_dict())
        for i, b in enumerate(gated.transformer.h):
            state[f"transformer.h.{i}.attn.gate.weight"] = b.attn.gate.weight.detach().clone()
        gated.load_state_dict(state)
        with torch.no_grad():
            for b in plain.transformer.h:
                b.attn.c_proj.weight.mul_(0.5)
        idx = _model_tokens(2, 12)
        torch.testing.assert_close(gated(idx), plain(idx), atol=_MODEL_ATOL, rtol=0)
        loss, _ = gated(idx, idx.roll(-1, 1))
        loss.backward()
        assert all(b.attn.gate.weight.grad.abs().sum() > 0 for b in gated.transformer.h), kw


@_model_one_thread
def test_model_record_attention_every_kind():
    """record_attention hands out one (B, H, T, T) map per layer for every kind: softmax layers'
    probabilities (the sparse layer's zeros exactly where its blocks are invisible), MLA's, and
    the linear kernel layer's normalised weights: every row a causal distribution."""
    m = _model_make(layer_pattern="SML", n_layer=3, sparse_block=4, sparse_local=0, sparse_global=1)
    idx = _model_tokens(2, 12)
    with M.record_attention(m) as probs:
        logits = m(idx)
    torch.testing.assert_close(logits, m(idx), atol=_MODEL_ATOL, rtol=0)
    assert len(probs) == 3 and all(p.shape == (2, 4, 12, 12) for p in probs)
    for p in probs:
        assert p.triu(1).abs().max() == 0 and (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 12))
    visible = M.attention_mask(torch.arange(12), torch.arange(12), sparse=(4, 0, 1))[0, 0]
    assert (probs[0][..., ~visible] == 0).all() and (probs[0][..., visible] > 0).all()


def _model_core_bmm_flops(m, T):
    """What the hand-written attention cores really compute per token (forward + backward), by
    hand from the shapes of their bmm calls: every score of a T x T (or chunk x chunk, or
    gathered-block) square, masked or not. flops_per_token counts only the visible ones."""
    c = m.config
    H, D = c.n_head, c.head_dim
    total = 0
    for kind in c.layer_kinds + (c.layer_kinds[-1] if c.mtp else ""):
        if kind == "M":
            _, _, dn, dr, dv = c.mla_dims
            total += 6 * H * (dn + dr + dv) * T                        # q k^T and p v over T keys
        elif kind == "L":
            E = D + (c.linear_kind == "kernel")
            sizes = [min(c.linear_chunk, T - a) for a in range(0, T, c.linear_chunk)]
            total += 6 * H * (D + E) * sum(n * n for n in sizes) / T   # chunk squares
            total += 6 * H * D * E * (2 * T - sizes[0] - sizes[-1]) / T  # read and write the state
        elif kind == "S":
            K = c.sparse_global + c.sparse_local + 1                   # gathered key blocks
            total += 12 * H * D * K * c.sparse_block
        else:
            total += 12 * H * D * T
    return total


@_model_one_thread
@pytest.mark.parametrize("kw", [dict(attn="mla", q_lora_rank=16), dict(attn="linear", linear_chunk=6),
                                dict(attn="linear", linear_kind="decay", linear_chunk=8, attn_gate="output"),
                                dict(sparse_block=4, sparse_local=1, sparse_global=1),
                                dict(layer_pattern="MLSG", n_layer=4, sparse_block=4, sparse_global=0,
                                     linear_chunk=5, attn_gate="output_head", mtp=True)])
def test_model_attention_flops_counted_by_torch(kw):
    """flops_per_token for every kind against torch.utils.flop_counter (as
    test_model_flops_counted_by_torch does for softmax): the weight matmuls (mm, addmm) are
    6 N_matmul per token exactly, gates and MLA's matrices included; the attention cores' bmm
    calls are what _model_core_bmm_flops works out by hand from their shapes; and the formula
    keeps the visible share of those (useful FLOPs)."""
    m, c, B, T, by_op = _model_counted_flops(**kw)
    weights = (by_op.pop("aten.mm", 0) + by_op.pop("aten.addmm", 0)) / (B * T)
    cores = by_op.pop("aten.bmm", 0) / (B * T)
    assert not by_op, by_op
    table = m.num_params(by_component=True, active=True)
    n_matmul = (sum(table.values()) - table["norm gains"] - table["embedding (wte)"]
                - table.get("linear decays", 0) + (c.vocab_size * c.n_embd * (T - 1) / T if c.mtp else 0))
    assert weights == pytest.approx(6 * n_matmul, abs=1)
    assert cores == pytest.approx(_model_core_bmm_flops(m, T), abs=1)
    useful = sum(m.attention_flops(k, T) for k in c.layer_kinds + (c.layer_kinds[-1] if c.mtp else ""))
    assert 0 < useful < cores and m.flops_per_token(T) == pytest.approx(weights + useful, abs=1)


@_model_one_thread
def test_model_attention_accounting_by_hand():
    """One small config of each kind, counted on paper. C=8, 2 heads of D=4, V=10, 1 layer,
    relu2 MLP (8 -> 32 -> 8: 512 weights), lm_head 80; T = 4 unless said.
    softmax (the baseline): c_attn 8*24 + c_proj 64 = 256; 6*(256+512+80) + 12*2*4*2.5 = 5328.
    gate output: + W_g 8*8 = 64 -> + 6*64 = 384: 5712; output_head: W_g 8*2 = 16: 5424.
    MLA, kv_lora_rank 4, qk_rope 2 (nope 4, v 4): wq 8*2*6 = 96, wkv_a 8*6 = 48, wkv_b 4*2*8 = 64,
      c_proj 64 -> 272; 6*(272+592) = 5184 + 6*2*(4+2+4)*2.5 = 300 -> 5484.
      KV cache: 4 + 2 = 6 numbers per token (softmax: 2*2*4 = 16): 24 bytes fp32.
    linear kernel, chunk 2: matrices as softmax (256); chunks [2, 2], visible pairs (1+2)*2/4 = 1.5
      per token, E = 5 (the normaliser column), state read by 2 of 4 tokens, written by 2 of 4:
      6*2*((4+5)*1.5 + 4*5*1) = 402 -> 5088 + 402 = 5490. KV bytes per token 0; state
      2 heads * 4 * 5 * 4 bytes = 160 bytes at any context.
    linear decay, chunk 4 (one chunk): E = 4, 6*2*(8*2.5) = 240 -> 5328; + 2 decays (not FLOPs).
    sparse, block 2, local 0, global 1, T = 6: keys seen 1, 2, 3, 4, 2+1, 2+2 = 17 in all:
      12*2*4*17/6 = 272 -> 5088 + 272 = 5360 (full causal: 12*2*4*3.5 = 336)."""
    base = dict(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_kv_head=2, n_embd=8)
    count = lambda **kw: M.GPT(M.GPTConfig(**{**base, **kw}))
    assert count().flops_per_token() == 5328
    assert count(attn_gate="output").flops_per_token() == 5712
    assert count(attn_gate="output_head").flops_per_token() == 5424
    mla = count(attn="mla", kv_lora_rank=4, qk_rope_head_dim=2)
    assert mla.num_params(by_component=True)["attention (mla)"] == 272 and mla.flops_per_token() == 5484
    assert mla.kv_cache_bytes_per_token(torch.float32) == 24 and count().kv_cache_bytes_per_token(torch.float32) == 64
    lin = count(attn="linear", linear_chunk=2)
    assert lin.flops_per_token() == 5490 and lin.kv_cache_bytes_per_token() == 0 and lin.cache_state_bytes() == 160
    decay = count(attn="linear", linear_kind="decay", linear_chunk=4)
    assert decay.flops_per_token() == 5328 and decay.num_params(by_component=True)["linear decays"] == 2
    assert count(block_size=6, sparse_block=2, sparse_local=0, sparse_global=1).flops_per_token() == 5360
    assert count(block_size=6).flops_per_token() == 5088 + 336
    for kw in _MODEL_KINDS.values():       # and the formulas count every real parameter
        m = M.GPT(_model_cfg(**kw))
        assert m.num_params() == sum(p.numel() for p in m.parameters()), kw


@_model_one_thread
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's imports
def test_model_compile_and_bf16_every_kind():
    """The new kinds under torch.compile (block-sparse, MLA and linear layers with a gate, traced
    whole: fullgraph, forward and backward through AOT autograd, the same numbers and gradients
    as eager; the softmax layers are compiled by the default-settings training tests) and every
    kind under CPU bf16 autocast (finite, and close to float32)."""
    m = _model_make(layer_pattern="SML", n_layer=3, sparse_block=4, linear_chunk=8, attn_gate="output",
                    n_kv_head=2).train()
    idx = _model_tokens(2, 16)
    torch.compiler.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    loss_c, _ = compiled(idx, idx.roll(-1, 1))
    loss_c.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    loss_e, _ = m(idx, idx.roll(-1, 1))
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=0)
    for gc, (name, p) in zip(grads, m.named_parameters()):
        torch.testing.assert_close(gc, p.grad, atol=1e-4, rtol=1e-4, msg=name)
    torch.compiler.reset()
    m = _model_make(**_MODEL_KINDS["hybrid"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(idx)
    assert torch.isfinite(low).all() and (low - m(idx)).abs().max() < 0.2
@pytest.mark.parametrize("tie", [False, True])
def test_model_grow_vocab_rows_are_the_mean(tie):
    """model.grow_vocab (a base model's tokenizer gains chat tokens): the new rows of wte and lm_head
    are the mean of the trained ones (one shared matrix when tied), the old ids' logits do not
    move, each new token starts at most as likely as an average one (p <= 1/V_old, Jensen), and
    padding rows that were never trained are reset as well."""
    torch.manual_seed(0)
    m = M.GPT(_model_cfg(vocab_size=64, tie_embeddings=tie)).eval()   # ids 61..63: padding, untrained
    with torch.no_grad():
        m.lm_head.weight.normal_(0.0, 1.0)              # spread logits: the bound is not trivially met
    old_wte, old_head = m.transformer.wte.weight.clone(), m.lm_head.weight.clone()
    idx = _model_tokens(2, 16)
    before = m(idx)
    assert M.grow_vocab(m, 61, 66) is m and m.config.vocab_size == 66
    wte, head = m.transformer.wte.weight, m.lm_head.weight
    assert wte.shape == head.shape == (66, 32) and (head is wte) == tie
    assert torch.equal(wte[:61], old_wte[:61]) and torch.equal(head[:61], old_head[:61])
    for k in range(61, 66):
        assert torch.allclose(wte[k], old_wte[:61].mean(0)) and torch.allclose(head[k], old_head[:61].mean(0))
    after = m(idx)
    assert torch.allclose(after[..., :61], before[..., :61], atol=1e-6)   # the inputs are old ids
    assert (torch.softmax(after, -1)[..., 61:] <= 1 / 61 + 1e-7).all()
    loss, _ = m(idx, idx)
    loss.backward()                                      # the grown rows are ordinary parameters
    assert wte.grad is not None and head.grad is not None
    with pytest.raises(ValueError, match="n_trained"):
        M.grow_vocab(m, 70, 66)


# ---------------------------------------------------------------------------- mixture of experts

_MODEL_MOE = dict(n_experts=4, top_k=2, moe_every=2, n_shared_experts=1, moe_hidden=24,
                  capacity_factor=1.0, n_layer=3)


@pytest.mark.parametrize("kw", [dict(_MODEL_MOE),
                                dict(_MODEL_MOE, mlp="swiglu", top_k=1, moe_every=1, n_kv_head=2)])
@_model_one_thread
def test_model_moe_cached_decode_equals_full_forward(kw):
    """Guards batch-dependence in MoE inference: with a capacity factor, dropping in eval mode
    would make a token's output depend on its neighbours and break cached decoding."""
    m = _model_make(**kw)
    assert len(m.moe_layers()) == (1 if kw["moe_every"] == 2 else 3)
    with torch.no_grad():
        for layer in m.moe_layers():
            layer.expert_bias.copy_(torch.tensor([0.2, -0.1, 0.0, 0.3]))
    idx = _model_tokens(2, 16)
    full = m(idx)
    torch.testing.assert_close(_model_decode(m, idx, 5), full, atol=_MODEL_ATOL, rtol=0)
    # the vectorised layers inside the model equal the per-token reference loop
    x = torch.randn(2, 6, 32)
    for layer in m.moe_layers():
        torch.testing.assert_close(layer(x), M.moe_reference(layer, x), atol=1e-5, rtol=0)


@_model_one_thread
def test_model_moe_aux_losses_summed_over_layers_and_trainable():
    m = _model_make(**dict(_MODEL_MOE, moe_every=1)).train()
    idx = _model_tokens(2, 16)
    loss, aux = m(idx, idx.roll(-1, 1))
    layers = m.moe_layers()
    assert len(layers) == 3 and set(aux) == {"moe_aux", "moe_z"}
    torch.testing.assert_close(aux["moe_aux"], sum(layer.aux["moe_aux"] for layer in layers))
    torch.testing.assert_close(aux["moe_z"], sum(layer.aux["moe_z"] for layer in layers))
    assert sum(int(layer.stats["dropped"]) for layer in layers) > 0  # capacity 1.0 drops in training
    (loss + 0.01 * aux["moe_aux"]).backward()
    for layer in layers:
        assert layer.router.weight.grad.abs().sum() > 0 and layer.c_fc.grad.abs().sum() > 0


@pytest.mark.parametrize("kw", [dict(_MODEL_MOE),
                                dict(_MODEL_MOE, mlp="swiglu", moe_hidden=0, n_shared_experts=0,
                                     tie_embeddings=True, mtp=True, norm_gain=True)])
@_model_one_thread
def test_model_moe_active_and_total_params_match_count(kw):
    m = M.GPT(_model_cfg(**kw))
    c = m.config
    total = sum(p.numel() for p in m.parameters())
    assert m.num_params() == total
    # active = total minus the routed experts a token does not use, counted from the tensors
    unused = 0
    for layer in m.moe_layers():
        per_expert = sum(w[0].numel() for w in (layer.c_fc, layer.c_gate, layer.c_proj) if w is not None)
        unused += (layer.n_experts - layer.top_k) * per_expert
    assert unused > 0 and m.num_params(active=True) == total - unused
    assert sum(m.num_params(by_component=True, active=True).values()) == total - unused
    # FLOPs count only the active experts (test_model_flops_counted_by_torch counts them for real)
    T = 16
    every_expert = M.GPT(dataclasses.replace(c, top_k=c.n_experts)).flops_per_token(T)
    assert every_expert - m.flops_per_token(T) == pytest.approx(6 * unused, abs=1)


@_model_one_thread
def test_model_moe_optim_groups():
    m = M.GPT(_model_cfg(**_MODEL_MOE))
    by = {g["name"]: g for g in m.optim_groups()}
    seen = [id(p) for g in by.values() for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in m.parameters())
    assert by["router"]["optimizer"] == "adamw" and by["expert"]["optimizer"] == "muon"
    assert [id(p) for p in by["router"]["params"]] == [id(layer.router.weight) for layer in m.moe_layers()]
    assert any(p.ndim == 3 for p in by["expert"]["params"])
    assert all(p.ndim == 2 for p in by["matrix"]["params"])

# ---------------------------------------------------------------------------- hyper-connections, Engram
# model.py sections 7b (hc_streams) and 7c (engram_layers).

_MODEL_MEM = dict(engram_ngram="2,3", engram_heads=2, engram_rows=37, engram_dim=4)


def _model_with_memory(seed=0, **kw):
    """_model_make with Engram memory (small tables) and whatever else kw asks for."""
    return _model_make(seed, **{**_MODEL_MEM, **kw})


@_model_one_thread
def test_model_hc_engram_bad_settings_are_one_line():
    cases = {"hc_streams": dict(hc_streams=0), "hc_streams to 2": dict(hc_dynamic=True),
             "hc_sinkhorn_iters": dict(hc_streams=2, hc_sinkhorn=True, hc_sinkhorn_iters=0),
             "out of range": dict(engram_layers="2"), "twice": dict(engram_layers="0,0"),
             "comma-separated": dict(engram_layers="one"), "from 2": dict(engram_layers="0", engram_ngram="1,2"),
             "to 8": dict(engram_layers="0", engram_ngram="9"), "engram_ngram is empty": dict(engram_layers="0", engram_ngram=""),
             "engram_rows": dict(engram_rows=0), "engram_heads": dict(engram_heads=0),
             "engram_dim": dict(engram_dim=0), "64-bit": dict(engram_rows=2 ** 31)}
    for words, kw in cases.items():
        with pytest.raises(ValueError, match=words) as e:
            _model_cfg(**kw)
        assert "\n" not in str(e.value)
    with pytest.raises(bpe.SettingsError, match="out of range"):
        bpe.parse_settings(M.ModelSettings, ["--engram_layers=1,4"])
    assert _model_cfg(engram_layers=1).engram_layer_ids == (1,)   # a --sweep entry may give an int


@pytest.mark.parametrize("kw", [dict(hc_streams=2), dict(hc_streams=4), dict(hc_streams=4, hc_dynamic=True),
                                dict(hc_streams=2, hc_sinkhorn=True),
                                dict(hc_streams=4, hc_dynamic=True, hc_sinkhorn=True, norm_gain=True),
                                dict(hc_streams=2, hc_dynamic=True, engram_layers="1", **_MODEL_MEM)])
@_model_one_thread
def test_model_hc_starts_as_single_stream(kw):
    """Section 7b's initialisation: n streams with the documented read/write/mix start as the one-
    stream model. Every other weight is random (a zero c_proj would make it trivially true), and
    the logits must be bitwise equal. The hyper-connection weights get gradients, so training can
    move away from the single stream."""
    one = _model_make(**{k: v for k, v in kw.items() if not k.startswith("hc_")})
    many = M.GPT(dataclasses.replace(one.config, **kw)).eval()
    missing, unexpected = many.load_state_dict(one.state_dict(), strict=False)
    assert not unexpected and missing and all(".hc_" in k for k in missing)
    idx = _model_tokens(2, 16)
    assert torch.equal(many(idx), one(idx))
    loss, _ = many.train()(idx, idx.roll(-1, 1))
    loss.backward()
    for hc in [m for m in many.modules() if isinstance(m, M.HyperConnection)]:
        assert hc.read.grad.abs().sum() > 0 and hc.write.grad.abs().sum() > 0
        assert hc.dyn is None or hc.dyn.weight.grad.abs().sum() > 0
    # and from one seed, the real init gives both models the same other weights (paired seeds)
    torch.manual_seed(1)
    plain = M.GPT(_model_cfg(**{k: v for k, v in kw.items() if not k.startswith(("hc_", "engram_"))}))
    torch.manual_seed(1)
    streams = M.GPT(dataclasses.replace(plain.config, **kw))
    mine = streams.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("kw", [dict(hc_dynamic=True), dict(hc_dynamic=True, hc_sinkhorn=True, hc_sinkhorn_iters=3),
                                dict(hc_sinkhorn=True)])
@_model_one_thread
def test_model_hc_einsums_equal_stream_loop_reference(kw):
    cfg = _model_cfg(hc_streams=3, **kw)
    hc = M.HyperConnection(cfg, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hc.parameters():
            p.copy_(torch.randn_like(p))
    H = torch.randn(2, 5, 3, 32)
    f = torch.nn.Linear(32, 32)
    torch.testing.assert_close(hc(H, f), M.hc_reference(hc, H, f), atol=1e-5, rtol=0)


@_model_one_thread
def test_model_sinkhorn_doubly_stochastic_and_equals_reference():
    logits = torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(0))
    m = M.sinkhorn(logits, 20)
    assert (m >= 0).all()
    torch.testing.assert_close(m.sum(-1), torch.ones(6, 4), atol=1e-5, rtol=0)   # rows
    torch.testing.assert_close(m.sum(-2), torch.ones(6, 4), atol=1e-5, rtol=0)   # columns
    for i in range(6):
        torch.testing.assert_close(m[i].double(), M.sinkhorn_reference(logits[i], 20), atol=1e-6, rtol=0)
    assert (M.sinkhorn(logits, 1).sum(-2) - 1).abs().max() > 1e-3   # one round is not yet converged


@_model_one_thread
def test_model_sinkhorn_worked_example():
    """Section 7b's 2 x 2 example, by hand: exp(logits) = [[4, 1], [1, 1]]."""
    logits = torch.tensor([[4.0, 1.0], [1.0, 1.0]]).log()
    torch.testing.assert_close(M.sinkhorn(logits, 1), torch.tensor([[28 / 41, 13 / 41], [0.35, 0.65]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(M.sinkhorn(logits, 50), torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]),
                               atol=1e-6, rtol=0)


@_model_one_thread
def test_model_engram_hash_worked_example():
    """Section 7c's worked example, then: the vectorised hash equals the definition on many
    n-grams, is a pure function of the ids (no seed, no state), and differs between heads."""
    assert M.engram_multiplier(0, 0) == 2654435761 and M.engram_multiplier(0, 1) == 3668339987
    assert (42 * 2654435761) % 2 ** 32 == 4112119562 and (17 * 3668339987) % 2 ** 32 == 2232237635
    assert 4112119562 ^ 2232237635 == 1880410441 and 1880410441 * 1000 >> 32 == 437
    assert M.engram_hash_one([42, 17], 0, 1000) == 437
    assert M.engram_hash_one([42, 17], 1, 1000) == 848 and M.engram_hash_one([17, 42], 0, 1000) == 370
    grams = torch.randint(0, 50000, (300, 3), generator=torch.Generator().manual_seed(0))
    mult = torch.tensor([[M.engram_multiplier(s, i) if i < n else 0 for i in range(3)]
                         for s, n in ((0, 2), (1, 2), (2, 3))])
    rows = M.engram_hash(grams, mult, 1000)                                  # (300, 3)
    torch.manual_seed(123)
    assert torch.equal(M.engram_hash(grams.clone(), mult, 1000), rows)
    for h, (s, n) in enumerate(((0, 2), (1, 2), (2, 3))):
        assert rows[:, h].tolist() == [M.engram_hash_one(g[:n], s, 1000) for g in grams.tolist()]
    assert (rows[:, 0] != rows[:, 1]).float().mean() > 0.9     # two heads: two different hashes
    assert rows.min() >= 0 and rows.max() < 1000 and len(set(rows[:, 0].tolist())) > 200
    # the n-gram context of the docstring
    grams, history = M.ngram_context(torch.tensor([[5, 6, 7]]), 3, 9)
    assert grams.tolist() == [[[5, 9, 9], [6, 5, 9], [7, 6, 5]]] and history[0].tolist() == [[6, 7]]


@_model_one_thread
def test_model_engram_equals_position_loop_reference():
    """The vectorised lookup + gate of a whole layer equals a loop over positions that reads
    each n-gram off the id list and hashes it with the plain-integer definition."""
    m = _model_with_memory(engram_layers="1")
    layer = m.transformer.h[1].engram
    idx = _model_tokens(2, 9)
    x = torch.randn(2, 9, 32)
    grams, _ = M.ngram_context(idx, m.config.engram_span, m.config.vocab_size)
    torch.testing.assert_close(layer(x, grams), M.engram_reference(layer, idx, x, m.config.vocab_size),
                               atol=1e-5, rtol=0)
    before = m(idx)                      # and the memory is live in the model
    with torch.no_grad():
        layer.c_proj.weight.zero_()
    assert (m(idx) - before).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [dict(engram_layers="0,1"),
                                dict(engram_layers="1", hc_streams=2, hc_dynamic=True, hc_sinkhorn=True, n_kv_head=2),
                                dict(engram_layers="0", engram_ngram="3", hc_streams=3, window=5)])
@_model_one_thread
def test_model_memory_and_streams_cached_decode_equals_full_forward(kw):
    """Guards the n-gram history in the cache: prefill, one token or 5 at a time, branching into
    3 rows, documents (a new document's n-grams must not reach into the previous one).
    The dynamic projections are scaled down: at the full random scale Sinkhorn's logits are so
    large that a 1e-6 change of the input moves some logits by 1e-3, and any two summation orders
    (cached and uncached attention) would differ by more than the tolerance."""
    m = _model_with_memory(**kw)
    with torch.no_grad():
        for hc in m.modules():
            if isinstance(hc, M.HyperConnection) and hc.dyn is not None:
                hc.dyn.weight.mul_(0.1)
    idx = _model_tokens(2, 24)
    full = m(idx)
    torch.testing.assert_close(_model_decode(m, idx, 7), full, atol=_MODEL_ATOL, rtol=0)
    torch.testing.assert_close(_model_decode(m, idx, 1, chunk=5), full, atol=_MODEL_ATOL, rtol=0)
    cache = m.make_cache(1, 24)
    m(idx[:1, :9], cache=cache)
    branched = cache.branch(3)
    cont = _model_tokens(3, 6, seed=5)
    got = torch.cat([m(cont[:, t:t + 1], cache=branched) for t in range(6)], dim=1)
    torch.testing.assert_close(got, m(torch.cat([idx[:1, :9].expand(3, -1), cont], 1))[:, 9:],
                               atol=_MODEL_ATOL, rtol=0)
    cache.reset()
    assert cache.ngram is None
    idx[0, [0, 6, 13]] = 0
    docs = M.doc_ids_from_bos(idx, 0)
    together = m(idx, doc_ids=docs)
    torch.testing.assert_close(_model_decode(m, idx, 9, doc_ids=docs), together, atol=_MODEL_ATOL, rtol=0)
    apart = torch.cat([m(idx[:1, a:b]) for a, b in ((0, 6), (6, 13), (13, 24))], dim=1)
    torch.testing.assert_close(together[:1], apart, atol=_MODEL_ATOL, rtol=0)


@_model_one_thread
def test_model_hc_engram_accounting_by_hand():
    """By hand: 1 layer, C=8, 2 heads of 4, V=10, untied, relu2 (hidden 32), T=4 (the example of
    test_model_flops_hand_example: 848 matmul params, attention 240 FLOPs), plus 2 dynamic streams
    and Engram in layer 0 with one order (2), one head, 5 rows of width 3.
    params: wte 80, attention 8*24 + 8*8 = 256, mlp 2*8*32 = 512, lm_head 80;
      hyper-connections: 3 sublayers (memory, attention, MLP) x (read 2 + write 2 + mix 4 +
      projection 8*(2+2) + 3 scales) = 3 * 43 = 129;  Engram: c_key + c_proj 2*3*8 = 48,
      table 5*3 = 15 (memory; a token reads 1 row of 3).
      total 80 + 256 + 512 + 80 + 129 + 48 + 15 = 1120, active 1120 - 15 + 3 = 1108, dense 1105.
    FLOPs: matmuls 6 * (848 + 48) = 5376, attention 240, hyper-connections per sublayer
      6 * (read 2*8 + mix 4*8 + projection 2*8*4) = 6 * 112 = 672, times 3 = 2016: total 7632.
    cache: the n-gram history keeps 1 id and its document id per row: 16 bytes."""
    cfg = M.GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_kv_head=2, n_embd=8,
                      hc_streams=2, hc_dynamic=True, engram_layers="0", engram_ngram="2",
                      engram_heads=1, engram_rows=5, engram_dim=3)
    m = M.GPT(cfg)
    assert m.num_params() == 1120 == sum(p.numel() for p in m.parameters())
    assert m.param_summary() == {"dense": 1105, "memory": 15, "total": 1120, "active": 1108}
    assert m.num_params(by_component=True)["hyper-connections"] == 129
    assert m.flops_per_token() == 7632
    assert m.cache_bytes_per_row() == 16
    cache = m.make_cache(3, 4)
    m(torch.zeros(3, 2, dtype=torch.long), cache=cache)
    assert sum(t.numel() * t.element_size() for t in cache.ngram) == 3 * 16
    table = M.architecture_table(m)
    assert "engram tables (memory)" in table and "dense 1,105 + memory 15" in table


@_model_one_thread
def test_model_hc_engram_optim_groups():
    """Engram's tables are embeddings: AdamW ("memory"), never Muon; its projections are hidden
    matrices (Muon); hyper-connection coefficients and the dynamic projections go to AdamW."""
    m = M.GPT(_model_cfg(hc_streams=2, hc_dynamic=True, engram_layers="0,1", norm_gain=True, **_MODEL_MEM))
    by = {g["name"]: g for g in m.optim_groups()}
    seen = [id(p) for g in by.values() for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in m.parameters())
    engrams = [b.engram for b in m.transformer.h]
    assert [id(p) for p in by["memory"]["params"]] == [id(e.tables) for e in engrams]
    assert by["memory"]["optimizer"] == by["hc"]["optimizer"] == by["hc_dyn"]["optimizer"] == "adamw"
    matrix = {id(p) for p in by["matrix"]["params"]}
    assert all(id(e.c_key.weight) in matrix and id(e.c_proj.weight) in matrix for e in engrams)
    hcs = [x for x in m.modules() if isinstance(x, M.HyperConnection)]
    assert len(hcs) == 6 and {id(h.dyn.weight) for h in hcs} == {id(p) for p in by["hc_dyn"]["params"]}
    assert {id(h.mix) for h in hcs} <= {id(p) for p in by["hc"]["params"]}


@_model_one_thread
def test_model_hc_engram_bf16_autocast_keeps_streams_float32():
    """Under CPU bf16 autocast (the Runtime's choice on AMX CPUs) the streams stay float32: the
    read and the mix are matmuls that autocast would otherwise round to bf16 at every sublayer.
    Forward and backward run, and the logits stay near float32's."""
    m = _model_with_memory(hc_streams=2, hc_dynamic=True, hc_sinkhorn=True, engram_layers="1").train()
    idx = _model_tokens(2, 12)
    dtypes = []
    for hc in [x for x in m.modules() if isinstance(x, M.HyperConnection)]:
        hc.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(idx)
        loss, _ = m(idx, idx.roll(-1, 1))
    loss.backward()
    assert set(dtypes) == {torch.float32} and len(dtypes) == 2 * 5
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    torch.testing.assert_close(logits, m(idx), atol=0.1, rtol=0.05)


@_model_one_thread
def test_model_hc_engram_compile_fullgraph_equals_eager():
    """Smoke test of torch.compile on both features: the whole forward + backward is one graph
    (fullgraph: no graph break in the hash, the Sinkhorn rounds or the stream mixing), and gives
    eager's loss and gradients. aot_eager traces what inductor would get (dynamo + the autograd
    graph) without inductor's C++ build, which takes minutes for these graphs on a CPU runner."""
    m = _model_with_memory(hc_streams=2, hc_dynamic=True, hc_sinkhorn=True, hc_sinkhorn_iters=2,
                           engram_layers="0", n_layer=1).train()
    idx = _model_tokens(2, 12)
    loss, _ = m(idx, idx.roll(-1, 1))
    grads = torch.autograd.grad(loss, list(m.parameters()))
    torch.compiler.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    loss_c, _ = compiled(idx, idx.roll(-1, 1))
    grads_c = torch.autograd.grad(loss_c, list(m.parameters()))
    torch.testing.assert_close(loss_c, loss, atol=1e-6, rtol=0)
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(gc, g, atol=1e-6, rtol=0)
    torch.compiler.reset()

# ---------------------------------------------------------------------------- Triton flash attention
# model.py section 5b. The kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set at the
# top of this file), on small shapes: it executes the same kernel code with numpy, one program at
# a time.

try:
    import triton  # noqa: F401  (only to know whether the kernel tests can run)
    _FLASH_MISSING = None
except ImportError as e:
    _FLASH_MISSING = f"triton cannot be imported ({e}); pip install triton to run the kernel tests"
_needs_triton = pytest.mark.skipif(_FLASH_MISSING is not None, reason=_FLASH_MISSING or "")


def _flash_case(B, H, Hkv, Tq, D, Tk=None, q_off=None, k_off=0, window=0, n_global=0, docs=False,
                dtype=torch.float32, seed=0):
    """Random q, k, v (requires_grad), the mask arguments, and section 4's mask for them."""
    g = torch.Generator().manual_seed(seed)
    Tk = Tk or Tq
    q_off = k_off + Tk - Tq if q_off is None else q_off      # the queries are the last Tq keys
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype).requires_grad_()
    k_doc = torch.randint(0, 3, (B, Tk), generator=g).sort(dim=1).values if docs else None
    q_doc = k_doc[:, Tk - Tq:] if docs else None
    mask = M.attention_mask(torch.arange(q_off, q_off + Tq), torch.arange(k_off, k_off + Tk),
                            window, n_global, q_doc, k_doc)
    return (q, k, v), (q_off, k_off, window, n_global, q_doc, k_doc), mask


def _flash_fwd_bwd(attn, qkv, do):
    out = attn(*qkv)
    return (out, *torch.autograd.grad(out, qkv, do))


_FLASH_CASES = [  # B, H, Hkv, Tq, D, extra; blocks are 64 rows, so 63, 65 and 200 end mid-block
    (1, 1, 1, 1, 16, {}),
    (1, 1, 1, 63, 16, {}),
    (2, 2, 1, 65, 32, {}),                                    # GQA, 2 query heads per kv head
    (1, 2, 1, 200, 16, dict(window=16)),                      # GQA + window: blocks skipped
    (1, 1, 1, 200, 16, dict(window=16, n_global=4)),          # the global prefix loop too
    (2, 1, 1, 130, 48, dict(docs=True)),                      # documents; head_dim 48 (padded to 64)
    (1, 1, 1, 65, 128, {}),
    (1, 2, 1, 1, 16, dict(Tk=70)),                            # one cached token decoding
    (1, 1, 1, 5, 16, dict(Tk=90, k_off=10, window=20)),       # a cached chunk, window-trimmed cache
]


@_needs_triton
@pytest.mark.parametrize("B,H,Hkv,Tq,D,extra", _FLASH_CASES)
@_model_one_thread
def test_model_flash_attention_equals_manual(B, H, Hkv, Tq, D, extra):
    """Output, the saved log-sum-exp, and dQ, dK, dV equal manual_attention's in float32."""
    qkv, where, mask = _flash_case(B, H, Hkv, Tq, D, **extra)
    do = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(1))
    got = _flash_fwd_bwd(lambda q, k, v: M.flash_attention(q, k, v, *where), qkv, do)
    want = _flash_fwd_bwd(lambda q, k, v: M.manual_attention(q, k, v, mask), qkv, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    q, k, v = qkv
    _, lse2 = M._flash_forward(q.detach(), k.detach(), v.detach(), where[:4], *where[4:])
    scores = (q @ k.repeat_interleave(H // Hkv, 1).transpose(-2, -1)) * D ** -0.5
    lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)          # natural log
    torch.testing.assert_close(lse2 * math.log(2), lse.detach(), atol=1e-5, rtol=1e-5)


@_needs_triton
@_model_one_thread
def test_model_flash_attention_worked_example():
    """Section 5b's worked example, by hand: D = 1, the last query (q = 1) sees keys [1, 2, 4, 3]
    with values [1, 1, 0, 0], so O = (e + e^2) / (e + e^2 + e^4 + e^3) = 0.1192 and
    LSE = ln(e + e^2 + e^4 + e^3) = ln(84.79) = 4.440."""
    q = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 4, 1)
    k = torch.tensor([1.0, 2.0, 4.0, 3.0]).view(1, 1, 4, 1)
    v = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 4, 1)
    M._flash_ready(q.device)                  # what flash_attention does first: define the kernels
    o, lse2 = M._flash_forward(q, k, v, (0, 0, 0, 0), None, None)
    assert o[0, 0, 3, 0].item() == pytest.approx(0.1192, abs=1e-4)
    assert lse2[0, 0, 3].item() * math.log(2) == pytest.approx(4.440, abs=1e-3)
    assert o[0, 0, :3, 0].tolist() == pytest.approx([1.0, 1.0, 2 / 3])  # q = 0: equal weights


@_needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@_model_one_thread
def test_model_flash_attention_half_precision_bound(dtype):
    """16-bit inputs, float32 accumulation. The stated bound: for the output and each gradient,
    max |kernel - exact| <= 2 eps max |exact|, eps = torch.finfo(dtype).eps (2^-7 for bfloat16,
    2^-10 for float16) and exact = float64 attention of the same rounded inputs. The kernel rounds
    P to the input dtype before P V, and dS before dS K, as manual_attention in that dtype rounds
    its probabilities and score gradients; measured here it stays within 1.4 eps (manual: 0.7)."""
    (q, k, v), where, mask = _flash_case(1, 2, 1, 100, 64, window=40, n_global=3, dtype=dtype)
    do = torch.randn(1, 2, 100, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = _flash_fwd_bwd(lambda q, k, v: M.flash_attention(q, k, v, *where), (q, k, v), do)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = _flash_fwd_bwd(lambda q, k, v: M.manual_attention(q, k, v, mask), exact, do.double())
    eps = torch.finfo(dtype).eps
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == dtype
        err, scale = (a.double() - r).abs().max().item(), r.abs().max().item()
        assert err <= 2 * eps * scale, f"{name}: error {err:.2e} > 2 eps max|exact| = {2 * eps * scale:.2e}"


@_needs_triton
@_model_one_thread
def test_model_flash_attention_gradcheck_float64():
    """torch.autograd.gradcheck in float64 (the interpreter computes in float64): finite
    differences of the forward kernel against the two backward kernels, with GQA, a window
    and a global prefix. fast_mode checks u^T J v for random u, v instead of all of J (a
    handful of kernel calls instead of one per input number). Older Triton interpreters (3.1,
    which torch 2.5's wheels bring) refuse float64 dot products: there the same check runs in
    float32 with central differences on a few coordinates, at a tolerance float32 allows."""
    (q, k, v), where, _ = _flash_case(1, 2, 1, 7, 4, window=3, n_global=1, dtype=torch.float64)
    f = lambda q, k, v: M.flash_attention(q, k, v, *where)
    try:
        assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)
        return
    except Exception as e:  # triton.runtime.errors.InterpreterError: "Unsupported dtype fp64"
        if "fp64" not in str(e):
            raise
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    w = torch.randn_like(f(q, k, v))                      # a random direction of the output
    (f(q, k, v) * w).sum().backward()
    eps = 1e-2
    for x in (q, k, v):
        for i in torch.randperm(x.numel())[:6].tolist():
            with torch.no_grad():
                x.view(-1)[i] += eps
                up = (f(q, k, v) * w).sum().item()
                x.view(-1)[i] -= 2 * eps
                down = (f(q, k, v) * w).sum().item()
                x.view(-1)[i] += eps
            assert (up - down) / (2 * eps) == pytest.approx(x.grad.view(-1)[i].item(), abs=2e-3, rel=2e-2)


@_needs_triton
@pytest.mark.filterwarnings("ignore:All-NaN slice")   # numpy, on the poisoned rows
@_model_one_thread
def test_model_flash_attention_skips_hidden_blocks():
    """Key blocks that the mask hides entirely are never loaded: poison them with NaN (0 * NaN
    is NaN, so a loaded-and-masked block would spread it) and the rows that cannot see them stay
    equal to the clean result. Causal: rows 0..63 never load keys 64..; window 16: rows 128.. never
    load keys 0..63 (with n_global they must, and do)."""
    for window, n_global, poison, rows in [(0, 0, slice(64, None), slice(0, 64)),
                                           (16, 0, slice(0, 64), slice(128, None))]:
        (q, k, v), where, _ = _flash_case(1, 1, 1, 200, 16, window=window, n_global=n_global)
        q, k, v = q.detach(), k.detach(), v.detach()
        clean = M.flash_attention(q, k, v, *where)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, poison] = float("nan")
        v2[:, :, poison] = float("nan")
        dirty = M.flash_attention(q, k2, v2, *where)
        torch.testing.assert_close(dirty[:, :, rows], clean[:, :, rows], atol=0, rtol=0)
        assert dirty.isnan().any()   # the rows that do see the poisoned keys
    (q, k, v), where, _ = _flash_case(1, 1, 1, 200, 16, window=16, n_global=4)
    v2 = v.detach().clone()
    v2[:, :, :4] = float("nan")      # the global prefix: every row sees it, so every row is NaN
    assert M.flash_attention(q.detach(), k.detach(), v2, *where).isnan().all()


@_needs_triton
@_model_one_thread
def test_model_gpt_training_step_triton_equals_manual():
    """A training step of the whole model: loss, every parameter's gradient, and the loss after
    an SGD step agree between attn_impl=triton and attn_impl=manual (GQA, window, global prefix,
    packed documents, the MTP head's attention too)."""
    m = _model_make(n_layer=1, n_head=2, n_kv_head=1, window=8, n_global=2, mtp=True).train()
    t = _model_twin(m, attn_impl="triton").train()
    idx = _model_tokens(1, 25)
    idx[:, [0, 9, 20]] = 0
    docs = M.doc_ids_from_bos(idx, 0)
    losses = {}
    for name, model in (("manual", m), ("triton", t)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss, aux = model(idx[:, :-1], idx[:, 1:], doc_ids=docs[:, :-1])
        (loss + aux["mtp"]).backward()
        opt.step()
        losses[name] = (loss.item(), aux["mtp"].item(), model(idx[:, :-1], idx[:, 1:])[0].item())
    assert losses["triton"] == pytest.approx(losses["manual"], abs=1e-5)
    for (name, p), p2 in zip(m.named_parameters(), t.parameters()):
        torch.testing.assert_close(p2, p, atol=1e-5, rtol=1e-5, msg=lambda msg: f"{name}: {msg}")


@_needs_triton
@pytest.mark.parametrize("kw", [dict(n_kv_head=1, window=5), dict(window=4, n_global=2)])
@_model_one_thread
def test_model_triton_cached_decode_equals_full_forward(kw):
    """attn_impl=triton runs the KV-cached path in the kernel too (q_offset = cache position,
    k_offset = first kept key): prefill + decode equals the full forward and the manual model."""
    m = _model_make(**{"attn_impl": "triton", "n_layer": 1, "n_head": 2, "n_kv_head": 2, **kw})
    idx = _model_tokens(1, 16)
    full = m(idx)
    torch.testing.assert_close(full, _model_twin(m, attn_impl="manual")(idx), atol=_MODEL_ATOL, rtol=0)
    torch.testing.assert_close(_model_decode(m, idx, 9), full, atol=_MODEL_ATOL, rtol=0)
    torch.testing.assert_close(_model_decode(m, idx, 2, chunk=7), full, atol=_MODEL_ATOL, rtol=0)
    idx[0, [0, 6, 11]] = 0                             # packed documents: cached doc ids too
    docs = M.doc_ids_from_bos(idx, 0)
    torch.testing.assert_close(_model_decode(m, idx, 8, doc_ids=docs), m(idx, doc_ids=docs),
                               atol=_MODEL_ATOL, rtol=0)


@_model_one_thread
def test_model_triton_one_line_errors(monkeypatch):
    """Where the kernel cannot run, one line saying why and what to use (these run with or
    without triton installed)."""
    for kw, hint in [(dict(attn_softcap=5.0), "attn_impl=manual"),
                     (dict(n_embd=512, n_head=2, n_kv_head=2), "attn_impl=sdpa")]:
        with pytest.raises(ValueError, match=hint) as e:
            _model_cfg(attn_impl="triton", **kw)
        assert "\n" not in str(e.value)
    m = _model_make(attn_impl="triton")
    idx = _model_tokens(1, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(bpe.UserError, match="TRITON_INTERPRET=1") as e:
        m(idx)                                         # CPU tensors, no interpreter
    assert "\n" not in str(e.value) and "attn_impl=sdpa" in str(e.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)   # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.setattr(M, "_flash_defined_for", None)
    with pytest.raises(bpe.UserError, match="pip install triton") as e:
        m(idx)
    assert "\n" not in str(e.value) and "attn_impl=sdpa" in str(e.value)


@_needs_triton
@_model_one_thread
def test_model_flash_attention_rejects_bad_inputs():
    q = torch.randn(1, 4, 8, 16)
    kv = torch.randn(1, 2, 8, 16)
    for args, match in [((q, kv.double(), kv), "dtype"), ((q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)), "multiple"),
                        ((q, kv[..., :8], kv[..., :8]), "do not match"), ((q.long(), kv.long(), kv.long()), "dtype")]:
        with pytest.raises(ValueError, match=match):
            M.flash_attention(*args)


def test_model_import_does_not_import_triton():
    """triton is optional and slow to import: model.py (and so train.py, sample.py) must only
    import it when attn_impl=triton runs."""
    code = "import sys, model; assert 'triton' not in sys.modules, 'model.py imported triton'"
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(M.__file__)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@_needs_triton
@_model_one_thread
def test_model_bench_attention_runs_on_cpu(capsys):
    """The GPU benchmark's code path, at interpreter sizes: one row, and the kernel agrees with
    SDPA (bfloat16) in the row's error columns."""
    M.bench_attention(torch.device("cpu"), lengths=(64,), head_dims=(16,), tokens=64, width=32, repeats=1)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.split()[:2] == ["64", "16"]]
    assert len(rows) == 1
    out_err, grad_err = (float(x) for x in rows[0].rsplit("|", 1)[1].split(","))
    assert out_err < 0.02 and grad_err < 0.02           # relative: bf16 rounding, 2 eps = 0.016

# ---------------------------------------------------------------------------- safetensors


def test_model_safetensors_bytes_by_hand(tmp_path):
    # The worked example of model.py section 14, byte for byte: 8-byte little-endian header length,
    # the JSON header padded with spaces to a multiple of 8, then float32 before bfloat16 data.
    header = (b'{"w":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},'
              b'"g":{"dtype":"BF16","shape":[1],"data_offsets":[8,10]}}')
    assert len(header) == 111
    expected = (b"\x70\x00\x00\x00\x00\x00\x00\x00" + header + b" "
                + b"\x00\x00\x80\x3f" + b"\x00\x00\x00\xc0"      # 1.0, -2.0 (float32, lowest byte first)
                + b"\x80\x3f")                                    # 1.0 (bfloat16 = float32's top half)
    path = tmp_path / "w.safetensors"
    M.write_safetensors(path, {"g": torch.tensor([1.0], dtype=torch.bfloat16), "w": torch.tensor([[1.0, -2.0]])})
    assert path.read_bytes() == expected
    back = M.read_safetensors(str(path))
    assert list(back) == ["w", "g"] and back["g"].dtype == torch.bfloat16
    assert torch.equal(back["w"], torch.tensor([[1.0, -2.0]])) and back["g"].item() == 1.0


def _model_safetensors_damaged(tmp_path, how):
    """A valid file of two tensors, then damaged one way; returns its path."""
    path = tmp_path / "bad.safetensors"
    M.write_safetensors(path, {"a": torch.arange(4.0), "b": torch.ones(2, 2)})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]

    def rebuild(h, d=data):
        text = json.dumps(h).encode()
        return len(text).to_bytes(8, "little") + text + d
    damaged = {
        "truncated": lambda: raw[:-5],
        "short": lambda: raw[:5],
        "header-past-end": lambda: (len(raw)).to_bytes(8, "little") + raw[8:],
        "header-absurd": lambda: (1 << 60).to_bytes(8, "little") + raw[8:],
        "not-json": lambda: raw[:8] + b"x" * n + data,
        "unknown-dtype": lambda: rebuild({**header, "a": {**header["a"], "dtype": "F7"}}),
        "overlap": lambda: rebuild({**header, "b": {**header["b"], "data_offsets": [8, 24]}}, data[:24]),
        "gap": lambda: rebuild({**header, "b": {**header["b"], "data_offsets": [20, 36]}}, data + b"\0" * 4),
        "shape-mismatch": lambda: rebuild({**header, "a": {**header["a"], "shape": [5]}}),
        "offsets-past-end": lambda: rebuild(header, data[:20]),
    }[how]()
    path.write_bytes(damaged)
    return path


@pytest.mark.parametrize("how, message", [
    ("truncated", "past its end"), ("short", "fewer than the 8"), ("header-past-end", "runs past the end"),
    ("header-absurd", "more than the format allows"), ("not-json", "not JSON"),
    ("unknown-dtype", "unknown dtype 'F7'"), ("overlap", "overlaps"), ("gap", "belong to no tensor"),
    ("shape-mismatch", "needs 20 bytes"), ("offsets-past-end", "past its end")])
def test_model_safetensors_reader_rejects_bad_files_in_one_line(tmp_path, how, message):
    path = _model_safetensors_damaged(tmp_path, how)
    with pytest.raises(bpe.UserError, match=message) as e:
        M.read_safetensors(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_model_safetensors_dtypes_round_trip_and_shards(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
               "f16": torch.randn(2, 3, generator=g).half(), "i64": torch.arange(5), "empty": torch.zeros(0, 4),
               "odd": torch.randn(3, generator=g).half()}
    M.write_safetensors(tmp_path / "t.safetensors", tensors)
    back = M.read_safetensors(str(tmp_path / "t.safetensors"))
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())
    back["f32"] += 1  # the mapping is private (copy-on-write): the file keeps its bytes
    assert torch.equal(M.read_safetensors(str(tmp_path / "t.safetensors"))["f32"], tensors["f32"])
    # past max_shard_bytes: shards + index, read back through the index; a later single-file write
    # into the same folder removes the shards it no longer uses
    folder = tmp_path / "sharded"
    folder.mkdir()
    paths = M.write_hf_weights(str(folder), tensors, max_shard_bytes=40)
    names = sorted(os.listdir(folder))
    assert M.SAFETENSORS_INDEX in names and len(names) == len(paths) > 3
    index = json.loads((folder / M.SAFETENSORS_INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = M.read_hf_weights(str(folder))
    assert all(torch.equal(back[k], t) for k, t in tensors.items())
    M.write_hf_weights(str(folder), tensors, max_shard_bytes=1 << 20)
    assert os.listdir(folder) == [M.SAFETENSORS_SINGLE]
    (tmp_path / "empty").mkdir()
    with pytest.raises(bpe.UserError, match="no model.safetensors nor model.safetensors.index.json"):
        M.read_hf_weights(str(tmp_path / "empty"))

# ---------------------------------------------------------------------------- norm epsilon, YaRN ramp


@_model_one_thread
def test_model_norm_eps_is_a_setting_every_norm_uses():
    # x = [1e-3, 1e-3]: mean(x^2) = 1e-6, so x / sqrt(1e-6 + eps) is 0.7071 with eps = 1e-6
    # (our default, Qwen3's) and 1e-3 / sqrt(1.1e-5) = 0.3015 with eps = 1e-5 (Llama's)
    x = torch.full((1, 2), 1e-3)
    assert M.RMSNorm(2)(x)[0, 0].item() == pytest.approx(0.70711, abs=1e-5)
    assert M.RMSNorm(2, eps=1e-5)(x)[0, 0].item() == pytest.approx(0.30151, abs=1e-5)
    m = _model_make(norm_eps=1e-5, qk_norm=True, mtp=True, n_experts=2, top_k=1)
    norms = [mod for mod in m.modules() if isinstance(mod, M.RMSNorm)]
    assert len(norms) == 3 * 4 + 1 + 2 and all(n.eps == 1e-5 for n in norms)
    idx = _model_tokens(1, 8)
    assert not torch.equal(m(idx), _model_twin(m, norm_eps=1e-6)(idx))
    with pytest.raises(ValueError, match="norm_eps"):
        _model_cfg(norm_eps=0.0)


@_model_one_thread
def test_model_yarn_index_ramp_by_hand():
    # model.py section 3's worked example: D=16, theta=1e4, L=1024: i(32) = 1.41 -> 1, i(1) = 4.42
    # -> 5, so Hugging Face's ramp keeps [1, 1, 0.75, 0.5, 0.25, 0, 0, 0] of each pair's frequency
    plain, _ = M.rope_frequencies(16, 10000.0)
    assert 16 * math.log(1024 / (2 * math.pi * 32)) / (2 * math.log(1e4)) == pytest.approx(1.414, abs=1e-3)
    assert 16 * math.log(1024 / (2 * math.pi)) / (2 * math.log(1e4)) == pytest.approx(4.424, abs=1e-3)
    keep = torch.tensor([1, 1, 0.75, 0.5, 0.25, 0, 0, 0], dtype=torch.float64)
    w, scale = M.rope_frequencies(16, 10000.0, "yarn", 4.0, train_len=1024, ramp="index")
    torch.testing.assert_close(w, keep * plain + (1 - keep) * plain / 4, atol=0, rtol=1e-12)
    assert scale == pytest.approx(0.1 * math.log(4) + 1)
    turns, _ = M.rope_frequencies(16, 10000.0, "yarn", 4.0, train_len=1024, ramp="turns")
    assert (turns[2:5] < w[2:5]).all()   # the paper's ramp interpolates the middle pairs more
    m = _model_make(block_size=16)
    idx = _model_tokens(1, 40)
    index = _model_twin(m, rope_scaling="yarn", rope_factor=4.0, yarn_ramp="index")
    assert not torch.equal(index(idx), _model_twin(m, rope_scaling="yarn", rope_factor=4.0)(idx))
    torch.testing.assert_close(_model_twin(m, rope_scaling="yarn", yarn_ramp="index")(idx[:, :16]),
                               m(idx[:, :16]), atol=0, rtol=0)   # factor 1: plain RoPE, either ramp
    with pytest.raises(ValueError, match="yarn_ramp"):
        _model_cfg(yarn_ramp="dims")

# ---------------------------------------------------------------------------- Hugging Face format


def _model_hf_tokenizer():
    return bpe.Tokenizer.train(_bpe_corpus(), vocab_size=256 + 24 + 1, quiet=True)


_MODEL_HF_SHAPES = {   # the three target architectures, tiny, every weight random (_model_make)
    "llama": dict(qk_norm=False, norm_eps=1e-5, n_kv_head=2, tie_embeddings=True, rope_theta=5e4),
    "qwen3": dict(qk_norm=True, head_size=12, n_kv_head=2),
    "qwen3_moe": dict(qk_norm=True, n_layer=3, n_experts=4, top_k=2, moe_every=2, moe_hidden=24),
}


def _model_hf_model(kind, tok, **kw):
    return _model_make(**{"vocab_size": tok.vocab_size + 3, "mlp": "swiglu", "norm_gain": True,
                          **_MODEL_HF_SHAPES[kind], **kw})


def _model_hf_reference_logits(folder, ids):
    """Logits computed straight from a Hugging Face folder's config.json and tensors by THEIR
    names, following transformers' published Llama / Qwen3 / Qwen3-MoE forward (written here
    from that description, not from model.py): RMSNorm with weight * x / sqrt(mean(x^2) + eps),
    RoPE by rotate_half on cat(freqs, freqs), q/k norms before RoPE, SiLU(gate) * up, routing by
    softmax -> top-k -> renormalised. Plain RoPE only."""
    hf = json.loads((folder / "config.json").read_text())
    w = {k: v.float() for k, v in M.read_hf_weights(str(folder)).items()}
    H, Hkv, D, eps = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], hf["rms_norm_eps"]
    T = len(ids)

    def norm(x, g):
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        return torch.cat([-x[..., D // 2:], x[..., :D // 2]], dim=-1)
    inv = 1.0 / hf["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1).float()[:, None], torch.cat([angles.sin()] * 2, -1).float()[:, None]

    def swiglu(x, p):
        return (F.silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)) @ w[p + "down_proj.weight"].T
    x = w["model.embed_tokens.weight"][ids]                                   # (T, C)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q, k, v = ((h @ w[p + f"self_attn.{n}_proj.weight"].T).view(T, -1, D) for n in "qkv")
        if hf["model_type"] != "llama":
            q, k = norm(q, w[p + "self_attn.q_norm.weight"]), norm(k, w[p + "self_attn.k_norm.weight"])
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        x = x + torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, H * D) @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        if hf.get("num_experts") and (i + 1) % hf["decoder_sparse_step"] == 0:
            probs = (h @ w[p + "mlp.gate.weight"].T).softmax(-1)
            top = probs.topk(hf["num_experts_per_tok"], dim=-1)
            gates = top.values / top.values.sum(-1, keepdim=True) if hf["norm_topk_prob"] else top.values
            y = torch.zeros_like(h)
            for t in range(T):
                for g, e in zip(gates[t], top.indices[t].tolist()):
                    y[t] += g * swiglu(h[t], p + f"mlp.experts.{e}.")
        else:
            y = swiglu(h, p + "mlp.")
        x = x + y
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return norm(x, w["model.norm.weight"]) @ head.T


def _model_greedy(m, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    return ids


@_model_one_thread
@pytest.mark.parametrize("kind", list(_MODEL_HF_SHAPES))
def test_model_hf_export_then_import_same_logits_and_greedy_tokens(tmp_path, kind):
    # Export a model in each target shape and import the folder back (hf:DIR): the same logits,
    # bit for bit in float32, and the same greedy tokens. An independent forward that reads the
    # folder by Hugging Face's tensor names (the architecture as transformers defines it) gives
    # the same logits too, so the names, the row order of q/k/v and gate/up, and the transposed
    # experts mean what config.json says they mean.
    tok = _model_hf_tokenizer()
    m = _model_hf_model(kind, tok)
    folder = tmp_path / "hf"
    paths = M.export_hf(m, tok, str(folder), max_shard_bytes=40_000 if kind == "qwen3_moe" else M.HF_SHARD_BYTES)
    names = sorted(os.listdir(folder))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert sorted(os.path.basename(p) for p in paths) == names
    assert (M.SAFETENSORS_INDEX in names) == (kind == "qwen3_moe")   # that one in shards
    hf = json.loads((folder / "config.json").read_text())
    assert hf["model_type"] == kind and hf["architectures"] == [M.HF_ARCHITECTURES[kind]]
    assert hf["rms_norm_eps"] == m.config.norm_eps and hf["head_dim"] == m.config.head_dim
    ckpt = M.open_checkpoint(f"hf:{folder}")
    back = M.model_from_checkpoint(ckpt, str(folder)).eval()
    assert back.config == dataclasses.replace(m.config, mlp_hidden=m.config.hidden_size)  # 0 = the default, resolved
    assert bpe.Tokenizer.from_vocab_merges(**ckpt["tokenizer"]).fingerprint == tok.fingerprint
    ids = [tok.eot_id] + tok.encode("def add(a, b): café 🙂")[:15]
    idx = torch.tensor([ids])
    with torch.no_grad():
        logits = m(idx)
        assert torch.equal(back(idx), logits)
        torch.testing.assert_close(_model_hf_reference_logits(folder, ids), logits[0], atol=2e-5, rtol=1e-5)
        assert _model_greedy(back, ids[:4], 8) == _model_greedy(m, ids[:4], 8)


@_model_one_thread
def test_model_hf_export_dtype_norm_without_gain_and_yarn(tmp_path):
    # bfloat16 weights on disk (config says so); a norm without gain exports as gains of ones (the
    # same function); YaRN travels as Hugging Face's ramp with block_size as the original length
    tok = _model_hf_tokenizer()
    m = _model_hf_model("qwen3", tok, norm_gain=False, rope_scaling="yarn", rope_factor=2.0, yarn_ramp="index")
    M.export_hf(m, tok, str(tmp_path / "hf"), dtype=torch.bfloat16)
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["torch_dtype"] == "bfloat16" and hf["max_position_embeddings"] == 64
    assert hf["rope_scaling"] == {"rope_type": "yarn", "factor": 2.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                  "original_max_position_embeddings": 32}
    w = M.read_hf_weights(str(tmp_path / "hf"))
    assert w["model.norm.weight"].dtype == torch.bfloat16 and bool((w["model.layers.0.self_attn.q_norm.weight"] == 1).all())
    back = M.model_from_checkpoint(M.open_checkpoint(f"hf:{tmp_path / 'hf'}"), "hf").eval()
    assert back.config.norm_gain and back.config.yarn_ramp == "index" and back.config.block_size == 32
    assert torch.equal(back.lm_head.weight, m.lm_head.weight.bfloat16().float())
    idx = _model_tokens(1, 50, vocab=tok.vocab_size)
    torch.testing.assert_close(back(idx), m(idx), atol=0.15, rtol=0.05)   # bf16 rounding of the weights


@pytest.mark.parametrize("change, message", [
    (dict(mlp="relu2"), "the relu2 MLP .* --mlp=swiglu"), (dict(mlp="gelu"), "--mlp=swiglu"),
    (dict(logit_softcap=15.0), "logit softcap .*--logit_softcap=0"),
    (dict(attn_softcap=30.0), "--attn_softcap=0"), (dict(mtp=True), "--mtp=False"),
    (dict(window=8), "sliding attention window .*--window=0"),
    (dict(n_experts=4, top_k=2, n_shared_experts=1), "--n_shared_experts=0"),
    (dict(n_experts=4, top_k=2, qk_norm=False), "--qk_norm=True"),
    (dict(n_experts=4, top_k=2, expert_bias=True), "--moe_bias_rate=0"),
    (dict(rope_scaling="yarn", rope_factor=2.0), "--yarn_ramp=index"),
    (dict(attn="mla", kv_lora_rank=16), "multi-head latent attention layers .*--attn=softmax"),
    (dict(layer_pattern="LG"), "linear attention layers .*no layer_pattern"),
    (dict(attn_gate="output"), "--attn_gate=none"), (dict(hc_streams=2), "--hc_streams=1"),
    (dict(engram_layers="0"), "--engram_layers="),
], ids=["relu2", "gelu", "logit-softcap", "attn-softcap", "mtp", "window", "shared-experts",
        "moe-no-qk-norm", "expert-bias", "yarn-turns", "mla", "linear", "gate", "streams", "engram"])
def test_model_hf_export_refuses_what_the_target_cannot_express(tmp_path, change, message):
    tok = _model_hf_tokenizer()
    biased = change.pop("expert_bias", False)
    m = _model_hf_model("qwen3", tok, **change)
    if biased:
        m.moe_layers()[0].expert_bias[1] = 0.5
    with pytest.raises(bpe.UserError, match=message) as e:
        M.export_hf(m, tok, str(tmp_path / "hf"))
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()


def test_model_hf_export_never_writes_into_a_folder_with_files(tmp_path):
    tok = _model_hf_tokenizer()
    m = _model_hf_model("llama", tok)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(bpe.UserError, match="already holds files \\(notes.txt\\).*--overwrite=True"):
        M.export_hf(m, tok, str(tmp_path / "hf"))
    assert os.listdir(tmp_path / "hf") == ["notes.txt"]
    M.export_hf(m, tok, str(tmp_path / "hf"), overwrite=True)
    assert "config.json" in os.listdir(tmp_path / "hf") and (tmp_path / "hf" / "notes.txt").read_text() == "mine"


def _model_hf_folder(tmp_path, kind="qwen3_moe"):
    tok = _model_hf_tokenizer()
    folder = tmp_path / "hf"
    M.export_hf(_model_hf_model(kind, tok), tok, str(folder))
    return folder


def _model_hf_edit_config(folder, **changes):
    hf = json.loads((folder / "config.json").read_text())
    hf.update(changes)
    (folder / "config.json").write_text(json.dumps(hf))


def _model_hf_edit_weights(folder, edit):
    w = {k: v.clone() for k, v in M.read_safetensors(str(folder / "model.safetensors")).items()}
    edit(w)
    M.write_safetensors(folder / "model.safetensors", w)


@pytest.mark.parametrize("damage, message", [
    (lambda f: _model_hf_edit_config(f, attention_bias=True), "attention_bias=true"),
    (lambda f: _model_hf_edit_config(f, mlp_bias=True), "mlp_bias=true"),
    (lambda f: _model_hf_edit_config(f, rope_scaling={"rope_type": "llama3", "factor": 8.0}), "type 'llama3'"),
    (lambda f: _model_hf_edit_config(f, rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 16}),
     "beta_fast=16"),
    (lambda f: _model_hf_edit_config(f, use_sliding_window=True), "sliding-window"),
    (lambda f: _model_hf_edit_config(f, model_type="gpt2"), "model_type 'gpt2'"),
    (lambda f: _model_hf_edit_config(f, hidden_act="gelu"), "hidden_act=gelu"),
    (lambda f: _model_hf_edit_config(f, norm_topk_prob=False), "norm_topk_prob=False with 2 experts"),
    (lambda f: _model_hf_edit_config(f, mlp_only_layers=[0]), "mlp_only_layers"),
    (lambda f: _model_hf_edit_config(f, partial_rotary_factor=0.5), "partial_rotary_factor"),
    (lambda f: _model_hf_edit_weights(f, lambda w: w.pop("model.layers.0.self_attn.k_proj.weight")),
     "no tensor model.layers.0.self_attn.k_proj.weight"),
    (lambda f: _model_hf_edit_weights(f, lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(48)})),
     "q_proj.bias .*has no place"),
    (lambda f: _model_hf_edit_weights(f, lambda w: w.update({"model.norm.weight": torch.ones(7)})), "has shape \\[7\\]"),
    (lambda f: os.rename(f / "model.safetensors", f / "pytorch_model.bin"), "safetensors weights only"),
    (lambda f: (f / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}})),
     "model is Unigram"),
    (lambda f: os.remove(f / "config.json"), "no config.json"),
], ids=["attention-bias", "mlp-bias", "llama3-rope", "yarn-betas", "sliding-window", "model-type", "gelu",
        "topk-unnormalised", "mlp-only-layers", "partial-rope", "missing-tensor", "bias-tensor", "shape",
        "bin-weights", "unigram-tokenizer", "no-config"])
def test_model_hf_import_refuses_what_gpt_cannot_express(tmp_path, damage, message):
    folder = _model_hf_folder(tmp_path)
    damage(folder)
    with pytest.raises(bpe.UserError, match=message) as e:
        M.open_checkpoint(f"hf:{folder}")
    assert "\n" not in str(e.value)


def test_model_hf_matches_transformers_if_installed(tmp_path):
    # Optional: transformers itself loads each export and gives the same logits and tokenizer ids.
    # (Not a dependency: skipped where it is not installed; the README reports a run by hand.)
    transformers = pytest.importorskip("transformers")
    tok = _model_hf_tokenizer()
    text = "def café(x):\n\treturn x  # 🙂 日本<|endoftext|>ok"
    for kind in _MODEL_HF_SHAPES:
        m = _model_hf_model(kind, tok, rope_scaling="yarn", rope_factor=2.0, yarn_ramp="index")
        folder = tmp_path / kind
        M.export_hf(m, tok, str(folder))
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        htok = transformers.AutoTokenizer.from_pretrained(str(folder))
        ids = tok.encode(text, allowed_special="all")
        assert htok(text, add_special_tokens=False)["input_ids"] == ids
        assert htok(text)["input_ids"] == [tok.eot_id] + ids
        idx = torch.tensor([[tok.eot_id] + ids])
        with torch.no_grad():
            torch.testing.assert_close(theirs(idx).logits, m(idx), atol=1e-4, rtol=1e-4)


# =============================================================================
# 4. model.py: mixture of experts
# =============================================================================

# Tests for the mixture-of-experts layer (model.py, section MoE). CPU, float32, tiny sizes.




def _moe_config(**overrides):
    cfg = dict(n_embd=16, n_experts=4, top_k=2, n_shared_experts=0, capacity_factor=0.0,
               mlp="relu2", moe_hidden=8, mlp_hidden=0, moe_bias_rate=0.0)
    cfg.update(overrides)
    return types.SimpleNamespace(**cfg)


def _moe_layer(seed=0, **overrides):
    """An MoE with random (not zero) output projections, so every expert's output shows."""
    torch.manual_seed(seed)
    moe = MoE(_moe_config(**overrides))
    with torch.no_grad():
        for p in (moe.c_proj, moe.shared_proj):
            if p is not None:
                p.normal_(0.0, 0.3)
    return moe


@pytest.mark.parametrize("impl", ["padded", "grouped"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mlp", ["relu2", "swiglu"])
def test_moe_vectorised_equals_per_token_loop(impl, top_k, mlp):
    # Guards the sort/scatter dispatch and the gate combine: any mix-up of which token
    # went to which expert, or which gate multiplies which output, breaks equality.
    moe = _moe_layer(top_k=top_k, mlp=mlp, n_shared_experts=1)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.5, 0.0]))  # bias must change choices only
    x = torch.randn(2, 7, 16)
    y = moe(x, impl=impl)
    torch.testing.assert_close(y, moe_reference(moe, x), rtol=1e-5, atol=1e-5)
    assert int(moe.stats["dropped"]) == 0 and int(moe.stats["routed"]) == 14 * top_k
    assert moe.stats["counts"].sum().item() == 14 * top_k


def test_moe_bias_changes_choice_not_weights():
    # Guards "bias for choosing only": with a bias that flips the choice, the gates are
    # still the softmax of the UNbiased logits (the docstring's worked example).
    moe = _moe_layer(n_embd=4, n_experts=4, top_k=2)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
        moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 3.5]))
    x = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    logits, chosen, gates = moe.route(x)
    assert chosen.tolist() == [[3, 0]]
    torch.testing.assert_close(gates, torch.softmax(torch.tensor([[-1.0, 2.0]]), -1))
    assert gates[0, 0].item() == pytest.approx(0.0474, abs=1e-4)


def _moe_onehot_layer(top_k, capacity_factor):
    """E = C = 4, router = 10 * identity: token x = a*e_i + b*e_j (a > b) picks expert i
    first and j second, so we know every routing decision in advance."""
    moe = _moe_layer(n_embd=4, n_experts=4, top_k=top_k, capacity_factor=capacity_factor)
    with torch.no_grad():
        moe.router.weight.copy_(10 * torch.eye(4))
    return moe


def test_moe_capacity_drops_hand_counted_tokens():
    # Guards the capacity rule and the drop count. 8 tokens, top_k=1, capacity_factor=1:
    # capacity = ceil(1 * 8 * 1 / 4) = 2. Routing [0,0,0,0,0,1,1,2] -> expert 0 keeps
    # its first 2 tokens and drops 3; experts 1 and 2 keep all; counts = [2, 2, 1, 0].
    moe = _moe_onehot_layer(top_k=1, capacity_factor=1.0).train()
    experts = [0, 0, 0, 0, 0, 1, 1, 2]
    x = torch.eye(4)[experts].view(1, 8, 4)
    y = moe(x)
    assert int(moe.stats["dropped"]) == 3 and int(moe.stats["routed"]) == 8
    assert moe.stats["counts"].tolist() == [2.0, 2.0, 1.0, 0.0]
    # priority by position: tokens 2, 3, 4 are the dropped ones, their output is zero
    # (no shared expert), everyone else gets the full expert output
    ref = moe_reference(moe, x)
    assert torch.all(y[0, 2:5] == 0)
    keep = [0, 1, 5, 6, 7]
    torch.testing.assert_close(y[0, keep], ref[0, keep])
    assert ref[0, 2:5].abs().sum() > 0
    # the grouped path drops exactly the same choices
    torch.testing.assert_close(moe(x, impl="grouped"), y)
    # eval mode never drops (outputs must not depend on the rest of the batch)
    moe.eval()
    torch.testing.assert_close(moe(x), ref)
    assert int(moe.stats["dropped"]) == 0


def test_moe_capacity_first_choices_win_over_second():
    # Guards the stated priority: all first choices before any second choice. top_k=2,
    # capacity = ceil(1 * 4 * 2 / 4) = 2. Tokens 0,1 pick expert 0 only as SECOND choice,
    # tokens 2,3 pick it FIRST; expert 0 has 4 claims and keeps tokens 2,3 although they
    # come later. Tokens' first choices: [1, 2, 0, 0]; second: [0, 0, 3, 3].
    moe = _moe_onehot_layer(top_k=2, capacity_factor=1.0).train()
    x = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float)
    x = x + 0.5 * torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]])
    x = x.view(1, 4, 4)
    moe(x)
    assert moe.stats["counts"].tolist() == [2.0, 1.0, 1.0, 2.0]
    assert int(moe.stats["dropped"]) == 2
    expert, rank, keep, counts, order = moe.dispatch(moe.route(x.view(4, 4))[1], capacity=2)
    # choice a = s*N + n; dropped choices are tokens 0 and 1's second choices (a = 4, 5)
    assert (~keep).nonzero().flatten().tolist() == [4, 5]


def test_moe_capacity_formula():
    assert moe_capacity(1.0, 8, 1, 4) == 2
    assert moe_capacity(1.25, 64, 2, 8) == 20
    assert moe_capacity(1.1, 10, 1, 1) == 11  # not 12: float noise must not round up
    assert moe_capacity(0.0, 8, 1, 4) is None and moe_capacity(math.inf, 8, 1, 4) is None


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_gradients_reach_router(top_k):
    # Guards the top_k=1 trap: a softmax over ONE chosen logit is constant 1, so the
    # router would learn only from the aux losses. Here the loss is the output alone.
    moe = _moe_layer(top_k=top_k, n_shared_experts=1)
    x = torch.randn(2, 5, 16, requires_grad=True)
    (moe(x) ** 2).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    for p in (moe.c_fc, moe.c_proj, moe.shared_fc, moe.shared_proj):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert moe.expert_bias.grad is None  # a buffer: balancing never enters the gradients
    # and the aux losses alone also reach the router
    moe.zero_grad()
    moe(x)
    (moe.aux["moe_aux"] + moe.aux["moe_z"]).backward()
    assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k,n_experts", [(1, 4), (2, 4), (2, 8)])
def test_moe_aux_loss_documented_values(top_k, n_experts):
    # Documented: moe_aux = E * sum f_i P_i = 1.0 exactly under uniform routing for every
    # top_k; approaches E / top_k when all tokens pick the same top_k experts with certainty;
    # moe_z = log(E)^2 at zero logits.
    moe = _moe_layer(top_k=top_k, n_experts=n_experts)
    with torch.no_grad():
        moe.router.weight.zero_()  # every logit 0 -> P_i = 1/E exactly
    x = torch.randn(2, 8, 16)
    moe(x)
    assert moe.aux["moe_aux"].item() == pytest.approx(1.0, abs=1e-6)
    assert moe.aux["moe_z"].item() == pytest.approx(math.log(n_experts) ** 2, rel=1e-6)
    # balanced hard routing: token n goes to experts n, n+1 (mod E) with near-certain probs
    moe = _moe_layer(n_embd=n_experts, n_experts=n_experts, top_k=top_k)
    with torch.no_grad():
        moe.router.weight.copy_(30 * torch.eye(n_experts))
    x = torch.eye(n_experts).view(1, n_experts, n_experts)
    moe(x)
    assert moe.aux["moe_aux"].item() == pytest.approx(1.0, abs=1e-4)
    # collapse: every token onto the same top_k experts, all the router's probability on
    # them -> E / top_k (regression: the comment said E for every top_k, and top_k > 1 was not
    # tested). The router scores experts 0..k-1 alike and far above the rest.
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:top_k, 0] = 30.0
    x = torch.zeros(1, n_experts, n_experts)
    x[..., 0] = 1.0
    moe(x)
    assert moe.aux["moe_aux"].item() == pytest.approx(n_experts / top_k, rel=1e-4)


def test_moe_bias_update_balances_skewed_router():
    # Guards the sign of the update: a router that sends almost everything to expert 0
    # must spread out after a few dozen forward + update_bias rounds.
    moe = _moe_layer(top_k=1, n_experts=4, moe_bias_rate=0.1)
    with torch.no_grad():
        moe.router.weight[0, 0] = 2.0  # every token has feature 0 ~ 3 -> expert 0 gets +6
    torch.manual_seed(1)
    x = torch.randn(4, 16, 16)
    x[..., 0] += 3.0
    shares = []
    with torch.no_grad():
        for _ in range(40):
            moe(x)
            shares.append(MoE.load_stats(moe.stats["counts"])["max_share"])
            moe.update_bias(moe.stats["counts"])
    assert shares[0] > 0.9
    assert max(shares[-5:]) < 0.4  # near 1/4 at the end
    assert moe.expert_bias[0] < 0  # the overloaded expert was pushed down


def test_moe_bias_update_identical_across_ranks_and_off_switch():
    # Two "ranks" fed the same all-reduced counts keep bit-identical biases (they are
    # never broadcast). The real 2-rank gloo test runs through train.py.
    moe_a = _moe_layer(moe_bias_rate=0.01)
    moe_b = copy.deepcopy(moe_a)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        counts = torch.randint(0, 50, (4,), generator=gen).float()
        moe_a.update_bias(counts)
        moe_b.update_bias(counts.clone())
    assert torch.equal(moe_a.expert_bias, moe_b.expert_bias)
    assert moe_a.expert_bias.abs().sum() > 0
    assert "expert_bias" in moe_a.state_dict()  # saved in checkpoints, restored on resume
    off = _moe_layer(moe_bias_rate=0.0)
    off.update_bias(torch.tensor([100.0, 0.0, 0.0, 0.0]))
    assert off.expert_bias.abs().sum() == 0


def test_moe_load_stats_worked_example():
    s = MoE.load_stats(torch.tensor([3.0, 1.0, 0.0, 0.0]))
    assert s["min_share"] == 0.0 and s["max_share"] == 0.75
    assert s["load_entropy"] == pytest.approx((0.75 * math.log(4 / 3) + 0.25 * math.log(4)) / math.log(4))
    assert MoE.load_stats(torch.ones(8))["load_entropy"] == pytest.approx(1.0)


def test_moe_param_and_flop_accounting_by_hand():
    # C=16, H=8, E=4, k=2, one shared expert, relu2 (2 matrices per expert):
    # router 4*16 = 64; per expert 16*8 + 8*16 = 256; shared 256.
    moe = _moe_layer(top_k=2, n_shared_experts=1)
    counts = moe.param_counts()
    assert counts["total"] == 64 + 4 * 256 + 256 == sum(p.numel() for p in moe.parameters())
    assert counts["active"] == 64 + 2 * 256 + 256
    assert moe.flops_per_token() == 6 * counts["active"]
    # swiglu has 3 matrices per expert; moe_hidden=0 falls back to the dense hidden size
    sw = MoE(_moe_config(mlp="swiglu", moe_hidden=0, n_embd=48))
    H = dense_hidden(_moe_config(mlp="swiglu", n_embd=48))
    assert H == 128 and sw.c_fc.shape == (4, 48, H)  # 8/3*48 = 128, a multiple of 64
    assert sw.param_counts()["active"] == 4 * 48 + 2 * 3 * 48 * H


def test_moe_fresh_layer_outputs_zero_and_eval_is_batch_independent():
    # Zero-init output projections: a fresh MoE adds nothing to the residual stream.
    moe = MoE(_moe_config(n_shared_experts=1, capacity_factor=1.0))
    x = torch.randn(2, 6, 16)
    assert torch.all(moe(x) == 0)
    # In eval mode one token alone gives the same output as inside the batch (what a
    # KV-cached decode relies on), even with a capacity factor set.
    moe = _moe_layer(capacity_factor=0.5).eval()
    full = moe(x)
    one = torch.cat([moe(x[:, t:t + 1]) for t in range(6)], dim=1)
    torch.testing.assert_close(one, full, rtol=1e-5, atol=1e-6)


def test_moe_bf16_autocast_runs_and_keeps_dtype():
    # Guards the float32 router under autocast and the dtype of the combine.
    moe = _moe_layer(n_shared_experts=1, capacity_factor=1.25).train()
    x = torch.randn(2, 6, 16)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
        assert moe.aux["moe_aux"].dtype == torch.float32
    assert y.dtype == x.dtype
    torch.testing.assert_close(y, ref, rtol=0.1, atol=0.1)


def test_moe_bad_config_is_one_line_error():
    with pytest.raises(ValueError, match="top_k"):
        MoE(_moe_config(top_k=5))
    with pytest.raises(ValueError, match="mlp"):
        MoE(_moe_config(mlp="tanh"))

# =============================================================================
# 5. train.py: optimizers (AdamW, Muon)
# =============================================================================

# Tests for the optimizers (AdamW, Newton-Schulz, Muon, distributed Muon).
# Run: PYTHONPATH=.plan python -m pytest -q test_optim_part.py




def _optim_params(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _optim_set_grads(params, seed):
    """Deterministic fake gradients (what DDP would leave, already averaged). A param
    may carry a `grad_scale` attribute (tiny grads make Adam's eps matter)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * getattr(p, "grad_scale", 1.0)


def _optim_run(make_opt, params, steps, first_step=0, lrs=None):
    """Run `steps` optimizer steps with seeded grads; optionally set group lrs per step
    the way the trainer's schedule does (group["lr"] = ...)."""
    opt = make_opt(params)
    for s in range(first_step, first_step + steps):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lrs(s)
        _optim_set_grads(params, 1000 + s)
        opt.step()
    return opt


# -----------------------------------------------------------------------------
# AdamW

@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_optim_adamw_matches_torch(weight_decay):
    """Our AdamW == torch.optim.AdamW over several steps, two groups with different lr
    and decay, lr changed every step like a schedule, one param with tiny grads (guards:
    wrong bias correction, eps placement, decay not scaled by the current lr)."""
    shapes = [(5, 7), (7,), (3, 2, 4)]
    ours, ref = _optim_params(0, shapes), _optim_params(0, shapes)
    ours[1].grad_scale = ref[1].grad_scale = 1e-7  # |g| ~ eps: checks where eps is added

    def groups(ps, cls, **kw):
        return cls([dict(params=ps[:2], lr=1e-2, base_lr=1e-2, weight_decay=weight_decay),
                    dict(params=ps[2:], lr=3e-3, base_lr=3e-3, weight_decay=0.0)],
                   betas=(0.9, 0.95), eps=1e-8, **kw)

    sched = lambda s: 1.0 - 0.1 * s
    _optim_run(lambda ps: groups(ps, AdamW), ours, steps=6, lrs=sched)
    _optim_run(lambda ps: groups(ps, torch.optim.AdamW, foreach=False), ref, steps=6, lrs=sched)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours[0], _optim_params(0, shapes)[0])  # it did move


def _compile_counting(monkeypatch):
    """Make torch.compile count the graphs it compiles, with public API only (regression: the
    tests used torch._dynamo.config.error_on_recompile, which torch 2.14 removed). A backend may
    be any callable (graph module, example inputs) -> callable; this one records the graph and
    runs it as it is. A recompile (a number baked in as a constant, say) is a second graph."""
    graphs, real = [], torch.compile

    def counting(fn, **kwargs):
        kwargs.pop("options", None)   # inductor's options; this backend takes none
        return real(fn, backend=lambda gm, inputs: graphs.append(gm) or gm.forward, **kwargs)
    monkeypatch.setattr(torch, "compile", counting)
    return graphs


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's imports
def test_optim_adamw_compiled_matches_torch(monkeypatch, capsys):
    """The compiled update (the trainer's default) == torch.optim.AdamW too: two groups,
    one with cautious decay (compared with our eager step), lr changed every step. lr and
    the bias corrections are inputs of the compiled graph, not constants: five steps with
    changing numbers compile exactly one graph."""
    torch.compiler.reset()
    shapes = [(5, 7), (7,), (3, 2, 4)]
    compiled, ref = _optim_params(0, shapes), _optim_params(0, shapes)
    for ps in (compiled, ref):
        ps[1].grad_scale = 1e-7

    def groups(ps, cls, cautious=None, **kw):
        extra = {} if cautious is None else {"cautious": cautious}
        return cls([dict(params=ps[:2], lr=1e-2, base_lr=1e-2, weight_decay=0.1, **extra),
                    dict(params=ps[2:], lr=3e-3, base_lr=3e-3, weight_decay=0.0)],
                   betas=(0.9, 0.95), eps=1e-8, **kw)

    sched = lambda s: 1.0 - 0.1 * s
    opt = _optim_run(lambda ps: groups(ps, AdamW, compiled=True), compiled, steps=5, lrs=sched)
    assert opt._update.compiled_fn is not None and "warning" not in capsys.readouterr().err
    _optim_run(lambda ps: groups(ps, torch.optim.AdamW, foreach=False), ref, steps=5, lrs=sched)
    for a, b in zip(compiled, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with monkeypatch.context() as m:
        graphs = _compile_counting(m)
        torch.compiler.reset()
        _optim_run(lambda ps: groups(ps, AdamW, compiled=True), _optim_params(0, shapes), steps=5,
                   lrs=sched)
        assert len(graphs) == 1
    # cautious decay, compiled vs eager (torch has no cautious decay)
    compiled, eager = _optim_params(0, shapes), _optim_params(0, shapes)
    _optim_run(lambda ps: groups(ps, AdamW, cautious=True, compiled=True), compiled, steps=3, lrs=sched)
    _optim_run(lambda ps: groups(ps, AdamW, cautious=True), eager, steps=3, lrs=sched)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.compiler.reset()


def test_optim_adamw_lazy_rows_compiled_equals_eager(capsys):
    """Lazy rows (Engram's tables) in the compiled update, as the trainer runs it: the same numbers
    as eager, no fallback (regression: inductor could not compile the row mask inside the update
    and the trainer warned and ran AdamW eagerly), and rows without gradient untouched, moments
    and decay included, while a dense parameter in the same step moves everywhere."""
    torch.compiler.reset()

    def run(compiled, steps):
        table, dense = _optim_params(0, [(4096, 8), (6,)])
        opt = AdamW([dict(params=[table], lr=0.1, weight_decay=0.5, lazy_rows=True),
                     dict(params=[dense], lr=0.1, weight_decay=0.5)], cautious=False, compiled=compiled)
        for s in range(steps):
            _optim_set_grads([table, dense], 50 + s)
            table.grad[s::2] = 0                   # odd rows, then even rows: no lookup
            before = table.detach().clone()
            opt.step()
        return table, dense, before, opt

    table, dense, before, opt = run(True, 2)
    assert opt._update.enabled and opt._update.compiled_fn is not None
    assert "warning" not in capsys.readouterr().err
    assert torch.equal(table[1::2], before[1::2]) and (table[::2] != before[::2]).all()
    ref_table, ref_dense, _, _ = run(False, 2)
    torch.testing.assert_close(table, ref_table, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dense, ref_dense, rtol=1e-6, atol=1e-7)
    torch.compiler.reset()


def _broken_compile(fn, **kwargs):
    """torch.compile on a machine without a C++ compiler: it fails at the first call."""
    def call(*args, **kw):
        raise RuntimeError("no C++ compiler")
    return call


def test_optim_adamw_compile_failure_falls_back_to_eager(monkeypatch, capsys):
    """No working torch.compile: one warning, then the eager update, same result."""
    monkeypatch.setattr(torch, "compile", _broken_compile)
    shapes = [(5, 7), (7,)]
    fallen, eager = _optim_params(0, shapes), _optim_params(0, shapes)
    opt = _optim_run(lambda ps: AdamW(ps, lr=1e-2, compiled=True), fallen, steps=3)
    _optim_run(lambda ps: AdamW(ps, lr=1e-2), eager, steps=3)
    assert opt._update.compiled_fn is None and not opt._update.enabled
    assert capsys.readouterr().err.count("warning: torch.compile of AdamW's step failed") == 1
    for a, b in zip(fallen, eager):
        assert torch.equal(a, b)


def test_optim_adamw_first_step_is_sign_descent():
    """Hand check (docstring example): step 1 with wd=0 moves each weight by ~lr*sign(g)."""
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    p.grad = torch.tensor([0.5, -2.0])
    AdamW([p], lr=0.1).step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, 1.1]))


@pytest.mark.parametrize("scale", [0.01, 100.0])  # well below / far above max_norm
def test_optim_clip_grad_norm_matches_torch(scale):
    """train.clip_grad_norm == torch.nn.utils.clip_grad_norm_, bitwise, whether or not it
    clips (it skips the multiply when the norm is below max_norm), and it returns the norm
    before clipping. A param without a grad is ignored; max_norm=0 only measures."""
    shapes = [(5, 7), (7,), (3, 2, 4)]
    ours, ref = _optim_params(0, shapes), _optim_params(0, shapes)
    for ps in (ours, ref):
        _optim_set_grads(ps[:2], 5)
        for p in ps[:2]:
            p.grad.mul_(scale)
    norm = train.clip_grad_norm(ours, max_norm=1.0)
    expected = torch.nn.utils.clip_grad_norm_(ref[:2], max_norm=1.0).item()
    assert norm == expected and ours[2].grad is None
    assert (norm > 1.0) == (scale > 1.0)
    for a, b in zip(ours[:2], ref[:2]):
        assert torch.equal(a.grad, b.grad)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours[:2]])).item()
    assert clipped == pytest.approx(min(norm, 1.0), rel=1e-5)
    before = [p.grad.clone() for p in ours[:2]]
    assert train.clip_grad_norm(ours, max_norm=0.0) == pytest.approx(min(norm, 1.0), rel=1e-5)
    assert all(torch.equal(p.grad, b) for p, b in zip(ours[:2], before))


def test_optim_cautious_decay_only_where_signs_agree():
    """Hand-checked: with lr=0.1, wd=0.5, decay factor is 1 - 0.05 = 0.95 on agreeing
    coordinates only. First Adam step = lr*sign(g) (see above).
        p = [ 2, -2,  2, -2],  g = [ 1, -1, -1,  1]  -> update sign = sign(g)
        agree (update*p > 0):   yes  yes   no   no
        after decay:  [1.9, -1.9, 2, -2];  after step p -= 0.1*sign(g):
        [1.8, -1.8, 2.1, -2.1]
    Guards: decay applied everywhere, or mask computed with the wrong sign."""
    p = torch.nn.Parameter(torch.tensor([2.0, -2.0, 2.0, -2.0]))
    p.grad = torch.tensor([1.0, -1.0, -1.0, 1.0])
    AdamW([p], lr=0.1, weight_decay=0.5, cautious=True).step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.8, -1.8, 2.1, -2.1]))
    q = torch.nn.Parameter(torch.tensor([2.0, -2.0, 2.0, -2.0]))  # plain decay: all four
    q.grad = p.grad.clone()
    AdamW([q], lr=0.1, weight_decay=0.5).step()
    torch.testing.assert_close(q.detach(), torch.tensor([1.8, -1.8, 2.0, -2.0]))


def test_optim_muon_cautious_decay():
    """Muon with cautious decay: coordinates whose update disagrees in sign with the
    weight are not decayed (compare against the same step without decay)."""
    ps = _optim_params(3, [(6, 4)])
    base = [p.detach().clone() for p in ps]
    _optim_set_grads(ps, 7)
    grad = ps[0].grad.clone()
    Muon(ps, lr=0.1, weight_decay=0.5, cautious=True).step()
    nodecay = torch.nn.Parameter(base[0].clone())
    nodecay.grad = grad
    Muon([nodecay], lr=0.1).step()
    update = (base[0] - nodecay.detach()) / 0.1            # what Muon subtracted
    agree = update * base[0] > 0
    expected = torch.where(agree, nodecay.detach() - 0.05 * base[0], nodecay.detach())
    torch.testing.assert_close(ps[0].detach(), expected, rtol=1e-6, atol=1e-6)
    assert 0 < agree.sum() < agree.numel()                 # both cases exercised


# -----------------------------------------------------------------------------
# Newton-Schulz

def _optim_ns_reference(G, steps=5):
    """Slow reference: SVD in float64, apply phi(s) = a s + b s^3 + c s^5 to each
    normalised singular value `steps` times, rebuild U phi(S) V^T."""
    a, b, c = NS_COEFFS
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    s = S / G.double().norm(dim=(-2, -1), keepdim=True)[..., 0]
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return U @ torch.diag_embed(s) @ Vh


@pytest.mark.parametrize("shape", [(32, 32), (48, 16), (16, 48), (3, 20, 12)])
def test_optim_newton_schulz_matches_svd_reference(shape):
    """The matmul iteration equals the polynomial applied to singular values (square,
    tall (transposed path), wide, batched = each matrix of a stack on its own)."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    X = newton_schulz5(G)
    assert X.shape == G.shape and X.dtype == torch.float32
    torch.testing.assert_close(X.double(), _optim_ns_reference(G), rtol=0, atol=2e-4)


@pytest.mark.parametrize("shape", [(64, 64), (96, 24), (24, 96), (4, 40, 24)])
def test_optim_newton_schulz_singular_values_near_one(shape):
    """Every singular value that starts >= NS_BAND_FROM of the Frobenius norm ends in
    NS_BAND = [0.68, 1.21]; random rectangular matrices are well-conditioned, so all of
    theirs must be in the band. A square random matrix can have a few tiny singular
    values (those stay below the band, by design of 5 steps)."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    s_in = torch.linalg.svdvals(G) / G.norm(dim=(-2, -1), keepdim=True)[..., 0]
    s_out = torch.linalg.svdvals(newton_schulz5(G).double()).float()
    lo, hi = NS_BAND
    ok = s_in >= NS_BAND_FROM
    assert ok.float().mean() > 0.9
    if shape[-1] != shape[-2]:
        assert ok.all()
    assert ((s_out[ok] >= lo - 1e-3) & (s_out[ok] <= hi + 1e-3)).all(), (s_out.min(), s_out.max())
    assert (s_out <= hi + 1e-3).all()


def test_optim_newton_schulz_bf16():
    """The bf16 path (default on CUDA, opt-in on CPU) stays within ~2% of fp32 and in
    the same band; Muon with ns_dtype=bf16 keeps float32 weights float32."""
    for shape in [(48, 16), (3, 40, 24)]:
        G = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        X = newton_schulz5(G, dtype=torch.bfloat16)
        assert X.dtype == torch.bfloat16 and X.shape == G.shape
        X32 = newton_schulz5(G)
        assert (X.float() - X32).norm() / X32.norm() < 0.05
        s = torch.linalg.svdvals(X.double())
        assert s.min() > NS_BAND[0] - 0.03 and s.max() < NS_BAND[1] + 0.03
    (p,) = _optim_params(4, [(8, 4)])
    _optim_set_grads([p], 5)
    Muon([p], ns_dtype=torch.bfloat16).step()
    assert p.dtype == torch.float32 and torch.isfinite(p).all()


def test_optim_newton_schulz_zero_matrix_stays_finite():
    """Guards: dividing by a zero Frobenius norm (an all-zero grad) gives NaN weights."""
    X = newton_schulz5(torch.zeros(8, 4))
    assert torch.isfinite(X).all() and (X == 0).all()


def test_optim_muon_one_step_by_hand():
    """Step 1, momentum mu, nesterov: buf = (1-mu) g, u = (1-mu) g + mu buf; the
    orthogonalisation removes the scale, so W1 = W0 - lr * scale * NS(g). Tall (8, 2)
    matrix: scale = sqrt(8 / 2) = 2."""
    assert muon_scale((8, 2)) == 2.0 and muon_scale((2, 8)) == 1.0 and muon_scale((3, 8, 2)) == 2.0
    (p,) = _optim_params(4, [(8, 2)])
    w0 = p.detach().clone()
    _optim_set_grads([p], 5)
    expected = w0 - 0.02 * 2.0 * newton_schulz5(p.grad)
    Muon([p], lr=0.02).step()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_numel", [train.MUON_BATCH_NUMEL, 100])
def test_optim_muon_batched_equals_one_matrix_at_a_time(monkeypatch, batch_numel):
    """Muon orthogonalises same-shape matrices in one batched call. Guards: rows of the
    stack applied to the wrong parameter, one Frobenius norm for the whole stack instead
    of one per matrix, the aspect-ratio scale of one shape used for another (a tall matrix
    and its wide transpose share a bucket and need different scales). batch_numel=100:
    batches capped at 2 matrices of 48 elements, so a bucket of 3 is cut in two calls."""
    monkeypatch.setattr(train, "MUON_BATCH_NUMEL", batch_numel)
    # (6, 8) and (4, 12) share the buckets of their transposes (8, 6) and (12, 4)
    shapes = [(8, 6), (12, 4), (6, 8), (3, 5, 7), (8, 6), (4, 12), (12, 4), (3, 7, 5)]
    together = _optim_params(6, shapes)
    alone = _optim_params(6, shapes)
    scales = [0.5, 1.0, 3.0, 1.0, 0.01, 2.0, 0.3, 5.0]  # very different norms within one bucket
    for step in range(2):
        _optim_set_grads(together, 40 + step)
        _optim_set_grads(alone, 40 + step)
        for p, q, k in zip(together, alone, scales):
            p.grad.mul_(k)
            q.grad.mul_(k)
        if step == 0:
            opt = Muon(together, lr=0.05, momentum=0.9, weight_decay=0.1, cautious=True)
            singles = [Muon([q], lr=0.05, momentum=0.9, weight_decay=0.1, cautious=True) for q in alone]
        opt.step()
        for single in singles:
            single.step()
    for p, q in zip(together, alone):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)


def _optim_muon_compiled_run(compiled, monkeypatch, steps=3):
    """Two groups (one with cautious decay), tall + wide + 3-D shapes; lr and momentum
    change every step, as the schedules do."""
    params = _optim_params(7, [(8, 6), (6, 8), (12, 4), (3, 5, 7), (8, 6)])
    opt = Muon([dict(params=params[:3]), dict(params=params[3:], weight_decay=0.1, cautious=True)],
               lr=0.02, momentum=0.9, compiled=compiled)
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.02 * (1.0 - 0.3 * s)
            group["momentum"] = 0.85 + 0.05 * s
        _optim_set_grads(params, 60 + s)
        opt.step()
    return params, opt


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's imports
def test_optim_muon_compiled_equals_eager(monkeypatch, capsys):
    """Muon runs its single-process step through torch.compile when the trainer compiles:
    same weights as eager (float32), and the changing lr and momentum are inputs of the
    compiled graph, not constants: three steps compile one graph per group, no more."""
    torch.compiler.reset()
    eager, _ = _optim_muon_compiled_run(False, monkeypatch)
    compiled, opt = _optim_muon_compiled_run(True, monkeypatch)
    assert opt._update.compiled_fn is not None and "warning" not in capsys.readouterr().err
    for p, q in zip(compiled, eager):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    with monkeypatch.context() as m:
        graphs = _compile_counting(m)
        torch.compiler.reset()
        _optim_muon_compiled_run(True, m)
        assert len(graphs) == 2   # the two groups have different buckets and settings
    torch.compiler.reset()


def test_optim_muon_compile_failure_falls_back_to_eager(monkeypatch, capsys):
    """A machine where torch.compile cannot work (no C++ compiler): one warning, then the
    eager step, with the same result."""
    monkeypatch.setattr(torch, "compile", _broken_compile)
    eager, _ = _optim_muon_compiled_run(False, monkeypatch)
    fallen, opt = _optim_muon_compiled_run(True, monkeypatch)
    assert opt._update.compiled_fn is None and not opt._update.enabled
    assert capsys.readouterr().err.count("warning: torch.compile of Muon's step failed") == 1
    for p, q in zip(fallen, eager):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


def test_optim_muon_rejects_vectors():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


# -----------------------------------------------------------------------------
# Distributed Muon: 2 gloo ranks == 1 process

# shapes: 3 of (8, 6) (odd -> one padding slot with 2 ranks), 1 tall (12, 4), a batched
# (3, 5, 7) stack, in two groups; 2-step lr schedule + momentum warmup as the trainer does.
_OPTIM_MUON_SHAPES = [(8, 6), (12, 4), (8, 6), (3, 5, 7), (8, 6)]
_OPTIM_MUON_STEPS = 3


def _optim_muon_make(params):
    return Muon([dict(params=params[:3], lr=0.02, base_lr=0.02),
                 dict(params=params[3:], lr=0.01, base_lr=0.01, weight_decay=0.1, cautious=True)],
                momentum=0.9)


def _optim_muon_train(params):
    opt = _optim_muon_make(params)
    for s in range(_OPTIM_MUON_STEPS):
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * (1.0 - 0.2 * s)
            group["momentum"] = 0.85 + 0.05 * s  # momentum warmup
        _optim_set_grads(params, 100 + s)  # same grads on every rank, as after DDP
        opt.step()
    return opt


def _optim_dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params = _optim_params(0, _OPTIM_MUON_SHAPES)
        _optim_muon_train(params)
        torch.save([p.detach() for p in params], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_optim_muon_distributed_matches_single_process(tmp_path):
    """Guards: ranks applying only their own slice, a wrong owner index, the padding
    slot being applied to a real parameter, ranks drifting apart."""
    mp.spawn(_optim_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = _optim_params(0, _OPTIM_MUON_SHAPES)
    _optim_muon_train(single)
    start = _optim_params(0, _OPTIM_MUON_SHAPES)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for a, b, s in zip(got, single, start):
            assert torch.equal(a, b.detach())  # same NS calls on the same inputs: bitwise
            assert not torch.equal(a, s)       # and every parameter moved


# -----------------------------------------------------------------------------
# state_dict round trip

@pytest.mark.parametrize("which", ["adamw", "muon"])
def test_optim_state_dict_resume_weights_only(which):
    """Save after 2 steps through torch.save / torch.load(weights_only=True), load into a
    fresh optimizer on fresh copies of the weights, run 2 more: equal (bitwise) to 4
    uninterrupted steps. Guards: state that is not plain tensors/numbers, lost step
    counters (bias correction) or momentum buffers."""
    shapes = [(6, 4), (4, 6), (2, 3, 5)]
    make = (lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1, cautious=True)) if which == "adamw" \
        else (lambda ps: Muon(ps, lr=0.02, weight_decay=0.1))
    full = _optim_params(0, shapes)
    _optim_run(make, full, steps=4)

    half = _optim_params(0, shapes)
    opt = _optim_run(make, half, steps=2)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "w": [p.detach() for p in half]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(w.clone()) for w in ckpt["w"]]
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    for s in range(2, 4):
        _optim_set_grads(resumed, 1000 + s)
        opt2.step()
    for a, b in zip(resumed, full):
        assert torch.equal(a, b)


def test_optim_muon_fan_in_first_scales_like_the_transposed_matrix():
    # Regression: MoE expert stacks are stored (n_experts, in, out), the transpose of a
    # torch Linear weight, and once got the inverse aspect-ratio factor (c_fc and c_proj
    # of the experts swapped their step sizes). A step on the stored layout with
    # fan_in_first=True must equal a step on the Linear layout, transposed back.
    torch.manual_seed(0)
    w_linear = torch.randn(3, 8, 2)          # (experts, out=8, in=2): tall, factor 2
    grad = torch.randn(3, 8, 2)
    a = torch.nn.Parameter(w_linear.clone())
    b = torch.nn.Parameter(w_linear.mT.contiguous().clone())  # stored (experts, in, out)
    a.grad, b.grad = grad.clone(), grad.mT.contiguous().clone()
    Muon([a], lr=0.1, momentum=0.0).step()
    Muon([b], lr=0.1, momentum=0.0, fan_in_first=True).step()
    torch.testing.assert_close(b.detach().mT, a.detach(), rtol=1e-5, atol=1e-6)
    # and the factor really differs from the untreated stored layout
    c = torch.nn.Parameter(w_linear.mT.contiguous().clone())
    c.grad = grad.mT.contiguous().clone()
    Muon([c], lr=0.1, momentum=0.0).step()
    assert not torch.allclose(c.detach().mT, a.detach(), atol=1e-4)

# =============================================================================
# 6. train.py: the training loop
# =============================================================================

# Tests of train.py: settings, schedules, data, checkpoints, resume, DDP, faults.
# Everything runs on CPU in float32 with a one-block model on a tiny corpus that
# prepare.py tokenizes once per session (module-scoped fixture).



_TRAIN_REPO = os.path.dirname(os.path.abspath(__file__))


def _train_corpus_docs():
    """A few dozen small Python-like documents (varied, so BPE has pairs to merge)."""
    docs = []
    for i in range(60):
        body = "\n".join(f"    x{j} = {i} * {j} + len('{'ab' * (j % 3)}')" for j in range(i % 7 + 2))
        docs.append(f"def func_{i}(a, b):\n    '''doc {i}'''\n{body}\n    return a + b\n")
    return docs


@pytest.fixture(scope="module")
def _train_data(tmp_path_factory):
    """A prepared data directory (vocab 300) made by prepare.py's own CLI code."""
    root = tmp_path_factory.mktemp("train_data")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n\n".join(_train_corpus_docs()))
    out = root / "data"
    argv = [f"--input={corpus}", "--doc_sep=\\n\\n\\n", f"--out_dir={out}", "--vocab_size=300",
            "--val_fraction=0.2", "--num_proc=1"]
    prepare.main(argv)
    return str(out)


def _train_cfg(data_dir, out_dir, **overrides):
    """A tiny, fast, deterministic float32 configuration."""
    base = dict(data_dir=data_dir, out_dir=str(out_dir), n_layer=1, n_head=2, n_kv_head=2,
                n_embd=32, block_size=32, seq_len=32, batch_size=4, max_steps=4,
                eval_interval=1000, eval_tokens=256, sample_interval=0, sample_tokens=4,
                log_interval=1000, ckpt_interval=1000, dtype="float32", compile="false",
                muon_momentum_warmup=2, warmup_steps=1)
    base.update(overrides)
    return train.TrainConfig(**base)


def _train_args(cfg):
    """The command line that reproduces cfg (for subprocess runs)."""
    return [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()
            if v != getattr(train.TrainConfig(), k)]


# -----------------------------------------------------------------------------
# settings


def test_train_config_errors_are_one_line_user_errors():
    with pytest.raises(bpe.SettingsError, match="did you mean --seq_len"):
        bpe.parse_settings(train.TrainConfig, ["--seq_lenn=64"])
    with pytest.raises(bpe.SettingsError, match="expected int"):
        bpe.parse_settings(train.TrainConfig, ["--n_layer=2.5"])
    with pytest.raises(bpe.SettingsError, match="batch_mode"):
        bpe.parse_settings(train.TrainConfig, ["--batch_mode=shuffled"])
    with pytest.raises(bpe.SettingsError, match="block_size"):
        bpe.parse_settings(train.TrainConfig, ["--seq_len_schedule=[(0, 64), (10, 999)]"])
    with pytest.raises(bpe.SettingsError, match="strictly increasing"):
        bpe.parse_settings(train.TrainConfig, ["--window_schedule=[(10, 64), (5, 0)]"])
    with pytest.raises(bpe.SettingsError, match="only one"):
        bpe.parse_settings(train.TrainConfig, ["--resume=True", "--init_from=x.pt"])
    with pytest.raises(bpe.SettingsError, match="only one"):
        bpe.parse_settings(train.TrainConfig, ["--resume=True", "--overwrite=True"])
    # regression: these were tracebacks deep inside the run (Muon's ValueError, an empty val set)
    with pytest.raises(bpe.SettingsError, match="--matrix_lr=-1.0 must be >= 0"):
        bpe.parse_settings(train.TrainConfig, ["--matrix_lr=-1"])
    with pytest.raises(bpe.SettingsError, match="--beta2=1.0 must lie in"):
        bpe.parse_settings(train.TrainConfig, ["--beta2=1"])
    with pytest.raises(bpe.SettingsError, match="--eval_tokens=10 is less than one validation window"):
        bpe.parse_settings(train.TrainConfig, ["--eval_tokens=10"])
    with pytest.raises(bpe.UserError, match="n_embd=100 must be divisible by n_head=3"):
        bpe.parse_settings(train.TrainConfig, ["--n_embd=100", "--n_head=3", "--n_kv_head=1"])
    cfg = bpe.parse_settings(train.TrainConfig, ["--matrix_lr=1", "--compile=False",
                                                 "--seq_len_schedule=[(0, 64), (100, 128)]"])
    assert cfg.matrix_lr == 1.0 and cfg.compile == "false"
    assert cfg.seq_len_schedule == [(0, 64), (100, 128)]


def test_train_every_model_field_is_a_setting_with_help():
    # TrainConfig extends GPTConfig, so every architecture switch is a train.py setting whose
    # --help line is model.py's own comment (read through the class hierarchy by bpe.py)
    model_comments = bpe._field_comments(M.GPTConfig)
    text = bpe.settings_help(train.TrainConfig).splitlines()
    for f in dataclasses.fields(M.GPTConfig):
        line = next(l for l in text if l.strip().startswith(f"--{f.name}="))
        if f.name != "vocab_size":  # redefined by TrainConfig (0 = the tokenizer's size)
            assert line.split(None, 1)[1] == model_comments[f.name], f.name
    for name in ("seq_len_schedule", "matrix_lr", "overwrite", "deterministic"):
        line = next(l for l in text if l.strip().startswith(f"--{name}="))
        assert len(line.split(None, 1)[1]) > 10  # a real comment follows the default
    mc = M.gpt_config(train.TrainConfig(n_layer=3, mlp="swiglu"), vocab_size=300)
    assert (mc.n_layer, mc.mlp, mc.vocab_size) == (3, "swiglu", 300) and type(mc) is M.GPTConfig


# -----------------------------------------------------------------------------
# schedules


def test_train_schedules_at_boundary_steps():
    cfg = train.TrainConfig(max_steps=100, warmup_steps=10, warmdown_frac=0.2, final_lr_frac=0.1,
                            muon_momentum_start=0.85, muon_momentum=0.95, muon_momentum_warmup=50)
    lr = lambda s: train.lr_multiplier(cfg, s)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)      # warmup ends at 1
    assert lr(10) == 1.0 and lr(80) == 1.0                                   # warmdown starts at 80
    assert lr(90) == pytest.approx(1 - 0.5 * 0.9)                            # linear halfway
    assert lr(100) == pytest.approx(0.1)                                     # ends at final frac
    cos = dataclasses.replace(cfg, warmdown="cosine")
    assert train.lr_multiplier(cos, 90) == pytest.approx(0.1 + 0.9 * 0.5)
    assert train.lr_multiplier(cos, 80) == 1.0
    assert train.muon_momentum(cfg, 0) == pytest.approx(0.85)
    assert train.muon_momentum(cfg, 25) == pytest.approx(0.90)
    assert train.muon_momentum(cfg, 50) == train.muon_momentum(cfg, 500) == pytest.approx(0.95)
    sched = [(0, 64), (100, 256)]
    assert [train.staged(sched, s, 512) for s in (0, 99, 100, 10**6)] == [64, 64, 256, 256]
    assert train.staged([(5, 0.5)], 4, 0.3) == 0.3 and train.staged([], 7, 9) == 9
    plan = train.plan_step(train.TrainConfig(window_schedule=[(0, 16), (3, 0)],
                                             mtp_weight_schedule=[(2, 0.0)]), 3)
    assert plan.window == 0 and plan.mtp_weight == 0.0


_TRAIN_MALLOC_SCRIPT = """
import ctypes, resource, sys, torch
sys.path.insert(0, sys.argv[2])
import model
class MallInfo2(ctypes.Structure):  # glibc >= 2.33; hblkhd = bytes in mmap-ed blocks
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "on":
    assert model.keep_freed_memory()
before = mallinfo2().hblkhd
big = torch.ones(48 << 18)  # 48 MB: above glibc's largest mmap threshold (32 MB)
mapped = mallinfo2().hblkhd - before
del big
sizes = [(1 << k) // 4 for k in range(17, 24)] * 4  # float32 tensors of 128 KB .. 8 MB
def churn():  # what a training step does: allocate, fill, free, many sizes
    for _ in range(5):
        tensors = [torch.ones(n) for n in sizes]
        del tensors
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
small = [libc.malloc(48) for _ in range(64)]  # more than the per-thread cache keeps (7)
for block in small:
    libc.free(block)
print(mapped, faults, mallinfo2().smblks)     # smblks: free blocks waiting in fastbins
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="glibc >= 2.33 malloc settings")
def test_train_keep_freed_memory_stops_page_faults():
    """The Runtime tunes glibc's malloc on CPU (model.keep_freed_memory), checked in fresh processes.
    The mechanism: a new 48 MB tensor is its own mmap without it (given back to the kernel
    when freed) and comes from the heap with it; freed small blocks wait in fastbins
    without it and are merged at once with it. The effect: after a warm-up, a second
    round of the same allocations (16k pages) hardly page-faults with it. (Without it,
    that count depends on the heap's layout: 0, 6.5k or 78k here, so it is not asserted.)"""
    def run(mode):
        r = subprocess.run([sys.executable, "-c", _TRAIN_MALLOC_SCRIPT, mode, _TRAIN_REPO],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return [int(x) for x in r.stdout.split()[-3:]]
    mapped_off, _, fastbins_off = run("off")
    mapped_on, faults_on, fastbins_on = run("on")
    # one round touches 16k pages; a few hundred faults come from Python and torch themselves
    assert mapped_off >= 48 << 20 and mapped_on == 0 and faults_on < 2000, (mapped_off, mapped_on, faults_on)
    assert fastbins_off > 0 and fastbins_on == 0, (fastbins_off, fastbins_on)


# -----------------------------------------------------------------------------
# data


def test_train_batches_depend_only_on_seed_step_index(_train_data):
    shards = prepare.load_split(_train_data, "train")
    bos = prepare.load_meta(_train_data)["bos_id"]
    for mode in ("random", "packed"):
        a = train.BatchSource(shards, mode, seed=1)
        b = train.BatchSource(shards, mode, seed=1)   # a fresh source: no hidden position
        x1, y1 = a.get(7, 1, 4, 16)
        b.get(0, 0, 4, 16)                            # reading other batches first changes nothing
        x2, y2 = b.get(7, 1, 4, 16)
        assert x1.shape == (4, 16) and np.array_equal(x1, x2) and np.array_equal(y1, y2)
        assert np.array_equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
        assert not np.array_equal(x1, a.get(7, 2, 4, 16)[0])  # another rank / micro-step
    packed = train.BatchSource(shards, "packed", seed=3)
    x, _ = packed.get(0, 0, 8, 32)
    assert (x[:, 0] == bos).all()  # every packed row starts at a document start


def test_train_random_windows_stay_inside_one_shard():
    """Random mode over several shards (one too short for a window): every row is T+1
    consecutive tokens of a single shard, every long enough shard is used, the short one
    never, and windows reach the very last valid start of a shard."""
    lengths = [50, 9, 200, 17]      # T + 1 = 17: shard 1 has no window, shard 3 exactly one
    shards = [types.SimpleNamespace(tokens=np.arange(n, dtype=np.uint16) + 1000 * i)
              for i, n in enumerate(lengths)]
    source = train.BatchSource(shards, "random", seed=5)
    seen, starts = set(), set()
    for step in range(300):
        x, y = source.get(step, 0, 8, 16)
        rows = np.concatenate([x, y[:, -1:]], axis=1)             # (B, T+1) as read
        assert (np.diff(rows, axis=1) == 1).all()                 # consecutive tokens ...
        seen |= set((rows[:, 0] // 1000).tolist())                # ... of one shard each
        assert ((rows[:, -1] // 1000) == (rows[:, 0] // 1000)).all()
        starts |= set(rows[:, 0].tolist())
    assert seen == {0, 2, 3}
    assert {33, 2183, 3000} <= starts  # the last starts of shards 0 and 2, shard 3's only one
    with pytest.raises(bpe.UserError, match="fewer than 201 tokens"):
        source.get(0, 0, 2, 200)


def test_train_bits_per_byte_matches_hand_count(_train_data, tmp_path):
    # bpb = nats / (ln 2 * bytes of the target tokens): recompute the bytes by decoding
    cfg = _train_cfg(_train_data, tmp_path)
    rt = train.runtime_for(cfg)
    tok = prepare.load_tokenizer(_train_data)
    val_x, val_y = train.val_windows(prepare.load_split(_train_data, "val"), 16, 64)
    torch.manual_seed(0)
    m = M.GPT(M.gpt_config(cfg, vocab_size=tok.vocab_size))
    tb = torch.tensor(tok.token_bytes())
    loss, bpb = train.evaluate(rt, m, val_x, val_y, 2, tb, False, tok.eot_id)
    n_bytes = sum(len(tok.decode_bytes([t])) for t in val_y.ravel().tolist())
    assert bpb == pytest.approx(loss * val_y.size / (math.log(2) * n_bytes), rel=1e-6)


# -----------------------------------------------------------------------------
# checkpoints, resume, signals, faults


def test_train_atomic_checkpoint_survives_crash_during_save(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    M.save_checkpoint(path, {"step": 1, "model": {"w": torch.ones(3)}, "model_config": {}})
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):  # half a file, then the "power cut"
        f.write(b"PK\x03\x04 partial")
        raise OSError("simulated crash")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError):
        M.save_checkpoint(path, {"step": 2, "model": {"w": torch.zeros(3)}, "model_config": {}})
    monkeypatch.setattr(torch, "save", real_save)
    ck = M.load_checkpoint(path)
    assert ck["step"] == 1 and torch.equal(ck["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind


def test_train_tied_embedding_trains_at_the_head_lr(_train_data, tmp_path):
    # Regression: with tie_embeddings=True the shared wte/lm_head matrix sat in the
    # "embed" group at embed_lr (~50x head_lr) and the default run diverged (val bpb
    # 2.67 vs 1.52 untied in the ablation). It must train at the head's lr.
    cfg = _train_cfg(_train_data, tmp_path, tie_embeddings=True)
    model = M.GPT(M.GPTConfig(vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                              block_size=32, tie_embeddings=True))
    rt = train.Runtime(device=torch.device("cpu"))
    groups = {g["name"]: g for opt in train.build_optimizers(cfg, model, rt) for g in opt.param_groups}
    scale = (train.REFERENCE_WIDTH / cfg.n_embd) ** 0.5
    assert "head" not in groups  # the head is the embedding
    assert groups["embed"]["lr"] == pytest.approx(cfg.head_lr * scale)
    assert groups["embed"]["params"][0] is model.lm_head.weight


def test_train_checkpoint_loads_weights_only_without_prefixes(_train_data, tmp_path):
    cfg = _train_cfg(_train_data, tmp_path, max_steps=2, eval_interval=1,
                     seq_len_schedule=[(0, 16), (1, 32)],  # tuples must survive weights_only too
                     batch_size_schedule=[(1, 2)], window_schedule=[(0, 8), (1, 0)])
    result = train.train(cfg)
    assert result.step == 2 and math.isfinite(result.val_bpb)
    for name in ("last.pt", "best.pt"):
        ck = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        for key in ("model", "model_config", "runtime", "train_config", "optimizers", "step",
                    "rng", "tokenizer", "tokenizer_path", "tokenizer_fingerprint", "best_val_loss",
                    "val_bpb", "bos_id", "checksum"):
            assert key in ck, key
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in ck["model"])
        m = M.GPT(M.GPTConfig(**ck["model_config"]))
        m.load_state_dict(ck["model"])  # strict: every key matches a bare GPT
    assert os.path.isfile(ck["tokenizer_path"])
    # the checkpoint carries its own tokenizer: a rebuilt or deleted data directory cannot orphan it
    gone = dict(ck, tokenizer_path=str(tmp_path / "deleted" / "tokenizer.bpe"))
    tok = M.checkpoint_tokenizer(gone, str(tmp_path / name))
    assert tok.fingerprint == ck["tokenizer_fingerprint"] == prepare.load_tokenizer(_train_data).fingerprint
    # metrics.jsonl has train and val records, loss.svg is valid SVG with both curves
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and {"grad_norm", "tok_s", "mfu", "lr_mult"} <= set(steps[0])
    assert [r["seq_len"] for r in steps] == [16, 32]  # the staged schedules took effect
    assert [r["batch_size"] for r in steps] == [4, 2]
    assert sum("val_bpb" in r for r in records) >= 2
    root = ET.parse(tmp_path / "loss.svg").getroot()
    lines = {p.get("id"): p.get("points") for p in root.iter("{http://www.w3.org/2000/svg}polyline")}
    assert set(lines) == {"train", "val"}
    assert len(lines["train"].split()) == 2 and len(lines["val"].split()) >= 2


def test_train_loss_svg_handles_edge_cases():
    # one point, flat curves and nan values must still give parseable SVG
    for train_pts, val_pts in (([(1, 2.0)], []), ([(0, 3.0), (1, 3.0)], [(1, float("nan"))])):
        root = ET.fromstring(train.loss_svg(train_pts, val_pts))
        assert root.tag.endswith("svg")
    assert "o" in train.text_plot([(0, 3.0), (10, 2.0)], [(10, 2.5)])


def _train_sigterm_at(monkeypatch, at_call):
    """Make the at_call-th forward of training send this process a real SIGTERM."""
    calls = {"n": 0}
    real = train.forward_loss

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "forward_loss", forward)


# model.py 7b and 7c in a one-block model: 2 dynamic, doubly stochastic streams and n-gram memory
_TRAIN_STREAMS_MEMORY = dict(hc_streams=2, hc_dynamic=True, hc_sinkhorn=True, hc_sinkhorn_iters=3,
                             engram_layers="0", engram_ngram="2,3", engram_heads=2, engram_rows=1024,
                             engram_dim=4, threads=1)


@pytest.mark.parametrize("mode,model", [("random", {}), ("packed", {}), ("packed", _TRAIN_STREAMS_MEMORY)])
def test_train_resume_is_bitwise_exact_after_sigterm(_train_data, tmp_path, monkeypatch, mode, model):
    opts = dict(max_steps=6, batch_mode=mode, grad_accum=2, warmup_steps=2, warmdown_frac=0.5, **model)
    full = train.train(_train_cfg(_train_data, tmp_path / "full", **opts))
    # SIGTERM during step 3's first micro-step: the step finishes, last.pt is saved, no error
    _train_sigterm_at(monkeypatch, at_call=5)
    part = train.train(_train_cfg(_train_data, tmp_path / "part", **opts))
    assert part.stopped and part.step == 3
    assert torch.load(tmp_path / "part" / "last.pt", weights_only=True)["step"] == 3
    monkeypatch.undo()
    rest = train.train(_train_cfg(_train_data, tmp_path / "part", resume=True, **opts))
    assert rest.step == 6
    assert part.losses + rest.losses == full.losses  # bitwise equal floats, step for step
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def _train_default_cfg(data_dir, out_dir, **overrides):
    """The defaults a user gets (dtype, compile, deterministic, threads all "auto"), on a small
    model: only the sizes and the logging are set."""
    base = dict(data_dir=data_dir, out_dir=str(out_dir), n_layer=2, n_head=2, n_kv_head=2,
                n_embd=64, block_size=64, seq_len=64, batch_size=8, max_steps=8, eval_interval=4,
                eval_tokens=256, sample_interval=0, log_interval=1000, ckpt_interval=1000)
    base.update(overrides)
    return train.TrainConfig(**base)


def test_train_default_settings_resume_bitwise(_train_data, tmp_path, monkeypatch):
    """Regression (reliability finding 3): with the defaults, compiled CPU code summed the
    embedding's gradient with atomic adds across threads, so two runs with one seed drifted
    apart after a few steps, and --dtype=auto could choose differently on resume. Now: two
    uninterrupted default runs are bitwise equal, and so is a run stopped by SIGTERM and resumed
    (which reuses the checkpoint's saved runtime choices)."""
    threads = torch.get_num_threads()
    try:
        full = train.train(_train_default_cfg(_train_data, tmp_path / "full"))
        again = train.train(_train_default_cfg(_train_data, tmp_path / "again"))
        assert full.losses == again.losses
        _train_sigterm_at(monkeypatch, at_call=4)
        part = train.train(_train_default_cfg(_train_data, tmp_path / "part"))
        assert part.stopped and part.step == 4
        saved = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["runtime"]
        assert saved == {"dtype": "float32" if not M.cpu_has_bf16_matmul() else "bfloat16",
                         "compile": True, "threads": os.cpu_count(), "deterministic": True}
        monkeypatch.undo()
        rest = train.train(_train_default_cfg(_train_data, tmp_path / "part", resume=True))
        assert part.losses + rest.losses == full.losses
        assert (full.val_loss, full.val_bpb) == (rest.val_loss, rest.val_bpb)
    finally:
        torch.set_num_threads(threads)


def test_train_never_replaces_an_earlier_run(_train_data, tmp_path):
    """Regression (reliability finding 1): running train.py again over an out_dir silently
    replaced best.pt, last.pt and metrics.jsonl. Now it refuses with one line that names
    --resume=True and --overwrite=True; --overwrite=True really starts over."""
    cfg = _train_cfg(_train_data, tmp_path, max_steps=3, eval_interval=2)
    train.train(cfg)
    before = {n: (tmp_path / n).read_bytes() for n in ("last.pt", "best.pt", "metrics.jsonl")}
    with pytest.raises(bpe.UserError, match=r"already holds a run .*--resume=True.*--overwrite=True"):
        train.train(_train_cfg(_train_data, tmp_path, max_steps=1))
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    res = train.train(_train_cfg(_train_data, tmp_path, max_steps=1, overwrite=True, eval_interval=1))
    assert res.step == 1 and torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 1
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert max(steps) == 1  # the old run's records are gone with it
    r = _e2e_run(["train.py", *_train_args(_train_cfg(_train_data, tmp_path, max_steps=1))], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--overwrite=True" in r.stderr


def test_train_torn_metrics_line_is_dropped_on_resume(_train_data, tmp_path, capsys):
    """Regression (reliability finding 2): a half-written last line in metrics.jsonl (full disk,
    kill) made --resume=True fail with a JSONDecodeError although last.pt was fine."""
    train.train(_train_cfg(_train_data, tmp_path, max_steps=2, ckpt_interval=2, eval_interval=2))
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "loss": 4.2, "lr_m')
    res = train.train(_train_cfg(_train_data, tmp_path, max_steps=4, resume=True, eval_interval=2))
    assert res.step == 4 and "dropped 1 damaged line" in capsys.readouterr().err
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]  # every line parses
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    svg = ET.parse(tmp_path / "loss.svg").getroot()   # the chart is drawn from the whole log
    lines = {p.get("id"): p.get("points") for p in svg.iter("{http://www.w3.org/2000/svg}polyline")}
    assert len(lines["train"].split()) == 4 and len(lines["val"].split()) == 3
    assert train.read_metrics(tmp_path / "metrics.jsonl")[1] == 0


def test_train_eval_tasks_logged_and_drawn(_train_data, tmp_path):
    """--eval_tasks (issue 19): sample.py's multiple-choice suite runs at every eval; its accuracy
    goes into metrics.jsonl and onto loss.svg (a dashed curve against a right-hand axis), and the
    logged number is exactly what sample.run_eval_suite gives for the final model."""
    task = tmp_path / "pick.jsonl"
    task.write_text("".join(json.dumps({"context": f"x = {i} +", "choices": [" 1", " abc", " ("],
                                        "answer": i % 3}) + "\n" for i in range(12)))
    cfg = _train_cfg(_train_data, tmp_path / "out", max_steps=4, eval_interval=2,
                     eval_tasks=str(task), eval_examples=10)
    res = train.train(cfg)
    evals = [json.loads(l) for l in open(tmp_path / "out" / "metrics.jsonl") if '"val_loss"' in l]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(0.0 <= r["acc_pick"] <= 1.0 for r in evals)
    tok = prepare.load_tokenizer(_train_data)
    suite = sample.load_suite(str(task), tok, n_examples=10)
    rt = M.setup_runtime("cpu", "float32", compile="false", deterministic="false")
    assert sample.run_eval_suite(res.model, tok, suite, rt)["pick"] == evals[-1]["acc_pick"]
    svg = ET.parse(tmp_path / "out" / "loss.svg").getroot()
    acc = [p for p in svg.iter("{http://www.w3.org/2000/svg}polyline") if p.get("id") == "acc_pick"]
    assert len(acc) == 1 and len(acc[0].get("points").split()) == 3


def test_train_mfu_is_never_above_100_percent():
    """MFU is a fraction of a peak; a CPU peak timed while the machine was busy comes out too low
    (seen: "mfu 259.9%"). Impossible values are reported as n/a, never printed."""
    assert train.mfu(1000.0, 1e6, 2e9) == pytest.approx(0.5)
    assert train.mfu(1000.0, 1e6, 1e9, world_size=2) == pytest.approx(0.5)
    assert train.mfu(1000.0, 1e6, 5e8) is None and train.mfu(1000.0, 1e6, None) is None
    assert train.format_mfu(None) == "n/a" and train.format_mfu(0.123) == "12.3%"
    rt = M.setup_runtime("cpu", "float32", compile="false", deterministic="false")
    peak = train.peak_flops(rt)
    assert 1e8 < peak < 1e14  # a CPU does between 0.1 GFLOP/s and 100 TFLOP/s


def test_train_eta_ignores_the_compile_step(_train_data, tmp_path, capsys, monkeypatch):
    """Regression (craft finding 5): the first step's ETA came from the compile step ("eta 1 day,
    13:33:48"). The first step is slow here (a 3 s sleep stands in for compiling): its line says
    n/a, and later ETAs come from the steps after it (were the slow step counted, the ETA with k
    steps left would be at least 3k seconds)."""
    real, calls = train.accumulate_gradients, {"n": 0}

    def slow_first(run, plan):
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(3.0)
        return real(run, plan)
    monkeypatch.setattr(train, "accumulate_gradients", slow_first)
    train.train(_train_cfg(_train_data, tmp_path, max_steps=4, log_interval=1))
    etas = re.findall(r"step (\d)/4 .*eta (\S+)", capsys.readouterr().out)
    assert etas[0] == ("1", "n/a") and len(etas) == 4
    for step, eta in etas[1:]:
        h, m, s = (int(x) for x in eta.split(":"))
        assert 3600 * h + 60 * m + s < 3 * (4 - int(step)) or int(step) == 4, etas


def test_train_nonfinite_loss_stops_and_keeps_checkpoints(_train_data, tmp_path, monkeypatch):
    real = train.forward_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # step 3 (the third forward) returns nan
        total, loss, aux = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            return total * float("nan"), loss * float("nan"), aux
        return total, loss, aux

    monkeypatch.setattr(train, "forward_loss", poisoned)
    with pytest.raises(train.NonFinite, match="at step 2"):
        train.train(_train_cfg(_train_data, tmp_path, max_steps=4, ckpt_interval=1))
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["step"] == 2  # the steps before nan were saved; nothing after it
    # skip_nonfinite: the bad step changes no weight, the run goes on
    calls["n"] = 0
    res = train.train(_train_cfg(_train_data, tmp_path / "skip", max_steps=3, skip_nonfinite=True))
    assert res.step == 3 and math.isnan(res.losses[2][1]) and math.isfinite(res.losses[1][1])


def test_train_never_saves_nonfinite_weights(_train_data, tmp_path, monkeypatch):
    """Regression (reliability finding 5): the check looked at the loss before the update, so a
    step that wrote inf into the weights was saved (last.pt held infinite tensors while the
    message said checkpoints were untouched), and --skip_nonfinite=True skipped 19 of 20 steps,
    exited 0 and saved a nan checkpoint. Now weights are checked before every save, skipping
    gives up after max_skips steps in a row, and sample.py refuses such a file in one line."""
    real = train.optimizer_step

    def overflowing(run, loss, grad_norm):  # step 2's update overflows; its loss was finite
        updated = real(run, loss, grad_norm)
        if run.step == 2:
            with torch.no_grad():
                run.params[0][0, 0] = float("inf")
        return updated
    monkeypatch.setattr(train, "optimizer_step", overflowing)
    with pytest.raises(train.NonFinite, match="not saving last.pt.*keep the last finite weights"):
        train.train(_train_cfg(_train_data, tmp_path / "a", max_steps=5, ckpt_interval=1))
    ck = M.load_checkpoint(str(tmp_path / "a" / "last.pt"))   # verified load: finite weights
    assert ck["step"] == 2
    monkeypatch.undo()

    real_forward = train.forward_loss

    def always_nan(*args, **kwargs):
        total, loss, aux = real_forward(*args, **kwargs)
        return total * float("nan"), loss * float("nan"), aux
    monkeypatch.setattr(train, "forward_loss", always_nan)
    with pytest.raises(train.NonFinite, match=r"the 4th step in a row; giving up \(--max_skips=3\)"):
        train.train(_train_cfg(_train_data, tmp_path / "b", max_steps=20, skip_nonfinite=True,
                               max_skips=3, ckpt_interval=2))
    assert M.load_checkpoint(str(tmp_path / "b" / "last.pt"))["step"] == 2
    monkeypatch.undo()

    # a non-finite checkpoint written by an older train.py: one line from sample.py
    bad = dict(ck, model={k: v.clone() for k, v in ck["model"].items()})
    name = next(iter(bad["model"]))
    bad["model"][name].view(-1)[0] = float("nan")
    M.save_checkpoint(str(tmp_path / "nan.pt"), bad)
    with pytest.raises(bpe.UserError, match=f"non-finite weights .*{re.escape(name)}"):
        sample.load_model(str(tmp_path / "nan.pt"))


def test_train_damaged_checkpoint_is_named(_train_data, tmp_path):
    """Regression (reliability finding 10): bytes overwritten inside last.pt's weights loaded
    silently (torch.load does not check the zip's CRCs). The checksum saved with every checkpoint
    catches it: one line naming the file, for resume and for sample.py alike."""
    train.train(_train_cfg(_train_data, tmp_path, max_steps=2))
    path = tmp_path / "last.pt"
    weight = M.load_checkpoint(str(path))["model"]["transformer.wte.weight"]
    raw = path.read_bytes()
    at = raw.find(weight.numpy().tobytes()[:64])
    assert at > 0
    damaged = bytearray(raw)
    damaged[at + 100] ^= 0x40                      # one bit of one weight
    path.write_bytes(bytes(damaged))
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["transformer.wte.weight"], weight)
    for load in (lambda: train.train(_train_cfg(_train_data, tmp_path, max_steps=3, resume=True)),
                 lambda: sample.load_model(str(path))):
        with pytest.raises(bpe.UserError, match=f"checkpoint {re.escape(str(path))} is damaged"):
            load()


def test_train_checkpoint_disk_full_is_one_line(tmp_path, monkeypatch):
    """Regression (reliability finding 7): a full disk during a save raised torch's zip-writer
    error ("enforce fail at inline_container.cc ... unexpected pos"), which never mentions the
    disk. Now one line says so, and the previous file is intact."""
    path = str(tmp_path / "last.pt")
    M.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "model_config": {}, "step": 1})

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4288 vs 4232")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(bpe.UserError, match=r"cannot write .*last.pt: the disk is full .* is intact"):
        M.save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "model_config": {}, "step": 2})
    monkeypatch.undo()
    assert M.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["last.pt"]


def test_train_removes_temp_files_of_killed_saves(_train_data, tmp_path):
    """Regression (reliability finding 9): kill -9 during saves left .last.pt.tmp<pid> files
    that nothing removed. A run (here a resume) deletes those of dead processes, and only those."""
    train.train(_train_cfg(_train_data, tmp_path, max_steps=1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f".last.pt.tmp{dead}").write_bytes(b"half a checkpoint")
    (tmp_path / f".best.pt.tmp{os.getppid()}").write_bytes(b"a save in progress elsewhere")
    train.train(_train_cfg(_train_data, tmp_path, max_steps=2, resume=True))
    assert not (tmp_path / f".last.pt.tmp{dead}").exists()
    assert (tmp_path / f".best.pt.tmp{os.getppid()}").exists()


def test_train_init_from_starts_new_run_from_weights(_train_data, tmp_path):
    train.train(_train_cfg(_train_data, tmp_path / "a", max_steps=2))
    src = str(tmp_path / "a" / "last.pt")
    cfg = _train_cfg(_train_data, tmp_path / "b", max_steps=1, init_from=src, n_layer=3)
    rt = train.runtime_for(cfg)
    m, mc = train.build_model(cfg, rt, 300, M.load_checkpoint(src), src)
    assert mc.n_layer == 1  # architecture comes from the checkpoint, not the settings
    ck = torch.load(src, weights_only=True)
    assert all(torch.equal(v, ck["model"][k]) for k, v in m.state_dict().items())
    res = train.train(cfg)
    assert res.step == 1 and res.losses[0][0] == 1


def test_train_init_from_hf_folder_with_data_from_its_tokenizer_json(_train_data, tmp_path):
    # Fine-tuning a Hugging Face folder: prepare.py tokenizes with the folder's tokenizer.json and
    # train.py --init_from=hf:DIR starts from exactly the folder's weights (step 0, new optimizer).
    torch.manual_seed(0)
    source = M.GPT(train.gpt_config(_train_cfg(_train_data, tmp_path, mlp="swiglu", logit_softcap=0.0,
                                               norm_gain=True, norm_eps=1e-5), vocab_size=300))
    M.export_hf(source, prepare.load_tokenizer(_train_data), str(tmp_path / "hf"))
    corpus = Path(_train_data).parent / "corpus.txt"
    prepare.main([f"--input={corpus}", "--doc_sep=\\n\\n\\n", f"--out_dir={tmp_path / 'data'}",
                  f"--tokenizer={tmp_path / 'hf' / 'tokenizer.json'}", "--val_fraction=0.2", "--num_proc=1"])
    assert prepare.load_tokenizer(str(tmp_path / "data")).fingerprint == prepare.load_tokenizer(_train_data).fingerprint
    cfg = _train_cfg(str(tmp_path / "data"), tmp_path / "b", max_steps=1, init_from=f"hf:{tmp_path / 'hf'}")
    m, mc = train.build_model(cfg, train.runtime_for(cfg), 300, M.open_checkpoint(cfg.init_from), cfg.init_from)
    assert mc.norm_eps == 1e-5 and mc.mlp == "swiglu"
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in m.state_dict().items())
    res = train.train(cfg)
    assert res.step == 1 and res.losses[0][0] == 1


# -----------------------------------------------------------------------------
# objectives: SFT, DPO, RL


def test_train_sft_loss_is_the_plain_loss_on_the_masked_targets():
    """forward_loss with a mask: with all ones it is the plain mean loss (bitwise), with zeros the
    mean over the rest, and a masked position's logits get exactly zero gradient."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    x, y = torch.randint(50, (2, 8)), torch.randint(50, (2, 8))
    plan = train.plan_step(train.TrainConfig(), 0)
    plain = train.forward_loss(m, x, y, None, plan, m.config)[1]
    assert torch.equal(train.forward_loss(m, x, y, None, plan, m.config, torch.ones_like(y))[1], plain)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0, 0]])
    logits = []
    hook = m.lm_head.register_forward_hook(lambda mod, inp, out: out.retain_grad() or logits.append(out))
    total, loss, _ = train.forward_loss(m, x, y, None, plan, m.config, mask)
    hook.remove()
    per_token = F.cross_entropy(m(x).reshape(16, 50), y.reshape(16), reduction="none").view(2, 8)
    assert torch.allclose(loss, per_token[mask == 1].sum() / 5)       # by hand: 5 targets count
    total.backward()
    grad = logits[0].grad.abs().sum(-1)                                 # (B, T)
    assert (grad[mask == 0] == 0).all() and (grad[mask == 1] > 0).all()
    nothing = train.forward_loss(m, x, y, None, plan, m.config, torch.zeros_like(y))[1]
    assert nothing.item() == 0.0                                        # no nan for an empty mask


def test_train_dpo_loss_by_hand():
    beta = 0.5
    # policy == reference: both implicit rewards are 0, the loss is -log sigmoid(0) = ln 2
    logp = torch.tensor([-3.0, -7.5])
    loss, acc, margin = train.dpo_loss(logp, logp + 1, logp, logp + 1, beta)
    assert loss.item() == pytest.approx(math.log(2)) and margin.item() == 0 and acc.item() == 0
    # pair 1: chosen -2 vs ref -2.5, rejected -3 vs ref -2.5 -> r_w = 0.25, r_l = -0.25, margin 0.5
    # pair 2: chosen -4 vs ref -3, rejected -1 vs ref -2  -> r_w = -0.5, r_l = 0.5, margin -1
    loss, acc, margin = train.dpo_loss(torch.tensor([-2.0, -4.0]), torch.tensor([-3.0, -1.0]),
                                       torch.tensor([-2.5, -3.0]), torch.tensor([-2.5, -2.0]), beta)
    expect = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.0))) / 2    # -log sigmoid(m)
    assert loss.item() == pytest.approx(expect) and loss.item() == pytest.approx(0.8937, abs=1e-4)
    assert acc.item() == 0.5 and margin.item() == pytest.approx(-0.25)


def test_train_dpo_held_out_pairs_cover_every_task():
    """The held-out pairs are spread over the whole val split, which prepare.py writes task by
    task: with 1000 pairs of 5 tasks and 200 asked for, each task gets 40 (the first 200 would all
    have been addition, a task the small model cannot do, so DPO's held-out accuracy read ~50%)."""
    val = [(task, i) for task in ("add", "sub", "count", "reverse", "sort") for i in range(200)]
    held = train.spread_evenly(val, 200)
    assert len(held) == 200 and collections.Counter(t for t, _ in held) == {t: 40 for t, _ in val[::200]}
    assert train.spread_evenly(list(range(10)), 3) == [0, 3, 6] and train.spread_evenly([1, 2], 8) == [1, 2]


def test_train_grpo_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    adv = train.grpo_advantages(rewards)
    s = math.sqrt(0.25 * 0.75)                       # group 1: mean 0.25, std over the 4 replies
    assert torch.allclose(adv[0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (s + train.GRPO_EPS))
    assert adv[0, 0].item() == pytest.approx(1.732, abs=1e-3) and adv[0, 1].item() == pytest.approx(-0.577, abs=1e-3)
    assert torch.equal(adv[1], torch.zeros(4))       # all right: nothing to prefer
    assert torch.allclose(adv[2], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-3)
    # the loss by hand: 2 replies of 2 and 1 tokens; A = (1, -1); no KL, then KL with d = 0.5
    logp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, kl = train.grpo_loss(logp, None, mask, torch.tensor([1.0, -1.0]), 0.1)
    assert loss.item() == pytest.approx(-((-1 - 2) * 1 + (-3) * -1) / 3) and kl.item() == 0
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [1 / 3, 0.0]]))  # -A / N per token
    loss, kl = train.grpo_loss(logp, logp.detach() + 0.5, mask, torch.tensor([1.0, -1.0]), 0.1)
    assert kl.item() == pytest.approx(math.exp(0.5) - 0.5 - 1)


@pytest.fixture(scope="module")
def _train_chat(_train_data, tmp_path_factory):
    """A base checkpoint (2 pretraining steps on _train_data) and chat data made with its tokenizer
    plus the chat tokens: synthetic add/sub conversations, and add preference pairs."""
    root = tmp_path_factory.mktemp("train_chat")
    train.train(_train_cfg(_train_data, root / "base", max_steps=2))
    tok = os.path.join(_train_data, "tokenizer.bpe")
    common = [f"--tokenizer={tok}", "--task_examples=300", "--task_val_examples=20", "--task_digits=2"]
    prepare.main(["--chat=tasks:add,sub", f"--out_dir={root / 'sft'}", *common])
    prepare.main(["--pairs=tasks:add", f"--out_dir={root / 'dpo'}", *common])
    return str(root / "base" / "last.pt"), str(root / "sft"), str(root / "dpo")


def _train_sigterm_in(monkeypatch, name, at_call):
    """Make the at_call-th call of train.<name> send this process a real SIGTERM."""
    calls, real = {"n": 0}, getattr(train, name)

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(train, name, wrapped)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_train_sft_and_dpo_from_a_base_checkpoint_resume_bitwise(_train_chat, tmp_path, monkeypatch, objective):
    """A base checkpoint (vocab 300) fine-tuned on chat data (its tokenizer + 4 chat tokens): the
    vocabulary grows to 304, SFT packs whole conversations with the loss mask, DPO keeps a frozen
    reference (saved with the run); stopped by SIGTERM and resumed, either run is bitwise the run
    that never stopped."""
    base, sft_dir, dpo_dir = _train_chat
    data_dir = sft_dir if objective == "sft" else dpo_dir
    opts = dict(objective=objective, init_from=base, max_steps=4, eval_interval=2, eval_examples=8,
                batch_size=4, grad_accum=2)
    full = train.train(_train_cfg(data_dir, tmp_path / "full", **opts))
    assert full.model.config.vocab_size == 304 and full.step == 4
    # SIGTERM in step 1 (its first micro-step): SFT's 3rd training forward; DPO's 9th scoring pass
    # (4 for the held-out pairs at step 0, then a policy and a reference pass per micro-step)
    _train_sigterm_in(monkeypatch, *(("forward_loss", 3) if objective == "sft" else ("token_logprobs", 9)))
    part = train.train(_train_cfg(data_dir, tmp_path / "part", **opts))
    assert part.stopped and part.step == 2
    monkeypatch.undo()
    rest = train.train(_train_cfg(data_dir, tmp_path / "part", **dict(opts, init_from="", resume=True)))
    assert part.losses + rest.losses == full.losses and rest.val_loss == full.val_loss
    a, b = (M.load_checkpoint(str(tmp_path / d / "last.pt")) for d in ("full", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if objective == "dpo":   # the reference is the starting model, grown, and never trained
        start = M.grow_vocab(M.model_from_checkpoint(M.load_checkpoint(base), base), 300, 304).state_dict()
        assert all(torch.equal(b["reference"][k], start[k]) for k in start)
        assert not torch.equal(a["model"]["lm_head.weight"], start["lm_head.weight"])
        assert re.search(r"reward_acc", open(tmp_path / "full" / "metrics.jsonl").read())


def test_train_objective_errors_are_one_line(_train_data, _train_chat, tmp_path):
    base, sft_dir, dpo_dir = _train_chat
    with pytest.raises(bpe.SettingsError, match="--objective=sft fine-tunes a trained model: give --init_from"):
        bpe.parse_settings(train.TrainConfig, ["--objective=sft"])
    with pytest.raises(bpe.SettingsError, match="use --batch_mode=packed"):
        bpe.parse_settings(train.TrainConfig, ["--objective=sft", "--init_from=x.pt", "--batch_mode=random"])
    for data_dir, objective, message in [(sft_dir, "pretrain", "holds chat data; use it with --objective=sft or rl"),
                                         (sft_dir, "dpo", "needs preference pairs"),
                                         (_train_data, "sft", "holds plain text")]:
        with pytest.raises(bpe.UserError, match=message):
            train.train(_train_cfg(data_dir, tmp_path / objective, objective=objective, init_from=base))
    foreign = _train_foreign_ckpt(tmp_path)      # its tokenizer is not the one the chat data extends
    with pytest.raises(bpe.UserError, match="trained with another tokenizer"):
        train.train(_train_cfg(sft_dir, tmp_path / "x", objective="sft", init_from=foreign))


def _train_foreign_ckpt(tmp_path):
    """A checkpoint whose tokenizer the chat data does not extend (another corpus)."""
    corpus = tmp_path / "other.txt"
    corpus.write_text("\n\n\n".join(f"other text number {i} " * 20 for i in range(30)))
    prepare.main([f"--input={corpus}", "--doc_sep=\\n\\n\\n", f"--out_dir={tmp_path / 'od'}", "--vocab_size=300",
                  "--val_fraction=0.2", "--num_proc=1"])
    train.train(_train_cfg(str(tmp_path / "od"), tmp_path / "o", max_steps=1))
    return str(tmp_path / "o" / "last.pt")


def test_train_rl_raises_the_reward_on_a_toy_task(_train_data, tmp_path, monkeypatch):
    """GRPO on a task a tiny model can learn: "Pick a digit" where the SFT data answers a random
    digit but the checker rewards only "7". After a short SFT the model answers some digit and ends
    its turn (reward about 1 in 10); RL must raise the reward on train prompts and pass@1 on held-out
    ones. The task lives in prepare.TASKS for the test only."""
    def make(rng, digits):
        return prepare.Problem("digit", f"Pick a digit for {prepare.syllable_word(rng)}.",
                               str(rng.randint(0, 9)), ())
    monkeypatch.setitem(prepare.TASKS, "digit", prepare.Task(make, lambda p, r: r.strip() == "7",
                                                             lambda p, rng: "3"))
    prepare.main(["--chat=tasks:digit", f"--tokenizer={_train_data}/tokenizer.bpe", f"--out_dir={tmp_path / 'd'}",
                  "--task_examples=400", "--task_val_examples=20"])
    train.train(_train_cfg(_train_data, tmp_path / "base", max_steps=1))
    train.train(_train_cfg(str(tmp_path / "d"), tmp_path / "sft", objective="sft", max_steps=15, batch_size=8,
                           init_from=str(tmp_path / "base" / "last.pt"), eval_interval=1000))
    res = train.train(_train_cfg(str(tmp_path / "d"), tmp_path / "rl", objective="rl", max_steps=8,
                                 init_from=str(tmp_path / "sft" / "last.pt"), batch_size=4, rl_group=8,
                                 rl_max_tokens=4, eval_interval=1000, eval_examples=10, rl_kl=0.01))
    rewards = [json.loads(line) for line in open(tmp_path / "rl" / "metrics.jsonl")]
    train_reward = [r["reward"] for r in rewards if "reward" in r]
    pass1 = [r["val_pass1"] for r in rewards if "val_pass1" in r]
    assert len(train_reward) == 8 and sum(train_reward[:3]) / 3 < 0.3, train_reward
    assert sum(train_reward[-3:]) / 3 > sum(train_reward[:3]) / 3 + 0.3, train_reward
    assert pass1[-1] > pass1[0], pass1
    assert res.val_loss == 1 - pass1[-1]


# -----------------------------------------------------------------------------
# distributed



def _train_one_rank_vs_two(data, tmp_path, timeout=180, **kw):
    """The same run twice: 1 process x 2 micro-batches (in this process) and 2 gloo ranks x 1
    (torchrun). Returns (the first run's settings, its TrainResult, its final weights, the
    two-rank run's final weights)."""
    one = _train_cfg(data, tmp_path / "one", grad_accum=2, **kw)
    res = train.train(one)
    two = dataclasses.replace(one, out_dir=str(tmp_path / "two"), grad_accum=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=_TRAIN_REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(_TRAIN_REPO, "train.py")] + _train_args(two)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    return one, res, a, b


def test_train_ddp_two_ranks_equal_two_micro_steps(_train_data, tmp_path):
    # one optimizer step: 1 rank x 2 micro-batches vs 2 gloo ranks x 1 must read the
    # same rows and average the same gradients (guards loss normalisation and no_sync)
    _, _, a, b = _train_one_rank_vs_two(_train_data, tmp_path, max_steps=1, threads=1, timeout=120)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)


def test_train_ddp_streams_and_memory_equal_two_micro_steps(_train_data, tmp_path):
    """The same check with hyper-connections (dynamic, Sinkhorn) and Engram memory: 2 steps, so
    that the tables (no gradient while Engram's c_proj is 0, at step 1) move at step 2 with lazy
    rows: a row looked up on either rank must be updated on both, identically."""
    one, res, a, b = _train_one_rank_vs_two(_train_data, tmp_path, max_steps=2, **_TRAIN_STREAMS_MEMORY)
    torch.manual_seed(one.seed)
    start = M.GPT(res.model.config).state_dict()   # the run's init (build_model seeds it so)
    key = "transformer.h.0.engram.tables"
    moved = (a[key] != start[key]).any(-1)
    assert 0 < moved.sum() < len(moved)             # some rows were looked up, most were not
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)


_TRAIN_MOE_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import bpe, train
cfg = bpe.parse_settings(train.TrainConfig, sys.argv[1:])
res = train.train(cfg)
biases = {{n: b for n, b in res.model.named_buffers() if n.endswith("expert_bias")}}
torch.save(biases, os.path.join(cfg.out_dir, "bias%s.pt" % os.environ.get("RANK", "0")))
# the teardown of train.main(): without it a gloo rank could exit while the other still
# used the connection, and abort ("terminate called without an active exception")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_train_moe_biases_identical_across_gloo_ranks(_train_data, tmp_path):
    # the balancing bias is updated from counts summed over micro-steps AND ranks, once
    # per optimizer step: 2 ranks must end with identical biases, equal to those of
    # 1 rank x 2 micro-steps (guards a per-rank update, or one update per micro-step)
    script = tmp_path / "run_moe.py"
    script.write_text(_TRAIN_MOE_SCRIPT.format(repo=_TRAIN_REPO))
    moe = dict(n_experts=4, top_k=2, capacity_factor=1.0, moe_bias_rate=0.01, max_steps=1,
               threads=1)
    one = _train_cfg(_train_data, tmp_path / "one", grad_accum=2, **moe)
    res = train.train(one)
    bias_one = {n: b for n, b in res.model.named_buffers() if n.endswith("expert_bias")}
    assert bias_one and all(b.abs().sum() > 0 for b in bias_one.values())  # the bias moved
    rec = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl") if '"loss"' in l][0]
    assert 0 < rec["moe_dropped"] < 1 and rec["moe_min_load"] <= 1 <= rec["moe_max_load"]
    two = dataclasses.replace(one, out_dir=str(tmp_path / "two"), grad_accum=1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script)] + _train_args(two)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b0 = torch.load(tmp_path / "two" / "bias0.pt", weights_only=True)
    b1 = torch.load(tmp_path / "two" / "bias1.pt", weights_only=True)
    for name in bias_one:
        assert torch.equal(b0[name], b1[name]), name
        assert torch.equal(b0[name], bias_one[name]), name


def test_train_ddp_error_exits_every_rank(tmp_path):
    # a bad setting seen by both ranks must end the whole job with a one-line error,
    # not leave a rank hanging in a collective
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(_TRAIN_REPO, "train.py"), f"--data_dir={tmp_path / 'missing'}",
           f"--out_dir={tmp_path / 'out'}", "--threads=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=_TRAIN_REPO)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "prepare.py" in proc.stderr


def test_train_memory_tables_adamw_at_embed_lr_with_lazy_rows():
    """Engram's tables are embeddings: AdamW (not Muon) at the embedding lr, and a step changes
    only the rows it looked up. Regression guard for plain AdamW on a table: a row used at step 1
    but not at step 2 still has Adam moments, and decoupled decay touches every row, so plain
    AdamW moves it at step 2; lazy rows leave it bitwise unchanged."""
    cfg = train.TrainConfig(data_dir="unused", n_layer=1, n_head=2, n_kv_head=2, n_embd=32, block_size=16,
                            seq_len=16, engram_layers="0", engram_ngram="2", engram_heads=1, engram_rows=97,
                            engram_dim=4, adam_weight_decay=0.5, cautious_wd=False)
    torch.manual_seed(0)
    model = M.GPT(M.gpt_config(cfg, vocab_size=50))
    engram = model.transformer.h[0].engram
    with torch.no_grad():
        engram.c_proj.weight.normal_()        # a trained value projection: the tables get gradients
    optimizers = train.build_optimizers(cfg, model, train.Runtime(device=torch.device("cpu")))
    (opt, group), = [(o, g) for o in optimizers for g in o.param_groups if g["name"] == "memory"]
    assert isinstance(opt, train.AdamW) and group["lazy_rows"] and group["params"] == [engram.tables]
    assert group["lr"] == pytest.approx(cfg.embed_lr * (train.REFERENCE_WIDTH / 32) ** 0.5)
    assert group["weight_decay"] == 0.5
    table = engram.tables
    start = table.detach().clone()

    def step(tokens):
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss, _ = model(tokens, tokens.roll(-1, 1))
        loss.backward()
        used = (table.grad != 0).any(-1)
        before = table.detach().clone()
        for o in optimizers:
            o.step()
        return used, before

    used1, _ = step(torch.arange(0, 24).view(2, 12))
    used2, before = step(torch.arange(25, 49).view(2, 12))
    after = table.detach()
    only_first = used1 & ~used2
    assert only_first.sum() > 0 and opt.state[table]["exp_avg"][only_first].abs().sum() > 0
    assert torch.equal(after[~used2], before[~used2])           # not looked up: unchanged
    assert (after[used2] != before[used2]).any(-1).all()       # looked up: updated
    never = ~used1 & ~used2
    assert never.sum() > 0 and torch.equal(after[never], start[never])


def test_train_compile_failure_warns_once_and_runs_eager(_train_data, tmp_path, monkeypatch, capsys):
    # torch.compile fails lazily (at the first call, e.g. no C++ compiler): the run must
    # warn once and redo that step eagerly, with the same result as an eager run
    class BrokenCompiled(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("inductor: no working C++ compiler")

    eager = train.train(_train_cfg(_train_data, tmp_path / "eager", max_steps=2))
    monkeypatch.setattr(torch, "compile", lambda model, **kw: BrokenCompiled())
    res = train.train(_train_cfg(_train_data, tmp_path / "broken", max_steps=2, compile="true"))
    assert capsys.readouterr().out.count("torch.compile failed") == 1
    assert res.losses == eager.losses

def test_train_bench_reports_speed_and_phases(_train_data, tmp_path, capsys):
    """--bench runs bench_steps + 3 steps, writes no checkpoint, and prints tokens/s, MFU
    and the per-phase breakdown, every figure positive."""
    res = train.train(_train_cfg(_train_data, tmp_path, bench=True, bench_steps=4))
    out = capsys.readouterr().out
    assert res.step == 7 and not os.path.exists(tmp_path / "last.pt")
    speed = re.search(r"bench: ([\d,]+) tokens/s \| MFU ([\d.]+%|n/a) \| ([\d.]+) ms/step", out)
    assert speed and all(float(v.replace(",", "")) > 0 for v in speed.group(1, 3))
    assert speed.group(2) == "n/a" or 0 <= float(speed.group(2)[:-1]) <= 100
    phases = re.search(r"by phase: data ([\d.]+), forward ([\d.]+), backward ([\d.]+), "
                       r"loss sync, clip ([\d.]+), optimizer steps ([\d.]+)", out)
    assert phases and all(float(v) > 0 for v in phases.groups())


# -----------------------------------------------------------------------------
# the attention family in training; fixed compute (--flops_budget) and sweeps

_TRAIN_HYBRID = dict(n_layer=4, layer_pattern="LMSW", window=8, sparse_block=8, linear_chunk=8,
                     attn_gate="output", n_head=2, n_kv_head=1)


def test_train_ddp_hybrid_of_every_kind_equals_two_micro_steps(_train_data, tmp_path):
    """DDP with linear, MLA, block-sparse and windowed layers and gates in one model: 2 gloo
    ranks x 1 micro-batch give the weights of 1 rank x 2 micro-batches (every parameter of every
    kind gets its gradient averaged; none goes unused)."""
    _, _, a, b = _train_one_rank_vs_two(_train_data, tmp_path, max_steps=1, threads=1, **_TRAIN_HYBRID)
    assert any(".wkv_b." in k for k in a) and any(k.endswith("attn.gate.weight") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)


def test_train_hybrid_resume_is_bitwise_exact_and_loads_in_sample(_train_data, tmp_path, monkeypatch):
    """A hybrid of every kind, packed documents (linear states reset at each document), stopped
    by SIGTERM and resumed, ends bitwise equal to the uninterrupted run; its checkpoint loads in
    sample.py and decodes (cached, branched, past the context) as the uncached reference does."""
    opts = dict(max_steps=4, batch_mode="packed", **_TRAIN_HYBRID)
    full = train.train(_train_cfg(_train_data, tmp_path / "full", **opts))
    _train_sigterm_at(monkeypatch, at_call=2)
    part = train.train(_train_cfg(_train_data, tmp_path / "part", **opts))
    assert part.stopped and part.step == 2
    monkeypatch.undo()
    rest = train.train(_train_cfg(_train_data, tmp_path / "part", resume=True, **opts))
    assert part.losses + rest.losses == full.losses
    model, tok, _ = sample.load_model(str(tmp_path / "part" / "last.pt"))
    assert model.config.layer_pattern == "LMSW"
    prompt = [tok.eot_id] + tok.encode("def func_3(a, b):")
    ref = sample.generate_uncached(model, prompt, 40)                         # 32-token context: jumps
    rows = torch.stack(list(sample.generate(model, prompt, 40, num_samples=2)), dim=1)
    assert rows.tolist() == [ref, ref]


def test_train_flops_budget_sets_the_steps(_train_data, tmp_path, capsys):
    """--flops_budget: steps = the most steps whose FLOPs fit the budget (per stage of a seq_len
    schedule), printed; the lr schedule is laid over those steps (the warmdown ends at the last);
    a budget below one step is one line."""
    cfg = _train_cfg(_train_data, tmp_path / "run", warmdown_frac=0.5, final_lr_frac=0.0)
    model = M.GPT(M.gpt_config(cfg, vocab_size=300))
    per_step = model.flops_per_token(32) * 4 * 32                       # batch 4 x seq_len 32
    res = train.train(dataclasses.replace(cfg, flops_budget=3.5 * per_step, max_steps=1000))
    assert res.step == 3 and f"flops_budget {3.5 * per_step:.3g} FLOPs: 3 steps of 128 tokens" in capsys.readouterr().out
    lrs = [r["lr_mult"] for r in train.read_metrics(tmp_path / "run" / "metrics.jsonl")[0] if "lr_mult" in r]
    assert lrs == [train.lr_multiplier(dataclasses.replace(cfg, max_steps=3), s) for s in range(3)]
    assert lrs[-1] < lrs[0]                                              # warmdown over the 3 steps
    # a schedule: 2 steps at seq_len 16, then seq_len 32; by hand
    staged = dataclasses.replace(cfg, seq_len_schedule=[(0, 16), (2, 32)])
    short = model.flops_per_token(16) * 4 * 16
    budget = 2 * short + 5 * per_step + 0.5 * per_step
    assert train.steps_for_budget(dataclasses.replace(staged, flops_budget=budget), model, 1) == 7
    assert train.steps_for_budget(dataclasses.replace(staged, flops_budget=1.5 * short), model, 1) == 1
    assert train.steps_for_budget(dataclasses.replace(staged, flops_budget=budget), model, 2) == 4  # 2 ranks
    with pytest.raises(bpe.UserError, match="does not pay for one step"):
        train.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "tiny"), flops_budget=0.5 * per_step))


def _train_sweep_table(text):
    """The rows of sweep.md: {entry: [cells]}."""
    rows = [l.strip("|").split("|") for l in text.splitlines() if l.startswith("| ") and "---" not in l]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_train_sweep_checks_first_writes_table_and_chart_and_resumes(_train_data, tmp_path, monkeypatch, capsys):
    """--sweep: every entry is checked before the first run (a typo in the last one stops it,
    nothing is run or written); entries x seeds run in their own folders at the same FLOPs; a
    SIGTERM in the third run stops the sweep; --resume=True skips the finished runs, resumes the
    interrupted one from its last.pt and runs the last; sweep.md and sweep.svg agree; a sweep is
    never silently replaced, nor resumed with other shared settings."""
    out = tmp_path / "sweep"
    sweep = [{}, {"attn": "linear", "linear_chunk": 8}]
    cfg = _train_cfg(_train_data, out, sweep=sweep + [{"atn": "mla"}], seeds=2)
    with pytest.raises(bpe.UserError, match=r"--sweep entry 2 \(atn=mla\): unknown setting --atn \(did you mean --attn\?\)"):
        train.run_sweep(cfg)
    assert not out.exists()
    with pytest.raises(bpe.SettingsError, match="--sweep entry 1 .*: window=8 applies to sliding-window"):
        train.run_sweep(dataclasses.replace(cfg, sweep=[{}, {"attn": "linear", "window": 8}]))
    with pytest.raises(bpe.UserError, match="--seed belongs to the sweep"):
        train.run_sweep(dataclasses.replace(cfg, sweep=[{"seed": 3}]))
    model = M.GPT(M.gpt_config(cfg, vocab_size=300))
    cfg = dataclasses.replace(cfg, sweep=sweep, flops_budget=3.5 * model.flops_per_token(32) * 128)
    _train_sigterm_at(monkeypatch, at_call=8)           # runs 1 and 2: 3 steps each; run 3: its 2nd step
    assert train.run_sweep(cfg) is True
    monkeypatch.undo()
    first = out / "defaults" / "seed1337" / "result.json"
    assert first.exists() and not (out / "attn=linear,linear_chunk=8" / "seed1337" / "result.json").exists()
    with pytest.raises(bpe.UserError, match="already holds a sweep"):
        train.run_sweep(cfg)
    with pytest.raises(bpe.UserError, match="--n_embd=32"):
        train.run_sweep(dataclasses.replace(cfg, resume=True, n_embd=64))
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    assert train.run_sweep(dataclasses.replace(cfg, resume=True)) is False
    log = capsys.readouterr().out
    assert log.count("finished before, skipped") == 2 and "seed 1337 (resuming)" in log
    assert re.search(r"resumed from \S+seed1337/last.pt at step 2", log) and first.stat().st_mtime_ns == stamp
    results = [json.loads((out / e / f"seed{s}" / "result.json").read_text())
               for e in ("defaults", "attn=linear,linear_chunk=8") for s in (1337, 1338)]
    assert [r["steps"] for r in results] == [3, 3, 3, 3] and results[0]["kv_bytes_per_token"] > 0
    assert results[2]["kv_bytes_per_token"] == 0 and results[2]["state_bytes"] > 0   # linear: a state
    table = _train_sweep_table((out / "sweep.md").read_text())
    assert list(table) == ["defaults", "attn=linear,linear_chunk=8"] and all(r[-1] == "2/2" for r in table.values())
    bpb = {e: [r["val_bpb"] for r in results[i:i + 2]] for i, e in ((0, "defaults"), (2, "attn=linear,linear_chunk=8"))}
    for entry, cells in table.items():
        mean, std = statistics.mean(bpb[entry]), statistics.stdev(bpb[entry])
        assert cells[6] == f"{mean:.4f} ± {std:.4f}"
    assert "noise)" in table["attn=linear,linear_chunk=8"][7]
    svg = ET.fromstring((out / "sweep.svg").read_text())
    ns = "{http://www.w3.org/2000/svg}"
    groups = svg.findall(f"{ns}g[@class='entry']")
    assert [g.get("data-label") for g in groups] == list(table)
    for g, entry in zip(groups, table):
        assert len(g.findall(f"{ns}circle[@class='seed']")) == 2
        assert float(g.get("data-mean")) == pytest.approx(statistics.mean(bpb[entry]), abs=1e-6)


def test_train_sweep_table_counts_memory_apart(tmp_path):
    """sweep.md's params cell of an Engram entry: active of total, and the tables' size, from the
    entry's settings (2 orders x 4 heads x 2048 rows x 32 wide = 524,288 on one layer)."""
    cfg = train.TrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "sw"), n_layer=2, n_embd=32,
                            n_head=2, n_kv_head=2, sweep=[{}, {"engram_layers": "1", "engram_rows": 2048}])
    plan = train.plan_sweep(cfg)
    results = {}
    for entry, (params, active) in zip(plan, ((40_000, 40_000), (600_000, 80_000))):
        results[entry.runs[0].out_dir] = {"seed": 1337, "steps": 5, "params": params, "active_params": active,
                                          "flops_per_token": 1e5, "kv_bytes_per_token": 256, "state_bytes": 0,
                                          "tok_s": 100.0, "val_loss": 3.0, "val_bpb": 1.5}
    table = _train_sweep_table(train.sweep_markdown(cfg, train.sweep_rows(plan, results), 64))
    assert table["defaults"][0] == "0.04M"
    assert table["engram_layers=1,engram_rows=2048"][0] == "0.08M active of 0.60M (0.52M memory)"


# =============================================================================
# 7. sample.py: generation
# =============================================================================

SAMPLE_REPO = os.path.dirname(os.path.abspath(sample.__file__))

# A tiny corpus with multi-byte characters, so that the tokenizer has tokens holding pieces of
# one character and the streaming decoder has something to get right.
_SAMPLE_CORPUS = [
    "def add(a, b):\n    return a + b\n\n",
    "The café serves crème brûlée. Ünïcödé is fun: 日本語のテキスト, emoji 🙂🚀 and more.\n",
    "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me!\n",
] * 3


def _sample_tokenizer(extra=""):
    """A small trained BPE; `extra` changes the corpus and so the merges and the fingerprint."""
    return bpe.Tokenizer.train([d + extra for d in _SAMPLE_CORPUS], vocab_size=256 + 40 + 1, quiet=True)


def _sample_model(vocab_size, block_size=32, seed=0):
    """A random 2-layer model. The output head gets a large init so that logits are spread out:
    greedy argmax then has no near-ties that float rounding could flip between two code paths."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_kv_head=1,
                       n_embd=32, logit_softcap=0.0)
    model = GPT(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    return model


def _sample_save_checkpoint(path, model, tok_path, tokenizer):
    """The checkpoint dict that train.py writes, with only plain types and tensors inside."""
    ckpt = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "train_config": {}, "optimizers": [], "step": 7, "data_state": {}, "rng": {},
            "tokenizer_path": str(tok_path), "tokenizer_fingerprint": tokenizer.fingerprint,
            "best_val_loss": 1.0, "val_bpb": 1.0, "bos_id": tokenizer.eot_id}
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """(tmp dir, tokenizer, model, checkpoint path): trained tokenizer + random model, saved."""
    tmp = tmp_path_factory.mktemp("sample")
    tok = _sample_tokenizer()
    tok_path = tmp / "tokenizer.bpe"
    tok.save(str(tok_path))
    model = _sample_model(tok.vocab_size)
    ckpt = _sample_save_checkpoint(tmp / "best.pt", model, tok_path, tok)
    return tmp, tok, model, ckpt


def _sample_main(monkeypatch, capsys, *args):
    """sample.main() in this process, as `python sample.py ARGS` would run it (no interpreter
    start-up: the command line's own tests are the _sample_cli ones). Returns (stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    capsys.readouterr()
    sample.main()
    return capsys.readouterr()


def _sample_cli(*args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(SAMPLE_REPO, "sample.py"), *args],
                          input=stdin, capture_output=True, text=True, timeout=120, cwd=SAMPLE_REPO,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"})


# --- generation: the cached fast path must reproduce the plain reference --------------------

def test_sample_cached_greedy_equals_uncached(sample_run):
    """Guards the KV cache (positions, prefill, one-token steps): greedy tokens must be identical,
    within the context and far past it (32-token context, 50 new tokens: two window jumps)."""
    _, tok, model, _ = sample_run
    prompt = sample.encode_prompt(tok, "ROMEO: But", model.config.max_context)
    for n_new in (10, 50):
        ref = sample.generate_uncached(model, prompt, n_new)
        got = [int(t) for t in sample.generate(model, prompt, n_new)]
        assert got == ref
    assert len(set(ref)) > 5  # the model is not stuck on one token, so the check has teeth


def test_sample_branched_rows_equal_single_greedy(sample_run):
    """Guards KVCache.branch: every row of a branched batch continues the same prefilled prompt."""
    _, tok, model, _ = sample_run
    prompt = sample.encode_prompt(tok, "def add", model.config.max_context)
    ref = sample.generate_uncached(model, prompt, 40)
    rows = torch.stack(list(sample.generate(model, prompt, 40, num_samples=3)), dim=1)  # (3, 40)
    assert all(r == ref for r in rows.tolist())


def test_sample_seeded_sampling_reproducible_and_matches_reference(sample_run):
    """Same seed -> same text; a different seed -> different text; and the cached sampler draws
    exactly what the reference draws from the same seed (same distributions, same RNG use)."""
    _, tok, model, _ = sample_run
    prompt = sample.encode_prompt(tok, "", model.config.max_context)
    s = sample.Sampling(temperature=1.2, top_k=50, top_p=0.95, repetition_penalty=1.3)

    def draw(seed):
        return [c.ids for c in sample.generate_text(model, tok, prompt, 30, s, num_samples=2, seed=seed)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    ref = sample.generate_uncached(model, prompt, 45, s, seed=3)
    assert [int(t) for t in sample.generate(model, prompt, 45, s, seed=3)] == ref


def test_sample_overflow_and_long_prompt(sample_run):
    """Past the context, generation keeps going (no position error from the model) and agrees
    with the reference; a prompt longer than the context is cut from the left with a warning."""
    _, tok, model, _ = sample_run
    ctx = model.config.max_context
    warnings = []
    prompt = sample.encode_prompt(tok, "ROMEO: But soft, what light " * 10, ctx, warn=warnings.append)
    assert len(prompt) == ctx and len(warnings) == 1 and "keeping its last" in warnings[0]
    full = [tok.eot_id] + tok.encode("ROMEO: But soft, what light " * 10)
    assert prompt == full[-ctx:]
    ref = sample.generate_uncached(model, full, 40)      # the reference crops on its own
    got = [int(t) for t in sample.generate(model, prompt, 40)]
    assert got == ref and len(got) == 40                 # window jumps after 1, 17 and 33 tokens


@_model_one_thread
def test_sample_memory_and_streams_generate_equals_uncached():
    """Generation from a model with Engram memory (model.py 7c) in both layers and 3 dynamic,
    doubly stochastic streams (7b): the cached generator (prefill, one-token steps, branching into
    2 rows, a re-prefill at each window jump of the 16-token context) draws exactly the
    reference's tokens, greedy and sampled. Guards the n-gram history of the cache across
    branch(n) and reset (a lost or stale history changes the first n-grams after it)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=53, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                       logit_softcap=0.0, hc_streams=3, hc_dynamic=True, hc_sinkhorn=True,
                       hc_sinkhorn_iters=3, engram_layers="0,1", engram_ngram="2,3", engram_heads=2, engram_rows=31, engram_dim=4)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():   # every weight random, so memory and streams all matter
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) * p.size(-1) ** -0.5)
        model.lm_head.weight.normal_(0.0, 0.5)
    prompt = [0, 5, 9, 11, 9, 5]
    ref = sample.generate_uncached(model, prompt, 30)      # window jumps after 10, 18 and 26 tokens
    rows = torch.stack(list(sample.generate(model, prompt, 30, num_samples=2)), dim=1)   # (2, 30)
    assert rows.tolist() == [ref, ref] and len(set(ref)) > 5
    s = sample.Sampling(temperature=1.0)
    ref = sample.generate_uncached(model, prompt, 20, s, seed=3, row=1)
    rows = torch.stack(list(sample.generate(model, prompt, 20, s, seed=3, num_samples=2)), dim=1)
    assert rows[1].tolist() == ref


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's imports
def test_sample_compiled_decode_step_equals_reference(monkeypatch):
    """--compile=true (sample.py section 2): generation's one-token steps run through the model
    compiled by inductor (C++ on CPU, dynamic shapes) and draw exactly the reference's tokens, for
    a hybrid of linear, global and sliding-window layers, across branching into 2 rows and the
    re-prefills of the 16-token context. The step compiles once per row count, not per position:
    30 steps past three window jumps are one graph for 1 row and one more for 2 rows (regression:
    SDPA's is_causal got a symbolic pos == 0, which split the step into a graph per layer). The
    bench runs compiled steps and says so, with one graph per row count for all its contexts and
    rounds (regression: a cache sized to each context made a graph per context); a bad --compile
    is one line."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=53, block_size=16, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                       layer_pattern="LGW", window=6)
    model = GPT(config).eval()
    rt = sample.setup_runtime("cpu", "float32", compile="true", deterministic="false")
    prompt, s = [0, 5, 9, 11, 9, 5], sample.Sampling(temperature=1.0)
    torch.compiler.reset()
    step = sample.decode_step(model, rt)
    assert step is not model
    ref = [sample.generate_uncached(model, prompt, 30, s, seed=3, row=r) for r in range(2)]
    rows = torch.stack(list(sample.generate(model, prompt, 30, s, seed=3, num_samples=2, step=step)), 1)
    assert rows.tolist() == ref and len(set(ref[0])) > 5
    torch.compiler.reset()
    graphs = _compile_counting(monkeypatch)
    step = sample.decode_step(model, rt)
    greedy = sample.generate_uncached(model, prompt, 30)
    assert [int(t) for t in sample.generate(model, prompt, 30, step=step)] == greedy and len(graphs) == 1
    rows = torch.stack(list(sample.generate(model, prompt, 30, num_samples=2, step=step)), 1)
    assert rows.tolist() == [greedy, greedy] and len(graphs) == 2
    out = io.StringIO()
    cfg = sample.SampleConfig(bench=True, bench_context=[8, 12], bench_tokens=2, bench_samples=2, bench_repeats=2)
    sample.bench_contexts([("hybrid", model)], rt, cfg, out=out)   # its own step: 2 more graphs in all
    assert "cpu float32, compiled decode steps" in out.getvalue().splitlines()[0] and len(graphs) == 4
    torch.compiler.reset()
    assert sample.decode_step(model, sample.setup_runtime("cpu", compile="false")) is model
    with pytest.raises(bpe.UserError, match=r"^--compile=maybe: choose auto, true or false$"):
        sample.runtime_for(sample.SampleConfig(compile="maybe"))


class _SampleHashCache:
    """The KVCache interface (pos, max_len, branch, reset) for _SampleHashModel: it keeps tokens."""

    def __init__(self, tokens, max_len):
        self.tokens, self.max_len, self.pos = tokens, max_len, tokens.size(1)

    def branch(self, n):
        return _SampleHashCache(self.tokens[:1, :self.pos].expand(n, -1).clone(), self.max_len)

    def reset(self):
        self.pos = 0


class _SampleHashModel(torch.nn.Module):
    """A stand-in model whose next token is a position-weighted hash of its whole visible context,
    sum_j (j + 1) * token_j mod V. Any token that the window or cache logic loses, repeats or
    shifts changes what it says next (a random small transformer barely notices such bugs)."""

    def __init__(self, vocab_size=53, context=16):
        super().__init__()
        self.config = type("Config", (), {"max_context": context, "vocab_size": vocab_size})()
        self.lm_head = torch.nn.Linear(1, 1)

    def make_cache(self, batch_size, max_len, device=None, dtype=None):
        return _SampleHashCache(torch.zeros(batch_size, 0, dtype=torch.long), max_len)

    def forward(self, idx, cache=None):
        context = idx
        if cache is not None:
            assert cache.pos + idx.size(1) <= min(cache.max_len, self.config.max_context)
            cache.tokens = context = torch.cat([cache.tokens[:, :cache.pos], idx], dim=1)
            cache.pos += idx.size(1)
        assert context.size(1) <= self.config.max_context
        weights = torch.arange(1, context.size(1) + 1)
        nxt = (context * weights).sum(dim=1) % self.config.vocab_size                 # (B,)
        logits = torch.nn.functional.one_hot(nxt, self.config.vocab_size).float() * 10
        return logits[:, None, :].expand(-1, idx.size(1), -1)                           # (B, T, V)


def test_sample_window_and_cache_bookkeeping_exact():
    """Guards the sliding window and the re-prefill: with a model that hashes its whole context,
    cached generation (1 or 3 rows) equals the reference for short, full and too-long prompts."""
    model = _SampleHashModel()
    for prompt_len in (1, 15, 16, 40):
        prompt = [(7 * i + 3) % 53 for i in range(prompt_len)]
        for keep in (0.5, 0.25):
            ref = sample.generate_uncached(model, prompt, 60, slide_keep=keep)
            rows = torch.stack(list(sample.generate(model, prompt, 60, num_samples=3, slide_keep=keep)), 1)
            assert rows.tolist() == [ref] * 3, (prompt_len, keep)
    assert len(set(ref)) > 20


def test_sample_rope_scaling_extends_context(sample_run):
    """--rope_scaling at load time: the checkpoint's block_size 32 becomes a 64-token context, the
    cached path runs past 32 positions without a window jump and still equals the reference."""
    _, tok, model, ckpt = sample_run
    stretched, _, _ = sample.load_model(str(ckpt), overrides=dict(rope_scaling="yarn", rope_factor=2.0))
    assert sample.context_length(stretched.config) == 64
    prompt = sample.encode_prompt(tok, "ROMEO: But soft, what light " * 2, 64)
    assert 32 < len(prompt) < 64
    got = [int(t) for t in sample.generate(stretched, prompt, 40)]
    assert got == sample.generate_uncached(stretched, prompt, 40)
    with pytest.raises(bpe.UserError, match="rope"):
        sample.load_model(str(ckpt), overrides=dict(rope_scaling="cubic", rope_factor=2.0))


def test_sample_window_rule_by_hand():
    """The shared sliding rule, checkable on paper: context 8, keep 4. With 8 tokens the window
    still starts at 0; the 9th token makes it jump to start 5 (tokens 5..8, four of them)."""
    assert sample.keep_length(8, 0.5) == 4
    assert sample.window_start(8, 0, 8, 4) == 0
    assert sample.window_start(9, 0, 8, 4) == 5
    assert sample.window_start(12, 5, 8, 4) == 5     # window 5..11 is 7 tokens: fits
    assert sample.window_start(14, 5, 8, 4) == 10    # 9 tokens: jump again


# --- choosing the next token ------------------------------------------------------------------

def test_sample_top_p_worked_example():
    """probs (0.5, 0.3, 0.15, 0.05), p = 0.75: mass above each token = (0, 0.5, 0.8, 0.95), so
    exactly the first two survive."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = sample.top_p_filter(logits, 0.75).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    assert sample.top_p_filter(logits, 0.5).isfinite()[0].tolist() == [True, False, False, False]


def test_sample_top_k_top_p_never_pick_filtered_tokens():
    """Crafted distribution over 10 tokens, shuffled order. Thousands of draws: top-k
    draws only from the k best, top-p only from the nucleus, and both together from the
    intersection."""
    probs = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.08, 0.07, 0.05, 0.03, 0.01, 0.01])
    perm = torch.tensor([3, 7, 0, 9, 1, 5, 8, 2, 6, 4])
    logits = probs[perm].log().expand(3000, -1).contiguous()        # (3000, 10): 3000 draws per call
    rank = perm.tolist()                                             # vocab id -> rank (0 = best)
    u = torch.rand(3000, generator=torch.Generator().manual_seed(0))

    def ranks(s):
        return {rank[t] for t in sample.pick_next(logits, s, u).tolist()}

    assert ranks(sample.Sampling(1.0, top_k=3)) == {0, 1, 2}
    assert ranks(sample.Sampling(1.0, top_p=0.6)) == {0, 1, 2}      # mass above rank 3 is 0.65
    assert ranks(sample.Sampling(1.0, top_p=0.66)) == {0, 1, 2, 3}  # above rank 3: 0.65 < 0.66
    assert ranks(sample.Sampling(1.0, top_k=2, top_p=0.9)) == {0, 1}
    assert ranks(sample.Sampling(0.0, top_k=5)) == {0}              # greedy: the argmax only


def test_sample_repetition_penalty_lowers_seen_tokens():
    """CTRL penalty: positive and negative logits of seen tokens both move down, so every seen
    token loses probability and every unseen one gains; penalty 1 changes nothing."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, -0.5]])
    seen = torch.tensor([[True, True, False, False, False]])
    before = logits.softmax(-1)
    after = sample.apply_repetition_penalty(logits, seen, 1.5).softmax(-1)
    assert torch.equal(sample.apply_repetition_penalty(logits, seen, 1.0), logits)
    assert (after[seen] < before[seen]).all() and (after[~seen] > before[~seen]).all()
    assert sample.apply_repetition_penalty(logits, seen, 2.0)[0, :2].tolist() == [1.0, -2.0]


# --- text: streaming and stop strings ------------------------------------------------------------

def test_sample_streaming_equals_decode_without_broken_chars(sample_run):
    """Streaming through the incremental decoder prints exactly decode(all ids), and text whose
    characters are split across tokens never shows U+FFFD mid-stream."""
    _, tok, model, _ = sample_run
    text = "Ünïcödé 日本語のテキスト 🙂🚀 crème brûlée"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)   # some tokens hold part of a character
    stream = sample.TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    # and for whatever a random model emits (possibly invalid UTF-8): streamed == decode
    got = {}
    prompt = sample.encode_prompt(tok, "日本", model.config.max_context)
    done = sample.generate_text(model, tok, prompt, 60, sample.Sampling(1.0), num_samples=2, seed=0,
                                on_text=lambda row, piece: got.setdefault(row, []).append(piece))
    for row, c in enumerate(done):
        assert "".join(got.get(row, [])) == c.text == tok.decode(c.ids)


def test_sample_stop_string_cut_exactly_across_tokens(sample_run):
    """A stop string that spans token boundaries: the output is the text up to (not including)
    its first occurrence, streamed pieces included (nothing of it leaks before the cut)."""
    _, tok, model, _ = sample_run
    prompt = sample.encode_prompt(tok, "The café", model.config.max_context)
    full = sample.generate_text(model, tok, prompt, 40)[0]
    # where each token's text ends inside full.text (streamed, so split characters count right)
    d, ends = tok.stream_decoder(), [0]
    for i in full.ids:
        ends.append(ends[-1] + len(d.push(i)))
    lens = [b - a for a, b in zip(ends, ends[1:])]
    # a stop string from the middle of token k, across token k+1, to the first char of token k+2
    k = next(k for k in range(len(lens) - 2) if lens[k] >= 2 and lens[k + 1] and lens[k + 2])
    stop = full.text[ends[k] + 1:ends[k + 2] + 1]
    streamed = []
    cut = sample.generate_text(model, tok, prompt, 40, stops=["never appears ~~", stop],
                               on_text=lambda row, piece: streamed.append(piece))[0]
    want = full.text[:full.text.index(stop)]
    assert cut.finish == "stop" and cut.text == want and "".join(streamed) == want


def test_sample_text_stream_holds_back_partial_stop():
    """Hand-checkable: stop 'END'. 'the EN' prints 'the ' and holds 'EN' back; 'Dx' completes it."""
    class Chars:  # a tokenizer whose ids are code points, enough for TextStream
        def stream_decoder(self):
            class D:
                def push(self, i):
                    return chr(i)

                def flush(self):
                    return ""
            return D()
    s = sample.TextStream(Chars(), ["END"])
    assert "".join(s.push(ord(c)) for c in "the EN") == "the "
    assert s.push(ord("D")) == "" and s.stopped and s.text == "the "
    s = sample.TextStream(Chars(), ["END"])
    assert "".join(s.push(ord(c)) for c in "the ENx") + s.finish() == "the ENx" and not s.stopped


def test_sample_prompt_and_stop_escapes(tmp_path):
    """Inline prompts and stop strings decode backslash escapes (a shell cannot easily pass a
    newline); a prompt file is read exactly; '@@' escapes a leading '@'; a bad escape is one line."""
    assert sample.read_prompt("ROMEO:\\n日本") == "ROMEO:\n日本"
    (tmp_path / "p.txt").write_text("raw \\n stays\n", encoding="utf-8")
    assert sample.read_prompt(f"@{tmp_path / 'p.txt'}") == "raw \\n stays\n"
    assert sample.read_prompt("@@home") == "@home"
    with pytest.raises(bpe.UserError, match="cannot read"):
        sample.read_prompt(f"@{tmp_path / 'missing.txt'}")
    with pytest.raises(bpe.UserError, match="backslash"):
        sample.read_prompt("ends with \\")
    assert sample.normalize_stop(None) == []
    assert sample.normalize_stop("\\n\\n") == ["\n\n"]
    assert sample.normalize_stop(["END", "日本\\t"]) == ["END", "日本\t"]
    with pytest.raises(ValueError):
        sample.normalize_stop("")
    with pytest.raises(ValueError):
        sample.normalize_stop(3)


# --- loading -------------------------------------------------------------------------------------

def test_sample_refuses_other_tokenizer(sample_run, tmp_path):
    """A tokenizer with a different merge table (different fingerprint) must be refused: the
    model would silently read the wrong ids. Also through the CLI: one line, exit code 2."""
    _, tok, model, ckpt = sample_run
    other = _sample_tokenizer(extra=" zebra quagga")
    assert other.fingerprint != tok.fingerprint
    other_path = tmp_path / "other.bpe"
    other.save(str(other_path))
    with pytest.raises(bpe.UserError, match="fingerprint"):
        sample.load_model(str(ckpt), tokenizer_path=str(other_path))
    # a checkpoint that records the other tokenizer is refused the same way
    bad = _sample_save_checkpoint(tmp_path / "bad.pt", model, other_path, tok)
    r = _sample_cli(f"--ckpt={bad}", "--max_new_tokens=5")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "fingerprint" in r.stderr and "--tokenizer=" in r.stderr


def test_sample_load_errors_are_one_line(sample_run, tmp_path):
    """Missing checkpoint, a pickled object (weights_only=True refuses to run code), a moved
    tokenizer that is found next to the checkpoint."""
    tmp, tok, model, ckpt = sample_run
    with pytest.raises(bpe.UserError, match="python train.py"):
        sample.load_model(str(tmp_path / "nope.pt"))
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_config": {}, "x": io.StringIO("not plain data")}, evil)
    with pytest.raises(bpe.UserError, match="cannot read checkpoint"):
        sample.load_model(str(evil))
    # the run directory was copied elsewhere: the recorded absolute tokenizer path is gone
    moved = tmp_path / "moved"
    moved.mkdir()
    tok.save(str(moved / "tokenizer.bpe"))
    _sample_save_checkpoint(moved / "best.pt", model, tmp_path / "gone" / "tokenizer.bpe", tok)
    m2, tok2, _ = sample.load_model(str(moved / "best.pt"))
    assert tok2.fingerprint == tok.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), model.state_dict().values()))


def test_sample_export_hf_then_sample_the_folder_greedy_alike(sample_run, tmp_path, monkeypatch, capsys):
    # --export_hf=DIR writes a Hugging Face folder; --ckpt=hf:DIR then samples exactly the greedy
    # text of the checkpoint it came from. sample_run's model (ReLU^2) is refused in one line that
    # names the switch, and --rope_scaling=yarn exports Hugging Face's YaRN.
    tmp, tok, relu2_model, relu2_ckpt = sample_run
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                          mlp="swiglu", logit_softcap=0.0, norm_gain=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.5 * torch.randn_like(p) * p.size(-1) ** -0.5)
    ckpt = _sample_save_checkpoint(tmp_path / "best.pt", model, tmp / "tokenizer.bpe", tok)
    folder = tmp_path / "hf"
    out, _ = _sample_main(monkeypatch, capsys, f"--ckpt={ckpt}", f"--export_hf={folder}")
    assert f"wrote {folder / 'config.json'}" in out and f"--ckpt=hf:{folder}" in out
    greedy = ["--prompt=ROMEO: But", "--temperature=0", "--max_new_tokens=24"]
    ours, _ = _sample_main(monkeypatch, capsys, f"--ckpt={ckpt}", *greedy)
    theirs, err = _sample_main(monkeypatch, capsys, f"--ckpt=hf:{folder}", *greedy)
    assert theirs == ours and len(ours) > len("ROMEO: But") and f"loaded hf:{folder}" in err
    with pytest.raises(bpe.UserError, match="the relu2 MLP .*--mlp=swiglu"):
        _sample_main(monkeypatch, capsys, f"--ckpt={relu2_ckpt}", f"--export_hf={tmp_path / 'no'}")
    with pytest.raises(bpe.UserError, match="already holds files"):
        _sample_main(monkeypatch, capsys, f"--ckpt={ckpt}", f"--export_hf={folder}")
    _sample_main(monkeypatch, capsys, f"--ckpt={ckpt}", f"--export_hf={folder}", "--overwrite=True",
                 "--rope_scaling=yarn", "--rope_factor=4", "--export_dtype=bfloat16")
    hf = json.loads((folder / "config.json").read_text())
    assert hf["rope_scaling"]["rope_type"] == "yarn" and hf["rope_scaling"]["factor"] == 4.0
    assert hf["max_position_embeddings"] == 128 and hf["torch_dtype"] == "bfloat16"


# --- the command line ------------------------------------------------------------------------------

def test_sample_cli_greedy_prompt_file_stop(sample_run, tmp_path):
    """The real command: --prompt=@file, greedy, a stop string. stdout is the prompt followed by
    exactly the reference (uncached) continuation, cut at the stop string."""
    tmp, tok, model, ckpt = sample_run
    prompt_text = "JULIET: Ay"
    (tmp_path / "p.txt").write_text(prompt_text, encoding="utf-8")
    ids = sample.encode_prompt(tok, prompt_text, model.config.max_context)
    ref_ids = sample.generate_uncached(model, ids, 30, stop_id=tok.eot_id)
    ref = tok.decode([i for i in ref_ids if i != tok.eot_id])
    stop = ref[len(ref) // 2: len(ref) // 2 + 3]
    want = ref[:ref.index(stop)]
    assert "\\" not in stop  # --stop decodes backslash escapes; this greedy text has none
    r = _sample_cli(f"--ckpt={ckpt}", f"--prompt=@{tmp_path / 'p.txt'}", "--temperature=0",
                    "--max_new_tokens=30", f"--stop={stop!r}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == prompt_text + want + "\n"


def test_sample_cli_num_samples_and_interactive(sample_run):
    """--num_samples prints each sample under a header; --interactive reads prompts until EOF
    (Ctrl-D) and exits cleanly, and an empty line starts from BOS."""
    tmp, tok, model, ckpt = sample_run
    r = _sample_cli(f"--ckpt={ckpt}", "--num_samples=3", "--max_new_tokens=8", "--prompt=def")
    assert r.returncode == 0, r.stderr
    assert sorted(l.split(" (")[0] for l in r.stdout.splitlines() if l.startswith("-" * 10)) == \
        [f"---------- sample {i}/3" for i in (1, 2, 3)]
    r = _sample_cli(f"--ckpt={ckpt}", "--interactive=True", "--max_new_tokens=5", stdin="ROMEO\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("> ROMEO") and r.stdout.endswith("> \n")  # two answered, then EOF


def test_sample_interactive_ctrl_c_stops_generation_only(sample_run):
    """Ctrl-C (KeyboardInterrupt) during a generation stops it and returns to the prompt; the next
    prompt still works; Ctrl-D (EOFError) exits."""
    tmp, tok, model, ckpt = sample_run
    lines = iter(["ROMEO", "JULIET"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    class Out(io.StringIO):
        writes = 0

        def write(self, s):
            Out.writes += 1
            if Out.writes == 2:                   # the first write is the echoed prompt
                raise KeyboardInterrupt
            return super().write(s)

    out = Out()
    cfg = sample.SampleConfig(max_new_tokens=20, temperature=0.0)
    sample.interactive(model, tok, cfg, sample.setup_runtime("cpu", compile="false"), read=read, out=out)
    text = out.getvalue()
    assert text.startswith("ROMEO\n[stopped]\nJULIET") and len(text) > len("ROMEO\n[stopped]\nJULIET\n")


def test_sample_bench_reports_all_figures(sample_run):
    """--bench's function on the tiny model: every figure is there and positive."""
    _, tok, model, _ = sample_run
    out = io.StringIO()
    cfg = sample.SampleConfig(bench_tokens=12, bench_samples=4, bench_repeats=1)
    med = sample.bench(model, sample.setup_runtime("cpu", compile="false"), cfg, tok.eot_id, out=out)
    assert set(med) == {"prefill", "cached", "uncached", "branched", "cache_gain", "branch_gain"}
    assert min(med.values()) > 0
    assert "KV cache speed-up" in out.getvalue() and "branching x4" in out.getvalue()


def test_sample_bench_context_compares_architectures(sample_run, monkeypatch, capsys):
    """--bench_context: decoding tokens/s after prefills of each length, for 1 and bench_samples
    rows, per --arch entry (untrained models of --ckpt=random), with each model's ratio to the
    first; bad settings are one line. And rows_per_batch counts a linear model's fixed state."""
    out, _ = _sample_main(monkeypatch, capsys, "--ckpt=random", "--bench=True", "--bench_context=[8,24]",
                          "--bench_tokens=2", "--bench_samples=3", "--bench_repeats=1",
                          "--arch=[{}, {'attn': 'linear'}, {'layer_pattern': 'LG', 'n_layer': 2}]")
    lines = out.splitlines()
    assert "softmax (default)" in lines[1] and "attn=linear" in lines[1] and "layer_pattern=LG,n_layer=2" in lines[1]
    rows = [l.split() for l in lines[2:6]]
    assert [(r[0], r[1]) for r in rows] == [("8", "1"), ("8", "3"), ("24", "1"), ("24", "3")]
    assert all(float(r[2]) > 0 and r[4].endswith("x)") and r[6].endswith("x)") for r in rows)
    assert lines[6].startswith("  cost of a token (1 row) at 24 against 8 tokens of context:")
    with pytest.raises(bpe.UserError, match=r"^--arch entry 1 \(attn=linaer\): attn='linaer': choose one of"):
        _sample_main(monkeypatch, capsys, "--ckpt=random", "--bench=True", "--arch=[{}, {'attn': 'linaer'}]")
    with pytest.raises(bpe.UserError, match="a checkpoint brings its own architecture"):
        _sample_main(monkeypatch, capsys, f"--ckpt={sample_run[3]}", "--bench=True", "--arch={'attn': 'mla'}")
    with pytest.raises(bpe.SettingsError, match="add --bench=True"):
        bpe.parse_settings(sample.SampleConfig, ["--bench_context=[512]"])
    with pytest.raises(bpe.UserError, match="exceed the context"):
        sample.bench_contexts([("m", sample_run[2])], sample.setup_runtime("cpu", compile="false"),
                              sample.SampleConfig(bench=True, bench_context=[32], bench_tokens=4))
    linear = M.GPT(_model_cfg(attn="linear", block_size=64))
    assert linear.cache_bytes(64, torch.float32) == linear.cache_state_bytes() > 0
    assert sample.rows_per_batch(linear, 5, 10, budget=10 ** 6) == 10 ** 6 // (
        linear.cache_state_bytes() + 8 * 15 + 4 * 10 + sample.LOGIT_COPIES * 4 * 61 + 61)


def test_sample_settings_validation():
    with pytest.raises(bpe.SettingsError, match="top_p"):
        bpe.parse_settings(sample.SampleConfig, ["--top_p=0"])
    cfg = bpe.parse_settings(sample.SampleConfig, ["--stop=['a', 'b\\\\n']", "--temperature=0"])
    assert cfg.stop == ["a", "b\n"] and cfg.temperature == 0.0
    assert bpe.parse_settings(sample.SampleConfig, ["--stop=END"]).stop == ["END"]


# --- token healing ---------------------------------------------------------------------------------

class _SampleBigramModel(torch.nn.Module):
    """A stand-in whose next-token logits depend on the last token only: logits = table[token].
    It has the KV-cache interface (make_cache, branch, reset), so the cached generator, branching
    and the batched scorer run on it, and every number it gives can be checked on paper."""

    def __init__(self, table, context=64):
        super().__init__()
        self.table = table                                                        # (V, V)
        self.config = type("Config", (), {"max_context": context, "vocab_size": table.size(0)})()
        self.lm_head = torch.nn.Linear(1, 1)

    def make_cache(self, batch_size, max_len, device=None, dtype=None):
        return _SampleHashCache(torch.zeros(batch_size, 0, dtype=torch.long), max_len)

    def forward(self, idx, cache=None):
        if cache is not None:
            assert cache.pos + idx.size(1) <= cache.max_len
            cache.tokens = torch.cat([cache.tokens[:, :cache.pos], idx], dim=1)
            cache.pos += idx.size(1)
        return self.table[idx]                                                    # (B, T, V)


def _sample_colon_world():
    """The worked example of sample.py's section 5: bytes + one merge ':' '\\n' -> 256 (":\\n"),
    <|endoftext|> = 257. The bigram model: after 'O' it prefers ":\\n" (5) to ":" (1), and likes
    'x' (10) and end-of-text (20) even more, which healing must not allow; after ':' it says
    ' ' (8), then 'x', then end-of-text. ":\\n" is followed by 'B', 'u', 't', end-of-text."""
    tok = bpe.Tokenizer("gpt4", [(ord(":"), ord("\n"), 256)], {bpe.EOT: 257})
    V, eot = 258, 257
    table = torch.zeros(V, V)
    table[ord("O"), 256], table[ord("O"), ord(":")], table[ord("O"), ord("x")], table[ord("O"), eot] = 5, 1, 10, 20
    table[ord(":"), ord(" ")] = 8
    for a, b in ((ord(" "), ord("x")), (ord("x"), eot), (256, ord("B")), (ord("B"), ord("u")),
                 (ord("u"), ord("t")), (ord("t"), eot)):
        table[a, b] = 9
    return tok, _SampleBigramModel(table)


@_model_one_thread
def test_sample_token_healing_picks_the_longer_token():
    """Section 5's worked example, on a hand-made tokenizer and model. 'ROMEO:' ends in the lone
    ':' token; healing backs it up and the constrained first token becomes ':\\n' (never 'x' or
    end-of-text, though the model likes them more); the text does not repeat the colon. Without
    healing the model continues after ':' with ' x'."""
    tok, model = _sample_colon_world()
    ids = sample.encode_prompt(tok, "ROMEO:", 64)
    assert tok.decode([ids[-1]]) == ":"
    kept, healing = sample.heal_prompt(tok, ids, 258)
    assert kept == ids[:-1] and healing.removed == b":" and healing.text == ":"
    streamed = []
    healed = sample.generate_text(model, tok, kept, 10, healing=healing,
                                  on_text=lambda row, piece: streamed.append(piece))[0]
    assert healed.ids[0] == 256 and healed.text == "\nBut" and healed.finish == "eot"
    assert "".join(streamed) == healed.text
    assert "ROMEO:" + healed.text == tok.decode(kept[1:] + healed.ids)      # the colon once, not twice
    plain = sample.generate_text(model, tok, ids, 10)[0]
    assert plain.text == " x"
    # nothing to heal: a prompt ending in a token no longer token starts with, or in a special token
    assert sample.heal_prompt(tok, sample.encode_prompt(tok, "ROMEO", 64), 258)[1] is None
    assert sample.heal_prompt(tok, [257, ord("O"), 257], 258) == ([257, ord("O"), 257], None)


@_model_one_thread
def test_sample_token_healing_sampling_branching_and_cli(capsys):
    """Healing under sampling, with 6 branched rows: every row's first token starts with ':'
    (some rows draw ':' then carry on, others ':\\n'), each row equals the uncached reference run
    with its own random numbers, and decoding prompt + row gives the prompt once. Through
    print_completions (the CLI's path) the printed text is exactly prompt + continuation; the off
    switch --token_healing=False prints the unhealed ' x'."""
    tok, model = _sample_colon_world()
    model.table[ord("O"), ord(":")] = 4.5                      # ':' and ':\\n' about equally likely
    ids = sample.encode_prompt(tok, "ROMEO:", 64)
    kept, healing = sample.heal_prompt(tok, ids, 258)
    s = sample.Sampling(temperature=1.0)
    rows = torch.stack(list(sample.generate(model, kept, 6, s, seed=4, num_samples=6, healing=healing)), 1)
    firsts = {tok.decode([int(r[0])]) for r in rows}
    assert firsts == {":", ":\n"}
    for r in range(6):
        assert rows[r].tolist() == sample.generate_uncached(model, kept, 6, s, seed=4, row=r, healing=healing)
    done = sample.generate_text(model, tok, kept, 6, s, num_samples=6, seed=4, healing=healing)
    for c in done:
        assert "ROMEO:" + c.text == tok.decode(kept[1:] + c.ids)
    for healing_on, want in ((True, "ROMEO:\nBut\n"), (False, "ROMEO: x\n")):
        out = io.StringIO()
        cfg = sample.SampleConfig(temperature=0.0, max_new_tokens=10, token_healing=healing_on, sample_batch=1)
        sample.print_completions(model, tok, "ROMEO:", ids, cfg, sample.setup_runtime("cpu", compile="false"), 0, out=out)
        assert out.getvalue() == want
    assert "healed ':'" in capsys.readouterr().err


@_model_one_thread
def test_sample_token_healing_real_model_cached_equals_reference(sample_run):
    """On the trained test tokenizer and a random GPT: a prompt whose last token can grow is
    healed; cached, branched generation with healing equals the uncached reference row by row,
    and prompt + streamed text == decode(prompt tokens kept + generated tokens)."""
    _, tok, model, _ = sample_run
    # " " grows into " b", " a", ...; "本" into "本語のテキスト" (3 bytes, whole character); "🙂" into "🙂🚀"
    for prompt, removed in (("ROMEO: But ", b" "), ("日本", "本".encode()), ("emoji 🙂", "🙂".encode())):
        kept, healing = sample.heal_prompt(tok, sample.encode_prompt(tok, prompt, 32), tok.vocab_size)
        assert healing.removed == removed
        _sample_check_healed_generation(tok, model, prompt, kept, healing)


def _sample_check_healed_generation(tok, model, prompt, kept, healing):
    for s in (sample.GREEDY, sample.Sampling(1.0, top_k=20)):
        rows = torch.stack(list(sample.generate(model, kept, 40, s, seed=1, num_samples=3, healing=healing)), 1)
        for r in range(3):
            assert rows[r].tolist() == sample.generate_uncached(model, kept, 40, s, seed=1, row=r, healing=healing)
            assert tok.decode_bytes(rows[r, :1].tolist()).startswith(healing.removed) or \
                healing.removed.startswith(tok.decode_bytes(rows[r, :1].tolist()))
        got = {}
        done = sample.generate_text(model, tok, kept, 40, s, num_samples=3, seed=1, healing=healing,
                                    on_text=lambda row, piece: got.setdefault(row, []).append(piece))
        for r, c in enumerate(done):
            assert "".join(got.get(r, [])) == c.text
            if c.finish == "length":
                assert prompt + c.text == tok.decode(kept[1:] + c.ids)


# --- many samples, closed stdin, bf16, --ckpt=random --------------------------------------------------

@_model_one_thread
def test_sample_num_samples_in_bounded_batches_same_text(sample_run, monkeypatch):
    """Regression (--num_samples=100000 allocated 7.5 GB in one batch): samples are drawn in
    batches of at most --sample_batch rows (or what SAMPLE_MEMORY_BYTES holds), no cache ever
    has more rows, and sample i is the same text whatever the batch size (each row has its own
    random numbers). rows_per_batch's worked example is checked by hand."""
    _, tok, model, _ = sample_run
    rows_seen = []
    real_branch = M.KVCache.branch
    monkeypatch.setattr(M.KVCache, "branch", lambda self, n: rows_seen.append(n) or real_branch(self, n))
    ids = sample.encode_prompt(tok, "def", 32)
    rt = sample.setup_runtime("cpu", compile="false")

    def texts(**kw):
        cfg = sample.SampleConfig(num_samples=7, max_new_tokens=12, temperature=1.0, **kw)
        return [c.text for c in sample.print_completions(model, tok, "def", ids, cfg, rt, 5, out=io.StringIO())]

    one_batch = texts(sample_batch=7)
    assert rows_seen == [7]
    rows_seen.clear()
    assert texts(sample_batch=3) == one_batch and rows_seen == [3, 3]      # and a last batch of 1
    rows_seen.clear()
    per_row = 2 * 2 * 1 * 16 * 4 * 32 + 8 * (len(ids) + 12) + 4 * 12 + 6 * 4 * model.config.vocab_size \
        + model.config.vocab_size          # the docstring's formula, for this model (2 layers, 1 kv head of 16)
    assert sample.rows_per_batch(model, len(ids), 12) == 2 ** 30 // per_row
    monkeypatch.setattr(sample, "SAMPLE_MEMORY_BYTES", 2 * per_row)
    assert texts() == one_batch and max(rows_seen) <= 2 and len(one_batch) == 7
    assert len(set(one_batch)) > 3                      # the samples differ: the check has teeth
    big = GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    assert sample.rows_per_batch(big, 5, 500, budget=2 ** 30) == 13578 < 100000     # the docstring's example


def test_sample_interactive_closed_stdin_is_one_line(sample_run, monkeypatch, capsys):
    """Regression: --interactive=True with stdin closed (0<&-) died with 'RuntimeError: input():
    lost sys.stdin'. Now one line and exit code 2; an empty stdin (< /dev/null) ends cleanly
    with a line saying so."""
    _, tok, model, ckpt = sample_run
    cmd = [sys.executable, os.path.join(SAMPLE_REPO, "sample.py"), f"--ckpt={ckpt}", "--interactive=True",
           "--max_new_tokens=4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       preexec_fn=lambda: os.close(0))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --interactive=True reads prompts from stdin, "
                                                        "but stdin is closed")
    cfg, rt = sample.SampleConfig(max_new_tokens=4), sample.setup_runtime("cpu", compile="false")
    monkeypatch.setattr(sys, "stdin", open(os.devnull))                  # < /dev/null: EOF at once
    out = io.StringIO()
    sample.interactive(model, tok, cfg, rt, out=out)
    assert out.getvalue() == "\n" and capsys.readouterr().err.splitlines()[-1] == "interactive: end of input, bye"


@_model_one_thread
def test_sample_cli_bfloat16_and_random_checkpoint(sample_run, monkeypatch, capsys):
    """--dtype=bfloat16 on CPU runs under bf16 autocast (a bf16 KV cache) and prints text after
    the prompt; --ckpt=random serves --bench only: anything else is one line that says so."""
    _, tok, model, ckpt = sample_run
    out, err = _sample_main(monkeypatch, capsys, f"--ckpt={ckpt}", "--device=cpu", "--dtype=bfloat16",
                            "--prompt=ROMEO", "--temperature=0", "--max_new_tokens=12", "--token_healing=False")
    assert "cpu bfloat16" in err and out.startswith("ROMEO") and len(out) > len("ROMEO\n")
    rt = sample.setup_runtime("cpu", "bfloat16", compile="false")
    ids = sample.encode_prompt(tok, "ROMEO", 32)
    with rt.autocast():
        assert model(torch.tensor([ids])).dtype == torch.float32       # logits come out float32
        cache = model.make_cache(1, 32, dtype=rt.dtype)
        model(torch.tensor([ids]), cache=cache)
    keys = cache.layers[0].parts[0]
    assert keys.dtype == torch.bfloat16 and keys[:, :, :len(ids)].abs().sum() > 0
    for mode in ("--prompt=hi", "--eval=builtin", "--stress=True"):
        with pytest.raises(bpe.UserError, match="only serves --bench=True"):
            _sample_main(monkeypatch, capsys, "--ckpt=random", mode)
    out, _ = _sample_main(monkeypatch, capsys, "--ckpt=random", "--bench=True", "--bench_tokens=4",
                          "--bench_samples=2", "--bench_repeats=1")
    assert "KV cache speed-up" in out and "4 new tokens per run" in out and "context 256" in out


# --- evaluation: scoring, the built-in suite, loaders, the interval ------------------------------------

def _sample_code_doc(i):
    """A small Python module: brackets of three kinds and indented blocks, different per i."""
    lines = [f'"""Module {i}: helpers for case {i}."""', "import os", ""]
    for j in range(5):
        lines += [f"def f{i}_{j}(x, y=[{j}, {i}]):", f"    if x > {j + i}:",
                  f"        return {{'a{j}': (x + y[{j % 2}]) * {i}}}", f"    return [x, {j}, {i * j}]", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    """(data dir, tokenizer, model, checkpoint): 30 code documents through prepare.build (vocab
    300, 30% held out for val), a random GPT on that vocabulary, saved like train.py does."""
    tmp = tmp_path_factory.mktemp("sample_data")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"m{i:02d}.txt").write_text(_sample_code_doc(i), encoding="utf-8")
    data = tmp / "data"
    prepare.build(prepare.Settings(input=str(corpus / "*.txt"), out_dir=str(data), vocab_size=300,
                                   val_fraction=0.3, num_proc=1), log=lambda *a: None, quiet=True)
    tok = prepare.load_tokenizer(str(data))
    model = _sample_model(tok.vocab_size)
    (tmp / "run").mkdir()
    ckpt = _sample_save_checkpoint(tmp / "run" / "best.pt", model, data / "tokenizer.bpe", tok)
    return data, tok, model, ckpt


@_model_one_thread
def test_sample_score_choices_hand_computation():
    """Log-likelihood scoring on a bigram stand-in whose probabilities are written below:
    context [0, 1]; candidates [2, 3], [3], [3, 0]:
        [2, 3]: ln p(2|1) + ln p(3|2) = ln 0.3 + ln 0.25 = ln 0.075
        [3]:    ln p(3|1)             = ln 0.4
        [3, 0]: ln p(3|1) + ln p(0|3) = ln 0.4 + ln 0.7 = ln 0.28
    The batched scorer (one forward over the padded candidates) and the reference agree with it."""
    probs = torch.full((4, 4), 0.25)
    probs[1] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    probs[3] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    model = _SampleBigramModel(probs.log(), context=16)
    choices = [[2, 3], [3], [3, 0]]
    want = torch.tensor([math.log(0.075), math.log(0.4), math.log(0.28)], dtype=torch.float64)
    torch.testing.assert_close(sample.score_choices(model, [0, 1], choices), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(sample.score_choices_reference(model, [0, 1], choices), want, atol=1e-6, rtol=0)
    with pytest.raises(bpe.UserError, match="candidate"):
        sample.score_choices(model, [0, 1], [[1] * 16])


@_model_one_thread
def test_sample_score_choices_batched_equals_one_at_a_time(sample_run):
    """On a random GPT: the shared-prefix, one-forward scores equal one full forward per candidate,
    for candidates of different lengths, a context that must be cropped to fit, and in any order."""
    _, tok, model, _ = sample_run
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    choices = [torch.randint(V, (n,), generator=g).tolist() for n in (1, 5, 3, 9)]
    for ctx_len in (4, 40):                                   # 40 + 9 > 32: the context is cropped
        context = [tok.eot_id] + torch.randint(V, (ctx_len,), generator=g).tolist()
        batched = sample.score_choices(model, context, choices)
        torch.testing.assert_close(batched, sample.score_choices_reference(model, context, choices), atol=1e-4, rtol=0)
        flipped = sample.score_choices(model, context, choices[::-1])
        torch.testing.assert_close(flipped, batched.flip(0), atol=1e-5, rtol=0)
        assert batched.std() > 0.5                            # the candidates really differ


@_model_one_thread
def test_sample_builtin_suite_deterministic_never_the_true_line(sample_data, tmp_path):
    """The built-in suite is cut from the val split: every example's context + right answer is
    real text of one val document; a continuation's distractors never have the true line's
    text; the same seed gives the same suite (also in another process, with another string-hash
    seed), another seed another suite."""
    data, tok, _, _ = sample_data
    suite = sample.builtin_suite(str(data), tok, n_examples=25, seed=3)
    assert set(suite) == {"continuation", "brackets", "indentation"}
    docs = sample.val_documents(str(data), tok)
    assert len(docs) >= 4 and all(d.startswith('"""Module') for d in docs)
    for name, examples in suite.items():
        assert len(examples) == 25
        for ex in examples:
            truth = ex.choices[ex.answer]
            assert any((ex.context + truth).rstrip("\n") in doc for doc in docs), (name, ex.where)
            assert len(set(ex.choices)) == len(ex.choices)
    for ex in suite["continuation"]:
        truth = ex.choices[ex.answer].strip()
        assert len(ex.choices) == sample.EVAL_CHOICES
        assert all(c.strip() != truth for i, c in enumerate(ex.choices) if i != ex.answer)
        own = int(ex.where.split("val document ")[1].split(",")[0])
        for i, c in enumerate(ex.choices):       # each distractor is a line of another document
            assert i == ex.answer or any(c[:-1] in doc.split("\n") for k, doc in enumerate(docs) if k != own)
    assert {ex.answer for ex in suite["continuation"]} == {0, 1, 2, 3}        # the answer moves
    assert all(ex.choices[ex.answer][0] in ")]}" for ex in suite["brackets"])
    assert suite == sample.builtin_suite(str(data), tok, n_examples=25, seed=3)
    assert suite != sample.builtin_suite(str(data), tok, n_examples=25, seed=4)
    digest = lambda s: hashlib.sha256(repr(sorted((k, [dataclasses.astuple(e) for e in v]) for k, v in s.items()))
                                      .encode()).hexdigest()
    code = (f"import sys, hashlib, dataclasses; sys.path.insert(0, {SAMPLE_REPO!r}); import sample, prepare; "
            f"tok = prepare.load_tokenizer({str(data)!r}); s = sample.builtin_suite({str(data)!r}, tok, 25, 3); "
            "print(hashlib.sha256(repr(sorted((k, [dataclasses.astuple(e) for e in v]) for k, v in s.items()))"
            ".encode()).hexdigest())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.strip() == digest(suite), r.stderr


def test_sample_jsonl_loaders_and_errors_carry_file_and_line(tmp_path):
    """HellaSwag lines and generic {"context"|"question", "choices", "answer"} lines load into
    Examples; every bad line is a one-line UserError naming the file and the line number."""
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join([
        json.dumps({"ctx": "A man is sitting on a roof. He", "endings": ["is", "was", "eats", "flies"], "label": 2}),
        "",
        json.dumps({"context": "2 + 2 =", "choices": [" 4", " 5"], "answer": 0}),
        json.dumps({"question": "Which is a colour?", "choices": ["red", "dog", "cat"], "answer": "0"}),
    ]) + "\n", encoding="utf-8")
    ex = sample.load_jsonl_task(str(good))
    assert [e.where for e in ex] == [f"{good}:1", f"{good}:3", f"{good}:4"]
    assert ex[0].context == "A man is sitting on a roof. He" and ex[0].choices[2] == " eats" and ex[0].answer == 2
    assert ex[1].choices == [" 4", " 5"] and ex[1].answer == 0
    assert ex[2].context == "Question: Which is a colour?\nAnswer:" and ex[2].choices[0] == " red"
    assert len(sample.load_jsonl_task(str(good), n_examples=2)) == 2
    line1 = json.dumps({"context": "a", "choices": ["b", "c"], "answer": 1})
    bad_lines = {
        "{not json": "not valid JSON",
        "[1, 2]": "expected a JSON object",
        json.dumps({"context": "a", "choices": ["b"], "answer": 0}): "at least 2",
        json.dumps({"context": "a", "choices": ["b", "c"], "answer": 2}): "index into the 2 choices",
        json.dumps({"ctx": "a", "endings": ["b", "c"]}): '"label"',
        json.dumps({"choices": ["b", "c"], "answer": 0}): '"context" or "question"',
        json.dumps({"text": "a"}): "expected HellaSwag",
    }
    for k, (line, message) in enumerate(bad_lines.items()):
        path = tmp_path / f"bad{k}.jsonl"
        path.write_text(f"{line1}\n\n{line}\n", encoding="utf-8")
        with pytest.raises(bpe.UserError) as e:
            sample.load_jsonl_task(str(path))
        assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value), str(e.value)
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes(line1.encode() + b"\n" + b'{"context": "caf\xe9"}\n')
    with pytest.raises(bpe.UserError, match=f"{re.escape(str(raw))}:2: not UTF-8"):
        sample.load_jsonl_task(str(raw))
    with pytest.raises(bpe.UserError, match="cannot read"):
        sample.load_jsonl_task(str(tmp_path / "missing.jsonl"))


def test_sample_wilson_interval_known_cases():
    """Textbook values of the 95% Wilson interval: 5/10 -> (0.2366, 0.7634), 0/10 -> (0, 0.2775),
    10/10 -> (0.7225, 1), 50/100 -> (0.4038, 0.5962)."""
    for (k, n), (lo, hi) in {(5, 10): (0.2366, 0.7634), (0, 10): (0.0, 0.2775), (10, 10): (0.7225, 1.0),
                             (50, 100): (0.4038, 0.5962)}.items():
        got = sample.wilson_interval(k, n)
        assert abs(got[0] - lo) < 1e-4 and abs(got[1] - hi) < 1e-4, (k, n, got)


@_model_one_thread
def test_sample_eval_suite_counts_and_cli(sample_data, tmp_path, monkeypatch, capsys):
    """evaluate_suite counts an example right when the right candidate has the highest score
    (summed, and per byte), exactly as the one-at-a-time reference scores say; run_eval_suite is
    {task: acc_norm} and leaves the model's train/eval mode as it was; `--eval=builtin,FILE`
    prints the same table as the functions."""
    data, tok, model, ckpt = sample_data
    rt = sample.setup_runtime("cpu", compile="false")
    suite = sample.builtin_suite(str(data), tok, n_examples=12, seed=1337)
    results = sample.evaluate_suite(model, tok, suite, rt)
    for name, examples in suite.items():
        right = right_norm = 0
        for ex in examples:
            ref = sample.score_choices_reference(model, [tok.eot_id] + tok.encode(ex.context),
                                                 [tok.encode(c) for c in ex.choices])
            right += int(ref.argmax()) == ex.answer
            right_norm += int((ref / torch.tensor([len(c.encode()) for c in ex.choices])).argmax()) == ex.answer
        r = results[name]
        assert (r.n, r.correct, r.correct_norm) == (len(examples), right, right_norm), name
        assert abs(r.baseline - sum(1 / len(e.choices) for e in examples) / len(examples)) < 1e-12
    model.train()
    accs = sample.run_eval_suite(model, tok, suite, rt)
    assert model.training and accs == {k: r.acc_norm for k, r in results.items()}
    model.eval()
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps({"context": ex.context, "choices": ex.choices, "answer": ex.answer})
                               for ex in suite["brackets"][:5]) + "\n", encoding="utf-8")
    r = _sample_cli(f"--ckpt={ckpt}", f"--eval=builtin,{jsonl}", f"--data_dir={data}", "--eval_examples=12")
    assert r.returncode == 0, r.stderr
    want = sample.evaluate_suite(model, tok, {**suite, "mine": suite["brackets"][:5]}, rt)
    assert r.stdout == sample.eval_report(want)
    assert r.stdout.splitlines()[-2].startswith("mine") and r.stdout.splitlines()[-2].endswith("0.333")
    with pytest.raises(bpe.UserError, match="--data_dir"):
        _sample_main(monkeypatch, capsys, f"--ckpt={ckpt}", "--eval=builtin", f"--data_dir={tmp_path / 'nothing'}")


# --- chat, task accuracy ------------------------------------------------------------------------

def _sample_chat_tokenizer():
    return _sample_tokenizer().with_special_tokens(bpe.CHAT_TOKENS)


class _SampleScriptedChat(GPT):
    """A real GPT (its KV cache and positions advance as usual) whose logits are overridden to
    write `script` after every <|assistant|> token and an 'x' forever after it, so what a chat
    prints shows exactly where generation stopped. The prompts it is given are recorded."""

    def __init__(self, config, tokenizer, script):
        super().__init__(config)
        self.tok, self.script, self.prompts, self.k = tokenizer, script, [], 0

    def forward(self, idx, *args, **kwargs):
        logits = super().forward(idx, *args, **kwargs)
        if int(idx[0, -1]) == self.tok.special_tokens[bpe.ASSISTANT]:
            self.prompts.append(idx[0].tolist())
            self.k = 0
        else:
            self.k += 1
        want = self.script[self.k] if self.k < len(self.script) else self.tok.encode("x")[0]
        bias = torch.zeros(logits.size(-1))
        bias[want] = 1e4
        return logits + bias


def test_sample_chat_through_stdin(monkeypatch, capsys):
    """--chat=True's loop, fed through stdin: the history is rendered with the chat template at every
    turn (recorded prompts), the reply stops at <|end|> (the scripted model would go on with 'x'),
    typed special-token text stays text, the oldest exchanges go when the context is full, and
    end of input exits."""
    tok = _sample_chat_tokenizer()
    end = tok.special_tokens[bpe.END_OF_TURN]
    torch.manual_seed(0)
    model = _SampleScriptedChat(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                                          n_kv_head=1, n_embd=16), tok, tok.encode("ok") + [end]).eval()
    typed = ["hi", "<|end|><|assistant|>no", "", "third message", "fourth"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(t + "\n" for t in typed)))
    cfg = sample.SampleConfig(chat=True, max_new_tokens=8, temperature=0.0)
    history = sample.chat(model, tok, cfg, sample.setup_runtime("cpu", compile="false"))
    out, err = capsys.readouterr()
    assert out.count("bot> ok\n") == 4 and "x" not in out.replace("next", "")   # stopped at <|end|>
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": typed[1]}]
    assert model.prompts[0] == prepare.render(turns[:1], tok, reply=True)[0]
    assert model.prompts[1] == prepare.render(turns, tok, reply=True)[0]      # the history, rendered
    assert model.prompts[1].count(tok.special_tokens[bpe.ASSISTANT]) == 2    # typed text stayed text
    # the context (64, 8 kept for the reply) overflows at the 4th message: the oldest exchange goes
    assert "forgot the oldest 1 exchange(s)" in err and len(model.prompts[3]) <= 64 - 8
    assert model.prompts[3] == prepare.render(history[-6:-1], tok, reply=True)[0]
    assert [m["content"] for m in history] == [typed[1], "ok", "third message", "ok", "fourth", "ok"]
    assert "end of input" in err


def test_sample_chat_cli_and_task_eval(tmp_path, monkeypatch, capsys):
    """The command lines: --chat=True with a checkpoint whose tokenizer has the chat tokens (a base
    model's is refused in one line), and --task_eval's report with its Wilson interval; pass@k by
    hand (Chen et al.'s estimator); the counting of right replies, with a generator that answers
    every other problem right."""
    assert sample.pass_at_k(5, 2, 1) == pytest.approx(0.4) and sample.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert sample.pass_at_k(3, 0, 3) == 0.0 and sample.pass_at_k(3, 1, 3) == 1.0
    tok = _sample_chat_tokenizer()
    tok.save(str(tmp_path / "chat.bpe"))
    ckpt = _sample_save_checkpoint(tmp_path / "chat.pt", _sample_model(tok.vocab_size, block_size=64),
                                   tmp_path / "chat.bpe", tok)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    out, err = _sample_main(monkeypatch, capsys, f"--ckpt={ckpt}", "--chat=True", "--max_new_tokens=4")
    assert out.startswith("you> bot> ") and "end of input" in err
    base = _sample_save_checkpoint(tmp_path / "base.pt", _sample_model(297), tmp_path / "base.bpe",
                                   _sample_tokenizer())
    _sample_tokenizer().save(str(tmp_path / "base.bpe"))
    with pytest.raises(bpe.UserError, match="no chat tokens"):
        _sample_main(monkeypatch, capsys, f"--ckpt={base}", "--chat=True")

    calls = {"n": 0}

    def every_other_right(model, tokenizer, ids, budget, sampling, k, **kw):
        question = tokenizer.decode(ids).split(bpe.USER)[1].split(bpe.END_OF_TURN)[0]
        p = next(p for p in prepare.task_problems("add", "test", 10, 0, 2) if p.question == question)
        calls["n"] += 1
        reply = p.answer if calls["n"] % 2 else p.answer + "0"
        return [sample.Completion(reply, [], "eot") for _ in range(k)]
    monkeypatch.setattr(sample, "generate_text", every_other_right)
    out, _ = _sample_main(monkeypatch, capsys, f"--ckpt={ckpt}", "--task_eval=add", "--eval_examples=10",
                          "--task_digits=2", "--temperature=0")
    row = out.splitlines()[1].split()
    lo, hi = sample.wilson_interval(5, 10)
    assert row[:5] == ["add", "10", "0.500", f"[{lo:.3f},", f"{hi:.3f}]"] and "wrong:" in out
    with pytest.raises(bpe.UserError, match=r"unknown task\(s\) \['mul'\].*--task_eval=add,count"):
        bpe.parse_settings(sample.SampleConfig, ["--task_eval=add,mul"])


def test_sample_builtin_suite_has_the_synthetic_tasks_for_chat_models(sample_data):
    """Issue 19 1(c): a chat model's built-in suite holds the synthetic tasks as multiple choice:
    test-split questions, the right reply among distinct wrong ones (the task's checker agrees),
    each closed by <|end|>; the same suite every time; a base model gets none of them."""
    data, base_tok, _, _ = sample_data
    tok = base_tok.with_special_tokens(bpe.CHAT_TOKENS)
    suite = sample.builtin_suite(str(data), tok, n_examples=12, seed=5, digits=2)
    assert {f"task_{n}" for n in prepare.TASKS} <= set(suite) and "continuation" not in suite  # other data
    assert suite == sample.builtin_suite(str(data), tok, n_examples=12, seed=5, digits=2)
    for name in prepare.TASKS:
        for ex in suite[f"task_{name}"]:
            p = next(p for p in prepare.task_problems(name, "test", 12, 0, 2) if p.question == ex.context)
            assert [prepare.TASKS[name].check(p, c) for c in ex.choices].count(True) == 1
            assert prepare.TASKS[name].check(p, ex.choices[ex.answer]) and len(set(ex.choices)) == len(ex.choices)
            ctx, choices = sample.example_ids(tok, ex)
            assert ctx == prepare.render([{"role": "user", "content": ex.context}], tok, reply=True)[0]
            assert all(c[-1] == tok.special_tokens[bpe.END_OF_TURN] for c in choices)
    assert not any(k.startswith("task_") for k in sample.builtin_suite(str(data), base_tok, n_examples=12))


# --- stress tests -------------------------------------------------------------------------------------

@_model_one_thread
def test_sample_stress_metrics_by_hand():
    """distinct-n, the longest repeated run and the re-prefill count, on examples done on paper."""
    assert sample.distinct_n([1, 2, 1, 2], 2) == 2 / 3 and sample.distinct_n([1, 2, 3], 1) == 1.0
    assert sample.longest_repeat([5, 1, 2, 3, 1, 2, 3, 1]) == 4
    assert sample.longest_repeat([7, 7, 7, 7]) == 3 and sample.longest_repeat([1, 2, 3]) == 0
    # context 32, keep 16, a 1-token prompt and 80 new tokens: the window jumps when the text
    # reaches 33 (-> start 17), 50 (-> 34) and 67 (-> 51) tokens
    assert sample.window_jumps(1, 80, 32, 16) == 3
    resets = []
    real_reset = _SampleHashCache.reset
    _SampleHashCache.reset = lambda self: resets.append(self.pos) or real_reset(self)
    try:
        list(sample.generate(_SampleHashModel(context=32), [1], 80, slide_keep=0.5))
    finally:
        _SampleHashCache.reset = real_reset
    assert len(resets) == 3                                # the generator re-prefilled three times


@_model_one_thread
def test_sample_stress_runs_and_reports(sample_data, monkeypatch, capsys):
    """--stress's function on the tiny model and data: nothing fails; past the context the cached
    generator equals the recompute; the length check covers the three RoPE variants; hotter
    samples are more surprising to the model; the odd prompts all generate. The CLI prints one
    line per check."""
    data, tok, model, ckpt = sample_data
    cfg = sample.SampleConfig(data_dir=str(data), stress=True)
    out = io.StringIO()
    res = sample.stress_tests(model, tok, cfg, sample.setup_runtime("cpu", compile="false"), out=out)
    assert res["failed"] == 0 and res["overflow"]["same"] and res["overflow"]["jumps"] == 3   # 80 tokens, as above
    assert set(res["length"]) == {"plain RoPE", "linear x2", "yarn x2"}
    assert all(math.isfinite(a) and math.isfinite(b) for a, b in res["length"].values())
    assert res["drift"][0.5] < res["drift"][1.5]
    assert all(v.startswith("ok") for v in res["prompts"].values()) and len(res["prompts"]) == 4
    assert res["repetition"][sample.STRESS_PENALTY]["distinct"][0] >= res["repetition"][1.0]["distinct"][0]
    text = out.getvalue()
    for tag in ("[overflow]", "[length]", "[repetition]", "[drift]", "[prompts]"):
        assert tag in text
    assert _sample_main(monkeypatch, capsys, f"--ckpt={ckpt}", "--stress=True", f"--data_dir={data}")[0] == text


# --- pictures ------------------------------------------------------------------------------------------

def test_sample_pca_recovers_known_axes():
    """Rows built as 5 a u1 + 2 b u2 + tiny noise (u1, u2 orthonormal in 16 dimensions, a and b
    standard normal): the top two principal axes are u1 and u2 (up to sign), the coordinates are
    5a and 2b (up to sign and centring), and they explain about 25/29 and 4/29 of the variance."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    u1, u2 = q[:, 0], q[:, 1]
    a, b = rng.normal(size=(2000, 1)), rng.normal(size=(2000, 1))
    x = 5 * a * u1 + 2 * b * u2 + 0.01 * rng.normal(size=(2000, 16)) + 3.0     # + an offset: centring matters
    coords, axes, explained = sample.principal_components(x)
    assert abs(axes[0] @ u1) > 0.999 and abs(axes[1] @ u2) > 0.999
    assert abs(np.corrcoef(coords[:, 0], a[:, 0])[0, 1]) > 0.999 and abs(np.corrcoef(coords[:, 1], b[:, 0])[0, 1]) > 0.999
    assert abs(explained[0] - 25 / 29) < 0.02 and abs(explained[1] - 4 / 29) < 0.02


@_model_one_thread
def test_sample_pictures_parse_with_expected_cells_and_labels(sample_data, monkeypatch, capsys):
    """--show draws three files next to the checkpoint. attention.svg: one cell per visible
    (query, key) pair of every layer and head, and T labels per layer row and per head column;
    embeddings.svg: one dot per non-special token, EMBED_LABELS labels; surprise.html: one span
    per token whose texts join back to the prompt."""
    data, tok, model, ckpt = sample_data
    prompt = "def f(x, y=[1, 2]):\n    return {'a': x}"
    out, _ = _sample_main(monkeypatch, capsys, f"--ckpt={ckpt}", "--show=attention,embeddings,surprise",
                          f"--prompt={prompt}", f"--data_dir={data}")
    folder = Path(ckpt).parent
    assert out.count(f"wrote {folder}") == 3
    assert sorted(p.name for p in folder.glob("*.svg")) + sorted(p.name for p in folder.glob("*.html")) == \
        ["attention.svg", "embeddings.svg", "surprise.html"]
    T = len(sample.encode_prompt(tok, sample.read_prompt(prompt), 32))
    L, H = model.config.n_layer, model.config.n_head
    svg = "{http://www.w3.org/2000/svg}"
    root = ET.parse(folder / "attention.svg").getroot()
    assert len([e for e in root.iter(f"{svg}rect") if e.get("class") == "cell"]) == L * H * T * (T + 1) // 2
    assert len([e for e in root.iter(f"{svg}text") if e.get("class") == "label"]) == L * T + H * T
    root = ET.parse(folder / "embeddings.svg").getroot()
    assert len([e for e in root.iter(f"{svg}circle") if e.get("class") == "token"]) == tok.vocab_size - 1
    assert len([e for e in root.iter(f"{svg}text") if e.get("class") == "label"]) == sample.EMBED_LABELS
    root = ET.parse(folder / "surprise.html").getroot()
    spans = list(root.iter("{http://www.w3.org/1999/xhtml}span"))
    assert len(spans) == T - 1 and "".join(s.text or "" for s in spans) == sample.read_prompt(prompt)
    # the attention cells are the recorded probabilities: the first query row of layer 0 head 0 is 1
    first = [e for e in ET.parse(folder / "attention.svg").getroot().iter(f"{svg}rect") if e.get("class") == "cell"][0]
    assert first.get("fill") == sample.blue(1.0)
    with pytest.raises(bpe.UserError, match="--prompt=TEXT"):
        _sample_main(monkeypatch, capsys, f"--ckpt={ckpt}", "--show=attention")


@_model_one_thread
def test_sample_surprise_page_escapes_html(sample_data):
    """The prompt's text is shown as text: markup in it is escaped (no live <script>), control
    characters (not allowed in XML) are written as \\xNN, and the page still parses."""
    data, tok, model, _ = sample_data
    nasty = "<script>alert('x')</script> & \"q\" <b>"
    pieces = sample.token_pieces(tok, tok.encode(nasty + "\x01"))
    page = sample.surprise_html(pieces, [1.0] * len(pieces), math.log(300), "t<i>tle")
    assert "<script" not in page and "<b>" not in page and "t&lt;i&gt;tle" in page
    assert page.count("&lt;") == 3 + 2             # the text's three, the title in <title> and <h1>
    root = ET.fromstring(page)
    spans = list(root.iter("{http://www.w3.org/1999/xhtml}span"))
    assert "".join(s.text or "" for s in spans) == nasty + "\\x01"
    assert spans[0].get("title") == "1.00 nats"

# =============================================================================
# 8. end to end: the quick start through the real command lines
# =============================================================================

_E2E_ROOT = Path(__file__).resolve().parent
_E2E_SCRIPTS = ["bpe.py", "prepare.py", "model.py", "train.py", "sample.py"]


def _e2e_env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _e2e_run(args, cwd, timeout=600):
    """Run one of our scripts the way a user does (a fresh interpreter, real argv)."""
    script = str(_E2E_ROOT / args[0])
    return subprocess.run([sys.executable, script, *args[1:]], cwd=cwd, env=_e2e_env(),
                          capture_output=True, text=True, timeout=timeout)


def _e2e_train_until_sigterm(args, cwd, at_step, timeout=600):
    """Start train.py, and once it logs step `at_step`, send SIGTERM like a cluster
    scheduler would. The trainer must finish its step, save last.pt and exit with
    train.EXIT_INTERRUPTED."""
    proc = subprocess.Popen([sys.executable, str(_E2E_ROOT / args[0]), *args[1:]], cwd=cwd,
                            env=_e2e_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"step {at_step}/"):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(seen) + (rest or "")


def _e2e_corpus(folder):
    """A tiny corpus of Python-looking documents: one file each, so one document each."""
    folder.mkdir()
    for i in range(24):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(12))
        (folder / f"mod{i:02d}.py.txt").write_text(f'"""Module {i}."""\nimport os\n\n' + body)
    return folder


@pytest.mark.parametrize("script", _E2E_SCRIPTS)
def test_e2e_every_script_answers_help(script):
    # The frame issue: every script answers --help with its settings and their meanings.
    r = _e2e_run([script, "--help"], cwd=_E2E_ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "settings (override with --key=value):" in r.stdout
    assert r.stdout.count("\n  --") >= 5  # one line per setting


@pytest.mark.parametrize("script,bad,hint", [
    ("prepare.py", "--vocab_sise=300", "--vocab_size"),
    ("train.py", "--max_step=3", "--max_steps"),
    ("sample.py", "--temprature=0", "--temperature"),
    ("bpe.py", "--vocab=300", "--vocab_size"),
    ("model.py", "--n_layers=2", "--n_layer"),
])
def test_e2e_unknown_key_is_one_line_with_suggestion(script, bad, hint):
    # Guards against traceback spew for a typo: one line on stderr naming the closest key.
    r = _e2e_run([script, bad], cwd=_E2E_ROOT, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert hint in lines[0]


def test_e2e_prepare_train_resume_sample(tmp_path):
    """The quick start in miniature, through the real command lines:
    prepare (vocab 300) -> train, stopped by SIGTERM at step 20 -> resume to 30 -> sample."""
    corpus = _e2e_corpus(tmp_path / "corpus")
    data, out = tmp_path / "data", tmp_path / "out"

    r = _e2e_run(["prepare.py", f"--input={corpus}/*.txt", f"--out_dir={data}",
                  "--vocab_size=300", "--num_proc=1", "--val_fraction=0.2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["splits"]["val"]["docs"] >= 1

    tiny = ["train.py", f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--compile=false",
            "--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--block_size=32",
            "--seq_len=32", "--batch_size=8", "--max_steps=30", "--eval_interval=10",
            "--eval_tokens=1024", "--ckpt_interval=10", "--sample_interval=0", "--sample_tokens=8"]
    rc, log = _e2e_train_until_sigterm(tiny, cwd=tmp_path, at_step=20)
    assert rc == train.EXIT_INTERRUPTED, log  # regression: exit code 0 read as "finished" by schedulers
    first = torch.load(out / "last.pt", weights_only=True)
    assert 20 <= first["step"] < 30, log  # the step in flight finishes, then it saves and exits

    r = _e2e_run(tiny + ["--resume=True"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] == 30
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "loss" in row]
    # the log after the resume: every step once (those redone after the last save are not doubled)
    assert [row["step"] for row in train_rows] == list(range(1, 31))
    assert [row["step"] for row in rows if "val_loss" in row] == [0, 10, 20, 30]
    # It learned something: the last losses are well below the first (ln 300 = 5.7 at init).
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0
    assert (out / "best.pt").exists() and (out / "loss.svg").exists()

    r = _e2e_run(["sample.py", f"--out_dir={out}", "--prompt=def ", "--max_new_tokens=24",
                  "--temperature=0", "--num_samples=2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # the command line printed exactly the greedy continuation of best.pt, once per sample
    # (regression: this used to check `"def " in stdout`, which the echoed prompt always passes)
    model, tok, _ = sample.load_model(str(out / "best.pt"))
    ids = sample.encode_prompt(tok, "def ", model.config.max_context)
    healed, healing = sample.heal_prompt(tok, ids, model.config.vocab_size)
    done = sample.generate_text(model, tok, healed, 24, healing=healing)
    want = "def " + done[0].text
    assert len(want) > len("def ") + 5 and r.stdout.count(want + "\n") == 2, (want, r.stdout)
