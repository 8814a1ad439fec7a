"""Fusion across sources, calibration, budget and attribution."""

import json

import numpy as np
import pytest
from helpers import FixedTreeSource

import retrospec
from retrospec.drafting.budget import LiveCost, StepCost, choose_budget, choose_nodes, expected_tokens
from retrospec.drafting.calibration import Calibrator, conditional_scores, path_scores
from retrospec.sources.base import Verified
from retrospec.tree import DraftTree
from retrospec.verify.step_cost import dynamic_cost, step_cost_for


class Named(FixedTreeSource):
    def __init__(self, name, tree):
        super().__init__(tree)
        self.name = name


def test_speculator_validates_its_arguments():
    with pytest.raises(ValueError, match="unique"):
        retrospec.Speculator([retrospec.ContextSource(), retrospec.ContextSource()])
    with pytest.raises(ValueError, match="budget"):
        retrospec.Speculator(budget=-1)
    with pytest.raises(ValueError, match="1 to 32"):
        retrospec.Speculator([])
    with pytest.raises(ValueError, match="combine"):
        retrospec.SpeculatorConfig(combine="sum")


def test_two_sources_fuse_and_get_credit():
    a = Named("a", DraftTree.from_paths([[1, 2, 3]], [[0.9, 0.8, 0.7]]))
    b = Named("b", DraftTree.from_paths([[1, 2, 4], [5]], [[0.6, 0.5, 0.4], [0.3]]))
    spec = retrospec.Speculator([a, b], budget=10, config=retrospec.SpeculatorConfig(calibrate=False))
    session = spec.start_request(np.array([9]))
    tree = session.draft(np.array([9]), max_depth=8)
    assert tree.tokens.tolist() == [1, 2, 3, 4, 5]
    assert tree.sources.tolist() == [3, 3, 1, 2, 2]
    # the verified path root -> 1 -> 2 -> 4: slots 0, 1, 2, 4
    counts, several = session.attribution(np.array([0, 1, 2, 4]))
    assert counts == {"a": 2, "b": 3} and several == 2


def test_calibration_learns_from_tested_nodes_only():
    a = Named("a", DraftTree.from_paths([[1, 2]], [[0.5, 0.25]]))
    spec = retrospec.Speculator([a], budget=10)
    session = spec.start_request(np.array([9]))
    for _ in range(30):
        session.draft(np.array([9]), max_depth=4)
        # verification rejects token 1 at the root: node 2 (below it) was never tested
        session.observe(Verified(np.array([9, 1, 2]), np.array([-1, 0, 1]), np.array([0]), np.array([7]), None))
    assert spec.calibrator.tested[0].sum() == 30  # only the depth-1 node, once per step
    assert session.draft(np.array([9]), max_depth=4).scores[0] < 0.2  # raw 0.5, measured 0


def test_the_fused_tree_is_calibrated_where_sources_agree():
    # both sources propose token 1 and are right half of the time: each source's own table
    # learns 0.5, their noisy-or says 0.75, the fused table brings it back to what is accepted
    a, b = (Named(name, DraftTree.from_paths([[1]], [[0.5]])) for name in "ab")
    spec = retrospec.Speculator([a, b], budget=10)
    session = spec.start_request(np.array([9]))
    for step in range(300):
        session.draft(np.array([9]), max_depth=4)
        accepted = np.array([0, 1]) if step % 2 else np.array([0])
        session.observe(Verified(np.array([9, 1]), np.array([-1, 0]), accepted, np.array([7]), None))
    assert spec.calibrator.tested[2].sum() == 300  # the fused node, once per step
    assert abs(session.draft(np.array([9]), max_depth=4).scores[0] - 0.5) < 0.05
    off = retrospec.Speculator([a, b], budget=10, config=retrospec.SpeculatorConfig(calibrate=False))
    assert off.start_request(np.array([9])).draft(np.array([9]), max_depth=4).scores[0] == pytest.approx(0.75)


def test_calibrator_tables():
    cal = Calibrator(2, prior_weight=2.0)
    raw, depth = np.array([0.55, 0.55, 0.55, 0.55]), np.array([1, 1, 1, 1])
    cal.learn(1, raw, depth, np.array([True, True, True, False]))
    # (3 + 2 * 0.55) / (4 + 2)
    assert cal.conditional(1, np.array([0.55]), np.array([1]))[0] == pytest.approx(4.1 / 6)
    assert cal.conditional(0, np.array([0.55]), np.array([1]))[0] == pytest.approx(0.55)  # untouched source
    assert np.isnan(cal.acceptance_rates(0)).all()
    with pytest.raises(ValueError):
        Calibrator(1, prior_weight=0)


def test_conditional_and_path_scores_round_trip():
    t = DraftTree.from_paths([[1, 2, 3], [4]], [[0.8, 0.4, 0.1], [0.5]])
    cond = conditional_scores(t)
    assert cond.tolist() == pytest.approx([0.8, 0.5, 0.25, 0.5])
    assert path_scores(t.parents, cond).tolist() == pytest.approx(t.scores.tolist())


def test_choose_budget_flat_then_linear_cost():
    flat = StepCost(sizes=(1, 64, 128), seconds=(0.01, 0.01, 0.02))
    scores = np.full(100, 0.05)
    assert choose_budget(scores, flat, 128) == 63  # free up to 64 tokens (63 nodes + root), then each node costs more than it brings
    # every extra token doubles, triples... the step: 1/0.01 beats 1.9/0.02 and 2.7/0.03
    steep = StepCost(sizes=(1, 2), seconds=(0.01, 0.02))
    assert choose_budget(np.array([0.9, 0.8]), steep, 8) == 0
    assert choose_budget(np.array([]), flat, 8) == 0
    with pytest.raises(ValueError):
        StepCost(sizes=(1,), seconds=(0.1,))


def test_a_cost_curve_that_dips_is_taken_as_measured():
    # SmolLM2 fp32 on 2 cores: 2 and 3 tokens cost more than 4 (GEMM kernel choice)
    dip = StepCost(sizes=(1, 2, 4, 8), seconds=(0.052, 0.087, 0.070, 0.078))
    assert dip(4) == pytest.approx(0.070) and dip(3) == pytest.approx(0.0785)
    # 3 nodes (4 slots): 2.2 tokens in 0.070 s (a monotone envelope priced them at 0.087 s)
    assert choose_budget(np.array([0.5, 0.4, 0.3]), dip, 3) == 3


def test_auto_budget_measures_once_and_caches(isolated_cache, monkeypatch):
    from conftest import tiny_model

    from retrospec.verify import step_cost

    monkeypatch.setattr(step_cost, "machine_busy", lambda: False)  # this test is about the cache,
    monkeypatch.setattr(step_cost, "BUSY_SPREAD", float("inf"))  # not about the machine's load
    model = tiny_model("llama")
    first = step_cost_for(model)
    files = list((isolated_cache / "step_cost").glob("*.json"))
    assert len(files) == 1
    assert step_cost_for(model) == first  # read back from the cache
    assert all(s > 0 for s in first.seconds)
    assert dynamic_cost(model).prior(1) == first  # the loop's prior, corrected live


def test_a_cost_measured_under_load_is_not_kept(isolated_cache, monkeypatch):
    from conftest import tiny_model

    from retrospec.verify import step_cost

    monkeypatch.setattr(step_cost, "machine_busy", lambda: True)
    cost = step_cost_for(tiny_model("llama"), batch=2, max_size=4)
    assert cost.loaded and cost.batch == 2
    assert not list((isolated_cache / "step_cost").glob("*.json"))  # used now, never cached


def test_the_batch_budget_shrinks_trees_as_the_step_gets_dearer():
    rows = [np.array([0.9, 0.6, 0.3, 0.1])] * 4
    assert expected_tokens(rows, 2) == pytest.approx(4 * 2.5)
    cheap = lambda slots: np.ones(np.shape(slots))  # noqa: E731  (a flat step: the deepest tree pays)
    assert choose_nodes(rows, range(5), cheap) == 4
    linear = lambda slots: 1.0 + 0.45 * (slots - 1)  # noqa: E731  (each slot costs 45% of a plain step)
    assert choose_nodes(rows, range(5), linear) == 2  # 2.5 / 1.9 beats 1.9 / 1.45 and 2.8 / 2.35
    steep = lambda slots: np.asarray(slots, float)  # noqa: E731  (a CPU at its limit: plain decoding)
    assert choose_nodes(rows, range(5), steep) == 0


def test_live_cost_follows_the_machine():
    prior = StepCost(sizes=(1, 9, 17), seconds=(0.010, 0.012, 0.020))
    live = LiveCost({1: prior}, half_life=2, fresh=8)
    assert live(9, 1) == pytest.approx(0.012)
    for _ in range(12):  # another process on the cores: the 9-slot step now takes 3x
        live.observe(9, 1, 0.036)
    assert live(9, 1) == pytest.approx(0.036, rel=0.05)
    assert live(17, 1) == pytest.approx(0.060, rel=0.1)  # unobserved cells scale with the machine
    for _ in range(12):  # the load went away
        live.observe(9, 1, 0.012)
    assert live(9, 1) == pytest.approx(0.012, rel=0.05)
    for _ in range(20):  # cells seen long ago are stale: the prior x ratio answers again
        live.observe(1, 1, 0.010)
    assert live(9, 1) == pytest.approx(0.012, rel=0.1)


def test_a_damaged_step_cost_cache_is_measured_again(isolated_cache, caplog, monkeypatch):
    """A cache file the budget code accepts but cannot use (a string among the seconds), or
    one too deeply nested for the JSON decoder, made generate() raise."""
    import logging

    import torch
    from conftest import tiny_model

    import retrospec
    from retrospec.verify import step_cost
    from retrospec.verify.step_cost import step_cost_for

    monkeypatch.setattr(step_cost, "machine_busy", lambda: False)  # a measurement under load is never written back:
    monkeypatch.setattr(step_cost, "BUSY_SPREAD", float("inf"))  # this test is about the damaged file
    model = tiny_model("llama")
    step_cost_for(model)
    (path,) = (isolated_cache / "step_cost").glob("*.json")
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, pad_token_id=0)
    ref = model.generate(ids, **kw)
    data = json.loads(path.read_text())
    for damage in (json.dumps({**data, "seconds": ["x"] * len(data["seconds"])}), "[" * 100_000 + "]" * 100_000):
        path.write_text(damage)
        step_cost.reset_live_costs()  # this process's costs: read the file again
        with caplog.at_level(logging.WARNING):
            out = retrospec.generate(model, ids, speculator=retrospec.Speculator(budget="auto"), **kw)
        assert torch.equal(out.sequences, ref) and "measuring again" in caplog.text
        assert json.loads(path.read_text())["seconds"][0] > 0  # and the cache is whole again


def test_the_one_pass_calibration_equals_the_functions_one_after_the_other():
    cal = Calibrator(1)
    rng = np.random.default_rng(0)
    raw_hist = rng.uniform(0, 1, 400).astype(np.float32)
    cal.learn(0, raw_hist, rng.integers(1, 6, 400), rng.uniform(0, 1, 400) < raw_hist)
    for seed in range(20):
        gen = np.random.default_rng(seed)
        paths = [gen.integers(0, 9, size=gen.integers(1, 6)).tolist() for _ in range(gen.integers(1, 8))]
        tree = DraftTree.from_paths(paths, [np.sort(gen.uniform(1e-7, 1, len(p)))[::-1].tolist() for p in paths])
        for calibrate in (True, False):
            raw, depth, scores = cal.calibrated(0, tree, calibrate)
            expect_raw = conditional_scores(tree)
            cond = cal.conditional(0, expect_raw, tree.depths()) if calibrate else expect_raw
            expected = DraftTree(tree.tokens, tree.parents, path_scores(tree.parents, cond), tree.sources).with_monotone_scores()
            assert np.array_equal(raw, expect_raw) and np.array_equal(depth, tree.depths())
            assert np.array_equal(scores, expected.scores), (seed, calibrate)  # bit for bit: the budget sorts on them
