"""Load what a client holds: tokenizer, the target's head, the whole draft model, all on the
client's device (hidden states go to the CPU only at the wire)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..devices import resolve_device, resolve_dtype
from ..models.compression import DraftCompression, frequent_tokens, quantize_int8
from ..models.fetch import resolve_model_dir
from ..models.head import Head
from ..models.registry import get_entry
from ..models.span import Span
from ..models.weights import load_config, weights_identity
from ..speculative.importance import ImportanceScorer

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


@dataclass
class ClientModels:
    tokenizer: PreTrainedTokenizerBase
    head: Head
    draft_head: Head | None
    draft_spans: list[Span]
    eos_ids: set[int]
    target_dir: Path
    weights: str  # digest of the target's weights: a swarm client chains only servers of the same
    draft_compression: DraftCompression
    # why no draft model is loaded, in words (speculative generations then draft by prompt lookup,
    # speculative/lookup.py); None: a draft model is loaded
    draft_fallback: str | None = None

    @property
    def device(self) -> torch.device:
        return self.head.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.dtype

    def importance(self) -> ImportanceScorer:
        vocab = self.head.config.vocab_size
        strings = self.tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(self.tokenizer)))))
        strings += [""] * (vocab - len(strings))
        return ImportanceScorer([s or "" for s in strings], special_ids=self.tokenizer.all_special_ids)


def default_draft(target: str) -> str | None:
    try:
        return get_entry(target).draft
    except ValueError:
        return None  # a local directory: no registry pairing


def load_client_models(target: str, draft: str | None, dtype: str | None = None, device: str = "cpu",
                       draft_int8: bool | None = None, draft_vocab: int | None = None,
                       quant: str = "none") -> ClientModels:
    """device: auto, cpu, cuda, cuda:N or mps (a missing one is a DeviceError, before any model is
    fetched or read); dtype: a name, or None for the device's default (devices.default_dtype);
    draft_int8 / draft_vocab: how the draft is made cheaper (models/compression.py), None: the
    device's default; quant: the servers' quantization this client chains (models/quantization.py).
    A draft that does not share the target's vocabulary is not loaded: draft_fallback says why, and
    speculative generations draft by prompt lookup (a draft over other token ids cannot propose
    the target's tokens)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    compression = DraftCompression.for_device(device, draft_int8, draft_vocab) if draft else DraftCompression()
    target_dir = resolve_model_dir(target)
    head = Head.load(target_dir, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    stops = eos_ids(tokenizer, head.config)
    draft_head, draft_spans, fallback = None, [], no_draft_reason(target) if not draft else None
    if draft:
        draft_dir = resolve_model_dir(draft)
        draft_config = load_config(draft_dir)
        if draft_config.vocab_size != head.config.vocab_size:
            fallback = (f"the draft {draft!r} has a vocabulary of {draft_config.vocab_size} tokens, the target "
                        f"{head.config.vocab_size}")
    if draft and fallback is None:
        draft_head = Head.load(draft_dir, dtype, device)
        if compression.vocab and compression.vocab < draft_config.vocab_size:
            draft_head = draft_head.with_vocabulary(frequent_tokens(draft_config.vocab_size, compression.vocab, stops))
        span = Span.load(draft_dir, 0, draft_config.num_hidden_layers, torch.float32 if compression.int8 else dtype,
                         device)
        draft_spans = [quantize_int8(span) if compression.int8 else span]
    return ClientModels(tokenizer, head, draft_head, draft_spans, stops, target_dir, weights_identity(target_dir, quant),
                        compression if draft_head is not None else DraftCompression(), fallback)


def no_draft_reason(target: str) -> str:
    """Why a client given no draft model has none, in words."""
    try:
        entry = get_entry(target)
    except ValueError:
        return "no draft model was given"
    return (f"no draft model shares the vocabulary of {entry.name}" if entry.draft is None
            else "no draft model was loaded")


def eos_ids(tokenizer: PreTrainedTokenizerBase, config) -> set[int]:
    ids = set()
    for value in (config.eos_token_id, tokenizer.eos_token_id):
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in STOP_TOKENS if t in vocab)
    return ids


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a user prompt, wrapped in the model's chat template when it has one."""
    if chat and tokenizer.chat_template:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt)["input_ids"]


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the model's chat template, ready for the assistant's turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
