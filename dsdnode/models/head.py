"""The client's part of the target model: token embeddings, final norm and LM head, no layers.

It lives on the client's device. Hidden states it is given (from the wire: CPU) move to that
device; logits come back to the CPU in float32, where verification and sampling run (a block's
logits are small: [T, V])."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from .weights import CheckpointLoader, load_config


class Head(nn.Module):
    def __init__(self, config: PretrainedConfig, embed: nn.Module, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.config, self.embed, self.norm, self.lm_head = config, embed, norm, lm_head
        self.vocab_ids: torch.Tensor | None = None  # the tokens lm_head scores (with_vocabulary); None: all

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @classmethod
    def load(cls, model_dir: Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> "Head":
        config = load_config(model_dir)
        loader = CheckpointLoader(model_dir, config, dtype, device)
        embed = loader.part("model.embed_tokens")  # Gemma's scales by sqrt(hidden) itself
        norm = loader.part("model.norm")
        if loader.reader.has("lm_head.weight"):
            lm_head = loader.part("lm_head")
        else:  # tied: the output projection is the embedding matrix
            with torch.device("meta"):
                lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            lm_head.weight = embed.weight
        head = cls(config, embed, norm, lm_head)
        head.loaded_keys = loader.reader.read
        return head

    def with_vocabulary(self, ids: torch.Tensor) -> "Head":
        """This head scoring only the tokens `ids` (the others get -inf logits, so zero probability):
        the output projection reads only their rows. Shares the embeddings and the norm."""
        rows = nn.Linear(self.config.hidden_size, len(ids), bias=False, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            rows.weight.copy_(self.lm_head.weight[ids.to(self.device)])
        head = Head(self.config, self.embed, self.norm, rows)
        head.vocab_ids = ids.cpu()
        return head

    @classmethod
    def of_model(cls, model: nn.Module) -> "Head":
        return cls(model.config, model.model.embed_tokens, model.model.norm, model.lm_head)

    @torch.inference_mode()
    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        """[1, T, H] embeddings of `ids`, on the head's device."""
        return self.embed(torch.tensor([ids], device=self.device))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[1, T, H] final hidden states (any device, any dtype) -> [T, V] float32 logits on the CPU."""
        logits = self.lm_head(self.norm(hidden.to(self.device, self.dtype)))[0].float().cpu()
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2/3: as their CausalLM forward does
            logits = torch.tanh(logits / cap) * cap
        if self.vocab_ids is None:
            return logits
        full = torch.full((logits.shape[0], self.config.vocab_size), float("-inf"))
        full[:, self.vocab_ids] = logits
        return full
