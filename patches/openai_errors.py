"""Component: the OpenAI server's answers about adapters (`vllm.v1.engine.async_llm.AsyncLLM`
`add_lora` / `generate`, `vllm.entrypoints.openai.models.serving.OpenAIServingModels.resolve_lora`).

vLLM 0.26 drops the reason on both paths by which an adapter fails a request over HTTP:

- at resolution, `resolve_lora` catches the engine's refusal (the worker's `add_lora` raises the
  AdapterError: adapter, file, reason), logs it, and answers 400 "LoRA adapter 'x' was found but
  could not be loaded." with nothing more;
- during the request, the plugin's scheduler finishes it with `FINISHED_ERROR` and the
  AdapterError's text as `stop_reason` (truncated or mis-shaped weights are only found when
  they are read); the serving classes see finish_reason "error" and answer 500 "Internal server
  error" (`_raise_if_error` is given the finish reason alone).

With the plugin on, in the process that serves HTTP (the one that builds the engine config):

- `AsyncLLM.add_lora` records why the engine refused an adapter for the `resolve_lora` call it
  runs under (a context variable: nothing is recorded outside one), and `resolve_lora`'s 400
  then carries that reason after vLLM's own sentence;
- `AsyncLLM.generate` raises `AdapterRequestError` (vLLM's `VLLMValidationError`, the exception
  of an invalid request, which `generate` already raises for those) where it would yield a final
  output whose finish_reason is "error" with a text `stop_reason` (only the plugin's failures
  carry one). vLLM's exception handlers answer that 400 BadRequestError with the text and
  `param` "model"; the completion and chat stream generators send it as their error event.

Offline `LLM(...)` runs `LLMEngine`, not `AsyncLLM`: its outputs keep finish_reason "error" and
the reason in `stop_reason`. The server log keeps the detail (the scheduler logs every failed
request with its reason; vLLM logs the refused `add_lora`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
from http import HTTPStatus
from typing import Any, AsyncGenerator

from vllm.exceptions import VLLMValidationError

from slora_plugin.patches.guard import Overrides, Requires

REQUIRES = (
    Overrides("vllm.v1.engine.async_llm:AsyncLLM.add_lora", "(self, lora_request)",
              "slora_plugin.patches.openai_errors:apply.<locals>.add_lora",
              "(self, lora_request, *args, **kwargs)"),
    Overrides("vllm.v1.engine.async_llm:AsyncLLM.generate",
              "(self, prompt, sampling_params, request_id, *, prompt_text=None, lora_request=None, "
              "tokenization_kwargs=None, trace_headers=None, priority=0, data_parallel_rank=None, "
              "reasoning_ended=None, reasoning_parser_kwargs=None)",
              "slora_plugin.patches.openai_errors:apply.<locals>.generate", "(self, *args, **kwargs)"),
    Overrides("vllm.entrypoints.openai.models.serving:OpenAIServingModels.resolve_lora",
              "(self, lora_name)", "slora_plugin.patches.openai_errors:apply.<locals>.resolve_lora",
              "(self, lora_name, *args, **kwargs)"),
    Requires("vllm.entrypoints.openai.engine.protocol:ErrorResponse"),
    Requires("vllm.entrypoints.serve.utils.error_response:create_error_response",
             ("message", "err_type", "status_code", "param")),
    Requires("vllm.exceptions:VLLMValidationError"),
)

#: The prefix vLLM's engine core puts before an exception raised by a utility call
#: (`vllm/v1/engine/core.py`, "Call to {name} method failed: {e}"); the reason is what follows.
_UTILITY_FAILURE = re.compile(r"^Call to \w+ method failed: ")

#: The refusals of `add_lora` seen by the `resolve_lora` call running in this context.
_refusals: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "slora_add_lora_refusals", default=None)


class AdapterRequestError(VLLMValidationError):
    """A request cannot be served because of its adapter; the message names the adapter and
    says why. vLLM answers it 400 BadRequestError, `param` "model"."""

    def __init__(self, message: str) -> None:
        super().__init__(message, parameter="model")

    def __str__(self) -> str:  # the message alone (VLLMValidationError appends the parameter)
        return str(self.args[0])


def adapter_failure(output: Any) -> str | None:
    """The reason a finished `RequestOutput` failed because of its adapter, else None: the
    plugin's scheduler finishes such requests with finish_reason "error" and the reason (an
    AdapterError's text, naming the adapter) as `stop_reason`; vLLM's own errors carry none."""
    for completion in getattr(output, "outputs", None) or ():
        reason = completion.stop_reason
        if completion.finish_reason == "error" and isinstance(reason, str) and reason:
            return reason
    return None


def refusal_reason(error: BaseException) -> str:
    """The engine's reason for refusing an adapter, without the engine core's call prefix."""
    return _UTILITY_FAILURE.sub("", str(error), count=1)


def with_reason(response: Any, lora_name: str, reason: str) -> Any:
    """`resolve_lora`'s 400 for `lora_name` with the engine's reason after vLLM's sentence."""
    from vllm.entrypoints.serve.utils.error_response import create_error_response

    return create_error_response(
        message=f"LoRA adapter '{lora_name}' was found but could not be loaded: {reason}",
        err_type=response.error.type, status_code=HTTPStatus(response.error.code),
        param="model")


def apply() -> None:
    """Wrap the three methods (once per process)."""
    from vllm.entrypoints.openai.engine.protocol import ErrorResponse
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.v1.engine.async_llm import AsyncLLM

    if getattr(AsyncLLM.generate, "_slora_wrapped", False):
        return
    original_add_lora = AsyncLLM.add_lora
    original_generate = AsyncLLM.generate
    original_resolve = OpenAIServingModels.resolve_lora

    @functools.wraps(original_add_lora)
    async def add_lora(self, lora_request, *args, **kwargs):
        try:
            return await original_add_lora(self, lora_request, *args, **kwargs)
        except Exception as e:
            seen = _refusals.get()
            if seen is not None:
                seen.append(refusal_reason(e))
            raise

    @functools.wraps(original_generate)
    async def generate(self, *args, **kwargs) -> AsyncGenerator[Any, None]:
        # The failed output is the request's last: the inner generator ends on its own (no
        # abort of a finished request), then the error is raised to the caller. Closing this
        # generator (a client gone) closes vLLM's at once, which aborts the request.
        failure = None
        async with contextlib.aclosing(original_generate(self, *args, **kwargs)) as outputs:
            async for output in outputs:
                failure = adapter_failure(output) if output.finished else None
                if failure is None:
                    yield output
        if failure is not None:
            raise AdapterRequestError(failure)

    @functools.wraps(original_resolve)
    async def resolve_lora(self, lora_name: str, *args, **kwargs):
        seen: list[str] = []
        token = _refusals.set(seen)
        try:
            result = await original_resolve(self, lora_name, *args, **kwargs)
        finally:
            _refusals.reset(token)
        if (isinstance(result, ErrorResponse) and seen
                and result.error.code == HTTPStatus.BAD_REQUEST.value):
            return with_reason(result, lora_name, seen[-1])
        return result

    for fn in (add_lora, generate, resolve_lora):
        fn._slora_wrapped = True  # type: ignore[attr-defined]
    AsyncLLM.add_lora = add_lora
    AsyncLLM.generate = generate
    OpenAIServingModels.resolve_lora = resolve_lora
