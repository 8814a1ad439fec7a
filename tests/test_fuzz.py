"""The fuzz harness over every on-disk format, a fixed-seed sample (run longer by hand:
``python -m retrospec.tools.fuzz --mutants 5000 --seed 1``)."""

from __future__ import annotations

from retrospec.tools.fuzz import FORMATS, OUTCOMES, run_fuzz


def test_mutated_datastores_fail_cleanly_and_never_hurt_generation(tmp_path):
    tally = run_fuzz(mutants=200, seed=17, workdir=tmp_path / "fuzz", generate_every=3, write_every=4, timeout=120)
    assert set(tally.counts) == set(FORMATS)
    for fmt, row in tally.counts.items():
        assert row["tried"] == 50 and sum(row[o] for o in OUTCOMES) == 50, (fmt, row)
        assert row["crash"] == row["hang"] == row["segfault"] == 0, (fmt, row, tally.examples)
        assert row["lost files"] == row["outside access"] == 0, (fmt, row, tally.examples)
        assert row["generate runs"] > 10
    # what the cheap checks let through: only contents forged with every checksum recomputed
    # (or, for the budget cache, which has no checksum, plausible numbers)
    for key, notes in tally.examples.items():
        if key.startswith(("suffix-index: silent wrong", "document-store: silent wrong")):
            assert all("checksums recomputed" in n for n in notes), notes
