"""Incremental detokenization: the text each new token adds, in microseconds per token.

With a fast tokenizer this is `tokenizers.decoders.DecodeStream` (Rust, a few microseconds a token; it
holds back the bytes of a character split across tokens until the character is whole). Other tokenizers
use the window method (vLLM's): decode a short window of recent tokens twice and keep what the newest
token added. Either way the pieces join to `tokenizer.decode(tokens, skip_special_tokens=True)` for
tokenizers that do no clean-up of spaces.
"""

from __future__ import annotations


class TextStream:
    """The generated text of one request, a token at a time."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        self._fast = None
        if backend is not None:
            try:
                from tokenizers.decoders import DecodeStream

                self._fast, self._backend = DecodeStream(skip_special_tokens=True), backend
            except ImportError:
                pass
        self._ids: list[int] = []
        self._prefix = self._read = 0

    def push(self, token: int) -> str:
        """The text that `token` completes ('' while a character is incomplete)."""
        if self._fast is not None:
            try:
                return self._fast.step(self._backend, token) or ""
            except Exception:  # an id outside the vocabulary (random-weight models): it adds no text
                return ""
        self._ids.append(token)
        prefix = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        full = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(prefix):]
        return ""

    def skip(self, tokens: list[int]) -> None:
        """Tokens whose text the caller wrote itself (a forced tag): context for what follows, not output."""
        for t in tokens:
            self.push(t)
