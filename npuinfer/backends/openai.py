"""``--backend openai``: a served deployment (MindIE Service, vllm-ascend, vLLM, any OpenAI-compatible server).

Log-likelihood scoring, prompts sent as token ids made with the served model's tokenizer (``--tokenizer DIR``),
``--logprob-requests``:

- ``per-choice`` is lm-evaluation-harness's ``local-completions``, request for request: each choice's prompt to
  ``/v1/completions`` with ``echo``, ``logprobs`` 1, ``max_tokens`` 1 and temperature 0; a request's input is
  ``(context + continuation)[-(L - 1):]`` for ``--max-length`` L (lm-eval keeps one position for the generated
  token), its log-likelihood the sum of the echoed ``token_logprobs`` over the continuation, ``is_greedy`` each
  token against the best of its ``top_logprobs``. The server computes every prompt position's log-probs and, for
  that, reads nothing from its prefix cache (vLLM skips it for prompt log-probs).
- ``per-context`` (default): where every choice is one token (C-Eval's " A".." D"), one prompt per question, the
  same context lm-eval's truncation leaves, with ``max_tokens`` 1 and vLLM's ``logprob_token_ids``: the server
  returns the raw log-probs of exactly those tokens at the next position, the greedy token beside them. The same
  numbers up to float rounding (the last position's logits computed in a shorter, possibly prefix-cached, pass),
  a quarter of the prompts, and a few-shot prefix shared by a subject's questions served from the prefix cache.
  A longer choice is asked per choice; a server that does not answer so (``PerChoiceFallback`` warns) is asked per
  choice from then on.

Several prompts go in one request (``--ceval-batch-size``) and ``--num-concurrent`` requests are in flight; a 5xx
answer or a time-out (``--request-timeout``) is retried with backoff. ``--max-length`` defaults to lm-eval's 2048
(or the server's ``max_model_len`` when smaller).

``--scoring generate`` asks ``/v1/completions`` greedily for the answer letter (the Ascend tool's way), or with
``--chat`` ``/v1/chat/completions``: the prompt decoded to text as one user message, under the server's chat
template.

``bench/`` times a served deployment by its own cases (streamed requests: npuinfer.serving), not through this class.
The API key is read from the environment variable ``--api-key-env`` names; it never reaches a row, log or cache.
"""
from __future__ import annotations

import asyncio
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from ..families import family_of_config
from ..hf_config import read_config
from ..tokenizer import Tokenizer, load_tokenizer
from .base import BackendUnsupported, GenerateRequest, Generation, Identity, Loglikelihood, LoglikelihoodRequest, \
    WorkCounters

DEFAULT_MAX_LENGTH = 2048  # lm-eval's for API models
RETRIES = 4  # after the first try: 5xx answers and time-outs
BACKOFF_S = 0.5  # doubled each retry


class PerChoiceFallback(UserWarning):
    """The server could not score per context (--logprob-requests per-context): the run asks per choice instead."""


class EndpointError(RuntimeError):
    """A request the server answered with an error, or did not answer, after the retries."""


@dataclass(frozen=True)
class Endpoint:
    """Where the server is; ``label`` never holds credentials."""

    base_url: str  # ...://host:port/v1
    served_model: str
    api_key: str | None = None
    timeout_s: float = 600.0
    concurrent: int = 1

    @property
    def label(self) -> str:
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def api_fit(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """lm-eval's API truncation: the prompt ``(context + continuation)[-(L - 1):]`` and how many of its tokens are
    context (api_models.batch_loglikelihood_requests)."""
    keep = max_length - 1
    whole = list(context) + list(continuation)
    return whole[-keep:], len(context) - max(0, len(whole) - keep)


class OpenAIBackend:
    """The scoring half of the backend interface over an OpenAI-compatible ``/v1/completions``."""

    name = "openai"
    dtype = None
    device = None
    weights = "served"

    def __init__(self, endpoint: Endpoint, tokenizer: Tokenizer, tokenizer_dir: str, max_length: int | None = None,
                 chat: bool = False, logprob_requests: str = "per-context"):
        self.endpoint = endpoint
        self.per_context = logprob_requests == "per-context"  # False after a server that cannot answer so
        self.chat = chat  # generate_until asks /v1/chat/completions, the prompt as one user message
        self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir
        self.server_max_length, self.server_version = self._check_server()
        self.max_seq_len = max_length or min(DEFAULT_MAX_LENGTH, self.server_max_length or DEFAULT_MAX_LENGTH)
        self.vocab_size = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else 0
        # What the answers come from, compared by the cache: a chat run's generations never mix with a completion's.
        self.checkpoint = f"{endpoint.label}{'/chat/completions' if chat else ''} {endpoint.served_model}"

    # ---- identity ------------------------------------------------------------------------------
    def identity(self) -> Identity:
        return Identity(backend=self.name, model=self.endpoint.served_model, checkpoint=self.checkpoint,
                        weights=self.weights, dtype="server", max_length=self.max_seq_len,
                        tokenizer=self.tokenizer_dir,
                        provenance={"endpoint": self.endpoint.label, "server_version": self.server_version or "",
                                    "tokenizer": self.tokenizer_dir,
                                    "logprob_requests": "per-context" if self.per_context else "per-choice"})

    def unsupported(self, suite: str) -> str | None:
        return None  # bench/ measures a served deployment by its own cases (npuinfer.pytest_plugin.serving)

    def generate(self, input_ids, attention_mask, max_new_tokens, observer=None):
        raise BackendUnsupported("a served deployment is timed by bench/test_serving.py's streamed requests, not by "
                                 "timed generate calls")

    # ---- the server ----------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return self.endpoint.base_url.rstrip("/") + path

    def _check_server(self) -> tuple[int | None, str | None]:
        """One clear error before any case: unreachable, not OpenAI-compatible, or the model not served."""
        try:
            reply = httpx.get(self._url("/models"), headers=self.endpoint.headers(), timeout=30)
        except httpx.HTTPError as exc:
            raise BackendUnsupported(f"--base-url {self.endpoint.label}: no server answers there ({exc})") from None
        if reply.status_code != 200:
            raise BackendUnsupported(f"--base-url {self.endpoint.label}: GET /models answered {reply.status_code}: "
                                     f"{reply.text[:300]} (not an OpenAI-compatible server?)")
        try:
            models = {m["id"]: m for m in reply.json()["data"]}
        except (ValueError, KeyError, TypeError):
            raise BackendUnsupported(f"--base-url {self.endpoint.label}: GET /models did not return an OpenAI model "
                                     f"list: {reply.text[:300]}") from None
        if self.endpoint.served_model not in models:
            raise BackendUnsupported(f"--served-model {self.endpoint.served_model}: not served at "
                                     f"{self.endpoint.label}; it serves {', '.join(models) or 'nothing'}")
        version = None
        root = self.endpoint.base_url.rstrip("/").rsplit("/v1", 1)[0]
        try:
            answer = httpx.get(root + "/version", timeout=10)
            if answer.status_code == 200:
                version = str(answer.json().get("version"))
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        return models[self.endpoint.served_model].get("max_model_len"), version

    async def _post(self, client: httpx.AsyncClient, payload: dict) -> dict:
        path = "/chat/completions" if "messages" in payload else "/completions"
        delay = BACKOFF_S
        for attempt in range(RETRIES + 1):
            try:
                reply = await client.post(self._url(path), json=payload, headers=self.endpoint.headers())
            except httpx.TimeoutException as exc:
                problem = f"no answer within {self.endpoint.timeout_s:g} s ({type(exc).__name__})"
            except httpx.TransportError as exc:
                raise EndpointError(f"{self.endpoint.label}: the server stopped answering: {exc}") from None
            else:
                if reply.status_code < 500:
                    if reply.status_code != 200:
                        raise EndpointError(f"{self.endpoint.label}{path} answered {reply.status_code}: "
                                            f"{reply.text[:500]}")
                    return reply.json()
                problem = f"{reply.status_code}: {reply.text[:300]}"
            if attempt < RETRIES:
                await asyncio.sleep(delay)
                delay *= 2
        raise EndpointError(f"{self.endpoint.label}{path} failed {RETRIES + 1} times; last: {problem}")

    def _run(self, payloads: list[dict]) -> list[dict]:
        """POST every payload, ``concurrent`` in flight; the answers in order."""
        async def main() -> list[dict]:
            limit = asyncio.Semaphore(self.endpoint.concurrent)
            async with httpx.AsyncClient(timeout=self.endpoint.timeout_s) as client:
                async def one(payload: dict) -> dict:
                    async with limit:
                        return await self._post(client, payload)
                return await asyncio.gather(*(one(p) for p in payloads))

        return asyncio.run(main())

    # ---- scoring -------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest], *, max_length: int | None = None,
                      batch_size: int = 8, counters: WorkCounters | None = None, share_prefix: bool = True
                      ) -> Iterator[tuple[int, Loglikelihood]]:
        limit = min(self.max_seq_len, max_length or self.max_seq_len)
        counters = counters if counters is not None else WorkCounters()
        fitted = [api_fit(r.context, r.continuation, limit) for r in requests]
        per_choice = list(range(len(requests)))
        if self.per_context:
            contexts, per_choice = one_token_contexts(requests, fitted)
            unanswered: list[int] = []
            for i, result in self._score_contexts(contexts, requests, batch_size, counters, unanswered):
                yield i, result
            per_choice = sorted(per_choice + unanswered)
        yield from self._score_echoed(per_choice, requests, fitted, batch_size, counters)

    def _score_contexts(self, contexts: dict[tuple[int, ...], list[int]], requests: Sequence[LoglikelihoodRequest],
                        batch_size: int, counters: WorkCounters, unanswered: list[int]
                        ) -> Iterator[tuple[int, Loglikelihood]]:
        """One prompt per context: the log-probs of its continuations' tokens at the next position, from vLLM's
        ``logprob_token_ids`` (raw log-probs, before any sampling setting); ``is_greedy`` is whether the greedy
        token is the continuation's. A server that does not answer so leaves its requests in ``unanswered`` and
        this backend asks per choice from then on."""
        groups = list(contexts.items())
        batches = [groups[b:b + batch_size] for b in range(0, len(groups), batch_size)]
        wave = max(1, self.endpoint.concurrent)
        for w in range(0, len(batches), wave):
            if not self.per_context:
                unanswered.extend(i for batch in batches[w:] for _, members in batch for i in members)
                return
            part = batches[w:w + wave]
            payloads = []
            for batch in part:
                wanted = sorted({requests[i].continuation[0] for _, members in batch for i in members})
                payloads.append({"model": self.endpoint.served_model, "prompt": [list(ctx) for ctx, _ in batch],
                                 "max_tokens": 1, "logprobs": 1, "logprob_token_ids": wanted,
                                 "return_tokens_as_token_ids": True, "temperature": 0, "seed": 1234})
            try:
                answers = self._run(payloads)
            except EndpointError as exc:
                if not _refused_field(str(exc)):
                    raise _without_logprobs(exc) from None
                self._stop_per_context(f"it refused logprob_token_ids ({str(exc)[:300]})")
                unanswered.extend(i for batch in batches[w:] for _, members in batch for i in members)
                return
            for batch, answer in zip(part, answers):
                choices = sorted(answer["choices"], key=lambda c: c["index"])
                if len(choices) != len(batch):
                    raise EndpointError(f"{self.endpoint.label}: {len(choices)} choices for {len(batch)} prompts")
                counters.forwards += 1
                for (ctx, members), choice in zip(batch, choices):
                    got = _next_token_logprobs(choice)
                    if got is None or any(requests[i].continuation[0] not in got[0] for i in members):
                        self._stop_per_context("its answer did not hold the asked tokens' log-probs "
                                               "(logprob_token_ids with return_tokens_as_token_ids)")
                        unanswered.extend(members)
                        continue
                    logprobs, greedy_token = got
                    counters.prompt_tokens += len(ctx)
                    counters.padded_tokens += len(ctx)
                    for i in members:
                        token = requests[i].continuation[0]
                        yield i, Loglikelihood(logprobs[token], token == greedy_token)

    def _stop_per_context(self, why: str) -> None:
        if self.per_context:
            self.per_context = False
            warnings.warn(PerChoiceFallback(f"{self.endpoint.label}: scoring per choice (echo + logprobs) from now "
                                            f"on, not per context: {why}"), stacklevel=2)

    def _score_echoed(self, indices: Sequence[int], requests: Sequence[LoglikelihoodRequest],
                      fitted: Sequence[tuple[list[int], int]], batch_size: int, counters: WorkCounters
                      ) -> Iterator[tuple[int, Loglikelihood]]:
        """lm-eval's local-completions, request for request: each choice's whole prompt with echo + logprobs."""
        batches = [list(indices[b:b + batch_size]) for b in range(0, len(indices), batch_size)]
        wave = max(1, self.endpoint.concurrent)
        for w in range(0, len(batches), wave):  # results leave as each wave of requests finishes
            part = batches[w:w + wave]
            payloads = [{"model": self.endpoint.served_model, "prompt": [fitted[i][0] for i in batch],
                         "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234}
                        for batch in part]
            try:
                answers = self._run(payloads)
            except EndpointError as exc:
                raise _without_logprobs(exc) from None
            for batch, answer in zip(part, answers):
                choices = sorted(answer["choices"], key=lambda c: c["index"])
                if len(choices) != len(batch):
                    raise EndpointError(f"{self.endpoint.label}: {len(choices)} choices for {len(batch)} prompts")
                counters.forwards += 1
                for i, choice in zip(batch, choices):
                    prompt, ctxlen = fitted[i]
                    counters.prompt_tokens += len(prompt)
                    counters.padded_tokens += len(prompt)
                    yield i, _continuation_logprob(choice, ctxlen, len(requests[i].continuation),
                                                   self.endpoint.label)

    def generate_until(self, requests: Sequence[GenerateRequest], *, max_length: int | None = None,
                       batch_size: int = 8, counters: WorkCounters | None = None, share_prefix: bool = True
                       ) -> Iterator[tuple[int, Generation]]:
        limit = min(self.max_seq_len, max_length or self.max_seq_len)
        counters = counters if counters is not None else WorkCounters()
        payloads = []
        for r in requests:  # lm-eval: the context keeps max_length - max_gen_toks tokens
            prompt = list(r.context)[-(limit - r.max_new_tokens):]
            payload = {"model": self.endpoint.served_model, "max_tokens": r.max_new_tokens, "temperature": 0,
                       "seed": 1234}
            if self.chat:  # a chat message is text: the server applies its chat template and tokenizes it
                payload["messages"] = [{"role": "user", "content": self.tokenizer.decode(prompt, skip_special=False)}]
            else:
                payload["prompt"] = prompt
            if r.until:
                payload["stop"] = list(r.until)
            payloads.append(payload)
            counters.prompt_tokens += len(prompt)
        wave = max(1, self.endpoint.concurrent) * batch_size
        for w in range(0, len(payloads), wave):
            for k, answer in enumerate(self._run(payloads[w:w + wave])):
                i = w + k
                first = answer["choices"][0]
                text = ((first.get("message") or {}).get("content") or "") if self.chat else first["text"]
                stop = requests[i].stop
                if stop is not None:  # the shortest prefix that passes, as in-process generation stops there
                    text = next((text[:n] for n in range(1, len(text) + 1) if stop(text[:n])), text)
                counters.forwards += 1
                yield i, Generation(text)


def one_token_contexts(requests: Sequence[LoglikelihoodRequest], fitted: Sequence[tuple[list[int], int]]
                       ) -> tuple[dict[tuple[int, ...], list[int]], list[int]]:
    """The requests scored by one prompt per context: those whose continuation is one token, grouped by the
    context lm-eval's truncation leaves them (the fitted prompt less its last token); and the others."""
    contexts: dict[tuple[int, ...], list[int]] = {}
    rest = []
    for i, (request, (prompt, _)) in enumerate(zip(requests, fitted)):
        if len(request.continuation) == 1 and len(prompt) > 1:
            contexts.setdefault(tuple(prompt[:-1]), []).append(i)
        else:
            rest.append(i)
    return contexts, rest


def _without_logprobs(exc: EndpointError) -> EndpointError:
    """A refusal of log-probs (echo, logprobs) says what to do instead; another error is left as it is."""
    if "echo" in str(exc) or "logprobs" in str(exc):
        return EndpointError(f"{exc}\nthis server does not return prompt log-probabilities (echo + logprobs); score "
                             "by generation instead: --scoring generate")
    return exc


def _refused_field(error: str) -> bool:
    """Whether a server's 4xx answer refuses the per-context request's fields (a server that forbids unknown ones)."""
    return any(word in error for word in ("logprob_token_ids", "return_tokens_as_token_ids", "extra_forbidden",
                                          "Extra inputs"))


def _next_token_logprobs(choice: dict) -> tuple[dict[int, float], int] | None:
    """The log-probs at the generated position by token id, and the greedy token; None where the answer holds
    no ``token_id:N`` keys (a server without return_tokens_as_token_ids)."""
    logprobs = choice.get("logprobs") or {}
    tokens, tops = logprobs.get("tokens") or [], logprobs.get("top_logprobs") or []
    if not tokens or not tops or not isinstance(tops[0], dict):
        return None
    try:
        got = {_token_id(key): float(value) for key, value in tops[0].items()}
        return got, _token_id(tokens[0])
    except ValueError:
        return None


def _token_id(key: str) -> int:
    if not key.startswith("token_id:"):
        raise ValueError(key)
    return int(key[len("token_id:"):])


def _continuation_logprob(choice: dict, ctxlen: int, n: int, where: str) -> Loglikelihood:
    logprobs = choice.get("logprobs") or {}
    token_lps = logprobs.get("token_logprobs")
    tops = logprobs.get("top_logprobs")
    if token_lps is None or len(token_lps) < ctxlen + n:
        raise EndpointError(f"{where}: the answer holds no echoed prompt log-probabilities (echo + logprobs); "
                            "score by generation instead: --scoring generate")
    picked = token_lps[ctxlen:ctxlen + n]
    greedy = all(top is not None and lp >= max(top.values()) for lp, top in zip(picked, (tops or [])[ctxlen:ctxlen + n]))
    return Loglikelihood(float(sum(picked)), bool(greedy and tops))


def make_openai_backend(source) -> OpenAIBackend:
    """The openai backend for a BackendSource: --base-url, --served-model and --tokenizer are required."""
    config = source.config
    missing = [flag for flag, value in (("--base-url", config.base_url), ("--served-model", config.served_model),
                                        ("--tokenizer", config.tokenizer)) if not value]
    if missing:
        raise BackendUnsupported(f"--backend openai needs {', '.join(missing)}")
    key = None
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise BackendUnsupported(f"--api-key-env {config.api_key_env}: that environment variable is not set")
    endpoint = Endpoint(config.base_url, config.served_model, key, config.request_timeout, config.num_concurrent)
    tok_dir = Path(config.tokenizer)  # the served model's directory: its config.json says which tokenizer files
    tokenizer = load_tokenizer(tok_dir, family_of_config(read_config(tok_dir), str(tok_dir / "config.json")))
    return OpenAIBackend(endpoint, tokenizer, str(tok_dir), config.max_length, config.chat, config.logprob_requests)


def wait_until_healthy(base_url: str, timeout_s: float) -> bool:
    """Poll ``/health`` until the server answers 200 (True) or ``timeout_s`` passes (False)."""
    root = base_url.rstrip("/").rsplit("/v1", 1)[0]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(root + "/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False
