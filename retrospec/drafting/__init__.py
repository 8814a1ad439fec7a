"""Drafting: every source's tree, calibrated, fused and pruned to a budget (no model calls)."""
