"""Per-sequence llama.cpp sampler chains and log-probabilities, built from SamplingParams."""

from __future__ import annotations

import ctypes
import json
import re
import secrets
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from edge_agent.engine.types import SamplingParams, UnsupportedFeature

# How many recent tokens the repetition penalties look back over (llama.cpp's default).
PENALTY_LAST_N = 64


def grammar_for(params: SamplingParams) -> str | None:
    """GBNF text for the request's structured output, or None when unconstrained."""
    constraint = params.structured_output
    if constraint is None:
        return None
    if constraint.kind == "json_object" or constraint.schema_json is None:
        grammar = JSON_GBNF
    else:
        try:
            grammar = str(json_schema_to_gbnf(constraint.schema_json))
        except Exception as exc:  # the converter raises bare Exceptions on schemas it can't do
            raise UnsupportedFeature(
                "structured_output", f"this JSON schema cannot be enforced: {exc}"
            ) from None
    if not (constraint.prefix or constraint.suffix):
        return grammar
    # The JSON's own start rule becomes one item between the fixed texts.
    body = re.sub(r"^root ::=", f"{_WRAPPED} ::=", grammar, count=1, flags=re.MULTILINE)
    item = f"{json.dumps(constraint.prefix)} {_WRAPPED} {json.dumps(constraint.suffix)}"
    root = f'root ::= {item} ("\\n" {item})*' if constraint.repeat else f"root ::= {item}"
    return f"{root}\n{body}"


_WRAPPED = "wrapped-json-value"  # no schema property yields this rule name (they get no "wrapped-")


class SamplerChain:
    """A llama.cpp sampler chain owned by one sequence; free() it when the sequence ends."""

    def __init__(self, vocab: Any, n_vocab: int, params: SamplingParams, grammar: str | None):
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        self._chain = llama_cpp.llama_sampler_chain_init(chain_params)
        add = self._add
        if params.logit_bias:
            items = list(params.logit_bias.items())
            biases = (llama_cpp.llama_logit_bias * len(items))(
                *(llama_cpp.llama_logit_bias(token, bias) for token, bias in items)
            )
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(items), biases))
        if grammar is not None:
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            if not sampler:
                self.free()
                raise UnsupportedFeature("structured_output", "the grammar does not compile")
            add(sampler)
        if (
            params.repetition_penalty != 1.0
            or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0
        ):
            add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab,
                    PENALTY_LAST_N,
                    params.repetition_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.greedy:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        # llama.cpp reads 0xFFFFFFFF as "pick a random seed": keep explicit seeds explicit.
        add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF if seed != 0xFFFFFFFF else 0))

    def _add(self, sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def sample(self, ctx: Any, batch_index: int) -> int:
        """Pick the next token from the logits at batch_index (also advances the chain)."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, batch_index))

    def free(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def logprobs_of(
    ctx: Any, batch_index: int, n_vocab: int, token: int, top_n: int
) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under the model and the top_n most likely tokens."""
    pointer = llama_cpp.llama_get_logits_ith(ctx, batch_index)
    logits = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), (n_vocab,))
    shifted = logits.astype(np.float64) - float(logits.max())
    log_total = float(np.log(np.exp(shifted).sum()))
    chosen = float(shifted[token]) - log_total
    top: list[tuple[int, float]] = []
    if top_n > 0:
        best = np.argpartition(-shifted, top_n - 1)[:top_n]
        best = best[np.argsort(-shifted[best], kind="stable")]
        top = [(int(t), float(shifted[t]) - log_total) for t in best]
    return chosen, top
