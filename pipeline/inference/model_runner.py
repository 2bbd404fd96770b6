"""The model runner: one forward of a model over a step's scheduled tokens.

It packs the new tokens of every scheduled sequence into one row of N tokens (no padding in the
matmuls, which are most of the work), sets the step's attention context (a `PagedBatch` of the
runner's paged KV cache: where each token's K/V go and which blocks each sequence reads), calls
the model's own forward (`GPT.hidden`, pipeline/model/gpt.py), and returns the fp32 logits of the
tokens asked for, on the CPU, where sampling runs. The engine keeps one runner for the target
model and one for the draft; both use the same block tables, each with its own K/V tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.model.gpt import GPT


class ModelRunner:
    def __init__(self, model: GPT, num_blocks: int, block_size: int):
        self.model = model
        self.kv = model.new_paged_kv_cache(num_blocks, block_size)
        self.device = self.kv.kv.device

    @torch.no_grad()
    def run(self, seqs: Sequence[tuple[Sequence[int], int, Sequence[int]]], logits_at: Sequence[int]) -> torch.Tensor:
        """seqs: (block table, start, new tokens) of each sequence; returns the logits (len(logits_at),
        padded vocab), fp32 on the CPU, of the packed tokens at the indices `logits_at`."""
        tokens = torch.tensor([t for _, _, new in seqs for t in new], device=self.device)[None]  # (1, N)
        batch = self.kv.batch([(table, start, len(new)) for table, start, new in seqs])
        training = self.model.training
        if training:  # no dropout while decoding, whatever the trainer left set
            self.model.eval()
        try:
            hidden = self.model.hidden(tokens, kv_cache=batch)[0]  # (N, C)
        finally:
            if training:
                self.model.train()
        at = torch.tensor(list(logits_at), dtype=torch.long, device=self.device)
        # one copy to the CPU per step: each request's generator lives there
        return self.model.logits(hidden[at]).float().cpu()
