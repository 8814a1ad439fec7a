"""Hand-computed token tables for the draft tree and its buffers."""

import numpy as np
import pytest

from retrospec.tree import ROOT, DraftTree, cap_depth, fuse, fuse_with_index, prune


def tree(tokens, parents, scores, sources=None):
    n = len(tokens)
    return DraftTree(
        np.array(tokens, np.int64), np.array(parents, np.int32), np.array(scores, np.float32),
        np.array(sources if sources is not None else [1] * n, np.uint32),
    )


def test_from_paths_merges_shared_prefixes():
    t = DraftTree.from_paths([[1, 2, 3], [1, 2, 4], [5]], [[0.9, 0.8, 0.5], [0.7, 0.6, 0.4], [0.3]])
    assert t.tokens.tolist() == [1, 2, 3, 4, 5]
    assert t.parents.tolist() == [ROOT, 0, 1, 1, ROOT]
    # a shared prefix keeps its highest score
    assert t.scores.tolist() == pytest.approx([0.9, 0.8, 0.5, 0.4, 0.3])
    t.validate()
    assert t.paths() == [[1, 2, 3], [1, 2, 4], [5]]


def test_validate_names_the_broken_invariant():
    with pytest.raises(ValueError, match="parents must come first"):
        tree([1, 2], [1, ROOT], [0.5, 0.5]).validate()
    with pytest.raises(ValueError, match="repeats token 7"):
        tree([7, 7], [ROOT, ROOT], [0.5, 0.4]).validate()
    with pytest.raises(ValueError, match="above its parent"):
        tree([1, 2], [ROOT, 0], [0.2, 0.5]).validate()


def test_fuse_token_table():
    # source 0 guesses "a b c" and "a d"; source 1 guesses "a b e" and "f"
    a = tree([10, 11, 12, 13], [ROOT, 0, 1, 0], [0.5, 0.4, 0.3, 0.1], [1, 1, 1, 1])
    b = tree([10, 11, 14, 15], [ROOT, 0, 1, ROOT], [0.5, 0.2, 0.1, 0.2], [2, 2, 2, 2])
    fused, (map_a, map_b) = fuse_with_index([a, b])
    #            a   b   c   d   e   f
    assert fused.tokens.tolist() == [10, 11, 12, 13, 14, 15]
    assert fused.parents.tolist() == [ROOT, 0, 1, 0, 1, ROOT]
    assert fused.sources.tolist() == [3, 3, 1, 1, 2, 2]
    assert map_a.tolist() == [0, 1, 2, 3] and map_b.tolist() == [0, 1, 4, 5]
    # noisy-or: 1 - (1 - 0.5)(1 - 0.5) = 0.75; 1 - 0.6 * 0.8 = 0.52
    assert fused.scores.tolist() == pytest.approx([0.75, 0.52, 0.3, 0.1, 0.1, 0.2])
    fused.validate()
    assert fuse([a, b], combine="max").scores.tolist() == pytest.approx([0.5, 0.4, 0.3, 0.1, 0.1, 0.2])


def test_fuse_of_one_or_no_tree():
    a = tree([1], [ROOT], [0.5])
    assert fuse([a, DraftTree.empty()]) is a
    assert len(fuse([])) == 0
    with pytest.raises(ValueError, match="combine"):
        fuse([a, a], combine="mean")


def test_prune_keeps_top_scores_prefix_closed():
    #          0     1     2     3     4
    t = tree([1, 2, 3, 4, 5], [ROOT, 0, 1, ROOT, 3], [0.9, 0.6, 0.2, 0.5, 0.5])
    p = prune(t, 3)
    assert p.tokens.tolist() == [1, 2, 4]  # not [.., 5]: ties go to the earlier node (the parent)
    assert p.parents.tolist() == [ROOT, 0, ROOT]
    p.validate()
    assert prune(t, 10) is t
    assert len(prune(t, 0)) == 0
    with pytest.raises(ValueError):
        prune(t, -1)


def test_cap_depth():
    t = DraftTree.from_paths([[1, 2, 3], [4]])
    assert cap_depth(t, 2).paths() == [[1, 2], [4]]
    assert len(cap_depth(t, 0)) == 0
    assert cap_depth(t, 5) is t
