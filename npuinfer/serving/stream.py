"""One streamed ``/v1/completions`` request, timed chunk by chunk on the client's monotonic clock.

The SSE framing is split by hand (``data: {...}`` events separated by a blank line) because it is the client's
hot loop: every chunk is one JSON decode and a few dict reads, nothing else, so one core drives thousands of
tokens per second (the client's cost is measured per case: npuinfer.serving.load).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

_decode = json.JSONDecoder().decode  # on str: json.loads would sniff a bytes body's encoding every chunk


@dataclass(frozen=True)
class Prompt:
    """What one request sends (npuinfer.serving.workload makes them)."""

    text: str
    prompt_len: int  # tokens of ``text`` under the served model's tokenizer (no special tokens added)
    output_len: int


@dataclass
class RequestRecord:
    """What the client saw of one request (times: ``time.perf_counter()``, CLOCK_MONOTONIC, shared by the
    processes of one machine, so records of several client processes merge on one time line)."""

    index: int
    prompt_len: int  # the tokens the prompt was made to have
    output_len: int  # max_tokens asked
    sent: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk
    chunk_tokens: list[int] = field(default_factory=list)  # how many tokens each carried
    prompt_tokens: int | None = None  # usage.prompt_tokens, as the server counted
    completion_tokens: int | None = None  # usage.completion_tokens
    finish_reason: str | None = None
    error: str | None = None  # the first error body or the exception, for a failed request

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def latency(self) -> float:
        return self.end - self.sent

    @property
    def output_tokens(self) -> int:
        """usage's count where the server reported it, else the tokens counted in the chunks."""
        return self.completion_tokens if self.completion_tokens is not None else sum(self.chunk_tokens)

    def to_json(self) -> dict:
        return self.__dict__.copy()

    @classmethod
    def from_json(cls, data: dict) -> "RequestRecord":
        return cls(**data)


def completion_payload(model: str, prompt: str | list[int], output_len: int, *, ignore_eos: bool = True,
                       token_ids: bool = False) -> dict:
    """The request: streamed, usage in the last chunk, greedy, exactly ``output_len`` tokens (``ignore_eos``)."""
    payload = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}
    if ignore_eos:
        payload["ignore_eos"] = True
    if token_ids:  # vLLM: each chunk's token ids (a reader that fell behind gets two tokens in one chunk)
        payload["return_token_ids"] = True
    return payload


async def stream_completion(session: aiohttp.ClientSession, url: str, headers: dict[str, str], payload: dict,
                            record: RequestRecord) -> RequestRecord:
    """Send ``payload`` and fill ``record`` as the chunks arrive. Errors are kept in the record, never raised:
    a case counts its failed requests."""
    clock = time.perf_counter
    times, counts = record.chunk_times, record.chunk_tokens
    record.sent = clock()
    try:
        async with session.post(url, json=payload, headers=headers) as reply:
            if reply.status != 200:
                body = (await reply.read()).decode("utf-8", "replace")
                record.error = f"HTTP {reply.status}: {body[:500]}"
                return record
            buffer = b""
            async for data in reply.content.iter_any():  # whatever has arrived, as soon as it has
                now = clock()
                if buffer:
                    data = buffer + data
                events = data.split(b"\n\n")  # usually one whole event: the server sends one per HTTP chunk
                buffer = events.pop()  # what follows the last separator: an incomplete event, or b""
                for event in events:
                    if not event.startswith(b"data:"):
                        continue  # comments and keep-alives
                    body = event[5:].strip()
                    if body == b"[DONE]":
                        continue
                    _chunk(_decode(body.decode()), now, times, counts, record)
    except asyncio.TimeoutError:
        record.error = "no answer within the request timeout (--request-timeout)"
    except (aiohttp.ClientError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.end = clock()
    if record.error is None and not times:
        record.error = "the stream ended without a token"
    return record


def _chunk(chunk: dict, now: float, times: list[float], counts: list[int], record: RequestRecord) -> None:
    if "error" in chunk:  # an error reported inside the stream (vLLM does so once streaming has begun)
        record.error = f"error in the stream: {json.dumps(chunk['error'])[:500]}"
        return
    usage = chunk.get("usage")
    if usage:
        record.prompt_tokens = usage.get("prompt_tokens")
        record.completion_tokens = usage.get("completion_tokens")
    for choice in chunk.get("choices") or ():
        # Every chunk with a choice is an arrival, as vllm bench serve counts them (a token that is an incomplete
        # UTF-8 sequence arrives with empty text); it carries its token ids' count where the server sends them.
        ids = choice.get("token_ids")
        times.append(now)
        counts.append(len(ids) if ids is not None else 1)
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
