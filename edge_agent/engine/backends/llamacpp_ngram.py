"""Prompt-lookup drafting: guess a sequence's next tokens from where its last ones appeared.

When output copies input (rewriting, correcting, extracting fields), the last few tokens
generated usually appeared before, in the prompt or earlier in the answer, and what
followed them then is a good guess at what follows now. The guess costs no model: the
decode loop verifies it in its next batch and keeps the tokens the model agrees with.
"""

from __future__ import annotations

from collections.abc import Sequence


class NgramIndex:
    """A sequence's tokens so far, with where each recent n-gram last appeared.

    For every n in ``min_n..max_n`` it maps an n-gram to the position just after its
    latest occurrence that has a token after it, so a lookup is a few dictionary reads
    and an appended token costs ``max_n - min_n + 1`` writes.
    """

    def __init__(self, tokens: Sequence[int], *, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes {min_n}..{max_n} are not 1 <= min <= max")
        self._min_n = min_n
        self._max_n = max_n
        self._tokens: list[int] = []
        self._follows: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]
        for token in tokens:
            self.append(token)

    def __len__(self) -> int:
        return len(self._tokens)

    def append(self, token: int) -> None:
        tokens = self._tokens
        end = len(tokens)  # the new token's position: it follows the n-grams ending before it
        for n in range(self._min_n, min(self._max_n, end) + 1):
            self._follows[n][tuple(tokens[end - n : end])] = end
        tokens.append(token)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.append(token)

    def draft(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the longest recent match of the last tokens.

        The longest n-gram is tried first: a longer match is likelier to continue the
        same way. A match close to the end gives a draft that stops at the last token.
        """
        tokens = self._tokens
        if limit <= 0:
            return []
        for n in range(min(self._max_n, len(tokens)), self._min_n - 1, -1):
            start = self._follows[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + limit]
        return []
