"""Verification: the tree forward, acceptance and the KV cache that follows the accepted path."""
