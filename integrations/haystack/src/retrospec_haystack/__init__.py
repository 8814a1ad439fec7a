"""Haystack components that generate with retrospec's lossless speculative decoding."""

from retrospec_haystack.generator import RetrospecChatGenerator, RetrospecGenerator

__all__ = ["RetrospecChatGenerator", "RetrospecGenerator"]
