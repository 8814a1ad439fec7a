"""Test-only draft sources and tokenizers."""

from __future__ import annotations

import numpy as np

from retrospec.tree import DraftTree


class OracleSource:
    """Knows the true continuation and hides it among distractors.

    Each proposal is a tree where the correct next tokens (up to ``depth``) form one path,
    placed at a random position among ``width`` siblings per level, and a few levels are
    deliberately wrong (``error_rate``), so acceptance stops at random depths and the
    accepted path is rarely the first child: a hard test of tree masks and KV compaction.
    """

    name = "oracle"
    topk_wanted = 0

    def __init__(self, reference: list[int], vocab: int, prompt_len: int, depth: int = 5, width: int = 3,
                 error_rate: float = 0.2, seed: int = 0):
        self.reference, self.vocab, self.prompt_len = reference, vocab, prompt_len
        self.depth, self.width, self.error_rate = depth, width, error_rate
        self.rng = np.random.default_rng(seed)

    def start_request(self, prompt, documents=()):
        return self

    def propose(self, context, max_nodes, max_depth):
        done = len(context) - self.prompt_len
        truth = self.reference[done : done + min(self.depth, max_depth)]
        paths, scores = [], []
        prefix: list[int] = []
        for token in truth:
            if self.rng.random() < self.error_rate:
                token = (token + 1 + int(self.rng.integers(self.vocab - 1))) % self.vocab
            decoys = [int(t) for t in self.rng.integers(0, self.vocab, self.width - 1) if t != token]
            order = decoys + [token]
            self.rng.shuffle(order)
            for t in order:
                paths.append(prefix + [t])
                scores.append([0.9 ** (i + 1) for i in range(len(prefix) + 1)])
            prefix = prefix + [token]
        if not paths:
            return DraftTree.empty()
        return DraftTree.from_paths(paths, scores)

    def observe(self, step):
        pass


class FixedTreeSource:
    """Always proposes the same tree (for statistical tests)."""

    name = "fixed"
    topk_wanted = 0

    def __init__(self, tree: DraftTree):
        self.tree = tree

    def start_request(self, prompt, documents=()):
        return self

    def propose(self, context, max_nodes, max_depth):
        return self.tree

    def observe(self, step):
        pass


def plain(model, ids, **kw):
    """Plain greedy ``generate()`` of an unpadded batch."""
    import torch

    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kw)


def spec(model, ids, speculator, **kw):
    """``retrospec.generate`` with the arguments of :func:`plain`."""
    import torch

    import retrospec

    return retrospec.generate(model, ids, speculator=speculator, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kw)


class IdTokenizer:
    """Texts are space-separated token ids: "5 6 7" -> [5, 6, 7]; other words are id 0."""

    def __init__(self, vocab_size: int = 100, name: str = "ids"):
        self.vocab_size, self.name_or_path = vocab_size, name
        self.bos_token = self.eos_token = self.pad_token = self.unk_token = None
        self.eos_token_id = None

    def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=False):
        def one(text):
            ids, offsets, pos = [], [], 0
            for word in text.split():
                start = text.index(word, pos)
                ids.append(int(word) if word.isdigit() else 0)
                offsets.append((start, start + len(word)))
                pos = start + len(word)
            return ids, offsets

        encoded = [one(t) for t in ([texts] if isinstance(texts, str) else texts)]
        out = {"input_ids": [e[0] for e in encoded]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e[1] for e in encoded]
        return {k: v[0] for k, v in out.items()} if isinstance(texts, str) else out

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)

    def get_vocab(self):
        return {f"t{i}": i for i in range(self.vocab_size)}


def edit_manifest(root, edit, recompute: bool = True) -> None:
    """Apply ``edit(data)`` to an index's manifest; with ``recompute`` also fix its own
    checksum (a hostile index, whose schema checks must catch the edit)."""
    import json
    from pathlib import Path

    from retrospec.datastores.files import CHECKSUM_KEY, manifest_digest

    path = Path(root) / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    if recompute and isinstance(data, dict):
        data[CHECKSUM_KEY] = manifest_digest(data)
    path.write_text(json.dumps(data))


def forge_file(root, name: str, raw: bytes) -> None:
    """Replace file ``name`` of an index and make every checksum agree with it (its manifest
    entry, its block crc32s, the manifest's own): corruption no cheap check can see."""
    from pathlib import Path

    import numpy as np

    from retrospec.datastores.files import describe_file
    from retrospec.datastores.suffix_index import block_crcs

    root = Path(root)
    (root / name).write_bytes(raw)
    shard, file = name.rsplit("/", 1) if "/" in name else ("", name)

    def edit(data):
        entries = data["files"] if not shard else next(s for s in data["shards"] if s["name"] == shard)["files"]
        entries[name].update(describe_file(root / name))
        if file in ("tokens.bin", "sa.bin"):
            block = next(s for s in data["shards"] if s["name"] == shard)["block_bytes"]
            crc = f"{shard}/{file.replace('.bin', '.crc')}"
            block_crcs(np.frombuffer(raw, np.uint8), block).astype("<u4").tofile(root / crc)
            entries[crc].update(describe_file(root / crc))

    edit_manifest(root, edit)
