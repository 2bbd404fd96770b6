"""Speculative decoding (Leviathan et al., 2023, https://arxiv.org/abs/2211.17192).

With a draft model (same tokenizer, smaller), each decode proposes up to K tokens with the draft,
one at a time, and the target scores them all in one pass. Draft token d with draft probability
q(d) and target probability p(d) is accepted with probability min(1, p(d)/q(d)); the first rejected
one is replaced by a draw from norm(max(0, p - q)); when all are accepted the target's next
distribution gives a bonus token. p and q are both taken after the request's sampling transforms,
so the output has exactly the target's sampling distribution (greedy: exactly the target's greedy
tokens). The draft keeps its own K/V in the same blocks (same block tables, its own tensors): its
cache is rolled back to the last accepted token and catches up on the next proposal.
"""

from __future__ import annotations

import itertools

import torch

from pipeline.inference.model_runner import ModelRunner
from pipeline.inference.sampling import draw, mask_padding, probabilities
from pipeline.inference.scheduler import ScheduledRow
from pipeline.inference.sequence import EngineStats, Request

Drafts = dict[int, tuple[list[int], list[torch.Tensor]]]  # request id -> (draft tokens, their distributions q)


def pick(p: torch.Tensor, req: Request) -> int:
    """The request's token from the distribution p: its argmax when greedy, else a draw."""
    return int(p.argmax()) if req.params.greedy else draw(p[None], [req.generator])[0]


class Speculator:
    def __init__(self, draft: ModelRunner, stats: EngineStats):
        self.draft, self.stats = draft, stats
        self.vocab_size = draft.model.config.vocab_size

    def propose(self, rows: list[ScheduledRow], failed: dict[int, Exception]) -> Drafts:
        """Draft tokens and their draft distributions q for each decode row (`row.k` of them),
        drawn one position at a time with the draft model (its first pass also catches up its
        cache on tokens it has not seen: the prompt, or the last accepted draft and the bonus
        token). A request whose draft sampling raises stops proposing; its error goes to `failed`."""
        out: Drafts = {w.req.id: ([], []) for w in rows}
        active = [(w.req, w.k) for w in rows]
        for j in itertools.count():
            active = [(req, k) for req, k in active if k > j and req.id not in failed]
            if not active:
                break
            seqs = []
            for req, _ in active:
                seq = req.tokens + out[req.id][0]
                seqs.append((req.table, req.draft_computed, seq[req.draft_computed:]))
            ends = list(itertools.accumulate(len(new) for _, _, new in seqs))
            last = mask_padding(self.draft.run(seqs, [e - 1 for e in ends]), self.vocab_size)
            for (req, _), (_, start, new), logits in zip(active, seqs, last):
                tokens, qs = out[req.id]
                req.draft_computed = start + len(new)
                try:
                    q = probabilities(logits, req.params, req.tokens + tokens, req.output + tokens)
                except Exception as e:
                    failed[req.id] = e
                    continue
                tokens.append(pick(q, req))
                qs.append(q)
        self.stats.draft_tokens += sum(len(t) for t, _ in out.values())
        return out

    def accept(self, req: Request, logits: torch.Tensor, drafts: list[int], qs: list[torch.Tensor]) -> list[int]:
        """The exact rule on the target's logits (len(drafts) + 1, V), padding masked: accept draft
        d with probability min(1, p(d)/q(d)); at the first rejection draw from norm(max(0, p - q));
        if all pass, a bonus token from the last p."""
        new: list[int] = []
        for j, (d, q) in enumerate(zip(drafts, qs)):
            p = probabilities(logits[j], req.params, req.tokens + new, req.output + new)
            if not (p[d] >= q[d] or float(torch.rand(1, generator=req.generator)) < float(p[d] / q[d])):
                residual = (p - q).clamp(min=0)
                new.append(pick(residual / residual.sum() if residual.sum() > 0 else p, req))
                break
            new.append(d)
            self.stats.accepted_tokens += 1
        else:
            new.append(pick(probabilities(logits[len(drafts)], req.params, req.tokens + new, req.output + new), req))
        # the draft's cache is valid up to the last accepted draft token
        req.draft_computed = min(req.draft_computed, len(req.tokens) + len(new) - 1)
        return new
