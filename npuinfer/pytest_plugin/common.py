"""Options and fixtures every suite shares: which models, which device, where results go."""
from __future__ import annotations

from pathlib import Path

import pytest

from ..device import Device, get_device
from ..parallel import dist as tp_dist
from ..parallel.launch import run_under_torchrun
from ..registry import DEFAULT_MODEL, discover_models, get_spec
from ..runtime import LoadedModel, ModelUnavailable, load_model, locate_model

GROUP = "npuinfer"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP, "npuinfer: models, device and results")
    group.addoption("--model", action="append", default=None, dest="npuinfer_models",
                    help="registry name; repeat for several (default: the tiny models, or every model found "
                         "under $NPUINFER_MODELS_DIR)")
    group.addoption("--model-path", default=None, dest="npuinfer_model_path",
                    help="checkpoint directory (with a single --model, or alone: family from config.json)")
    group.addoption("--device", default="auto", dest="npuinfer_device", help="auto | cpu | cuda[:N] | npu[:N]")
    group.addoption("--dtype", default=None, dest="npuinfer_dtype", choices=["fp32", "fp16", "bf16"],
                    help="default fp16 on accelerators, fp32 on cpu")
    group.addoption("--max-seq-len", default=None, type=int, dest="npuinfer_max_seq_len",
                    help="cap the KV cache (also $MAX_SEQ_LEN)")
    group.addoption("--attention", default="sdpa", choices=["sdpa", "eager"], dest="npuinfer_attention")
    group.addoption("--kernels", default="fused", choices=["fused", "plain"], dest="npuinfer_kernels",
                    help="fused: the device's fused ops, each checked against plain torch at load (default); "
                         "plain: plain torch ops")
    group.addoption("--compile", action="store_true", default=False, dest="npuinfer_compile",
                    help="run the decode step as one graph (cpu: an AOTInductor library; cuda: CUDA graphs; npu: "
                         "torchair); each new shape builds first, in the warm-up")
    group.addoption("--dummy-weights", action="store_true", default=False, dest="npuinfer_dummy_weights",
                    help="the model's real shapes with seeded random weights made on the device, no checkpoint "
                         "(refused before allocating when the weights cannot fit --memory-limit / the device)")
    group.addoption("--results-dir", default="results", dest="npuinfer_results_dir",
                    help="where CSV, markdown and plots are written (default results/)")
    group.addoption("--tp", default=1, type=int, dest="npuinfer_tp",
                    help="tensor parallel ranks: the session re-runs itself under torchrun with this many "
                         "processes; rows come from rank 0, timings are the max over ranks")


def pytest_configure(config: pytest.Config) -> None:
    """Bad session-wide input is one usage error before any case runs: the results directory, the models."""
    results = config.getoption("npuinfer_results_dir", None)
    if results is not None:
        problem = results_dir_problem(Path(results))
        if problem:
            raise pytest.UsageError(f"--results-dir {results}: {problem}")
    if not config.getoption("help", False):
        check_models(config)


def results_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a results directory, or None; creates nothing."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if p.is_dir():
                return None
            return f"{p} is a file, not a directory" if p.exists() else f"{p} is a broken link"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """With --tp N (N > 1) outside torchrun, run this same pytest command as N ranks and return their status."""
    tp = config.getoption("npuinfer_tp")
    if tp < 1:
        raise pytest.UsageError(f"--tp: expected a positive number of ranks, got {tp}")
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
    path = config.getoption("npuinfer_model_path")
    names = config.getoption("npuinfer_models") or ([None] if path else discover_models())
    problems = []
    for name in dict.fromkeys(names):
        try:
            locate_model(name, path, tp=config.getoption("npuinfer_tp"), dummy_weights=dummy_weights(config))
        except ModelUnavailable as exc:
            problems.append(str(exc))
    if problems:
        raise pytest.UsageError("\n".join(problems))


def dummy_weights(config: pytest.Config) -> bool:
    """--dummy-weights (helper wt-15 adds the option): a real model without its checkpoint runs on random
    weights of its real size instead of being a usage error."""
    return bool(config.getoption("npuinfer_dummy_weights", False))


def selected_models(config: pytest.Config, default: list[str]) -> list[str]:
    """--model values, else models found under $NPUINFER_MODELS_DIR, else ``default``."""
    names = config.getoption("npuinfer_models")
    if names:
        for name in names:
            get_spec(name)  # unknown names fail at collection with the list of known ones
        return names
    if config.getoption("npuinfer_model_path"):
        return [Path(config.getoption("npuinfer_model_path")).name]
    return discover_models() or default


def worker_index(config: pytest.Config) -> int:
    """pytest-xdist worker number (gw3 -> 3), 0 when not distributed."""
    worker = getattr(config, "workerinput", {}).get("workerid", "gw0")
    return int(worker[2:]) if worker.startswith("gw") else 0


class ModelCache:
    """Loads each model once per pytest session (per xdist worker) and hands it to every case."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self._loaded: dict[str, LoadedModel] = {}
        tp = config.getoption("npuinfer_tp")
        if tp > 1:  # under torchrun: join the group; rank r takes device base + LOCAL_RANK
            self.device: Device = tp_dist.init_tensor_parallel(tp, config.getoption("npuinfer_device"))
        else:
            self.device = get_device(config.getoption("npuinfer_device"), local_rank=self._worker_offset())

    def _worker_offset(self) -> int | None:
        """Each pytest-xdist worker on its own device index when an explicit npu/cuda device is given."""
        if config_device_is_generic(self.config.getoption("npuinfer_device")):
            return None
        return worker_index(self.config) or None

    def get(self, name: str) -> LoadedModel:
        if name not in self._loaded:
            path = self.config.getoption("npuinfer_model_path")
            registry_name = None if path and name == Path(path).name and name not in _names() else name
            self._loaded[name] = load_model(
                registry_name, path, self.device, self.config.getoption("npuinfer_dtype"),
                self.config.getoption("npuinfer_max_seq_len"), self.config.getoption("npuinfer_attention"),
                compile=self.config.getoption("npuinfer_compile"),
                kernels=self.config.getoption("npuinfer_kernels"),
                dummy_weights=self.config.getoption("npuinfer_dummy_weights"),
                memory_limit=self.config.getoption("bench_memory_limit", None))
        return self._loaded[name]


def config_device_is_generic(spec: str) -> bool:
    return spec in ("auto", "cpu")


def _names() -> set[str]:
    from ..registry import MODELS

    return set(MODELS)


@pytest.fixture(scope="session")
def model_cache(pytestconfig: pytest.Config) -> ModelCache:
    return ModelCache(pytestconfig)


@pytest.fixture(scope="session")
def npuinfer_device(model_cache: ModelCache) -> Device:
    return model_cache.device


@pytest.fixture(scope="session")
def results_dir(pytestconfig: pytest.Config) -> Path:
    path = Path(pytestconfig.getoption("npuinfer_results_dir"))
    path.mkdir(parents=True, exist_ok=True)
    return path


DEFAULT_TINY_MODELS = ["qwen-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny", "internlm-tiny", "gpt-neox-tiny"]
assert DEFAULT_MODEL in DEFAULT_TINY_MODELS
