"""What the entry points (``cnnfeat-train``, ``cnnfeat-explore``) share: config location, resolvers, error edge.

No entry point imports another; both import this module. Exit codes are documented in
:mod:`cnnfeat.status`: 0 finished, 1 an unexpected error (with its traceback), 2 a :class:`CnnfeatError`
(a problem the message names: config, data, checkpoint, disk, a busy run directory), 3 diverged, 130 Ctrl-C,
143 SIGTERM.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cnnfeat.errors import CnnfeatError, ConfigError
from cnnfeat.lightning_api import target
from cnnfeat.status import EXIT_SIGINT, EXIT_SIGTERM, EXIT_USER_ERROR

log = logging.getLogger("cnnfeat")
T = TypeVar("T")


def config_dir() -> str:
    """The directory of cnnfeat's Hydra configs: ``cnnfeat/conf`` inside an installed wheel, else the checkout's
    top-level ``conf/`` (an editable install or a source tree, where ``conf/`` is not an importable package)."""
    try:
        spec = importlib.util.find_spec("cnnfeat.conf")
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / "train.yaml").is_file():
            return str(Path(location))
    return str(Path(__file__).resolve().parent.parent / "conf")


CONFIG_DIR = config_dir()

#: Trainer arguments cnnfeat passes itself (instantiated from their own config groups)
_TRAINER_PASSED = ("self", "callbacks")
#: Lightning defaults cnnfeat changes wherever the installed release has the argument
_TRAINER_CHANGED = {"enable_autolog_hparams": False}  # cnnfeat logs config + final metrics to HParams itself


def trainer_arguments() -> dict[str, Any]:
    """Every argument of the installed Lightning ``Trainer`` with its default (plain values only)."""
    import inspect

    from cnnfeat import lightning_api as pl

    args: dict[str, Any] = {}
    for name, p in inspect.signature(pl.Trainer.__init__).parameters.items():
        if name in _TRAINER_PASSED or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        args[name] = default if isinstance(default, str | int | float | bool | type(None)) else str(default)
    args.update({k: v for k, v in _TRAINER_CHANGED.items() if k in args})
    return args


def register_trainer_schema() -> None:
    """``trainer/lightning``: every Trainer argument of the installed Lightning, so ``trainer.NAME=VALUE`` works for
    all of them while the YAML presets list only what cnnfeat changes (and so never name an argument an older
    Lightning release lacks)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="trainer", name="lightning", node=trainer_arguments())


register_trainer_schema()

# ${pl:callbacks.ModelCheckpoint}: Lightning classes in configs follow cnnfeat's choice of package
OmegaConf.register_new_resolver("pl", target, replace=True)
# ${pid:} in run directories: two runs started in the same second still get directories of their own
OmegaConf.register_new_resolver("pid", os.getpid, replace=True)
# ${record_subdir:${resume}}: a resumed run records its config beside the original, never over it
OmegaConf.register_new_resolver(
    "record_subdir",
    lambda resume: f".hydra-resume-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}" if resume else ".hydra",
    replace=True,
    use_cache=True,
)


class MaxLevelFilter(logging.Filter):
    """Passes records below ``level`` (the console's stdout handler; warnings and errors go to stderr)."""

    def __init__(self, level: str | int = logging.WARNING) -> None:
        super().__init__()
        self.level = logging.getLevelName(level) if isinstance(level, str) else level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class Interrupted(SystemExit):
    """SIGTERM arrived outside Lightning's own loops (e.g. while data is prepared); exit code 143."""

    def __init__(self) -> None:
        super().__init__(EXIT_SIGTERM)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[dict[str, bool]]:
    """While active, SIGTERM raises :class:`Interrupted`, except inside a Lightning loop, which stops itself.

    Lightning installs its own SIGTERM handler while it runs and calls the previous one (this) after its
    own; this one then only records the signal (``state["sigterm"]``) and lets Lightning stop at the next
    batch. Outside Lightning it raises at once, so the entry point can record ``interrupted``.
    """
    state = {"sigterm": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        state["sigterm"] = True
        if signal.getsignal(signal.SIGTERM) is handler:
            raise Interrupted

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)


def instantiate_node(node: DictConfig, where: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose cnnfeat errors surface as themselves, naming the config node."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, CnnfeatError):
            if f"{where}." not in str(cause) and f"{where}:" not in str(cause):
                cause.args = (f"{where}: {cause}", *cause.args[1:])
            raise cause from None
        if isinstance(cause, TypeError) and "argument" in str(cause):
            raise ConfigError(f"{where}: {cause}") from e
        raise


def instantiate_group(cfg: DictConfig | None, where: str = "callbacks") -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group; ``null`` entries are skipped."""
    if not cfg:
        return []
    return [
        instantiate_node(c, f"{where}.{name}")
        for name, c in cfg.items()
        if isinstance(c, DictConfig) and "_target_" in c
    ]


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_cli(fn: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run an entry point; in a single run a :class:`CnnfeatError` ends it with its message and exit code 2.

    In a multirun the error is re-raised so that only that job fails (the sweep goes on and its summary
    lists the job as failed); ``HYDRA_FULL_ERROR=1`` shows the traceback. Any other exception is a bug and
    keeps its traceback. Ctrl-C exits with 130, SIGTERM with 143.
    """
    try:
        return fn(cfg)
    except CnnfeatError as e:
        if is_multirun() or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s\n(set HYDRA_FULL_ERROR=1 for the full traceback)", type(e).__name__, e)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        log.error("Interrupted (Ctrl-C)")
        raise SystemExit(EXIT_SIGINT) from None
