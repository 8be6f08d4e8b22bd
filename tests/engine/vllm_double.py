"""A stand-in for vLLM's GPU engine, so the vLLM backend is tested on boxes without one.

It follows the interface of vLLM 0.33's ``AsyncLLM``: ``from_engine_args``,
``generate(prompt, sampling_params, request_id)`` as an async iterator of
``RequestOutput`` (``outputs[0]`` a ``CompletionOutput`` with ``text``,
``token_ids``, ``logprobs``, ``finish_reason``, ``stop_reason``; deltas or
cumulative as ``output_kind`` asks), ``abort(request_id)``, ``get_tokenizer()``,
``model_config.max_model_len`` and ``shutdown()``. When vLLM is importable its
real SamplingParams and output classes are used; otherwise small look-alikes.

The "model" is a byte-level tokenizer and a fixed reply spelled out byte by byte,
then end-of-sequence: deterministic, tokenizer-free, and multi-byte characters
arrive split across tokens as they do from a real byte-level BPE. What it stands
in for is the GPU, not our code: the adapter under test is the real VllmBackend.
"""

from __future__ import annotations

import asyncio
import codecs
import enum
import json
import tempfile
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_agent.config import VllmOptions
from edge_agent.engine.backends.vllm import VllmApi, VllmBackend
from edge_agent.manifest import HfArtifact, ModelManifest

DOUBLE_REPLY = "Hello from the vLLM double: naïve café ✓ done."
DOUBLE_JSON_REPLY = '{"answer": "double", "ok": true}'
# A schema containing this key is refused at admission, as vLLM refuses a schema
# its grammar backend cannot compile.
UNCOMPILABLE_SCHEMA_KEY = "x-double-uncompilable"

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- vLLM's classes, or look-alikes with the same fields ----------------------------------


class _RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class DoubleValidationError(ValueError):
    """Like vllm.exceptions.VLLMValidationError: a message, maybe the parameter's name."""

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass
class _StructuredOutputsParams:
    json: str | dict[str, Any] | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        if (self.json is None) == (self.json_object is None):
            raise DoubleValidationError("You must use one kind of structured outputs constraint")


@dataclass
class _SamplingParams:
    """The fields VllmBackend sets, with vLLM 0.33's range checks (sampling_params.py)."""

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    output_kind: Any = _RequestOutputKind.CUMULATIVE
    skip_special_tokens: bool = True
    structured_outputs: _StructuredOutputsParams | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise DoubleValidationError(
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}."
            )
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise DoubleValidationError(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}."
            )
        if self.repetition_penalty <= 0.0:
            raise DoubleValidationError("repetition_penalty must be greater than zero.")
        if not 0.0 <= self.temperature <= 2.0:
            raise DoubleValidationError(
                f"temperature must be in [0, 2], got {self.temperature}.", parameter="temperature"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise DoubleValidationError(
                f"top_p must be in (0, 1], got {self.top_p}.", parameter="top_p"
            )
        if self.top_k < -1:
            raise DoubleValidationError(
                f"top_k must be 0 (disable), or at least 1, got {self.top_k}."
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise DoubleValidationError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise DoubleValidationError("max_tokens must be at least 1.", parameter="max_tokens")


@dataclass
class _Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class _CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Any]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[Any]
    finished: bool


class DoubleEngineDeadError(Exception):
    """vLLM's EngineDeadError: the engine-core process is gone."""


def _vllm_classes() -> dict[str, Any]:
    """vLLM's real classes when it imports (a GPU box, or a CPU box with the wheel)."""
    try:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.logprobs import Logprob
        from vllm.outputs import CompletionOutput, RequestOutput
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:
        return {
            "real": False,
            "EngineDeadError": DoubleEngineDeadError,
            "SamplingParams": _SamplingParams,
            "StructuredOutputsParams": _StructuredOutputsParams,
            "RequestOutputKind": _RequestOutputKind,
            "ValidationError": DoubleValidationError,
            "Logprob": _Logprob,
            "CompletionOutput": _CompletionOutput,
            "RequestOutput": _RequestOutput,
        }
    return {
        "real": True,
        "EngineDeadError": EngineDeadError,
        "SamplingParams": SamplingParams,
        "StructuredOutputsParams": StructuredOutputsParams,
        "RequestOutputKind": RequestOutputKind,
        "ValidationError": VLLMValidationError,
        "Logprob": Logprob,
        "CompletionOutput": CompletionOutput,
        "RequestOutput": RequestOutput,
    }


# --- the tokenizer ------------------------------------------------------------------------


class ByteTokenizer:
    """Hugging Face-shaped byte-level tokenizer: special tokens, then one id per byte."""

    SPECIAL = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
    BOS = 1
    EOS = 2
    OFFSET = len(SPECIAL)

    def __init__(self) -> None:
        self.chat_template: str | None = CHAT_TEMPLATE
        self.eos_token_id = self.EOS
        self.bos_token_id = self.BOS
        env = ImmutableSandboxedEnvironment()
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(CHAT_TEMPLATE)

    def __len__(self) -> int:
        return self.OFFSET + 256

    def encode(
        self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False
    ) -> list[int]:
        ids = [self.BOS] if add_special_tokens else []
        rest = text
        while rest:
            if not split_special_tokens:
                special = next((s for s in self.SPECIAL if rest.startswith(s)), None)
                if special is not None:
                    ids.append(self.SPECIAL.index(special))
                    rest = rest[len(special) :]
                    continue
            ids.extend(b + self.OFFSET for b in rest[0].encode("utf-8"))
            rest = rest[1:]
        return ids

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = False) -> str:
        return self.token_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def token_bytes(self, ids: Sequence[int] | int, skip_special_tokens: bool = True) -> bytes:
        out = bytearray()
        for token in [ids] if isinstance(ids, int) else ids:
            if token < self.OFFSET:
                if not skip_special_tokens:
                    out += self.SPECIAL[token].encode()
            else:
                out.append(token - self.OFFSET)
        return bytes(out)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        if self.chat_template is None:
            raise ValueError("tokenizer has no chat template")
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


# --- the engine ---------------------------------------------------------------------------


@dataclass
class DoubleAsyncLLM:
    """AsyncLLM's request surface over a deterministic byte-by-byte reply."""

    engine_args: Mapping[str, Any]
    reply: str = DOUBLE_REPLY
    tokens_per_output: int = 1  # >1: deltas merged, as vLLM does when the reader lags
    token_delay_s: float = 0.0
    classes: dict[str, Any] = field(default_factory=_vllm_classes)
    received: dict[str, Any] = field(default_factory=dict)  # request_id -> SamplingParams
    prompts: dict[str, Any] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    is_shut_down: bool = False
    errored: bool = False  # AsyncLLM.errored: the engine core died

    def die(self) -> None:
        """What AsyncLLM does when its engine-core process dies: every stream and every
        later call raises EngineDeadError, and ``errored`` turns true."""
        self.errored = True

    def __post_init__(self) -> None:
        self.tokenizer = ByteTokenizer()
        self.model_config = SimpleNamespace(max_model_len=int(self.engine_args["max_model_len"]))

    @classmethod
    def from_engine_args(cls, engine_args: Mapping[str, Any], **kwargs: Any) -> DoubleAsyncLLM:
        return cls(engine_args=dict(engine_args), **kwargs)

    def get_tokenizer(self) -> ByteTokenizer:
        return self.tokenizer

    async def abort(self, request_id: str | Sequence[str], internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.aborted.extend(ids)
        self.running.difference_update(ids)

    def shutdown(self, timeout: float | None = None) -> None:
        self.is_shut_down = True

    async def generate(
        self, prompt: Mapping[str, Any], sampling_params: Any, request_id: str
    ) -> AsyncGenerator[Any, None]:
        classes = self.classes
        if self.errored:
            raise classes["EngineDeadError"]("EngineCore encountered an issue")
        prompt_ids = list(prompt["prompt_token_ids"])
        if not prompt_ids:
            raise classes["ValidationError"]("The decoder prompt cannot be empty")
        self._check_structured(sampling_params)
        self.received[request_id] = sampling_params
        self.prompts[request_id] = prompt
        self.running.add(request_id)
        delta = sampling_params.output_kind == classes["RequestOutputKind"].DELTA
        reply = DOUBLE_JSON_REPLY if sampling_params.structured_outputs else self.reply
        script = [*self.tokenizer.encode(reply, add_special_tokens=False), ByteTokenizer.EOS]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        all_ids: list[int] = []
        all_text = ""
        all_logprobs: list[dict[int, Any]] = []
        batch_ids: list[int] = []
        batch_text = ""
        batch_logprobs: list[dict[int, Any]] = []
        max_len = self.model_config.max_model_len
        try:
            for produced, token in enumerate(script, start=1):
                await asyncio.sleep(self.token_delay_s)
                if self.errored:
                    raise classes["EngineDeadError"]("EngineCore encountered an issue")
                if request_id not in self.running:
                    return  # aborted
                finish: str | None = None
                if token == ByteTokenizer.EOS:
                    finish = "stop"  # vLLM leaves the end-of-sequence token's text out
                    piece = decoder.decode(b"", final=True)
                else:
                    piece = decoder.decode(self.tokenizer.token_bytes([token]))
                    if produced >= (sampling_params.max_tokens or 16) or (
                        len(prompt_ids) + produced >= max_len
                    ):
                        finish = "length"
                        piece += decoder.decode(b"", final=True)
                batch_ids.append(token)
                batch_text += piece
                if sampling_params.logprobs is not None:
                    batch_logprobs.append(self._logprobs(token, sampling_params.logprobs))
                if len(batch_ids) < self.tokens_per_output and finish is None:
                    continue
                all_ids += batch_ids
                all_text += batch_text
                all_logprobs += batch_logprobs
                completion = classes["CompletionOutput"](
                    index=0,
                    text=batch_text if delta else all_text,
                    token_ids=list(batch_ids if delta else all_ids),
                    cumulative_logprob=None,
                    logprobs=(list(batch_logprobs if delta else all_logprobs) or None)
                    if sampling_params.logprobs is not None
                    else None,
                    finish_reason=finish,
                    stop_reason=None,
                )
                batch_ids, batch_text, batch_logprobs = [], "", []
                yield classes["RequestOutput"](
                    request_id=request_id,
                    prompt=None,
                    prompt_token_ids=prompt_ids,
                    prompt_logprobs=None,
                    outputs=[completion],
                    finished=finish is not None,
                )
                if finish is not None:
                    return
        finally:
            self.running.discard(request_id)

    def _check_structured(self, sampling_params: Any) -> None:
        structured = sampling_params.structured_outputs
        if structured is None or structured.json is None:
            return
        schema = (
            structured.json if isinstance(structured.json, str) else json.dumps(structured.json)
        )
        if UNCOMPILABLE_SCHEMA_KEY in schema:
            raise self.classes["ValidationError"](
                "The provided JSON schema contains features not supported by xgrammar."
            )

    def _logprobs(self, token: int, top_n: int) -> dict[int, Any]:
        """The sampled token first at rank 1, then top_n - 1 made-up runners-up."""
        logprob = self.classes["Logprob"]
        decode = self.tokenizer.decode
        position = {token: logprob(logprob=-0.25, rank=1, decoded_token=decode([token]))}
        for rank in range(2, top_n + 1):
            other = ByteTokenizer.OFFSET + (token + rank) % 256
            position[other] = logprob(
                logprob=-float(rank), rank=rank, decoded_token=decode([other])
            )
        return position


# --- wiring -------------------------------------------------------------------------------


class VllmDouble:
    """Builds VllmApi bundles whose engine is a DoubleAsyncLLM; keeps the engine it made."""

    def __init__(self, **engine_kwargs: Any) -> None:
        self.engine_kwargs = engine_kwargs
        self.engine: DoubleAsyncLLM | None = None
        self.engines_made = 0
        self.classes = _vllm_classes()

    def api(self, options: VllmOptions) -> VllmApi:
        classes = self.classes

        def make_engine(kwargs: dict[str, Any]) -> DoubleAsyncLLM:
            self.engine = DoubleAsyncLLM.from_engine_args(
                kwargs, classes=classes, **self.engine_kwargs
            )
            self.engines_made += 1
            return self.engine

        return VllmApi(
            version="double" + (" (real vLLM classes)" if classes["real"] else ""),
            sampling_params=classes["SamplingParams"],
            structured_outputs=classes["StructuredOutputsParams"],
            delta_output_kind=classes["RequestOutputKind"].DELTA,
            validation_errors=(ValueError, classes["ValidationError"]),
            make_engine=make_engine,
            dead_errors=(classes["EngineDeadError"],),
        )


def with_hf_directory(manifest: ModelManifest) -> ModelManifest:
    """The manifest with an [hf] artifact whose directory exists (the double reads none)."""
    if manifest.hf is not None:
        path = manifest.hf.path
        if (path if path.is_absolute() else manifest.source.parent / path).is_dir():
            return manifest
    directory = Path(tempfile.mkdtemp(prefix="vllm-double-"))
    return manifest.model_copy(update={"hf": HfArtifact(path=directory)})


def make_double_vllm_backend(
    manifest: ModelManifest,
    *,
    options: VllmOptions | None = None,
    parallel: int = 4,
    double: VllmDouble | None = None,
    **backend_kwargs: Any,
) -> VllmBackend:
    """A VllmBackend (not yet started) whose engine is the double instead of a GPU."""
    double = double or VllmDouble()
    return VllmBackend(
        with_hf_directory(manifest),
        options,
        parallel=parallel,
        api_loader=double.api,
        **backend_kwargs,
    )
