"""Exact speculative decoding: how a draft is verified, and when drafting pays.

A generating sequence's next token goes into the batch with up to K drafted tokens after
it, each with its logits. The sequence's own sampler chain then draws position 0, and
position i+1 only while the token drawn at i equals draft token i: the logits at i+1 were
computed after exactly the tokens drawn so far. This is speculative rejection sampling
for a draft that is a point mass (an n-gram lookup proposes one token, with certainty):
the draft token d is kept with probability p(d), and when it is not, the token drawn is
distributed as p without d, renormalised, which is the rule's residual max(0, p - q).
Because it draws with the chain itself, every sampler a request has (temperature, top-k,
top-p, min-p, penalties, grammar, logit bias) sees the same tokens in the same order as
without speculation, and with a seed the random stream is drawn once per token as before:
the text is the same, not only its distribution, as long as a token's logits do not
depend on how many tokens shared its batch (the llama.cpp build and context settings of
``llamacpp_batch`` make sure of that, and the tests check it).

Verifying K tokens is not free: on a CPU that computes every row of a small model, a
batch of K+1 tokens costs several one-token decodes. ``DraftPolicy`` keeps each
sequence's acceptance and drafts only as far as the expected tokens per unit of cost
beat plain decoding; when that is nowhere, the sequence stops drafting for a while and
tries again later, each failed try waiting twice as long.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

SpeculationMode = Literal["off", "ngram"]

# A new sequence's assumed acceptance, and how many drafted tokens' worth of weight that
# guess has against what is seen: optimistic enough to try a short draft at once, weak
# enough that one refused draft can stop the next.
PRIOR_ACCEPTANCE = 0.9
PRIOR_WEIGHT = 1.0
# Each verification's evidence fades by this factor, so acceptance follows the text's
# current stretch (copying, then writing freely, then copying again). Ten refused drafts
# in a row weigh about as much as the most evidence can (1 / (1 - DECAY)), so the
# estimate can fall far below any break-even.
DECAY = 0.9
# Steps a sequence waits after its drafts stopped paying, doubled by each failed retry.
FIRST_PAUSE = 16
MAX_PAUSE = 512


@dataclass(frozen=True, slots=True)
class SpeculationOptions:
    """The engine's speculation settings (picklable: they cross into the engine process)."""

    mode: SpeculationMode = "off"
    max_draft: int = 8  # tokens drafted after the sampled one, at most
    min_ngram: int = 3  # the shortest match of the last tokens a draft is taken from
    max_ngram: int = 4
    # Cost of verifying one more token, as a fraction of a one-token decode; None
    # measures it when the engine loads.
    verify_cost: float | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def linear_costs(verify_cost: float, max_draft: int) -> tuple[float, ...]:
    """``costs[n]``: decoding n tokens of one sequence, in one-token decodes (``costs[0]`` 0)."""
    return (0.0, *(1.0 + verify_cost * (n - 1) for n in range(1, max_draft + 2)))


def costs_from_timings(seconds: Mapping[int, float], max_draft: int) -> tuple[float, ...]:
    """``costs[n]`` for n = 1 .. max_draft + 1 from timed decodes of a few batch sizes.

    Sizes between two timed ones are interpolated, sizes past the last extrapolated
    from the last two. Timing noise is bounded by what is known: a batch of n tokens
    costs no less than n - 1 tokens' batch, and no more than n one-token decodes.
    """
    sizes = sorted(seconds)
    if not sizes or sizes[0] != 1:
        raise ValueError("the timings must include a one-token decode")
    one = seconds[1]
    costs = [0.0, 1.0]
    for n in range(2, max_draft + 2):
        below = max((s for s in sizes if s <= n), default=1)
        above = min((s for s in sizes if s >= n), default=below)
        if above == below and len(sizes) > 1 and n > sizes[-1]:
            below, above = sizes[-2], sizes[-1]
        if above == below:
            value = seconds[below]
        else:
            slope = (seconds[above] - seconds[below]) / (above - below)
            value = seconds[below] + slope * (n - below)
        costs.append(min(float(n), max(costs[-1], value / one)))
    return tuple(costs)


def with_step_overhead(costs: Sequence[float], overhead: float) -> tuple[float, ...]:
    """``costs`` when every step also pays ``overhead`` (in one-token decodes) however
    many tokens it decodes: verifying is then relatively cheaper."""
    return (0.0, *((cost + overhead) / (1.0 + overhead) for cost in costs[1:]))


class VerifyCosts:
    """What decoding n tokens of one sequence costs, in one-token steps, as the loop sees it.

    Timed decodes on a quiet context say what the kernels cost; the loop's own
    one-token steps can take longer (another process on the box's cores, OpenMP threads
    waking), and what they take beyond the timing is paid per step, not per token.
    ``observe`` follows that, so drafting is weighed against the steps it saves.
    """

    def __init__(self, decode: Sequence[float], one_token_s: float | None = None) -> None:
        self._decode = tuple(decode)
        self._one_token_s = one_token_s  # None: fixed costs, from the settings
        self.observed_s: float | None = None
        self.costs = self._decode

    @property
    def max_draft(self) -> int:
        return len(self._decode) - 2

    def observe(self, seconds: float) -> None:
        """A one-token step of a lone sequence took ``seconds``."""
        if self._one_token_s is None or self._one_token_s <= 0:
            return
        previous = self.observed_s
        self.observed_s = seconds if previous is None else previous + 0.1 * (seconds - previous)
        overhead = max(0.0, self.observed_s - self._one_token_s) / self._one_token_s
        self.costs = with_step_overhead(self._decode, overhead)


def verify(draft: Sequence[int], draw: Callable[[int], int | None]) -> int:
    """Draw a verified draft's positions in turn; how many drafted tokens were accepted.

    ``draw(i)`` samples the target's token at position i (the batch row after the
    sampled token and the first i drafted ones) and returns it, or None where the
    sequence ended. Position i + 1 is drawn only after position i drew ``draft[i]``;
    when all are accepted, the position after the last drafted token is drawn too.
    """
    for i, drafted in enumerate(draft):
        if draw(i) != drafted:
            return i
    draw(len(draft))
    return len(draft)


class DraftPolicy:
    """One sequence's acceptance so far, and the draft length it makes worth verifying."""

    def __init__(self, costs: VerifyCosts) -> None:
        self._costs = costs
        self._hits = 0.0  # drafted tokens accepted, fading with DECAY
        self._trials = 0.0  # drafted tokens drawn against (accepted, or the one rejected)
        self._pause = 0
        self._next_pause = FIRST_PAUSE
        self.drafted = 0
        self.accepted = 0
        self.pauses = 0

    @property
    def max_draft(self) -> int:
        return self._costs.max_draft

    @property
    def acceptance(self) -> float:
        """The estimated chance that a drafted token is accepted, given those before were."""
        return (self._hits + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self._trials + PRIOR_WEIGHT)

    def length(self, available: int) -> int:
        """How many of ``available`` drafted tokens to verify this step (0: none).

        Maximises expected tokens per unit of cost, ``(1 + a + a^2 + ... + a^k) /
        costs[k + 1]``, against 1 for a plain step. Called once per generating step.
        """
        if self._pause > 0:
            self._pause -= 1
            if self._pause == 0:
                # Try again from the prior: the text may have come to a stretch it copies.
                self._hits = self._trials = 0.0
            return 0
        if available <= 0:
            return 0
        a = self.acceptance
        costs = self._costs.costs
        best, best_rate = 0, 1.0
        expected, term = 1.0, 1.0
        for k in range(1, min(available, self.max_draft) + 1):
            term *= a
            expected += term
            rate = expected / costs[k + 1]
            if rate > best_rate:
                best, best_rate = k, rate
        if best == 0:
            self.pauses += 1
            self._pause = self._next_pause
            self._next_pause = min(2 * self._next_pause, MAX_PAUSE)
        return best

    def record(self, drafted: int, accepted: int, rejected: bool) -> None:
        """What a verification of ``drafted`` tokens found: ``accepted`` kept, then a
        rejection, or none (all kept, or the sequence ended first)."""
        self.drafted += drafted
        self.accepted += accepted
        self._hits = self._hits * DECAY + accepted
        self._trials = self._trials * DECAY + accepted + int(rejected)
        if not rejected and accepted == drafted:
            self._next_pause = FIRST_PAUSE
