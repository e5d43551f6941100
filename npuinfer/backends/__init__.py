"""The backend table: every engine both suites can measure, chosen by ``--backend NAME``.

Built in: ``npuinfer`` (npuinfer's runtime), ``hf`` (transformers on the same checkpoint) and ``openai`` (a
served deployment's OpenAI-compatible endpoint). A plugin adds one
under the ``npuinfer.backends`` entry-point group: the entry point names a factory taking a ``BackendSource``
and returning an object with the ``base.Backend`` interface. The suites reach a model only through that
interface (npuinfer.backends.base).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

from ..device import Device
from ..options import RunConfig
from ..runtime import LoadedModel
from .base import Backend, BackendUnsupported
from .hf import hf_refusal, make_hf_backend
from .npuinfer import NpuinferBackend
from .openai import make_openai_backend

ENTRY_POINT_GROUP = "npuinfer.backends"
DEFAULT_BACKEND = "npuinfer"


@dataclass(frozen=True)
class BackendSource:
    """What a factory gets: the run's settings, the device, and npuinfer's own model for them (loaded on first
    call, once per session: a backend over the same weights, such as hf over dummy weights, shares it)."""

    config: RunConfig
    device: Device
    local: Callable[[], LoadedModel]


BackendFactory = Callable[[BackendSource], Backend]

BUILTIN: dict[str, BackendFactory] = {
    "npuinfer": lambda source: NpuinferBackend(source.local()),
    "hf": make_hf_backend,
    "openai": make_openai_backend,
}


# Per backend, why it cannot run a model, from the run's settings alone (no weights read): said before any case
# runs. A backend with none here says it when it is made.
REFUSALS: dict[str, Callable[[RunConfig], str | None]] = {"hf": hf_refusal}


def refusal(name: str, config: RunConfig) -> str | None:
    """Why backend ``name`` cannot run ``config``'s model, or None."""
    check = REFUSALS.get(name)
    return check(config) if check is not None else None


def backend_factories() -> dict[str, BackendFactory]:
    """Built-ins, then the entry points of installed plugins (a plugin cannot replace a built-in)."""
    table = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        table.setdefault(ep.name, ep.load())
    return table


def backend_names() -> list[str]:
    return list(backend_factories())


def make_backend(name: str, source: BackendSource) -> Backend:
    factories = backend_factories()
    if name not in factories:
        raise BackendUnsupported(f"--backend {name}: unknown backend; known: {', '.join(factories)}")
    return factories[name](source)


__all__ = ["BUILTIN", "Backend", "BackendSource", "BackendUnsupported", "DEFAULT_BACKEND", "backend_names",
           "make_backend", "refusal"]
