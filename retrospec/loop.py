"""The decoding loop of one sequence: draft → fuse → prune → verify → commit → update.

This is the only module that calls the model. One request, unpadded, batch size 1; the
hooks in :mod:`retrospec.hooks` run it once per row of a batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from retrospec.sources.base import Verified
from retrospec.drafting.speculator import Speculator
from retrospec.stats import SpecStats
from retrospec.verify.verifiers import Verifier
from retrospec.verify.acceptance import accept_greedy_host, accept_walk, pick_token, predictions

log = logging.getLogger(__name__)


@dataclass
class DecodeSettings:
    """What the loop needs from the generation config, resolved once per ``generate`` call."""

    logits_processor: object | None
    """A ``LogitsProcessorList`` (``None`` when empty: plain argmax)."""
    stopping_criteria: object
    """A ``StoppingCriteriaList``, checked after every committed token."""
    do_sample: bool
    max_length: int | None
    """Total length (prompt incl. padding + new tokens) at which generation stops."""
    windows: dict[str, int | None]
    """Attention layer types and their sliding windows."""
    max_positions: int | None
    """Largest position + 1 the model's embeddings cover."""
    streamer: object | None = None
    documents: tuple[str, ...] = ()
    """Texts that came with the request, for document sources."""
    max_nodes: int | None = None
    """Most tree nodes the verifier takes per step (its slots minus the root)."""
    flat_cost: bool = False
    """The verifier costs the same for any tree up to ``max_nodes`` (fixed-shape graphs)."""


class _Clock:
    """Accumulates wall time per phase into ``stats.seconds``; when profiling, also each
    step's total and its (synchronised) forward time."""

    def __init__(self, stats: SpecStats, device: torch.device, profile: bool):
        self.stats, self.profile = stats, profile
        self.sync = profile and device.type == "cuda"
        self.last = self.step_start = time.perf_counter()
        self.forward = 0.0

    def lap(self, phase: str) -> None:
        if phase == "forward" and self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.stats.add_time(phase, now - self.last)
        if phase == "forward":
            self.forward = now - self.last
        self.last = now

    def end_step(self) -> None:
        if self.profile:
            self.stats.step_seconds.append(self.last - self.step_start)
            self.stats.step_device_seconds.append(self.forward)
        self.step_start = self.last


class StopRule:
    """When to stop: after every committed token, exactly as ``generate()`` decides.

    Stopping criteria are arbitrary callables over the whole sequence; for the common ones
    (``MaxLengthCriteria``, ``EosTokenCriteria``) the same decision is made on the host from
    the token and the length, without a device round trip per token.
    """

    def __init__(self, criteria):
        from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

        self.criteria = criteria
        items = list(criteria) if criteria is not None else []
        self.fast = all(type(c) in (MaxLengthCriteria, EosTokenCriteria) for c in items)
        self.max_length = min((c.max_length for c in items if isinstance(c, MaxLengthCriteria)), default=None)
        self.eos = {int(t) for c in items if isinstance(c, EosTokenCriteria) for t in c.eos_token_id.reshape(-1).tolist()}

    def first_stop(self, tokens: list[int], length_before: int) -> int | None:
        """Fast path: how many of ``tokens`` to commit before stopping, or None (no stop)."""
        for i, token in enumerate(tokens):
            if token in self.eos or (self.max_length is not None and length_before + i + 1 >= self.max_length):
                return i + 1
        return None


@torch.no_grad()
def decode_row(
    model,
    ids: torch.Tensor,
    shown: torch.Tensor,
    speculator: Speculator,
    settings: DecodeSettings,
    verifier: Verifier,
) -> tuple[list[int], SpecStats]:
    """Generate the continuation of one sequence.

    Args:
        ids: ``[1, L]`` the prompt tokens the model reads (no padding).
        shown: ``[1, P]`` the row as plain ``generate()`` shows it to logits processors and
            stopping criteria (left padding included); ends with ``ids``.
        verifier: runs the forwards and keeps the cache (see :mod:`retrospec.verify.verifiers`).

    Returns the new tokens and the statistics of this row.
    """
    stats = SpecStats(prefills=1)
    device = next(model.parameters()).device  # inputs may come on the CPU, as generate() allows
    ids, shown = ids.to(device), shown.to(device)
    clock = _Clock(stats, device, speculator.config.profile)
    prompt_len = ids.shape[1]
    if settings.max_positions is not None and prompt_len >= settings.max_positions:
        raise ValueError(
            f"the prompt has {prompt_len} tokens but the model's positions end at {settings.max_positions}; shorten it"
        )
    capacity = settings.max_length if settings.max_length is not None else shown.shape[1] + 4096
    seq = torch.empty(1, max(capacity, shown.shape[1] + 1), dtype=torch.long, device=device)
    seq[:, : shown.shape[1]] = shown
    cur = shown.shape[1]  # length of `seq` in use
    context = np.empty(prompt_len + seq.shape[1], np.int64)  # the tokens the sources see
    context[:prompt_len] = ids[0].cpu().numpy()
    ctx_len = prompt_len
    new_tokens: list[int] = []
    greedy = settings.logits_processor is None and not settings.do_sample
    rule = StopRule(settings.stopping_criteria)

    def commit(tokens: list[int]) -> tuple[int, bool]:
        """Append tokens, stopping right after the first one a stopping criterion fires on."""
        nonlocal cur, seq, ctx_len, context
        while cur + len(tokens) > seq.shape[1]:  # only without a max_length: grow
            seq = torch.cat([seq, torch.empty_like(seq)], dim=1)
            context = np.concatenate([context, np.empty_like(context)])
        if rule.fast:
            cut = rule.first_stop(tokens, cur)
            kept = tokens if cut is None else tokens[:cut]
            seq[0, cur : cur + len(kept)] = torch.tensor(kept, dtype=torch.long)
            cur += len(kept)
            context[ctx_len : ctx_len + len(kept)] = kept
            ctx_len += len(kept)
            new_tokens.extend(kept)
            return len(kept), cut is not None
        for done, token in enumerate(tokens, 1):
            seq[0, cur] = token
            cur += 1
            context[ctx_len] = token
            ctx_len += 1
            new_tokens.append(token)
            if bool(settings.stopping_criteria(seq[:, :cur], None).any()):
                return done, True
        return len(tokens), False

    def stream(tokens: list[int]) -> None:
        if settings.streamer is not None and tokens:
            settings.streamer.put(torch.tensor(tokens, dtype=torch.long))

    # 1) prefill: the prompt, then the first new token from its last logits
    session = speculator.start_request(context[:prompt_len], model, settings.documents)
    topk = speculator.topk_wanted
    last = session.adjust_logits(context[:prompt_len], context[prompt_len - 1 : prompt_len], np.array([-1]), verifier.start(ids))
    first = pick_token(last, seq[:, :cur], settings.logits_processor, settings.do_sample)
    done, stopped = commit([first])
    stream(new_tokens[-done:])
    stats.new_tokens += done
    past_len = prompt_len  # tokens in the cache; the root (last committed token) is not
    clock.lap("prefill")
    clock.step_start = clock.last  # steps are timed from here

    while not stopped:
        # 2) draft, within the remaining length, the model's positions and the verifier's slots
        room = (settings.max_length - cur) if settings.max_length is not None else 1 << 30
        if settings.max_positions is not None:
            room = min(room, settings.max_positions - past_len)
        tree = session.draft(context[:ctx_len], max_depth=max(room - 1, 0), max_nodes=settings.max_nodes, flat_cost=settings.flat_cost)
        clock.lap("draft")
        # 3) verify: one forward over root + tree, then acceptance
        root = new_tokens[-1]
        slot_tokens = np.concatenate([[root], tree.tokens]).astype(np.int64)
        buffers, logits = verifier.verify(tree, root, past_len)
        logits = session.adjust_logits(context[:ctx_len], slot_tokens, buffers.parent_slots, logits)
        clock.lap("forward")
        if greedy:
            preds, top = predictions(logits, topk)  # one device-to-host copy per step
            acc = accept_greedy_host(slot_tokens, buffers.parent_slots, preds)
        else:
            acc = accept_walk(buffers, logits, seq[:, :cur], settings.logits_processor, settings.do_sample)
            top = logits.topk(topk, dim=-1).indices.cpu().numpy() if topk else None
        clock.lap("accept")
        # 4) commit (a stop may cut the block), stream, compact the cache
        done, stopped = commit(acc.tokens)
        stream(new_tokens[-done:])
        stats.steps += 1
        stats.new_tokens += done
        stats.drafted_nodes += len(tree)
        stats.record_step(done)
        drafts_kept = min(done, acc.slots.shape[0] - 1)  # a stop may cut before the bonus
        by_source, several = session.attribution(acc.slots[: 1 + drafts_kept])
        stats.accepted_drafts += drafts_kept
        stats.accepted_by_several += several
        for name, count in by_source.items():
            stats.accepted_by_source[name] = stats.accepted_by_source.get(name, 0) + count
        if not stopped:
            verifier.keep(past_len, acc.slots)
            past_len += acc.slots.shape[0]
        clock.lap("commit")
        # 5) update: the sources learn from what verification showed
        session.observe(
            Verified(
                slot_tokens=slot_tokens,
                parent_slots=buffers.parent_slots,
                accepted_slots=acc.slots,
                committed=np.asarray(new_tokens[-done:], np.int64),
                topk=top,
            )
        )
        clock.lap("update")
        clock.end_step()
    return new_tokens, stats
