"""The loop against a scripted model: logits from a table written by hand, a fake verifier.

The "model" continues every token ``t`` with ``NEXT[t]`` (a cycle), so every committed
token, every accepted slot and every cache move below is computed by hand.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from helpers import FixedTreeSource

import retrospec
from retrospec.buffers import tree_layout
from retrospec.drafting.budget import LiveCost, StepCost
from retrospec.loop import DecodeSettings, Request, decode
from retrospec.tree import DraftTree
from retrospec.verify.verifiers import StepOutput, VerifierConfig, move_tables

VOCAB = 10
NEXT = [(t + 1) % VOCAB for t in range(VOCAB)]  # 1 -> 2 -> ... -> 9 -> 0 -> 1


class ScriptedModel(torch.nn.Module):
    """Only what the loop asks of a model: its parameters' device."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))


def onehot(tokens: np.ndarray) -> torch.Tensor:
    logits = torch.zeros(*tokens.shape, VOCAB)
    logits.scatter_(-1, torch.as_tensor([NEXT[t] for t in tokens.reshape(-1)]).reshape(*tokens.shape, 1), 10.0)
    return logits


class ScriptedVerifier:
    """Verifies with the table; records every forward and every kept path."""

    flat, node_options = False, None

    def __init__(self, batch: int):
        self.batch, self.capacity = batch, 1 << 20
        self.forwards: list = []
        self.kept: list = []
        self.dropped: list = []

    def prefill(self, prompts, rows, alone=False):
        return onehot(np.array([p[-1] for p in prompts]))

    def verify(self, trees, roots, past, nodes, predict=True, topk=0):
        layout = tree_layout(trees, roots, past)
        logits = onehot(layout.input_ids)
        self.forwards.append(layout)
        return StepOutput(layout, logits, logits.argmax(-1).numpy() if predict else None)

    def keep(self, past, accepted):
        self.kept.append(move_tables(past, accepted, 8, -1))

    def rows_only(self, keep):
        self.dropped.append(list(keep))
        self.batch = len(keep)
        return True


def settings(max_new_tokens: int, eos=()) -> DecodeSettings:
    return DecodeSettings(None, None, frozenset(eos), False, max_new_tokens, {"full_attention": None}, None)


def run(requests, speculator, max_new_tokens, eos=(), cost=None):
    verifier = ScriptedVerifier(len(requests))
    results, stats = decode(ScriptedModel(), requests, speculator, settings(max_new_tokens, eos), VerifierConfig(),
                            verifier=verifier, cost=cost)
    return results, stats, verifier


def test_the_context_source_drafts_the_cycle_and_every_draft_is_accepted():
    prompt = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])
    results, stats, verifier = run([Request(prompt)], retrospec.Speculator(budget=4), max_new_tokens=11)
    # prefill -> 3; step 1: drafts 4 5 6 7, all accepted, bonus 8; step 2: 9 0 1 2 (+ bonus 3)
    assert results[0].tokens == [3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3]
    assert stats.steps == 2 and stats.forwards == 2 and stats.mean_accepted == 5.5
    assert stats.accepted_hist == [0, 0, 0, 0, 0, 2] and stats.accepted_drafts == 8
    assert [f.input_ids.tolist() for f in verifier.forwards] == [[[3, 4, 5, 6, 7]], [[8, 9, 0, 1, 2]]]
    assert [f.past.tolist() for f in verifier.forwards] == [[12], [17]]  # the cache grew by the accepted slots
    assert verifier.kept == [None, None]  # accepted slots were a prefix of the tree: nothing to move


def test_the_accepted_path_off_the_first_branch_is_moved_into_place():
    # root 3: children 9 (slot 1, then 9 in slot 2) and 4 (slot 3, then 5 in slot 4)
    tree = DraftTree.from_paths([[9, 9], [4, 5]])
    results, stats, verifier = run([Request(np.array([1, 2]))], retrospec.Speculator([FixedTreeSource(tree)], budget=4), max_new_tokens=6)
    # prefill -> 3; the model says 4 after 3 (slot 3), 5 after 4 (slot 4), bonus 6; then no
    # draft matches (7 after 6, 8 after 7): one token a step
    assert results[0].tokens == [3, 4, 5, 6, 7, 8]
    src, dst = verifier.kept[0]
    assert src[0, :3].tolist() == [2, 5, 6] and dst[0, :3].tolist() == [2, 3, 4]  # past 2 + slots 0, 3, 4
    assert stats.accepted_by_source == {"fixed": 2}


def test_rows_of_a_batch_accept_their_own_paths_and_stop_on_their_own():
    tree = DraftTree.from_paths([[4, 5, 6], [9]])
    requests = [Request(np.array([1, 2, 3])), Request(np.array([0, 0, 7])), Request(np.array([5]))]
    results, stats, verifier = run(requests, retrospec.Speculator([FixedTreeSource(tree)], budget=4), max_new_tokens=6, eos=[7])
    # row 0: prefill 4; after 4 the model wants 5, the tree's first tokens are 4 and 9: [5], [6], [7]
    assert results[0].tokens == [4, 5, 6, 7]  # stops at EOS 7, which it keeps
    assert results[1].tokens == [8, 9, 0, 1, 2, 3]  # after 8 the model wants 9: accepted, bonus 0
    assert results[2].tokens == [6, 7]  # after 6 the model says 7 = EOS: drafted 4 5 6 never reached
    assert verifier.forwards[0].input_ids.tolist() == [[4, 4, 5, 6, 9], [8, 4, 5, 6, 9], [6, 4, 5, 6, 9]]
    assert verifier.dropped  # finished rows left the batch
    assert stats.prefills == 3 and stats.new_tokens == 12


def test_more_requests_than_rows_wait_for_a_free_row():
    requests = [Request(np.array([s, NEXT[s]])) for s in range(5)]
    verifier = ScriptedVerifier(2)
    results, stats = decode(ScriptedModel(), requests, retrospec.Speculator(budget=2), settings(3), VerifierConfig(),
                            batch_size=2, verifier=verifier)
    assert [r.tokens for r in results] == [[NEXT[NEXT[s]], (s + 3) % 10, (s + 4) % 10] for s in range(5)]
    assert max(f.input_ids.shape[0] for f in verifier.forwards) == 2  # never more than two rows
    assert verifier.forwards[-1].input_ids.shape[0] == 1  # the last request ran alone
    assert stats.prefills == 5


def test_when_speculation_cannot_pay_the_loop_decodes_plainly_and_pauses_drafting():
    class Counting(FixedTreeSource):
        calls = 0

        def propose(self, context, max_nodes, max_depth):
            Counting.calls += 1
            time.sleep(0.005)  # drafting dearer than the (scripted, instant) step, whatever the machine's load
            return super().propose(context, max_nodes, max_depth)

    steep = LiveCost({1: StepCost(sizes=(1, 2), seconds=(1.0, 2.0))})  # each slot costs a whole step
    source = Counting(DraftTree.from_paths([[4, 5]], [[0.5, 0.2]]))
    results, _stats, verifier = run(
        [Request(np.array([2, 3]))], retrospec.Speculator([source], budget="auto"), max_new_tokens=20, cost=steep
    )
    assert results[0].tokens == [(4 + i) % 10 for i in range(20)]
    assert all(f.input_ids.shape[1] == 1 for f in verifier.forwards)  # plain steps only
    assert Counting.calls < len(verifier.forwards) / 2  # drafting paused for 1, 2, 4 ... steps


def test_where_drafting_is_cheap_against_a_step_it_never_pauses():
    class Counting(FixedTreeSource):
        calls = 0

        def propose(self, context, max_nodes, max_depth):
            Counting.calls += 1
            return super().propose(context, max_nodes, max_depth)

    class SlowVerifier(ScriptedVerifier):  # a CPU's step: ~50x what drafting costs
        def verify(self, *args, **kwargs):
            time.sleep(0.02)
            return super().verify(*args, **kwargs)

    steep = LiveCost({1: StepCost(sizes=(1, 2), seconds=(0.02, 0.04))})  # a node still costs a whole step
    source = Counting(DraftTree.from_paths([[4, 5]], [[0.5, 0.2]]))
    verifier = SlowVerifier(1)
    results, _ = decode(ScriptedModel(), [Request(np.array([2, 3]))], retrospec.Speculator([source], budget="auto"),
                        settings(12), VerifierConfig(), verifier=verifier, cost=steep)
    assert results[0].tokens == [(4 + i) % 10 for i in range(12)]
    assert all(f.input_ids.shape[1] == 1 for f in verifier.forwards)  # plain steps only...
    # ...and each looked at (the next draft may pay), but the last: it has room for the bonus token only
    assert Counting.calls == len(verifier.forwards) - 1


def test_the_budget_measures_a_plain_step_it_only_knows_from_the_prior():
    """Trees look free by the prior, so the budget speculates; after EXPLORE_EVERY
    speculating steps it runs one plain step, whose cell is stale, and from then on decides
    on measured costs (here the drafts rarely pay, so it stays plain); the output is unchanged."""
    from retrospec.loop import EXPLORE_EVERY

    flat = LiveCost({1: StepCost(sizes=(1, 3), seconds=(1.0, 1.0))})
    source = FixedTreeSource(DraftTree.from_paths([[4, 5]], [[0.9, 0.8]]))
    results, _stats, verifier = run(
        [Request(np.array([2, 3]))], retrospec.Speculator([source], budget="auto"), max_new_tokens=40, cost=flat
    )
    assert results[0].tokens == [(4 + i) % 10 for i in range(40)]
    widths = [f.input_ids.shape[1] for f in verifier.forwards]
    plain = [i for i, w in enumerate(widths) if w == 1]
    assert plain and plain[0] == EXPLORE_EVERY - 1, widths  # the first look, after 8 speculating steps
    assert all(w == 3 for w in widths[: EXPLORE_EVERY - 1]), widths
    assert not flat.stale(1, 1)


def test_a_request_whose_drafts_fail_stops_paying_for_trees_its_scores_promise():
    """Scores that promise 1.7 tokens a step (calibration off, so nothing else corrects
    them) and drafts that never match: after a few failed steps the row's own record
    (``RowTrust``) shrinks its tree to nothing, where the promise alone would keep it."""
    from retrospec.drafting.speculator import SpeculatorConfig

    class Fixed(LiveCost):  # the prior only: the scripted steps' measured times say nothing
        def observe(self, slots, batch, seconds):
            pass

    cost = Fixed({1: StepCost(sizes=(1, 2, 3), seconds=(1.0, 1.3, 1.6))})  # 2 nodes pay if 0.6+ of them are accepted
    source = FixedTreeSource(DraftTree.from_paths([[9, 9]], [[0.9, 0.8]]))  # never what the model says, but after 8
    speculator = retrospec.Speculator([source], budget="auto", config=SpeculatorConfig(calibrate=False))
    results, _stats, verifier = run([Request(np.array([1, 2]))], speculator, max_new_tokens=12, cost=cost)
    assert results[0].tokens == [(3 + i) % 10 for i in range(12)]
    wide = [f.input_ids.shape[1] > 1 for f in verifier.forwards]
    assert wide[:2] == [True, True] and not any(wide[4:]), wide
