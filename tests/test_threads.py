"""One Speculator shared by several threads."""

from __future__ import annotations

import torch
from conftest import repetitive_prompt, tiny_model
from helpers import plain, spec

import retrospec


def test_two_threads_sharing_one_static_speculator_match_plain_greedy():
    """A static verifier holds its request's KV cache: concurrent requests must not share one."""
    import threading

    from retrospec.verify.verifiers import VerifierPool

    model = tiny_model("llama")
    speculator = retrospec.Speculator([retrospec.ContextSource()], budget=8)
    static = retrospec.VerifierConfig(mode="static")
    prompts = [repetitive_prompt(96, 30, seed) for seed in range(30, 36)]
    refs = [plain(model, ids, max_new_tokens=40) for ids in prompts]
    outs: dict[int, torch.Tensor] = {}
    start = threading.Barrier(2)

    def work(worker: int) -> None:
        start.wait()
        for i in range(worker, len(prompts), 2):
            outs[i] = spec(model, prompts[i], speculator, max_new_tokens=40, verifier=static).sequences

    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ref in enumerate(refs):
        assert torch.equal(outs[i], ref), i
    assert 1 <= len(VerifierPool.for_model(model)) <= 2
