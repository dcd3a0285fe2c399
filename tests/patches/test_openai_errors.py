"""What an HTTP client gets for a bad adapter (issue 17): vLLM's real OpenAI serving classes
(`OpenAIServingModels`, `OpenAIServingCompletion`, `OpenAIServingChat`) with the plugin's
resolver over real adapter files, and an `AsyncLLM` whose engine core is faked: its `add_lora`
runs the host store's config check (as the worker's does) and fails as vLLM's engine core
fails a utility call; its requests finish as the plugin's scheduler finishes a request whose
adapter's weights cannot be read (finish_reason "error", the AdapterError's text as
stop_reason). The answer is turned into an HTTP status and body as vLLM's router and exception
handlers do (`create_error_response` of the ErrorResponse or exception; a stream's error
event). Every answer names the adapter and says why: 400 for a bad adapter, 404 unknown."""

from __future__ import annotations

import asyncio
import json
import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from slora_plugin.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, write_random_adapter
from slora_plugin.adapters.store import AdapterStore
from slora_plugin.patches import openai_errors

TARGETS = ("q_proj", "v_proj")


def _adapters(root: str, dims) -> str:
    """good; bad-config (not JSON); bad-rank (above the maximum); bad-weights (truncated)."""
    for name, rank in (("good", 4), ("bad-config", 4), ("bad-rank", 64), ("bad-weights", 4)):
        write_random_adapter(os.path.join(root, name), dims, rank, TARGETS, seed=rank)
    with open(os.path.join(root, "bad-config", CONFIG_NAME), "w") as f:
        f.write('{"peft_type": "LORA", "r": ')
    weights = os.path.join(root, "bad-weights", WEIGHTS_NAME)
    os.truncate(weights, os.path.getsize(weights) // 2)
    return root


class _Collector:
    """What `AsyncLLM.add_request` returns: the request's outputs, in order."""

    def __init__(self, request_id: str, outputs: list[Any]) -> None:
        self.request_id, self._outputs = request_id, list(outputs)

    def get_nowait(self) -> Any:
        return self._outputs.pop(0) if self._outputs else None

    async def get(self) -> Any:
        return self._outputs.pop(0)

    def close(self) -> None:
        pass


class FakeEngine:
    """The engine core behind a real AsyncLLM (`generate`, `add_lora` are AsyncLLM's, wrapped
    by the patch): the host store checks adapters, reads weights, and says why it cannot."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self.aborted: list[str] = []

    async def add_lora_async(self, lora_request) -> bool:
        try:
            self.store.spec(lora_request.lora_path)  # the worker's add_lora
        except Exception as e:
            raise Exception(f"Call to add_lora method failed: {e}") from None  # vLLM's core
        return True

    def outputs(self, request_id: str, prompt: list[int], lora_request) -> list[Any]:
        from vllm.outputs import CompletionOutput, RequestOutput

        def out(token_ids, finished, finish_reason=None, stop_reason=None):
            c = CompletionOutput(0, "", token_ids, None, None, finish_reason=finish_reason,
                                 stop_reason=stop_reason)
            return RequestOutput(request_id, None, prompt, None, [c], finished)

        try:
            if lora_request is not None:
                self.store.get(lora_request.lora_path).release()  # the worker's host read
        except Exception as e:  # the scheduler: FINISHED_ERROR, the AdapterError as stop_reason
            return [out([], True, "error", str(e))]
        return [out([5], False), out([5, 6], True, "length")]


def _async_llm(model_config, engine: FakeEngine):
    from vllm.v1.engine.async_llm import AsyncLLM

    class TestAsyncLLM(AsyncLLM):
        errored = False

        def __init__(self) -> None:  # no engine: only what the serving classes read
            self.model_config = model_config
            self.vllm_config = None
            self.renderer = SimpleNamespace(tokenizer=SimpleNamespace())
            self.input_processor = None
            self.log_requests = False
            self.engine_core = engine

        async def add_request(self, request_id, prompt, params, *args, lora_request=None, **kw):
            return _Collector(request_id, engine.outputs(request_id, prompt["prompt_token_ids"],
                                                         lora_request))

        async def abort(self, request_id, internal=False) -> None:
            engine.aborted.append(request_id)

        async def is_tracing_enabled(self) -> bool:
            return False

        def shutdown(self, *args, **kwargs) -> None:
            pass

    return TestAsyncLLM()


class _Renderer:
    """The prompt side (not under test): token ids in, one engine input out."""

    async def render_completion(self, request):
        from vllm.inputs.engine import tokens_input

        return [tokens_input(list(request.prompt))]

    async def render_chat(self, request):
        from vllm.inputs.engine import tokens_input

        return [], [tokens_input([3, 4, 5])]


@pytest.fixture
def serving(tmp_path, tiny_model_dir, tiny_dims, monkeypatch):
    """(completion, chat, engine) serving over adapters of tmp_path/adapters, plugin patched."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.resolver import LoRAResolverRegistry

    from slora_plugin.adapters.resolver import register_resolver
    from slora_plugin.config import SLoRAConfig
    from vllm_cpu import build_vllm_config

    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    openai_errors.apply()
    adapter_dir = _adapters(str(tmp_path / "adapters"), tiny_dims)
    model_config = build_vllm_config(tiny_model_dir).model_config
    saved = dict(LoRAResolverRegistry.resolvers)
    LoRAResolverRegistry.resolvers.clear()
    register_resolver(SLoRAConfig(adapter_dir=adapter_dir))
    store = AdapterStore(tiny_dims, 4096, torch.float16, adapter_dir=adapter_dir, max_rank=16,
                         host_cache_bytes=1 << 22, loader_threads=1)
    engine = FakeEngine(store)
    client = _async_llm(model_config, engine)
    try:
        models = OpenAIServingModels(client, [BaseModelPath("tiny", tiny_model_dir)])
        completion = OpenAIServingCompletion(client, models, online_renderer=_Renderer(),
                                             request_logger=None)
        chat = OpenAIServingChat(client, models, "assistant", online_renderer=_Renderer(),
                                 request_logger=None, chat_template=None,
                                 chat_template_content_format="auto")
        yield completion, chat, engine
    finally:
        store.close()
        LoRAResolverRegistry.resolvers.clear()
        LoRAResolverRegistry.resolvers.update(saved)


async def _answer(call) -> tuple[int, dict]:
    """(HTTP status, JSON body) as vLLM's router and exception handlers would send them; for a
    stream, its status (200) is replaced by the error event's code, if one comes."""
    from vllm.entrypoints.openai.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.utils.error_response import create_error_response

    try:
        result = await call
    except Exception as e:  # noqa: BLE001 - the app's exception handlers answer these
        err = create_error_response(e)
        return err.error.code, err.model_dump()
    if isinstance(result, ErrorResponse):
        return result.error.code, result.model_dump()
    if hasattr(result, "__aiter__"):
        events = [chunk async for chunk in result]
        payloads = [json.loads(e[len("data: "):]) for e in events if e != "data: [DONE]\n\n"]
        errors = [p for p in payloads if "error" in p]
        return (errors[0]["error"]["code"], errors[0]) if errors else (200, payloads[-1])
    return 200, result.model_dump()


def _request(kind: str, model: str, stream: bool):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    if kind == "completion":
        return CompletionRequest(model=model, prompt=[3, 4, 5], max_tokens=2, stream=stream)
    return ChatCompletionRequest(model=model, messages=[{"role": "user", "content": "hi"}],
                                 max_tokens=2, stream=stream)


def _ask(serving, kind: str, model: str, stream: bool) -> tuple[int, dict]:
    completion, chat, _ = serving
    request = _request(kind, model, stream)
    call = (completion.create_completion(request) if kind == "completion"
            else chat.create_chat_completion(request))
    return asyncio.run(_answer(call))


CASES = [(kind, stream) for kind in ("completion", "chat") for stream in (False, True)]


@pytest.mark.parametrize("kind,stream", CASES)
@pytest.mark.parametrize("name,file,reason", [
    ("bad-config", CONFIG_NAME, "not valid JSON"),
    ("bad-rank", CONFIG_NAME, "above the configured maximum"),
])
def test_bad_config_answers_400_naming_adapter_file_and_reason(serving, kind, stream, name, file,
                                                               reason):
    """Refused at resolution (the engine's add_lora): vLLM's sentence, then the reason."""
    status, body = _ask(serving, kind, name, stream)
    assert status == 400, body
    message = body["error"]["message"]
    assert body["error"]["type"] == "BadRequestError" and body["error"]["param"] == "model"
    assert message.startswith(f"LoRA adapter '{name}' was found but could not be loaded: ")
    assert f"adapter '{name}'" in message.split(": ", 1)[1] and file in message and reason in message
    assert "Call to add_lora" not in message


@pytest.mark.parametrize("kind,stream", CASES)
def test_unreadable_weights_answer_400_with_the_reason_not_500(serving, kind, stream):
    """Found bad only when the weights are read: the request finishes with "error"."""
    status, body = _ask(serving, kind, "bad-weights", stream)
    assert status == 400, body
    error = body["error"]
    assert error["type"] == "BadRequestError" and error["param"] == "model"
    assert error["message"].startswith("adapter 'bad-weights'") and WEIGHTS_NAME in error["message"]
    assert "Internal server error" not in error["message"]
    assert not serving[2].aborted  # the request had finished: nothing to abort


@pytest.mark.parametrize("kind,stream", CASES)
def test_unknown_adapter_is_404_naming_it(serving, kind, stream):
    status, body = _ask(serving, kind, "no-such-adapter", stream)
    assert status == 404 and body["error"]["type"] == "NotFoundError"
    assert "no-such-adapter" in body["error"]["message"]


@pytest.mark.parametrize("name,phrase", [(".hidden/a", "hidden component"),
                                         ("../etc", "'..' path component")])
def test_refused_name_is_400_with_the_reason(serving, name, phrase):
    for kind, stream in CASES:
        status, body = _ask(serving, kind, name, stream)
        assert status == 400 and body["error"]["type"] == "BadRequestError", (kind, stream, body)
        assert name in body["error"]["message"] and phrase in body["error"]["message"]


@pytest.mark.parametrize("kind,stream", CASES)
def test_good_adapter_and_base_model_still_answer(serving, kind, stream):
    for model in ("good", "tiny"):
        status, body = _ask(serving, kind, model, stream)
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] in ("length", None), choice


def test_reason_of_a_failed_output_and_of_an_engine_refusal():
    from vllm.outputs import CompletionOutput, RequestOutput

    def out(finish_reason, stop_reason):
        c = CompletionOutput(0, "", [], None, None, finish_reason=finish_reason,
                             stop_reason=stop_reason)
        return RequestOutput("r", None, [1], None, [c], True)

    assert openai_errors.adapter_failure(out("error", "adapter 'a': bad")) == "adapter 'a': bad"
    assert openai_errors.adapter_failure(out("error", None)) is None  # vLLM's own errors
    assert openai_errors.adapter_failure(out("stop", "</s>")) is None
    assert openai_errors.refusal_reason(Exception("Call to add_lora method failed: adapter 'a': x")) \
        == "adapter 'a': x"
    assert str(openai_errors.AdapterRequestError("adapter 'a': x")) == "adapter 'a': x"


def test_a_client_that_goes_away_aborts_its_request_at_once(tiny_model_dir):
    """The wrapper closes vLLM's generator when its caller closes it (vLLM's serving code calls
    `aclose()` when a client disconnects), so the request is aborted then, not whenever the
    garbage collector finalizes the abandoned inner generator."""
    from vllm.inputs.engine import tokens_input
    from vllm.sampling_params import SamplingParams

    from vllm_cpu import build_vllm_config

    openai_errors.apply()
    engine = FakeEngine(store=None)
    llm = _async_llm(build_vllm_config(tiny_model_dir).model_config, engine)

    async def client_goes_away() -> None:
        gen = llm.generate(tokens_input([3, 4]), SamplingParams(max_tokens=2), "r1")
        first = await gen.__anext__()
        assert not first.finished
        await gen.aclose()
        assert engine.aborted == ["r1"]

    asyncio.run(client_goes_away())
