"""Training data: token windows (`pipeline.token_shards.TokenWindows`) read in a deterministic order.

The training order is a fresh permutation of all windows per epoch (seeded by seed and epoch).
The loader's only state is `position`, the number of sequences the whole job has consumed; rank r
of W, at each micro step, takes the B sequences starting at position + r * B, then every rank
moves position on by W * B. So one global batch holds the same sequences whatever W is (1 process
with 2 accumulation steps, or 2 processes with 1), and a checkpoint's position resumes exactly,
even on a different number of processes.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.token_shards import TokenWindows


def to_device(batch: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) windows -> inputs and targets (B, T) on the device (pinned, async on CUDA)."""
    tensor = torch.from_numpy(batch)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor[:, :-1].contiguous(), tensor[:, 1:].contiguous()


class TrainLoader:
    """Endless, deterministic micro batches of B windows for one rank (see the module docstring)."""

    def __init__(self, windows: TokenWindows, micro_batch: int, rank: int, world_size: int, seed: int):
        self.windows, self.B, self.rank, self.world_size, self.seed = windows, micro_batch, rank, world_size, seed
        self.position = 0
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def _window_at(self, g: int) -> np.ndarray:
        epoch, i = divmod(g, len(self.windows))
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(len(self.windows))
        return self.windows[int(self._order[i])]

    def next_batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.position + self.rank * self.B
        batch = np.stack([self._window_at(g) for g in range(first, first + self.B)])
        self.position += self.world_size * self.B
        return to_device(batch, device)

    def epoch(self) -> float:
        return self.position / len(self.windows)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint data order has seed {state['seed']}, this run {self.seed}")
        self.position = int(state["position"])


def val_rounds(windows: TokenWindows, eval_tokens: int, micro_batch: int, world_size: int) -> int:
    """Eval rounds (one micro batch per rank each) in the first eval_tokens of the val split;
    checked when the run starts, not at its first evaluation."""
    per_round = world_size * micro_batch
    rounds = min(eval_tokens // windows.seq_len, len(windows)) // per_round
    if rounds == 0:
        raise ValueError(f"val split has {len(windows)} windows and eval_tokens allows "
                         f"{eval_tokens // windows.seq_len}; one eval round needs {per_round} "
                         f"(processes x micro_batch): raise pretrain.eval_tokens or add val data")
    return rounds


def val_batches(windows: TokenWindows, eval_tokens: int, micro_batch: int, rank: int, world_size: int):
    """This rank's share of the first eval_tokens of the val split, in order, as micro batches of
    windows. Every rank gets the same number of batches (the total is rounded down to a multiple
    of world_size * B), so averaging the per-batch losses over ranks gives the mean over all."""
    per_round = world_size * micro_batch
    for r in range(val_rounds(windows, eval_tokens, micro_batch, world_size)):
        first = r * per_round + rank * micro_batch
        yield np.stack([windows[i] for i in range(first, first + micro_batch)])


def unigram_entropy(windows: TokenWindows, vocab_size: int, max_tokens: int = 50_000_000) -> float:
    """Entropy (nats per token) of the token frequencies in the first max_tokens of the split: the
    loss of the best model that ignores context. A model that learned anything beats it."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    left = max_tokens
    for tokens in windows.shards:
        chunk = tokens[:left]
        counts += np.bincount(chunk, minlength=vocab_size)
        left -= len(chunk)
        if left <= 0:
            break
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
