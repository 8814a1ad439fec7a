"""Haystack generators that decode with retrospec's lossless speculative decoding."""

from .chat.chat_generator import RetrospecChatGenerator

__all__ = ["RetrospecChatGenerator"]
