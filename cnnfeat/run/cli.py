"""What the entry points (``cnnfeat-train``, ``cnnfeat-explore``) share: config location, resolvers, error edge.

No entry point imports another; both import this module. Exit codes are documented in
:mod:`cnnfeat.run.status`: 0 finished, 1 an unexpected error (with its traceback), 2 a :class:`CnnfeatError`
(a problem the message names: config, data, checkpoint, disk, a busy run directory), 3 diverged, 130 Ctrl-C,
143 SIGTERM.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
    SearchPathException,
)
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cnnfeat.errors import CnnfeatError, ConfigError
from cnnfeat.run.atomic import is_disk_full
from cnnfeat.run.lightning_api import MisconfigurationException, target
from cnnfeat.run.status import EXIT_SIGINT, EXIT_SIGTERM, EXIT_USER_ERROR

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
    return str(Path(__file__).resolve().parents[2] / "conf")


CONFIG_DIR = config_dir()

#: Trainer arguments cnnfeat passes itself (instantiated from their own config groups)
_TRAINER_PASSED = ("self", "callbacks")
#: Lightning defaults cnnfeat changes wherever the installed release has the argument
_TRAINER_CHANGED = {"enable_autolog_hparams": False}  # cnnfeat logs config + final metrics to HParams itself


def trainer_arguments() -> dict[str, Any]:
    """Every argument of the installed Lightning ``Trainer`` with its default (plain values only)."""
    import inspect

    from cnnfeat.run import lightning_api as pl

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

    node = {"_target_": "${pl:Trainer}", **trainer_arguments()}  # also usable alone: trainer=lightning
    ConfigStore.instance().store(group="trainer", name="lightning", node=node)


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


def lightning_refusal(e: BaseException, where: str) -> ConfigError:
    """Lightning's refusal of a setting as cnnfeat's :class:`ConfigError`; for a GPU preset without a GPU, what to
    run instead."""
    message = f"{where}: {e}"
    if "gpu" in str(e).lower() or "cuda" in str(e).lower():
        import torch

        if not torch.cuda.is_available():
            message += (
                " No GPU is visible to this process (torch.cuda.is_available() is False): on this machine run "
                "trainer=cpu, or trainer=auto (the default), which uses a GPU only where there is one."
            )
    return ConfigError(message)


def instantiate_node(node: DictConfig, where: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose cnnfeat errors and Lightning's refusals surface as cnnfeat errors, naming
    the config node."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, CnnfeatError):
            if f"{where}." not in str(cause) and f"{where}:" not in str(cause):
                cause.args = (f"{where}: {cause}", *cause.args[1:])
            raise cause from None
        if isinstance(cause, MisconfigurationException) or (
            where == "trainer" and isinstance(cause, ValueError | ModuleNotFoundError)
        ):  # the Trainer's constructor checks its arguments (precision, strategy, accelerator): the user's values
            raise lightning_refusal(cause, where) from e
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
        try:
            return fn(cfg)
        except MisconfigurationException as e:  # Lightning refused a setting during the run (not at construction)
            raise lightning_refusal(e, "trainer") from e
    except CnnfeatError as e:
        if is_multirun() or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s\n(set HYDRA_FULL_ERROR=1 for the full traceback)", type(e).__name__, e)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        log.error("Interrupted (Ctrl-C)")
        raise SystemExit(EXIT_SIGINT) from None


#: Hydra's refusals of a command line (unknown key, group or option, bad syntax): user mistakes, exit code 2
_HYDRA_REFUSALS = (ConfigCompositionException, OverrideParseException, MissingConfigException, SearchPathException)


def _advice(error: BaseException, program: str) -> str:
    """One line that says what to do about Hydra's refusal ``error`` (printed after Hydra's own message)."""
    cause = error.__cause__
    key, parent = getattr(cause, "key", None), getattr(cause, "parent_node", None)
    if isinstance(key, str) and isinstance(parent, DictConfig):
        full_key = getattr(cause, "full_key", None) or key
        node = full_key.rpartition(".")[0] or "the config"
        close = difflib.get_close_matches(key, [str(k) for k in parent], n=2)
        hint = f" Did you mean {' or '.join(f'{node}.{c}' for c in close)}?" if close else ""
        return (
            f"{program}: {node} has no key '{key}'.{hint} `{program} --cfg job` prints every key; nothing was run "
            "(prefix + only to add a key that the callable really takes)."
        )
    if isinstance(error, MissingConfigException):
        return f"{program}: no such config option (see the available options above); nothing was run."
    return f"{program}: the command line was refused (above); `{program} --help` lists the options. Nothing was run."


def entry_point(hydra_main: Callable[[], Any], program: str) -> Callable[[], None]:
    """The console-script function around a ``@hydra.main`` function: exit codes as documented in
    :mod:`cnnfeat.run.status` for what happens before the task runs too.

    Hydra prints its own refusal of a command line (an unknown key or option, a syntax error, a full disk
    when it records the config) and exits with 1; here that becomes exit code 2, with one line that says
    what to do. Anything else keeps its exit code and traceback.
    """

    def main() -> None:
        try:
            hydra_main()
        except SystemExit as e:
            error = e.__context__
            if e.code == 1 and isinstance(error, _HYDRA_REFUSALS):
                sys.stderr.write(_advice(error, program) + "\n")
                raise SystemExit(EXIT_USER_ERROR) from None
            if e.code == 1 and error is not None and is_disk_full(error):
                sys.stderr.write(f"{program}: the disk is full ({error}); free space or choose another directory.\n")
                raise SystemExit(EXIT_USER_ERROR) from None
            raise

    main.__doc__ = hydra_main.__doc__
    return main
