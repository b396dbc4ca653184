"""The Python library API: connect to a swarm (or run the model in this process) and generate.

    import dsdnode

    with dsdnode.connect("smollm2-135m", local=True, hops=2) as client:
        print(client.generate("def add(a, b):", max_new_tokens=16, k=4).text)
        for piece in client.stream("Write a haiku about rain", max_new_tokens=32):
            print(piece, end="", flush=True)

    async with await dsdnode.connect_async("qwen2.5-coder-1.5b", bootstrap=["/ip4/.../p2p/..."]) as client:
        out = await client.generate("Write a quicksort in Python")
        async for piece in client.stream("Explain it"):
            ...

Options of generate/stream are GenerateOptions' fields (max_new_tokens, k, k_max, temperature,
top_p, seed, adaptive, tau, overlap); a prompt is text (wrapped in the model's chat template unless
chat=False) or a list of token ids. The sync Client runs an AsyncClient on an event loop of its own
in a background thread, so it works from scripts and notebooks alike."""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Literal

from .loading import encode_prompt
from .service import ClientService, Generation, GenerateOptions, build_service
from .streaming import TextStream
from ..errors import BadValue

_END = object()


class AsyncClient:
    """A client of one model: its tokenizer, head and draft, and a chain source (swarm or local)."""

    def __init__(self, service: ClientService):
        self.service = service

    @classmethod
    async def connect(cls, model: str, *, bootstrap: list[str] | tuple[str, ...] = (), local: bool = False,
                      hops: int = 4, draft: str | bool = True, dtype: Literal["bfloat16", "float16", "float32"] | None = None,
                      device: str = "auto", link_latency_ms: float = 0.0, relay: bool = False,
                      draft_int8: bool | None = None, draft_vocab: int | None = None,
                      private_layers: int = 0) -> AsyncClient:
        """model: a registry name or a directory. draft: True for the registry's pairing, False for
        none, or a model name/directory; with no draft model sharing the target's vocabulary,
        generations with k != 0 draft by prompt lookup (Generation.drafting says which drafted;
        service.models.draft_fallback says why). local: run the target in this process
        as `hops` spans (no network); otherwise join the swarm through `bootstrap` multiaddrs.
        device: where the head, the draft (and with local, the spans) compute: auto (CUDA, then
        MPS, then CPU), cpu, cuda, cuda:N or mps. dtype: None for the device's default (bfloat16;
        float16 on GPUs without bfloat16 and on MPS).
        link_latency_ms: emulated delay of every link (benchmarks); relay: carry each block through
        the client between hops (a baseline, slower). draft_int8 / draft_vocab: a cheaper draft
        (int8 layers; only the most frequent tokens), None: the device's default (both on a CPU).
        private_layers: run the target's first N layers in this process, so no server sees token
        embeddings (client/private.py; costs their memory and compute here), swarm only."""
        service = await asyncio.get_running_loop().run_in_executor(None, functools.partial(
            build_service, model, bootstrap=bootstrap, local=local, hops=hops, draft=draft, dtype=dtype,
            device=device, link_latency_ms=link_latency_ms, relay=relay, draft_int8=draft_int8,
            draft_vocab=draft_vocab, private_layers=private_layers))
        await service.start()
        return cls(service)

    def encode(self, prompt: str | list[int], chat: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return encode_prompt(self.service.models.tokenizer, prompt, chat)
        vocab = self.service.models.head.config.vocab_size
        if not prompt or any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise BadValue(f"a prompt of token ids must be a non-empty list of ints in 0..{vocab - 1}")
        return list(prompt)

    async def generate(self, prompt: str | list[int], options: GenerateOptions | None = None, *, chat: bool = True,
                       on_text: Callable[[str], object] | None = None, **kwargs) -> Generation:
        """Generate after `prompt` with `options` (or GenerateOptions(**kwargs)); returns the text,
        tokens, per-round statistics and the route. on_text is called with each new piece of text."""
        ids, opts = self.encode(prompt, chat), _options(options, kwargs)
        on_tokens = TextStream(self.service.models.tokenizer, on_text).push if on_text else None
        return await self.service.generate(ids, opts, on_tokens)

    async def stream(self, prompt: str | list[int], options: GenerateOptions | None = None, *, chat: bool = True,
                     **kwargs) -> AsyncIterator[str]:
        """Yield the text as it is generated (never half a character)."""
        ids, opts = self.encode(prompt, chat), _options(options, kwargs)
        pieces: asyncio.Queue = asyncio.Queue()
        text = TextStream(self.service.models.tokenizer, pieces.put_nowait)

        async def run() -> None:
            try:
                await self.service.generate(ids, opts, on_tokens=text.push)
            finally:
                pieces.put_nowait(_END)
        task = asyncio.create_task(run())
        try:
            while (piece := await pieces.get()) is not _END:
                yield piece
            await task  # raises what the generation raised
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        await self.service.stop()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class Client:
    """The same API, synchronous: an AsyncClient on an event loop in a background thread."""

    def __init__(self, model: str, **connect_options):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dsdnode-client", daemon=True)
        self._thread.start()
        try:
            self._client: AsyncClient = self._call(AsyncClient.connect(model, **connect_options))
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def service(self) -> ClientService:
        return self._client.service

    def generate(self, prompt: str | list[int], options: GenerateOptions | None = None, *, chat: bool = True,
                 on_text: Callable[[str], object] | None = None, **kwargs) -> Generation:
        return self._call(self._client.generate(prompt, options, chat=chat, on_text=on_text, **kwargs))

    def stream(self, prompt: str | list[int], options: GenerateOptions | None = None, *, chat: bool = True,
               **kwargs) -> Iterator[str]:
        pieces: queue.Queue = queue.Queue()

        async def pump() -> None:
            try:
                async for piece in self._client.stream(prompt, options, chat=chat, **kwargs):
                    pieces.put(piece)
            except BaseException as e:
                pieces.put(e)
            finally:
                pieces.put(_END)
        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (piece := pieces.get()) is not _END:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            future.cancel()

    def close(self) -> None:
        if self._loop.is_running():
            try:
                self._call(self._client.close())
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _options(options: GenerateOptions | None, kwargs: dict) -> GenerateOptions:
    if options is not None and kwargs:
        raise TypeError(f"give either options or keyword options, not both ({sorted(kwargs)})")
    return options if options is not None else GenerateOptions(**kwargs)


def connect(model: str, **options) -> Client:
    """A synchronous client; see AsyncClient.connect for the options."""
    return Client(model, **options)


async def connect_async(model: str, **options) -> AsyncClient:
    """An asyncio client; see AsyncClient.connect for the options."""
    return await AsyncClient.connect(model, **options)

