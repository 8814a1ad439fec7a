"""The history source: hand-computed drafts, eviction, namespaces, files, threads, losslessness."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from conftest import BENCH, repetitive_prompt, tiny_model
from helpers import IdTokenizer, plain, spec

import retrospec
from retrospec.datastores.files import IndexFormatError
from retrospec.datastores.history import SEP, HistoryIndex, HistoryStore
from retrospec.sources.history import HistoryConfig, HistorySource
from retrospec.tools.simulate import replay


def draft(source: HistorySource, context, nodes=16, depth=4) -> list[list[int]]:
    return source.start_request(np.asarray(context)).propose(np.asarray(context), nodes, depth).paths()


def learn(source: HistorySource, prompt, output) -> None:
    session = source.start_request(np.asarray(prompt))
    session.finish(np.asarray(list(prompt) + list(output)))


# -- drafts: hand-computed token tables ---------------------------------------------------
def test_drafts_continue_the_longest_match_in_earlier_requests():
    src = HistorySource(HistoryConfig(min_match=2))
    learn(src, [9, 9], [1, 2, 3, 4, 5])        # history: 9 9 1 2 3 4 5 |
    learn(src, [8, 8], [6, 2, 3, 7, 7])        #          8 8 6 2 3 7 7 |
    # "1 2 3" occurred once (then 4 5); "2 3" twice more recently (then 7 7): the 3-token match leads
    tree = src.start_request(np.array([0, 1, 2, 3])).propose(np.array([0, 1, 2, 3]), 16, 2)
    assert tree.paths() == [[4, 5], [7, 7]]
    first = {p[0]: s for p, s in zip(tree.paths(), [tree.scores[tree.tokens.tolist().index(4)],
                                                       tree.scores[tree.tokens.tolist().index(7)]])}
    assert first[4] > first[7]                    # 2**3 against 2**2 of evidence
    assert draft(src, [5, 2, 3]) == [[4, 5], [7, 7]]   # only "2 3" matches: both, equal weight
    assert draft(src, [5, 5, 3]) == []           # one token is below min_match: Not [[4, 5], [7, 7]]


def test_continuations_stop_at_the_end_of_a_request_and_cross_prompt_to_output():
    src = HistorySource(HistoryConfig(min_match=2))
    learn(src, [4, 1, 2], [3, 6])                 # 4 1 2 3 6 |
    learn(src, [5], [1, 2])                       # 5 1 2 |   (1 2 ends a request: no continuation)
    assert draft(src, [7, 1, 2], depth=4) == [[3, 6]]   # from the prompt's end into its output; Not [3, 6, 5]


def test_frequency_decides_between_continuations_of_equal_matches():
    src = HistorySource(HistoryConfig(min_match=2))
    for out in ([1, 2, 3], [1, 2, 3], [1, 2, 8]):
        learn(src, [], out)
    tree = src.start_request(np.array([1, 2])).propose(np.array([1, 2]), 16, 1)
    scores = dict(zip(tree.tokens.tolist(), tree.scores.tolist()))
    assert set(scores) == {3, 8} and scores[3] == pytest.approx(2 * scores[8])


def test_prompts_weigh_less_than_outputs_and_can_be_left_out():
    src = HistorySource(HistoryConfig(min_match=2, prompt_weight=0.25))
    learn(src, [1, 2, 3, 0], [1, 2, 4])           # after "1 2": 3 in a prompt, 4 in an output
    tree = src.start_request(np.array([1, 2])).propose(np.array([1, 2]), 16, 1)
    scores = dict(zip(tree.tokens.tolist(), tree.scores.tolist()))
    assert scores[4] == pytest.approx(4 * scores[3])
    quiet = HistorySource(HistoryConfig(min_match=2, learn_prompts=False))
    learn(quiet, [1, 2, 3, 0], [1, 2, 4])
    assert draft(quiet, [1, 2], depth=1) == [[4]]


@pytest.mark.parametrize("bad", [dict(prompt_weight=0.0), dict(min_match=0), dict(max_tokens=8), dict(match_weight=0.5)])
def test_bad_settings_name_the_value(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        HistoryConfig(**bad)


def test_a_request_is_learnt_once_when_it_finishes():
    src = HistorySource()
    session = src.start_request(np.array([1, 2, 3]))
    assert draft(src, [1, 2]) == []               # not before it ends
    session.finish(np.array([1, 2, 3, 4]))
    session.finish(np.array([1, 2, 3, 4]))
    assert src.index.requests == 1 and len(src.index) == 5  # 1 2 3 4 SEP


def test_forget_drops_only_its_namespace():
    src = HistorySource()
    other = src.in_namespace("x")
    learn(src, [1], [2, 3, 4])
    learn(other, [1], [2, 3, 5])
    src.forget()
    assert draft(src, [2, 3]) == [] and draft(other, [2, 3]) == [[5]]
    learn(src, [1], [2, 3, 6])
    assert draft(src, [2, 3]) == [[6]]


# -- bounded memory -----------------------------------------------------------------------
def test_eviction_drops_the_oldest_requests_whole():
    index = HistoryIndex(max_tokens=16)
    index.add([], [1, 2, 3, 4, 5])                # 6 positions with its separator
    index.add([], [1, 2, 6, 7, 8])                # 12
    index.add([], [9, 9, 9, 9])                   # 17 > 16: the first request goes
    assert index.requests == 2 and len(index) == 11 and index.evicted == 1
    ends, _ = index.matches(np.array([1, 2]))
    rows, _, _ = index.continuations(ends, 3)
    assert rows.tolist() == [[6, 7, 8]]           # Not [[6, 7, 8], [3, 4, 5]]
    for _ in range(50):                           # wraps around the ring many times
        index.add([5], [1, 2, 3])
    ends, _ = index.matches(np.array([1, 2]))
    assert index.continuations(ends, 2)[0].tolist()[0] == [3, SEP]
    assert len(index) <= 16


def test_memory_is_flat_once_the_budget_is_full():
    index = HistoryIndex(max_tokens=1 << 13)
    rng = np.random.default_rng(0)
    sizes = []
    for _ in range(400):
        index.add(rng.integers(0, 500, 40), rng.integers(0, 500, 60))
        sizes.append(index.nbytes)
    assert sizes[-1] == sizes[200] and len(index) <= 1 << 13
    assert index.requests < 100 and index.evicted > 300


def test_a_request_larger_than_the_budget_keeps_its_last_tokens():
    index = HistoryIndex(max_tokens=16)
    index.add(list(range(10)), list(range(10, 30)))
    assert len(index) == 16 and index.requests == 1
    ends, _ = index.matches(np.array([25, 26]))
    assert index.continuations(ends, 3)[0].tolist() == [[27, 28, 29]]


# -- namespaces ---------------------------------------------------------------------------
def test_namespaces_never_draft_for_each_other():
    alice = HistorySource()
    bob = alice.in_namespace("bob")
    learn(alice, [1], [2, 3, 4])
    assert draft(alice, [2, 3]) == [[4]]
    assert draft(bob, [2, 3]) == []
    learn(bob, [1], [2, 3, 5])
    assert draft(bob, [2, 3]) == [[5]] and draft(alice, [2, 3]) == [[4]]
    assert alice.store is bob.store and sorted(alice.store.namespaces) == ["", "bob"]


# -- files ----------------------------------------------------------------------------------
def _saved(tmp_path, tokenizer=None):
    src = HistorySource(store=HistoryStore(1 << 12, tokenizer))
    learn(src, [1, 2], [3, 4, 5])
    learn(src.in_namespace("t"), [7], [8, 9])
    path = tmp_path / "hist"
    src.save(path)
    return src, path


def test_save_load_round_trip_keeps_every_namespace(tmp_path):
    tok = IdTokenizer(100)
    src, path = _saved(tmp_path, tok)
    again = HistorySource.load(path, tok)
    assert sorted(again.store.namespaces) == ["", "t"]
    assert draft(again, [2, 3]) == [[4, 5]] and draft(again.in_namespace("t"), [7, 8]) == [[9]]
    for ns in ("", "t"):
        a, b = src.store.index(ns).snapshot(), again.store.index(ns).snapshot()
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert json.loads((path / "manifest.json").read_text())["format"] == "retrospec-history"
    assert not any(p.suffix in (".pkl", ".pickle", ".npz") for p in path.iterdir())


def test_another_tokenizer_is_refused(tmp_path):
    _, path = _saved(tmp_path, IdTokenizer(100))
    with pytest.raises(IndexFormatError, match="tokenizer"):
        HistorySource.load(path, IdTokenizer(120, name="other"))
    _, bare = _saved(tmp_path / "bare")
    with pytest.raises(IndexFormatError, match="without a tokenizer identity"):
        HistorySource.load(bare, IdTokenizer(100))


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "value"])
def test_corrupted_or_truncated_files_are_refused_and_nothing_else_is_lost(tmp_path, damage):
    from helpers import edit_manifest

    from retrospec.datastores.files import describe_file

    tok = IdTokenizer(100)
    src, path = _saved(tmp_path, tok)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    tokens = path / "ns0.tokens"
    if damage == "flip":
        raw = bytearray(tokens.read_bytes())
        raw[4] ^= 0xFF
        tokens.write_bytes(bytes(raw))
        match = "sha256|checksum"
    elif damage == "truncate":
        tokens.write_bytes(tokens.read_bytes()[:-4])
        match = "sha256|bytes|truncated"
    elif damage == "manifest":
        (path / "manifest.json").write_text((path / "manifest.json").read_text()[:-20])
        match = "manifest"
    else:  # a token id past the vocabulary, with every checksum made to agree
        raw = np.frombuffer(tokens.read_bytes(), "<i4").copy()
        raw[0] = 10_000
        tokens.write_bytes(raw.tobytes())
        entry = describe_file(tokens)
        edit_manifest(path, lambda data: data["namespaces"][0]["files"]["ns0.tokens"].update(entry))
        match = "outside the token ids"
    with pytest.raises(IndexFormatError, match=match):
        HistorySource.load(path, tok)
    # the refused directory is still there, the other files untouched, the live store unchanged
    assert {p.name for p in path.iterdir()} == set(before)
    assert all(p.read_bytes() == before[p.name] for p in path.iterdir() if p.name not in ("ns0.tokens", "manifest.json"))
    assert draft(src, [2, 3]) == [[4, 5]]


def test_save_never_replaces_a_folder_of_other_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    src = HistorySource()
    learn(src, [1], [2, 3])
    with pytest.raises(IndexFormatError, match="not a retrospec index"):
        src.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_the_registry_loads_a_saved_history_and_refuses_a_damaged_one(tmp_path):
    from retrospec.sources.registry import Datastores, make_source

    tok = IdTokenizer(100)
    _, path = _saved(tmp_path, tok)
    source = make_source("history", None, tok, Datastores(history=str(path)))
    assert draft(source, [2, 3]) == [[4, 5]]
    fresh = make_source("history", None, tok, Datastores(history=str(tmp_path / "new")))
    learn(fresh, [1], [2, 3])
    fresh.save()
    assert draft(HistorySource.load(tmp_path / "new", tok), [1, 2]) == [[3]]
    (path / "ns0.kinds").write_bytes(b"")
    with pytest.raises(IndexFormatError):
        make_source("history", None, tok, Datastores(history=str(path)))


# -- concurrency and the decoding loop ------------------------------------------------------
def test_concurrent_adds_and_lookups_keep_the_index_consistent():
    index = HistoryIndex(max_tokens=1 << 12)
    errors: list[BaseException] = []

    def writer(seed):
        rng = np.random.default_rng(seed)
        for _ in range(300):
            index.add(rng.integers(0, 50, 10), [1, 2, 3, seed + 10] + rng.integers(0, 50, 10).tolist())

    def reader():
        try:
            for _ in range(2000):
                ends, lengths = index.matches(np.array([7, 1, 2, 3]))
                rows, _, live = index.continuations(ends, 4)
                assert rows.shape[0] == int(live.sum()) and (lengths >= 2).all()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(2)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert index.added == 600 and len(index) <= 1 << 12
    ends, _ = index.matches(np.array([7, 1, 2, 3]))
    rows, _, _ = index.continuations(ends, 1)
    assert set(rows[:, 0].tolist()) <= {10, 11}


def test_the_loop_teaches_history_and_stays_identical_to_plain_greedy():
    model = tiny_model("llama")
    source = HistorySource()
    speculator = retrospec.Speculator([retrospec.ContextSource(), source], budget=16)
    prompts = [repetitive_prompt(96, 30, s % 2) for s in range(4)]
    steps = []
    for ids in prompts:
        out = spec(model, ids, speculator, max_new_tokens=40)
        assert torch.equal(out.sequences, plain(model, ids, max_new_tokens=40))
        steps.append(out.stats.steps)
    assert source.index.requests == 4
    assert steps[2] < steps[0] / 3 and steps[3] < steps[1] / 3  # the repeats drafted from history


def test_four_threads_sharing_one_speculator_with_history_match_plain_greedy():
    model = tiny_model("llama", seed=3)
    source = HistorySource()
    speculator = retrospec.Speculator([retrospec.ContextSource(), source], budget=16)
    prompts = [repetitive_prompt(96, 24, s % 3) for s in range(12)]
    refs = [plain(model, ids, max_new_tokens=32) for ids in prompts]
    outs: dict[int, torch.Tensor] = {}
    start = threading.Barrier(4)

    def work(worker: int) -> None:
        start.wait()
        for i in range(worker, len(prompts), 4):
            outs[i] = spec(model, prompts[i], speculator, max_new_tokens=32).sequences

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(outs[i], refs[i]) for i in range(len(prompts)))
    assert source.index.requests == len(prompts)


def test_rows_of_a_batch_share_the_history():
    model = tiny_model("llama", seed=4)
    source = HistorySource()
    speculator = retrospec.Speculator([retrospec.ContextSource(), source], budget=16)
    prompts = [repetitive_prompt(96, 24, s % 2)[0] for s in range(4)]
    outs, _ = retrospec.generate_many(model, [p.tolist() for p in prompts], speculator=speculator, max_new_tokens=24,
                                      do_sample=False, pad_token_id=0, batch_size=2, progress=False)
    for p, out in zip(prompts, outs):
        ref = plain(model, p[None], max_new_tokens=24)[0, p.shape[0]:].tolist()
        assert list(out)[: len(ref)] == ref
    assert source.index.requests == 4


def test_the_simulator_replays_history_across_requests():
    source = HistorySource()
    speculator = retrospec.Speculator([source], budget=16)
    prompt, answer = np.array([3, 4, 5]), np.array([10, 11, 12, 13, 14, 15, 16, 17])
    first = replay(speculator, prompt, answer)
    second = replay(speculator, prompt, answer)
    assert first == 7 and second == 1             # the repeat is drafted whole (depth 7, after the prefill's token)


# -- real model (slow) ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.real
def test_smollm2_with_history_is_identical_to_plain_greedy_over_repeated_requests(smollm2):
    from retrospec.sources.registry import default_sources
    from retrospec.tools.prompts import load_prompts, render

    model, tokenizer = smollm2
    sources = default_sources(model, tokenizer)  # history is one of them
    history = next(s for s in sources if isinstance(s, HistorySource))
    speculator = retrospec.Speculator(sources, budget=16)
    records = load_prompts(BENCH / "specbench" / "question.jsonl", per_category=2)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for record in records + records[:4]:     # the repeats draft from history
        ids = render(tokenizer, [{"role": "user", "content": record.turns[0]}], raw=record.raw)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48, pad_token_id=pad)
        out = retrospec.generate(model, ids, speculator=speculator, **kw)
        assert torch.equal(out.sequences, model.generate(ids, **kw)), record.id
    assert history.index.requests == len(records) + 4


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_four_threads_sharing_history_match_plain_greedy(smollm2):
    from retrospec.tools.prompts import load_prompts, render

    model, tokenizer = smollm2
    speculator = retrospec.Speculator([retrospec.ContextSource(), HistorySource()], budget=16)
    records = load_prompts(BENCH / "specbench" / "question.jsonl", per_category=1)[:4] * 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [render(tokenizer, [{"role": "user", "content": r.turns[0]}], raw=r.raw) for r in records]
    kw = dict(do_sample=False, max_new_tokens=32, pad_token_id=pad)
    refs = [model.generate(p, attention_mask=torch.ones_like(p), **kw) for p in prompts]
    outs: dict[int, torch.Tensor] = {}

    def work(worker):
        for i in range(worker, len(prompts), 4):
            outs[i] = retrospec.generate(model, prompts[i], speculator=speculator, attention_mask=torch.ones_like(prompts[i]),
                                         **kw).sequences

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(outs[i], refs[i]) for i in range(len(prompts)))
