"""Token classes, the key table and the relaxation rule."""

import math
import random

import pytest
import torch

from dsdnode.speculative.importance import (CLASSES, KEY_CLASSES, AdaptiveSettings, ImportanceScorer,
                                     classify, entropy, normalize_token)

EXPECTED = {
    # numbers: always key
    "123": "number", "Ġ42": "number", "3.14": "number", "Ġ0x1F": "number", "1e-5": "number",
    "▁7": "number", "1)": "number", "Ġ2.": "number",
    # identifiers and keywords
    "Ġfoo": "identifier", "bar_baz": "identifier", "ing": "identifier", "▁value": "identifier",
    "IT": "identifier",
    "Ġdef": "keyword", "return": "keyword", "Ġif": "keyword", "ĠNone": "keyword", "Ġin": "keyword",
    "Ġthis": "keyword",
    # operators (any operator character makes a symbol token key)
    "+": "operator", "Ġ==": "operator", "!=": "operator", "<=": "operator", "+=": "operator",
    "->": "operator", "**": "operator", "Ġ=": "operator", "=(": "operator", "%": "operator",
    "&&": "operator", "|": "operator", "^": "operator", "~": "operator", "!": "operator",
    # whitespace, in byte-level BPE, SentencePiece and decoded spellings
    "Ġ": "whitespace", "Ċ": "whitespace", "ĠĠĠĠ": "whitespace", "ĉĉ": "whitespace",
    "čĊ": "whitespace", "▁": "whitespace", "<0x0A>": "whitespace", " ": "whitespace",
    "\n    ": "whitespace",
    # punctuation, possibly with whitespace around it
    ",": "punctuation", ".": "punctuation", ";": "punctuation", ":": "punctuation",
    "(": "punctuation", ")": "punctuation", "[": "punctuation", "]": "punctuation",
    "{": "punctuation", "}": "punctuation", '"': "punctuation", "'": "punctuation",
    "):Ċ": "punctuation", "Ġ(": "punctuation", "...": "punctuation",
    # filler words
    "Ġthe": "filler", "ĠThe": "filler", "▁the": "filler", "Ġa": "filler", "an": "filler",
    "Ġof": "filler", "Ġto": "filler", "Ġso": "filler", "Ġthen": "filler", "Ġwell": "filler",
    "Ġjust": "filler", " the": "filler",
    # special and unrecognized: key
    "<|endoftext|>": "special", "<|im_start|>": "special", "</s>": "special", "": "special",
    ".get": "other", "'s": "other", "Ġthe,": "other", "<0xE2>": "other", "\ufffd": "other",
}


@pytest.mark.parametrize("token,cls", EXPECTED.items())
def test_classify(token, cls):
    assert classify(token) == cls


def test_normalize_markers():
    assert normalize_token("ĠĠfooĊ") == "  foo\n"
    assert normalize_token("▁hello") == " hello"
    assert normalize_token("<0x09>") == "\t"


def test_key_table_matches_classes():
    tokens = list(EXPECTED)
    sc = ImportanceScorer(tokens)
    assert sc.is_key.dtype == torch.bool and sc.is_key.shape == (len(tokens),)
    for i, t in enumerate(tokens):
        assert sc.token_class(i) == EXPECTED[t]
        assert bool(sc.is_key[i]) == (EXPECTED[t] in KEY_CLASSES) == sc.key(i)
    assert {"number", "identifier", "keyword", "operator"} <= KEY_CLASSES
    assert not {"whitespace", "punctuation", "filler"} & KEY_CLASSES
    assert set(KEY_CLASSES) <= set(CLASSES)


def test_special_ids_and_out_of_range_ids_are_key():
    sc = ImportanceScorer(["Ġthe", "Ġ", ","], special_ids=[1])
    assert sc.token_class(1) == "special" and sc.key(1)
    assert sc.key(3) and sc.key(-1) and sc.token_class(99) == "other"
    assert not sc.key(0) and not sc.key(2)


def test_large_vocabulary_table():
    rng = random.Random(0)
    pieces = ["Ġthe", "Ġfoo", "12", ",", "Ġ==", "ĠĠ", "ing", "Ġa", "()", "é"]
    vocab = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 3))) for _ in range(150_000)]
    sc = ImportanceScorer(vocab)
    assert sc.vocab_size == 150_000 and sc.is_key.sum() > 0 and (~sc.is_key).sum() > 0


@pytest.mark.parametrize("bad", [[], "abc", ["ok", None], ["ok", 3]])
def test_bad_vocab_raises(bad):
    with pytest.raises(ValueError):
        ImportanceScorer(bad)


@pytest.mark.parametrize("kwargs", [{"tau": -0.1}, {"tau": 1.5}, {"max_entropy": -1.0},
                                    {"max_entropy": math.nan}])
def test_adaptive_settings_validation(kwargs):
    with pytest.raises(ValueError):
        AdaptiveSettings(**kwargs)


def test_entropy():
    assert entropy(torch.tensor([1.0, 0.0, 0.0])) == 0.0
    assert math.isclose(entropy(torch.full((8,), 1 / 8)), math.log(8), rel_tol=1e-6)


def test_relaxable_rule():
    vocab = ["Ġthe", "Ġa", "Ġx", "Ġ1", ",", "Ġ"]
    sc = ImportanceScorer(vocab)
    s = AdaptiveSettings(enabled=True, max_entropy=1.0)
    peaked = torch.tensor([0.6, 0.35, 0.01, 0.01, 0.02, 0.01])       # entropy ~0.9 nats
    assert sc.relaxable(1, peaked, s) and sc.relaxable(4, peaked, s)
    assert not sc.relaxable(2, peaked, s) and not sc.relaxable(3, peaked, s)  # key draft token
    key_top = torch.tensor([0.35, 0.01, 0.6, 0.01, 0.02, 0.01])      # target wants "Ġx"
    assert not sc.relaxable(1, key_top, s)
    flat = torch.full((6,), 1 / 6)                                   # entropy ln 6 ~1.79
    assert not sc.relaxable(1, flat, s)
    assert sc.relaxable(1, flat, AdaptiveSettings(enabled=True, max_entropy=2.0))
