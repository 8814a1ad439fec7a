"""The one tree layout and mask (retrospec.buffers): token tables, batches, the static path."""

import numpy as np
import pytest
import torch

from retrospec.buffers import PAD_SLOT, attention_mask, prefill_buffers, to_buffers, tree_buffers, tree_layout
from retrospec.tree import ROOT, DraftTree


def test_which_slots_each_slot_sees():
    # root -> 1 -> 2, root -> 3 (slots: root 0, nodes 1..3)
    tree = DraftTree.from_paths([[1, 2], [3]])
    assert tree.parents.tolist() == [ROOT, 0, ROOT]
    assert tree_layout([tree], [0], [0]).sees[0].astype(int).tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 0, 0, 1],
    ]


def test_to_buffers_token_table():
    t = DraftTree.from_paths([[7, 8], [9]])
    b = to_buffers(t, root_token=3, past_len=2)
    assert b.input_ids.tolist() == [[3, 7, 8, 9]]
    assert b.position_ids.tolist() == [[2, 3, 4, 3]]
    visible = (b.attention_mask[0, 0] == 0).int().tolist()
    #              ctx ctx  r  7  8  9
    assert visible == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1]]
    assert b.attention_mask.dtype == torch.float32
    assert b.attention_mask.min() == torch.finfo(torch.float32).min  # additive, not boolean
    assert b.parent_slots.tolist() == [[-1, 0, 1, 0]]
    assert b.cache_index.tolist() == [[2, 3, 4, 5]] and b.sizes.tolist() == [4]


def test_to_buffers_mask_dtype_and_sliding_window():
    t = DraftTree.from_paths([[7, 8]])
    b = to_buffers(t, root_token=3, past_len=4, dtype=torch.bfloat16, windows={"full_attention": None, "sliding_attention": 3})
    full, sliding = b.attention_mask["full_attention"], b.attention_mask["sliding_attention"]
    assert full.dtype == sliding.dtype == torch.bfloat16
    # positions 4, 5, 6 with window 3 see keys at positions > q - 3
    assert (sliding[0, 0] == 0).int().tolist() == [
        [0, 0, 1, 1, 1, 0, 0],  # q=4 sees 2, 3 and itself
        [0, 0, 0, 1, 1, 1, 0],  # q=5 sees 3, the root, itself
        [0, 0, 0, 0, 1, 1, 1],  # q=6 sees the root (4), node 7 (5), itself
    ]
    assert (full[0, 0] == 0).int().tolist()[2] == [1, 1, 1, 1, 1, 1, 1]


def test_empty_tree_is_a_plain_decoding_step():
    b = to_buffers(DraftTree.empty(), root_token=5, past_len=3)
    assert b.input_ids.tolist() == [[5]] and b.position_ids.tolist() == [[3]]
    assert (b.attention_mask == 0).all()


def test_a_batch_pads_rows_to_one_slot_count_at_their_own_offsets():
    a, b = DraftTree.from_paths([[7, 8]]), DraftTree.from_paths([[9]])
    buf = tree_buffers([a, b], roots=[3, 4], past=[2, 0], slots=4)
    assert buf.input_ids.tolist() == [[3, 7, 8, 3], [4, 9, 4, 4]]  # padding repeats the root
    assert buf.position_ids.tolist() == [[2, 3, 4, 2], [0, 1, 0, 0]]
    assert buf.cache_index.tolist() == [[2, 3, 4, 5], [0, 1, 2, 3]]
    assert buf.parent_slots.tolist() == [[-1, 0, 1, PAD_SLOT], [-1, 0, PAD_SLOT, PAD_SLOT]]
    assert buf.sizes.tolist() == [3, 2]
    visible = (buf.attention_mask[:, 0] == 0).int().tolist()
    #                 row 0: ctx ctx  r  7  8  pad
    assert visible[0] == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 1]]
    #                 row 1:  r  9 pad pad (no context), keys beyond its slots unused
    assert visible[1] == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]]
    with pytest.raises(ValueError, match="does not fit"):
        tree_buffers([a], [3], [2], slots=2)


def test_the_static_path_lays_out_the_same_mask_as_the_dynamic_path():
    """The dynamic verifier builds its mask with exact sizes; a static verifier pads the slots
    and attends over its whole capacity, building the mask inside its step from the same
    layout. Over the keys both see, the masks are equal; the static mask hides the rest."""
    from conftest import tiny_model

    from retrospec.verify.verifiers import DynamicVerifier, StaticVerifier

    rng = np.random.default_rng(0)
    trees = [DraftTree.from_paths([rng.integers(0, 50, size=rng.integers(1, 5)).tolist() for _ in range(3)]) for _ in range(3)]
    roots, past = [5, 6, 7], np.array([9, 4, 13])
    windows = {"full_attention": None, "sliding_attention": 6}
    exact = tree_buffers(trees, roots, past, windows=windows)
    model = tiny_model("llama")
    captured = {}

    def spy(**kwargs):
        captured["mask"] = kwargs["attention_mask"]
        raise StopIteration

    static = StaticVerifier(model, windows, batch=3, capacity=64, node_options=(16,))
    dynamic = DynamicVerifier(model, windows, batch=3, capacity=64)
    for verifier in (dynamic, static):
        verifier.model = spy
        with pytest.raises(StopIteration):
            verifier.verify(trees, roots, past, nodes=max(len(t) for t in trees))
        got = captured["mask"]
        for kind, expected in exact.attention_mask.items():
            s, k = expected.shape[2], expected.shape[3]
            assert torch.equal(got[kind][:, :, :s, :k], expected), (type(verifier).__name__, kind)
            assert (got[kind][:, :, :s, k:] != 0).all()  # nothing beyond the exact keys is visible


def test_prefill_of_left_padded_prompts_writes_each_row_compactly():
    positions, index, mask = prefill_buffers([3, 1], 3, key_len=4, scratch=3, windows={"sliding_attention": 2})
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert index.tolist() == [[0, 1, 2], [3, 3, 0]]  # padding writes to the scratch index
    assert (mask[0, 0] == 0).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]]  # window 2
    assert (mask[1, 0] == 0).int().tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="lengths"):
        prefill_buffers([0], 2)


def test_the_mask_function_takes_any_query_subset():
    """The drafter's use: new query rows over this step's already cached tree slots."""
    sees = torch.tensor([[[True, False, True]]])  # one query: tree slot 0 (root) and itself (slot 2)
    mask = attention_mask(
        sees, torch.tensor([2]), torch.tensor([2]), torch.tensor([[4]]), torch.tensor([[2, 3, 4]]), 5, None, torch.float32
    )
    assert (mask[0, 0] == 0).int().tolist() == [[1, 1, 1, 0, 1]]
