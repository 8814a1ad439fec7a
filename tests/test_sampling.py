"""Sampling preserves the model's distribution (statistical tests at the noise floor)."""

from __future__ import annotations

import numpy as np
import torch
from conftest import tiny_model
from helpers import FixedTreeSource

import retrospec
from retrospec.buffers import to_buffers
from retrospec.tree import DraftTree
from retrospec.verify.acceptance import accept_walk


def tv(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def noise_floor(p: np.ndarray, n: int) -> float:
    """Expected TV of an n-sample empirical distribution from p."""
    return 0.5 * float(np.sum(np.sqrt(2 * p * (1 - p) / (np.pi * n))))


def joint_of_first_two(commit_rule, p1, p2, n, seed):
    """Empirical joint of the first two committed tokens; a rejected root child leaves the
    second token to the next step, which samples the model's own distribution."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((len(p1), len(p1)))
    for _ in range(n):
        tokens = commit_rule()
        second = tokens[1] if len(tokens) > 1 else rng.choice(len(p1), p=p2[tokens[0]])
        counts[tokens[0], second] += 1
    return counts / n


def test_tree_sampling_is_exact_and_a_biased_rule_is_caught():
    torch.manual_seed(0)
    vocab = 6
    gen = np.random.default_rng(1)
    p1 = gen.dirichlet(np.ones(vocab))
    p2 = gen.dirichlet(np.ones(vocab), size=vocab)
    exact = p1[:, None] * p2
    # the root's children: tokens 0, 1, 2; token 0 has children 3, 4
    tree = DraftTree.from_paths([[0, 3], [0, 4], [1], [2]])
    buffers = to_buffers(tree, root_token=5, past_len=0)
    slot_tokens = buffers.input_ids[0].tolist()
    parent_slots = buffers.parent_slots[0]
    logits = torch.empty(len(slot_tokens), vocab)
    logits[0] = torch.log(torch.tensor(p1))
    for slot in range(1, len(slot_tokens)):
        depth_one = parent_slots[slot] == 0
        logits[slot] = torch.log(torch.tensor(p2[slot_tokens[slot]])) if depth_one else 0.0
    prefix = torch.tensor([[5]])
    n = 20000

    def lossless():
        return accept_walk(np.asarray(slot_tokens), parent_slots, logits, prefix, None, do_sample=True).tokens

    def typical_acceptance():  # accept a drafted child the model finds "typical enough"
        probs = torch.softmax(logits[0], -1).numpy()
        for slot in np.flatnonzero(parent_slots == 0):
            if probs[slot_tokens[slot]] >= 0.5 * probs.max():
                return [slot_tokens[slot], int(np.random.default_rng().choice(vocab, p=p2[slot_tokens[slot]]))]
        return lossless()

    empirical = joint_of_first_two(lossless, p1, p2, n, seed=2)
    floor = noise_floor(exact.ravel(), n)
    assert tv(empirical, exact) < 3 * floor, (tv(empirical, exact), floor)
    biased = joint_of_first_two(typical_acceptance, p1, p2, n, seed=3)
    assert tv(biased, exact) > 3 * floor  # the test has the power to see a biased rule


def test_end_to_end_sampling_matches_the_model():
    """Tiny model, vocab 4, a fixed tree: the (2nd, 3rd) token joint matches the exact one."""
    vocab, n = 4, 2500
    model = tiny_model("llama", vocab=vocab, seed=3)
    model.generation_config.eos_token_id = None  # every token counts; none ends the sequence
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    temperature = 1.7  # the warper runs per node too

    @torch.no_grad()
    def probs(ids):
        return torch.softmax(model(ids).logits[:, -1].float() / temperature, -1)

    p1 = probs(prompt)[0]
    exact = torch.zeros(vocab, vocab)
    for x1 in range(vocab):
        s1 = torch.cat([prompt, torch.tensor([[x1]])], 1)
        p2 = probs(s1)[0]
        for x2 in range(vocab):
            p3 = probs(torch.cat([s1, torch.tensor([[x2]])], 1))[0]
            exact[x2] += p1[x1] * p2[x2] * p3
    exact = exact.numpy() / exact.sum().item()

    tree = DraftTree.from_paths([[0, 1], [0, 2], [1, 3], [2], [3, 0]])
    speculator = retrospec.Speculator([FixedTreeSource(tree)], budget=16)
    torch.manual_seed(0)
    counts = np.zeros((vocab, vocab))
    for _ in range(n):
        out = retrospec.generate(model, prompt, speculator=speculator, do_sample=True, temperature=temperature, top_k=0,
                                 max_new_tokens=3, pad_token_id=0, attention_mask=torch.ones_like(prompt))
        _, x2, x3 = out.sequences[0, -3:].tolist()
        counts[x2, x3] += 1
    empirical = counts / n
    floor = noise_floor(exact.ravel(), n)
    assert tv(empirical, exact) < 3 * floor, (tv(empirical, exact), floor)


def test_sampling_in_a_batch_keeps_each_rows_distribution():
    """Three rows in one batch, each drafting the same fixed tree: every row's second token
    follows the model's own next-token distribution after its first."""
    vocab, n = 4, 1500
    model = tiny_model("llama", vocab=vocab, seed=5)
    model.generation_config.eos_token_id = None
    prompts = [[1, 2, 3, 1, 2], [3, 3, 1], [2, 0, 1, 2, 0, 1, 2]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1

    @torch.no_grad()
    def probs(seq):
        return torch.softmax(model(torch.tensor([seq])).logits[0, -1].float(), -1)

    exact = []
    for p in prompts:  # joint of the first two new tokens of each row alone
        p1 = probs(p)
        exact.append(np.array([[float(p1[a] * probs(p + [a])[b]) for b in range(vocab)] for a in range(vocab)]))
    tree = DraftTree.from_paths([[0, 1], [1], [2, 3], [3]])
    speculator = retrospec.Speculator([FixedTreeSource(tree)], budget=8)
    torch.manual_seed(1)
    counts = np.zeros((len(prompts), vocab, vocab))
    for _ in range(n):
        out = retrospec.generate(model, ids, attention_mask=mask, speculator=speculator, do_sample=True, top_k=0,
                                 max_new_tokens=2, pad_token_id=0)
        for b in range(len(prompts)):
            a, c = out.sequences[b, width : width + 2].tolist()
            counts[b, a, c] += 1
    for b in range(len(prompts)):
        floor = noise_floor(exact[b].ravel(), n)
        assert tv(counts[b] / n, exact[b]) < 3 * floor, (b, tv(counts[b] / n, exact[b]), floor)


def test_seeded_sampling_is_reproducible():
    model = tiny_model("llama", seed=4)
    prompt = torch.tensor([[5, 6, 7, 5, 6]])
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        out = retrospec.generate(model, prompt, speculator=retrospec.Speculator(budget=8), do_sample=True,
                                 max_new_tokens=20, pad_token_id=0, attention_mask=torch.ones_like(prompt))
        runs.append(out.sequences)
    assert torch.equal(runs[0], runs[1])
