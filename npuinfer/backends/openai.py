"""``--backend openai``: a served deployment (MindIE Service, vllm-ascend, vLLM, any OpenAI-compatible server).

Log-likelihood scoring, prompts sent as token ids made with the served model's tokenizer (``--tokenizer DIR``),
``--logprob-requests``:

- ``per-choice`` is lm-evaluation-harness's ``local-completions``, request for request: each choice's prompt to
  ``/v1/completions`` with ``echo``, ``logprobs`` 1, ``max_tokens`` 1 and temperature 0; a request's input is
  ``(context + continuation)[-(L - 1):]`` for ``--max-length`` L (lm-eval keeps one position for the generated
  token), its log-likelihood the sum of the echoed ``token_logprobs`` over the continuation, ``is_greedy`` each
  token against the best of its ``top_logprobs``. The server computes every prompt position's log-probs and, for
  that, reads nothing from its prefix cache (vLLM skips it for prompt log-probs).
- ``per-context`` (default): each continuation token is a question about the tokens before it, asked with
  ``max_tokens`` 1 and vLLM's ``logprob_token_ids`` (the raw log-probs of exactly those tokens at the next
  position, the greedy token beside them), one prompt per distinct prefix: C-Eval's four one-token choices are one
  prompt per question, the context lm-eval's truncation leaves; a choice's second token is asked after the first
  level, of a prompt that extends one the server has just seen (its prefix cache may hold it). The same numbers up
  to float rounding (a position's logits computed in another pass), a quarter of the prompts, and no prompt
  log-probs, which keep vLLM from reading its prefix cache. A server that does not answer so
  (``PerChoiceFallback`` warns) is asked per choice from then on.

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
        self._tls = httpx.create_ssl_context()  # once: a client made for every wave would load the CA file again
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
            async with httpx.AsyncClient(timeout=self.endpoint.timeout_s, verify=self._tls) as client:
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
        echoed = list(range(len(requests)))
        if self.per_context:
            levels, echoed = next_token_steps(fitted)
            left = {i: len(prompt) - ctxlen for i, (prompt, ctxlen) in enumerate(fitted) if ctxlen >= 1}
            total = dict.fromkeys(left, 0.0)
            greedy = dict.fromkeys(left, True)
            for level in levels:  # a level's prefixes extend the last level's: the server may have them cached
                for members, got in self._ask_next_tokens(level, batch_size, counters):
                    logprobs, greedy_token = got
                    for i, token in members:
                        total[i] += logprobs[token]
                        greedy[i] = greedy[i] and token == greedy_token
                        left[i] -= 1
                        if not left[i]:
                            yield i, Loglikelihood(total[i], greedy[i])
                if not self.per_context:  # the server could not answer so: the rest per choice
                    break
            echoed = sorted(echoed + [i for i, n in left.items() if n])
        yield from self._score_echoed(echoed, requests, fitted, batch_size, counters)

    def _ask_next_tokens(self, level: dict[tuple[int, ...], list[tuple[int, int]]], batch_size: int,
                         counters: WorkCounters
                         ) -> Iterator[tuple[list[tuple[int, int]], tuple[dict[int, float], int]]]:
        """One prompt per prefix: the log-probs of the tokens its members ask at the next position, from vLLM's
        ``logprob_token_ids`` (raw log-probs, before any sampling setting), and the greedy token. A server that does
        not answer so stops this (``per_context`` False, a warning); its prefixes are left unanswered."""
        groups = list(level.items())
        batches = [groups[b:b + batch_size] for b in range(0, len(groups), batch_size)]
        wave = max(1, self.endpoint.concurrent)
        for w in range(0, len(batches), wave):
            part = batches[w:w + wave]
            payloads = [{"model": self.endpoint.served_model, "prompt": [list(prefix) for prefix, _ in batch],
                         "max_tokens": 1, "logprobs": 1,
                         "logprob_token_ids": sorted({t for _, members in batch for _, t in members}),
                         "return_tokens_as_token_ids": True, "temperature": 0, "seed": 1234} for batch in part]
            try:
                answers = self._run(payloads)
            except EndpointError as exc:
                if not _refused_field(str(exc)):
                    raise _without_logprobs(exc) from None
                self._stop_per_context(f"it refused logprob_token_ids ({str(exc)[:300]})")
                return
            for batch, answer in zip(part, answers):
                choices = sorted(answer["choices"], key=lambda c: c["index"])
                if len(choices) != len(batch):
                    raise EndpointError(f"{self.endpoint.label}: {len(choices)} choices for {len(batch)} prompts")
                counters.forwards += 1
                for (prefix, members), choice in zip(batch, choices):
                    got = _next_token_logprobs(choice)
                    if got is None or any(t not in got[0] for _, t in members):
                        self._stop_per_context("its answer did not hold the asked tokens' log-probs "
                                               "(logprob_token_ids with return_tokens_as_token_ids)")
                        return
                    counters.prompt_tokens += len(prefix)
                    counters.padded_tokens += len(prefix)
                    yield members, got

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


def next_token_steps(fitted: Sequence[tuple[list[int], int]]
                     ) -> tuple[list[dict[tuple[int, ...], list[tuple[int, int]]]], list[int]]:
    """Each continuation token as a question about the tokens before it: by depth (a continuation's k-th token at
    level k), prefix -> [(request index, token)], so every choice of a question sharing a context is one prompt
    (C-Eval's " A".." D": one prompt per question). Prompts are lm-eval's truncation (``api_fit``); a request
    whose context it leaves empty is asked per choice (the second list), as lm-eval cannot score its first token
    either."""
    levels: list[dict[tuple[int, ...], list[tuple[int, int]]]] = []
    echoed = []
    for i, (prompt, ctxlen) in enumerate(fitted):
        if ctxlen < 1:
            echoed.append(i)
            continue
        for k in range(len(prompt) - ctxlen):
            if len(levels) <= k:
                levels.append({})
            levels[k].setdefault(tuple(prompt[:ctxlen + k]), []).append((i, prompt[ctxlen + k]))
    return levels, echoed


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
