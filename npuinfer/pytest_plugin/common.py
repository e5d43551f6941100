"""Options and fixtures every suite shares: which models, which device, where results go (the options
themselves are defined once, in npuinfer.options, for the CLI too)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..device import Device, get_device
from ..parallel import dist as tp_dist
from ..parallel.launch import run_under_torchrun
from ..options import (
    MODELS_DEST,
    RunConfig,
    add_backend_option,
    add_baseline_option,
    add_device_options,
    add_endpoint_options,
    add_model_options,
    add_runtime_options,
)
from ..locate import ModelUnavailable, locate_config
from ..registry import DEFAULT_MODEL, MODELS, discover_models, get_spec
from ..runtime import LoadedModel, load
from ..backends import Backend, BackendSource, BackendUnsupported, backend_names, make_backend, refusal

GROUP = "npuinfer"
SERVED_BACKENDS = ("openai",)  # backends that measure a server: no local model, the case model is the served one
_SERVED = pytest.StashKey[Backend]()


def served_backend(config: pytest.Config) -> Backend | None:
    """The session's served backend (made and checked at configure time), None for in-process backends."""
    return config.stash.get(_SERVED, None)


def _no_local_model():
    raise BackendUnsupported("a served backend has no local model")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP, "npuinfer: models, device and results")
    add_model_options(group.addoption, several=True)  # the same definitions as `npuinfer infer` (npuinfer.options)
    add_device_options(group.addoption)
    add_runtime_options(group.addoption)
    add_backend_option(group.addoption)  # the engine both suites measure (npuinfer.backends)
    add_endpoint_options(group.addoption)
    add_baseline_option(group.addoption)  # read by the bench and the accuracy suites
    group.addoption("--results-dir", default="results", dest="npuinfer_results_dir",
                    help="where CSV, markdown and plots are written (default results/)")


_SESSION_RUN = pytest.StashKey[RunConfig]()


def session_run(config: pytest.Config) -> RunConfig:
    """The session's run settings (model=None: a case's model comes from its parameters), read once."""
    if _SESSION_RUN not in config.stash:
        config.stash[_SESSION_RUN] = RunConfig.from_pytest(config, None)
    return config.stash[_SESSION_RUN]


def run_config(config: pytest.Config, model: str | None) -> RunConfig:
    """The session's RunConfig for one of its models: a registry name, or the --model-path directory's name
    (then the family comes from its config.json)."""
    path = session_run(config).model_path
    registry_name = None if path and model == Path(path).name and model not in MODELS else model
    return RunConfig.from_pytest(config, registry_name)


def pytest_configure(config: pytest.Config) -> None:
    """Bad session-wide input is one usage error before any case runs: the results directory, the models."""
    results = config.getoption("npuinfer_results_dir", None)
    if results is not None:
        problem = results_dir_problem(Path(results))
        if problem:
            raise pytest.UsageError(f"--results-dir {results}: {problem}")
    if not config.getoption("help", False):
        backend = session_run(config).backend
        if backend not in backend_names():
            raise pytest.UsageError(f"--backend {backend}: unknown backend; known: {', '.join(backend_names())}")
        if backend in SERVED_BACKENDS:  # the server is checked once here: unreachable or wrong model, exit 4
            try:
                config.stash[_SERVED] = make_backend(backend, BackendSource(RunConfig.from_pytest(config, None),
                                                                            get_device("cpu"), _no_local_model))
            except BackendUnsupported as exc:
                raise pytest.UsageError(str(exc)) from None
        else:
            check_models(config)


def results_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a results directory, or None; creates nothing."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if p.is_dir():  # the nearest directory that exists must let this run write (or make) the results
                return None if os.access(p, os.W_OK | os.X_OK) else f"{p} is not writable (read-only or no permission)"
            return f"{p} is a file, not a directory" if p.exists() else f"{p} is a broken link"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """With --tp N (N > 1) outside torchrun, run this same pytest command as N ranks and return their status."""
    tp = session_run(config).tp
    if tp == 1 or tp_dist.launched():
        return None
    if config.getoption("numprocesses", None):
        raise pytest.UsageError("--tp cannot be combined with pytest-xdist -n: every rank must run every case")
    check_models(config)  # once here, not once per rank
    return run_under_torchrun(tp, ["-m", "pytest", *config.invocation_params.args],
                              cwd=str(config.invocation_params.dir))


def check_models(config: pytest.Config) -> None:
    """Every model this session names (--model, --model-path, or found under $NPUINFER_MODELS_DIR) is located
    before any case is collected: a missing or unusable checkpoint is one usage error (exit 4, no traceback)
    naming what was looked for and the stand-in to try, not the same failure in every case. The default tiny
    models need no check: they are built on first use."""
    path = session_run(config).model_path
    names = config.getoption(MODELS_DEST) or ([None] if path else discover_models())
    problems = []
    for name in dict.fromkeys(names):
        try:
            locate_config(RunConfig.from_pytest(config, name))
        except ModelUnavailable as exc:
            problems.append(str(exc))
    if problems:
        raise pytest.UsageError("\n".join(problems))


def case_model(item: pytest.Item) -> str | None:
    """The model a bench or accuracy case runs (None for other tests)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    case = params.get("perf_case") or params.get("max_batch_case")
    return case.model if case is not None else params.get("ceval_model")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """What --backend cannot run is said before any case runs: a model named with --model is a usage error; in a
    sweep over every model, that model's cases are skipped with the reason."""
    backend = session_run(config).backend
    named = set(config.getoption(MODELS_DEST) or ())
    reasons: dict[str, str | None] = {}
    for item in items:
        model = case_model(item)
        if model is None:
            continue
        if model not in reasons:
            reasons[model] = refusal(backend, run_config(config, model))
            if reasons[model] and model in named:
                raise pytest.UsageError(f"--backend {backend} --model {model}: {reasons[model]}")
        if reasons[model]:
            item.add_marker(pytest.mark.skip(reason=f"--backend {backend}: {reasons[model]}"))


def selected_models(config: pytest.Config, default: list[str]) -> list[str]:
    """--model values, else models found under $NPUINFER_MODELS_DIR, else ``default``; a served backend's is the
    served model."""
    run = session_run(config)
    if run.backend in SERVED_BACKENDS:
        return [run.served_model]
    names = config.getoption(MODELS_DEST)
    if names:
        for name in names:
            get_spec(name)  # unknown names fail at collection with the list of known ones
        return names
    if run.model_path:
        return [Path(run.model_path).name]
    return discover_models() or default


def xdist_worker_id(config: pytest.Config) -> str | None:
    """This process's pytest-xdist worker id (``gw3``), None in the controller or without xdist."""
    return getattr(config, "workerinput", {}).get("workerid")


def worker_index(config: pytest.Config) -> int:
    """pytest-xdist worker number (gw3 -> 3), 0 when not distributed."""
    worker = xdist_worker_id(config) or "gw0"
    return int(worker[2:]) if worker.startswith("gw") else 0


class ModelCache:
    """Loads each model once per pytest session (per xdist worker) and hands it to every case."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self._loaded: dict[str, LoadedModel] = {}
        run = session_run(config)
        tp = run.tp
        if tp > 1:  # under torchrun: join the group; rank r takes device base + LOCAL_RANK
            self.device: Device = tp_dist.init_tensor_parallel(tp, run.device)
        else:
            self.device = get_device(run.device, local_rank=self._worker_offset())

    def _worker_offset(self) -> int | None:
        """Each pytest-xdist worker on its own device index when an explicit npu/cuda device is given."""
        if config_device_is_generic(session_run(self.config).device):
            return None
        return worker_index(self.config) or None

    def get(self, name: str) -> LoadedModel:
        if name not in self._loaded:
            self._loaded[name] = load(run_config(self.config, name), self.device)
        return self._loaded[name]


class BackendCache:
    """Each model's backend (--backend), made once per session over the ModelCache: npuinfer's own model is
    loaded once and shared by every backend that runs on its weights."""

    def __init__(self, config: pytest.Config, models: ModelCache):
        self.config = config
        self.models = models
        self.name: str = session_run(config).backend
        self._made: dict[str, Backend] = {}

    @property
    def device(self) -> Device:
        return self.models.device

    def get(self, model: str) -> Backend:
        if _SERVED in self.config.stash:  # made (and the server checked) at configure time
            return self.config.stash[_SERVED]
        if model not in self._made:
            source = BackendSource(run_config(self.config, model), self.models.device,
                                   lambda: self.models.get(model))
            self._made[model] = make_backend(self.name, source)
        return self._made[model]


def config_device_is_generic(spec: str) -> bool:
    return spec in ("auto", "cpu")


@pytest.fixture(scope="session")
def model_cache(pytestconfig: pytest.Config) -> ModelCache:
    return ModelCache(pytestconfig)


@pytest.fixture(scope="session")
def backend_cache(pytestconfig: pytest.Config, model_cache: ModelCache) -> BackendCache:
    return BackendCache(pytestconfig, model_cache)


@pytest.fixture(scope="session")
def npuinfer_device(model_cache: ModelCache) -> Device:
    return model_cache.device


@pytest.fixture(scope="session")
def results_dir(pytestconfig: pytest.Config) -> Path:
    path = Path(pytestconfig.getoption("npuinfer_results_dir"))
    path.mkdir(parents=True, exist_ok=True)
    return path


DEFAULT_TINY_MODELS = ["qwen-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny", "internlm-tiny", "gpt-neox-tiny",
                       "qwen2-tiny", "llama3-tiny", "qwen3-tiny"]
assert DEFAULT_MODEL in DEFAULT_TINY_MODELS
