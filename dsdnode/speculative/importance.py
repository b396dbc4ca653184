"""Which tokens matter: the rule behind the opt-in lossy (importance-relaxed) verification.

Speculative decoding is lossless only if every draft token that differs from the target's
choice is rejected. Many such mismatches are harmless ("the" vs "a", a space vs a newline
before a comment, "," vs ";" in prose), yet each one ends the round early. Relaxed
verification accepts a mismatching draft token when it is *unimportant* and the target itself
finds it nearly as plausible as its own choice. Anything that changes meaning -- numbers,
identifiers, keywords, operators, special tokens, anything unrecognized -- is *key* and is
never relaxed.

Each vocabulary entry is classified once at construction (a plain Python pass over the
token strings, well under a second for 150k tokens); verification then only looks up a
precomputed boolean tensor and computes one entropy per mismatching position.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AdaptiveSettings:
    """Knobs of relaxed verification (greedy base). Off by default: it changes the output.

    enabled: False makes `verify_adaptive` identical to greedy verification.
    tau: a non-key draft token is accepted if p(draft) >= tau * p(target's argmax). Lower
        tau accepts more (longer rounds, faster) but drifts further from the target's greedy
        text; tau = 1 only relaxes exact ties. Must be in [0, 1].
    max_entropy: largest entropy (nats) of the target's distribution at that position for
        which relaxing is allowed. A high-entropy position is an open choice point where a
        different token can steer the continuation elsewhere; a low cap keeps relaxation to
        positions where the target hesitates between a few near-equivalent tokens. Larger
        values accept more, smaller values are safer. Default 2.5 nats (perplexity ~12).
    """

    enabled: bool = False
    tau: float = 0.3
    max_entropy: float = 2.5

    def __post_init__(self) -> None:
        if not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau!r}")
        if not isinstance(self.max_entropy, (int, float)) or math.isnan(self.max_entropy) \
                or self.max_entropy < 0:
            raise ValueError(f"max_entropy must be >= 0 (nats), got {self.max_entropy!r}")


# Class names, in the order of their integer codes in ImportanceScorer.class_ids.
CLASSES = ("number", "identifier", "keyword", "operator", "whitespace", "punctuation",
           "filler", "special", "other")
# Never relaxed. "special" (EOS, chat markers) and "other" (mixed or unrecognized tokens,
# partial UTF-8 bytes, non-ASCII symbols) are key because we cannot tell they are harmless.
KEY_CLASSES = frozenset({"number", "identifier", "keyword", "operator", "special", "other"})

# Common English words whose swap rarely changes meaning. Programming keywords ("if", "in",
# "and", "is", "this", ...) are classified as keywords first and so are never filler.
FILLER_WORDS = frozenset("""
the a an of to so then well just also very really quite basically actually simply now here
there that which some maybe perhaps still even already thus hence please we our you your it its
""".split())

# Keywords of Python and the C / Java / JavaScript / Go / Rust families (lower-case match).
KEYWORDS = frozenset("""
false none true and as assert async await break class continue def del elif else except
finally for from global if import in is lambda nonlocal not or pass raise return try while
with yield match case print self cls int float str bool list dict set tuple len range
auto char const default do double enum extern goto long register short signed sizeof static
struct switch typedef union unsigned void volatile include define bool null nullptr new
delete this public private protected virtual template typename namespace using function var
let const typeof instanceof undefined func package go chan defer select interface map type
fn mut impl trait pub use mod crate loop where ref move dyn super extends implements throws
throw catch final abstract
""".split())

_OPERATOR_CHARS = frozenset("+-*/=<>%&|^!~@#?$\\")
_PUNCT_CHARS = frozenset(",.;:()[]{}'\"`")
_SPACE_MARKERS = str.maketrans({"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "č": "\r", "▁": " "})
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPECIAL_TOKEN = re.compile(r"<\|[^|]*\|>|</?s>|<unk>|<pad>|<mask>|<eos>|<bos>")
_NUMBER = re.compile(r"[+-]?(0[xX][0-9a-fA-F_]+|0[bB][01_]+|(\d[\d_]*\.?\d*|\.\d+)([eE][+-]?\d+)?)[jJlLuUfF]?")


def normalize_token(text: str) -> str:
    """Map tokenizer markers to the text they stand for.

    Byte-level BPE spells space/newline/tab/CR as 'Ġ'/'Ċ'/'ĉ'/'č'; SentencePiece spells a space as
    '▁' and raw bytes as '<0xNN>'. Decoded strings (tokenizer.decode per id) pass unchanged.
    """
    m = _BYTE_TOKEN.fullmatch(text)
    if m:
        b = int(m.group(1), 16)
        return chr(b) if b < 0x80 else "\ufffd"  # a lone non-ASCII byte decodes to U+FFFD
    return text.translate(_SPACE_MARKERS)


def classify(token: str) -> str:
    """Class of one token string (raw tokenizer spelling or decoded text); see CLASSES."""
    if _SPECIAL_TOKEN.fullmatch(token):
        return "special"
    text = normalize_token(token)
    if text == "":
        return "special"
    if text.isspace():
        return "whitespace"
    core = text.strip()
    word = core.lower()
    if word in KEYWORDS:
        return "keyword"
    if word in FILLER_WORDS and (core[1:].islower() or len(core) == 1):
        return "filler"  # "the", "The", "A"; not acronyms like "IT"
    if _NUMBER.fullmatch(core):
        return "number"
    if core.isidentifier():
        # Numbers are always key; an identifier with digits is key as well, so either is fine.
        return "identifier"
    if any(ch.isdigit() for ch in core):
        return "number"  # "1)", "2.", "3e": contains a digit, must stay exact
    chars = set(core) - {" ", "\n", "\t", "\r"}
    if chars <= _PUNCT_CHARS:
        return "punctuation"
    if chars <= (_OPERATOR_CHARS | _PUNCT_CHARS):
        return "operator"  # "==", "->", "**", "+=", "=(" ...: any operator char makes it key
    return "other"


def entropy(probs_row: Tensor) -> float:
    """Shannon entropy in nats of a probability vector (zeros contribute nothing)."""
    return float(torch.special.entr(probs_row.to(torch.float32)).sum())


class ImportanceScorer:
    """Per-vocabulary key/non-key table plus the position-dependent relaxation rule.

    token_strings[i] is the string of vocab id i (convert_ids_to_tokens or decode per id).
    special_ids: ids to force into the "special" class (e.g. tokenizer.all_special_ids).
    Ids beyond len(token_strings) (padded LM-head rows) are treated as key.
    """

    def __init__(self, token_strings: list[str], special_ids: list[int] | tuple[int, ...] = ()):
        if not isinstance(token_strings, (list, tuple)) or len(token_strings) == 0:
            raise ValueError("token_strings must be a non-empty list of strings")
        code = {name: i for i, name in enumerate(CLASSES)}
        ids = []
        for i, t in enumerate(token_strings):
            if not isinstance(t, str):
                raise ValueError(f"token_strings[{i}] is {type(t).__name__}, expected str")
            ids.append(code[classify(t)])
        self.class_ids = torch.tensor(ids, dtype=torch.uint8)
        for sid in special_ids:
            if 0 <= sid < len(ids):
                self.class_ids[sid] = code["special"]
        key_codes = torch.tensor([code[c] for c in sorted(KEY_CLASSES)], dtype=torch.uint8)
        self.is_key: Tensor = torch.isin(self.class_ids, key_codes)

    @property
    def vocab_size(self) -> int:
        return int(self.class_ids.numel())

    def token_class(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            return "other"
        return CLASSES[int(self.class_ids[token_id])]

    def key(self, token_id: int) -> bool:
        """True if the token must never be relaxed (unknown ids included)."""
        return not 0 <= token_id < self.vocab_size or bool(self.is_key[token_id])

    def relaxable(self, token_id: int, target_probs_row: Tensor,
                  s: AdaptiveSettings | None = None) -> bool:
        """May a mismatching draft token be accepted at this position (before the tau test)?

        Rule: the draft token is non-key, the target's own choice (argmax) is non-key too
        (replacing a number/identifier the target wanted is just as harmful as inserting
        one), and the target's entropy here is <= s.max_entropy (it hesitates among a few
        alternatives rather than facing an open choice). The tau ratio test is applied by
        `verify_adaptive`; it also rules out positions where the target is confidently
        peaked on another token.
        """
        s = s or AdaptiveSettings(enabled=True)
        if self.key(token_id):
            return False
        if self.key(int(target_probs_row.argmax())):
            return False
        return entropy(target_probs_row) <= s.max_entropy
