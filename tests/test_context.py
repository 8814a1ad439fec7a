"""Hand-computed token tables for the context source."""

import numpy as np
import pytest

from retrospec import ContextConfig, ContextSource


def propose(tokens, max_nodes=32, max_depth=4, **cfg):
    seq = np.array(tokens)
    return ContextSource(ContextConfig(**cfg)).start_request(seq).propose(seq, max_nodes, max_depth)


def test_longest_suffix_wins_and_all_its_occurrences_merge():
    #        0  1  2  3  4  5  6  7  8  9 10 11
    seq = [1, 2, 3, 5, 9, 2, 3, 6, 1, 2, 3]
    t = propose(seq, max_depth=2, max_matches=2)
    # suffix "1 2 3" occurred once (ends at 2) -> "5 9"; "2 3" adds the most recent other one (ends at 6) -> "6 1"
    assert t.paths() == [[5, 9], [6, 1]]
    # the 3-token match weighs more than the 2-token one
    assert t.scores[0] > t.scores[2]


def test_counts_become_scores():
    # "7" was followed by 8 twice and by 9 once
    t = propose([7, 8, 7, 8, 7, 9, 0, 7], max_depth=1, max_ngram=1)
    assert dict(zip(t.tokens.tolist(), t.scores.tolist()))[8] == pytest.approx(2 * t.scores[t.tokens.tolist().index(9)])


def test_no_earlier_occurrence_gives_an_empty_tree():
    assert len(propose([1, 2, 3, 4])) == 0
    assert len(propose([5])) == 0


def test_min_ngram_and_max_matches():
    seq = [4, 1, 4, 2, 4, 3, 4]
    assert sorted(t[0] for t in propose(seq, max_depth=1).paths()) == [1, 2, 3]
    assert propose(seq, max_depth=1, max_matches=1).paths() == [[3]]  # the most recent only
    assert len(propose(seq, max_depth=1, min_ngram=2)) == 0


def test_index_grows_incrementally_like_a_rebuild():
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 6, size=80)
    session = ContextSource().start_request(seq[:20])
    for end in range(21, 80, 7):
        grown = session.propose(seq[:end], 16, 6)
        fresh = ContextSource().start_request(seq[:end]).propose(seq[:end], 16, 6)
        assert grown.tokens.tolist() == fresh.tokens.tolist()
        assert grown.scores.tolist() == fresh.scores.tolist()


def test_context_never_shrinks():
    session = ContextSource().start_request(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="shrank"):
        session.propose(np.array([1, 2]), 8, 4)


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="min_ngram"):
        ContextConfig(min_ngram=0)
    with pytest.raises(ValueError, match="match_weight"):
        ContextConfig(match_weight=0.5)


def _reference_occurrences(seq, tail, min_n, max_matches, exclude_end=-1):
    """What NgramIndex.occurrences promises, by brute force over the sequence."""
    tail = list(tail)
    found = {}
    for n in range(len(tail), min_n - 1, -1):
        key = tail[len(tail) - n :]
        for end in range(len(seq) - 1, n - 2, -1):
            if seq[end - n + 1 : end + 1] == key and end != exclude_end and end not in found:
                found[end] = n
                if len(found) >= max_matches:
                    return list(found.items())
    return list(found.items())


@pytest.mark.parametrize("vocab, capacity", [(3, 4), (50, 5)])
def test_ngram_index_finds_what_a_brute_force_scan_finds(vocab, capacity):
    # grown in uneven pieces past several table rehashes and array growths; PAD (-1) is a
    # token like any other (the document source separates documents with it)
    from retrospec.sources.context import NgramIndex

    rng = np.random.default_rng(vocab)
    index, seq = NgramIndex(max_n=4, capacity=capacity), []  # 5: not a power of two
    while len(seq) < 1500:
        piece = rng.integers(-1, vocab, size=int(rng.integers(1, 40))).tolist()
        index.extend(piece)
        seq += piece
        assert len(index) == len(seq) and index.tokens().tolist() == seq
        for _ in range(3):
            cut = int(rng.integers(1, len(seq) + 1))
            tail = seq[max(cut - 4, 0) : cut]
            for min_n, most in ((1, 32), (2, 5), (1, 1)):
                assert index.occurrences(tail, min_n, most, exclude_end=cut - 1) == _reference_occurrences(seq, tail, min_n, most, cut - 1)
    assert index.continuation(10, 5) == seq[11:16] and index.continuation(len(seq) - 2, 5) == seq[-1:]
