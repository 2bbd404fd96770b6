"""SFT data: a seeded mixture of task conversations, which train only on the assistant's tokens,
and replayed pretraining text, which trains on every token, in padded micro batches.

- Rendering: each train example of a task with a positive mixture weight goes through the chat
  template (`render_conversation` -> ids, mask). A conversation longer than the model's context
  (more than seq_len + 1 tokens: inputs are ids[:-1], targets ids[1:]) is dropped and counted per
  task; cutting it would train on an answer without its end.
- Replay: windows of `replay_tokens` + 1 tokens of the tokenize stage's train shards (the text
  the base was pretrained on, never its val split), cut as pretraining cuts them (across document
  boundaries, the EOS id between documents). A window is a row whose mask is all ones, so every
  target is trained, with the full next-token loss as in pretraining. Rows are made on demand
  from the memory-mapped shards: a corpus of billions of tokens costs no memory here.
- Mixture: `weights` are the shares of rows each part (a task, or replay) contributes. An epoch
  of the stream holds E items, E the number of rows of all weighted parts; part t gets
  round(w_t / sum(w) * E) of them (at least one), taken in turn from a seeded permutation of its
  rows that is redrawn each time the part runs out (a small part repeats, a large one is
  subsampled). The epoch's items are then shuffled with a seed of (seed, epoch).
- Batches: a step trains on `global_batch` consecutive rows of the stream, whatever the
  number of processes or accumulation steps. The loader's only state is `position`, the
  rows consumed. A global batch is sorted by length, then cut into micro batches of B
  rows (rank r of W takes micro batches r, r + W, ...), so rows of like length share a micro
  batch and little compute goes to padding. Rows are right-padded to the longest row of their
  micro batch; padding targets are -1, and so are the targets of every position whose token is
  not an assistant token (mask 0), so a conversation's loss covers exactly the assistant's
  tokens. Padding sits after a row's real tokens, and attention is causal, so no real token ever
  sees it: each row is one conversation or one window, nothing leaks between rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.tasks import Example, get_task
from pipeline.token_shards import TokenWindows, index_path, split_shards
from pipeline.tokenizer.bpe import BPETokenizer
from pipeline.tokenizer.chat import render_conversation

Rendered = tuple[list[int], list[int]]  # (ids, mask) of one row: a conversation or a replay window
REPLAY = "replay"  # the mixture's part that is pretraining text, not a task


def render_examples(tokenizer: BPETokenizer, examples: Sequence[Example], seq_len: int) -> tuple[list[Rendered], int]:
    """The conversations that fit a context of seq_len (at most seq_len + 1 tokens), rendered,
    and the number dropped as too long."""
    kept = [r for r in (render_conversation(tokenizer, e.messages) for e in examples) if len(r[0]) <= seq_len + 1]
    return kept, len(examples) - len(kept)


def load_split(tokenizer: BPETokenizer, tasks_config: dict[str, Any], names: Sequence[str], split: str,
               seq_len: int) -> tuple[dict[str, list[Rendered]], dict[str, int]]:
    """Each named task's `split`, rendered: ({task: conversations}, {task: dropped as too long}).
    A task left with no conversation that fits is a config error."""
    rendered, dropped = {}, {}
    for name in names:
        rendered[name], dropped[name] = render_examples(tokenizer, get_task(name, tasks_config).examples(split), seq_len)
        if not rendered[name]:
            raise ConfigError(f"config key 'sft.mixture.{name}': none of the {dropped[name]} {split} conversations "
                              f"fits the model's context of {seq_len} tokens")
    return rendered, dropped


class ReplayRows:
    """Every window of `tokens` + 1 ids of a split's token shards, as rows that train on every
    target (mask all ones): the sequence a Mixture draws replay from, by index."""

    def __init__(self, tokens_dir: str | Path, split: str, vocab_size: int, tokens: int):
        self.paths = split_shards(tokens_dir, split)  # each checked against the tokens manifest
        self.windows = TokenWindows(self.paths, vocab_size, tokens)

    def files(self) -> list[Path]:
        """The shards read: each .bin and its .idx."""
        return [f for path in self.paths for f in (path, index_path(path))]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> Rendered:
        ids = self.windows[i].tolist()
        return ids, [1] * len(ids)


def collate(rows: Sequence[Rendered], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows -> inputs and targets (B, T), T the longest row minus one: inputs ids[:-1] padded with
    pad_id, targets ids[1:] where mask[1:] is 1 and -1 elsewhere (prompt tokens and padding)."""
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        x[i, :len(ids) - 1] = ids_t[:-1]
        y[i, :len(ids) - 1] = torch.where(mask_t[1:], ids_t[1:], -1)
    return x, y


class Mixture:
    """The endless, seeded stream of mixture rows (see the module docstring): item g of the stream
    is `self[g]`, computed from g alone. `tasks` maps each part to its rows (a list, or ReplayRows)."""

    def __init__(self, tasks: dict[str, Sequence[Rendered]], weights: dict[str, float], seed: int):
        self.names = [name for name in tasks if weights.get(name, 0) > 0]
        if not self.names:
            raise ConfigError("config key 'sft.mixture': no part has a positive weight")
        self.tasks, self.seed = [tasks[name] for name in self.names], seed
        total = sum(weights[name] for name in self.names)
        self.epoch_size = sum(len(rows) for rows in self.tasks)
        self.counts = [max(1, round(weights[name] / total * self.epoch_size)) for name in self.names]
        self.epoch_size = sum(self.counts)
        self._epoch, self._order = -1, np.zeros((0, 2), dtype=np.int64)

    def _build(self, epoch: int) -> np.ndarray:
        items = []
        for t, count in enumerate(self.counts):
            first = epoch * count
            cycles = {}  # one permutation per (task, cycle) the epoch touches, not one per item
            for k in range(first, first + count):
                cycle, i = divmod(k, len(self.tasks[t]))
                if cycle not in cycles:
                    cycles[cycle] = np.random.default_rng([self.seed, t, cycle]).permutation(len(self.tasks[t]))
                items.append((t, int(cycles[cycle][i])))
        order = np.random.default_rng([self.seed, len(self.tasks), epoch]).permutation(len(items))
        return np.asarray(items, dtype=np.int64)[order]

    def __getitem__(self, g: int) -> tuple[str, Rendered]:
        epoch, i = divmod(g, self.epoch_size)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._build(epoch)
        t, j = self._order[i]
        return self.names[t], self.tasks[t][j]

    def shares(self) -> dict[str, float]:
        """The share of each part's rows in an epoch (the weights, after rounding)."""
        return {name: count / self.epoch_size for name, count in zip(self.names, self.counts)}


def micro_batches(rows: Sequence[Rendered], micro_batch: int, rank: int, world_size: int,
                  pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro batches of a global batch: rows sorted by length (stable), cut into
    micro batches of micro_batch rows, every world_size-th one from `rank` on."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    chunks = [order[s:s + micro_batch] for s in range(0, len(order), micro_batch)]
    return [collate([rows[i] for i in chunk], pad_id) for chunk in chunks[rank::world_size]]


class SFTLoader:
    """Global batches of `global_batch` stream rows, as this rank's padded micro batches."""

    def __init__(self, mixture: Mixture, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 pad_id: int):
        if global_batch % (micro_batch * world_size):
            raise ConfigError(f"config key 'sft.global_batch' = {global_batch} is not a multiple of "
                              f"micro_batch x processes = {micro_batch} x {world_size}")
        self.mixture, self.global_batch, self.micro_batch = mixture, global_batch, micro_batch
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        self.position = 0

    def next_batches(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = [self.mixture[g][1] for g in range(self.position, self.position + self.global_batch)]
        self.position += self.global_batch
        return [(x.to(device), y.to(device))
                for x, y in micro_batches(rows, self.micro_batch, self.rank, self.world_size, self.pad_id)]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.mixture.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.mixture.seed:
            raise ValueError(f"checkpoint data order has seed {state['seed']}, this run {self.mixture.seed}")
        self.position = int(state["position"])


def val_batches(rows: Sequence[Rendered], micro_batch: int, rank: int, world_size: int,
                pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro batches of the held-out rows, the same number on every rank
    (the set is cut to a whole number of rounds of world_size x micro_batch rows: an FSDP forward
    is collective, so every rank must run as many)."""
    per_round = micro_batch * world_size
    usable = len(rows) // per_round * per_round
    if usable == 0:
        raise ConfigError(f"config key 'sft.eval_examples': {len(rows)} held-out rows, fewer than one "
                          f"round of micro_batch x processes = {per_round}")
    return micro_batches(rows[:usable], micro_batch, rank, world_size, pad_id)
