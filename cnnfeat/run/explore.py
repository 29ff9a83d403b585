"""Draw cnnfeat's pictures from saved checkpoints, without training.

    cnnfeat-explore ckpt=outputs/runs/DATE/TIME-PID/checkpoints/last.ckpt
    cnnfeat-explore ckpt=outputs/runs/DATE/TIME-PID/checkpoints          # every epochNN-*.ckpt, in order
    cnnfeat-explore ckpt=... callbacks=transfer                          # for an experiment=transfer checkpoint
    cnnfeat-explore ckpt=... callbacks=[attribution,importance]          # where it looks, which units matter

Given a directory, every ``epochNN-*.ckpt`` and ``last.ckpt`` is explored, once per epoch (each checkpoint's own
``epoch`` field decides; ``last.ckpt`` is the final network when the best checkpoint is an earlier epoch). With
per-epoch checkpoints (train with ``callbacks.model_checkpoint.save_top_k=-1``) the UMAP maps are fitted one after
the other from warm starts, so the aligned trajectory and the filter evolution are rebuilt after the fact; when the
run's ``.hydra/config.yaml`` sits beside the checkpoints, the untrained network (step 0) is re-created from the
run's seed too. Pictures and scalars go to TensorBoard at step = epochs trained (the training run's axis) and, with
``save_png=true`` (the default here), to ``<output dir>/images``. The probe images are built as in training
(``cnnfeat.probe``), once per split. Every checkpoint is one step for every callback: a callback's ``every_n_epochs``
(the importance callback's 5) is not consulted here, so ``callbacks=[attribution,importance]`` logs
``attribution/*`` and ``importance/*`` at each explored step, and the report shows them on its attribution and
importance pages.

Epochs without a checkpoint are gaps: ``<output dir>/explored.json`` lists the explored and the missing steps, and a
value named after the previous epoch (``cka/to_previous/*``, ``units/died|revived/*``, ``umap/frame_shift``) is
logged only at a step whose previous step was explored. A checkpoint whose weights hold NaN or infinity is refused
before anything is drawn: such a network has no pictures to show.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from cnnfeat.callbacks import VisualizationCallback
from cnnfeat.callbacks.base import inference
from cnnfeat.callbacks.session import AnalysisSession
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.data.feature_cache import FrozenFeatureDataModule
from cnnfeat.errors import CheckpointError, ConfigError, WeightsError
from cnnfeat.report import report_at_end
from cnnfeat.run import lightning_api as pl
from cnnfeat.run.atomic import atomic_write
from cnnfeat.run.checkpoint_io import nonfinite_tensors
from cnnfeat.run.checkpoints import load_model, read_checkpoint
from cnnfeat.run.cli import CONFIG_DIR, entry_point, instantiate_group, run_cli
from cnnfeat.run.resume import saved_training_config

log = logging.getLogger("cnnfeat")

#: the checkpoint that ``callbacks.last_checkpoint`` writes after every epoch
LAST = "last.ckpt"
#: ``<output dir>/explored.json``: ``{"explored": [steps], "missing": [steps], "checkpoints": {step: file name}}``
EXPLORED_JSON = "explored.json"


def checkpoints_in(path: str | Path) -> list[Path]:
    """A checkpoint file, or a directory's ``epoch*.ckpt`` files ordered by their epoch followed by ``last.ckpt``
    (every ``*.ckpt`` when there are neither)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"ckpt={path}: no such file or directory")
    numbered = [(int(m.group(1)), p) for p in path.glob("epoch*.ckpt") if (m := re.match(r"epoch(\d+)", p.name))]
    found = [p for _, p in sorted(numbered)] + [p for p in [path / LAST] if p.is_file()]
    found = found or sorted(path.glob("*.ckpt"))
    if not found:
        raise CheckpointError(f"ckpt={path}: no .ckpt files in this directory")
    return found


def untrained_model(ckpt_file: Path) -> pl.LightningModule | None:
    """The run's network before training, re-created from its seed (``None`` without the run's config)."""
    run_cfg = ckpt_file.parent.parent / ".hydra" / "config.yaml"
    if not run_cfg.is_file():
        return None
    try:
        cfg = OmegaConf.load(run_cfg)
        seed = cfg.get("seed") if isinstance(cfg, DictConfig) else None
    except Exception as e:  # any YAML or OmegaConf error: the file is not a run config we can use
        log.warning("No untrained network (step 0): %s is not a readable run config (%s)", run_cfg, e)
        return None
    if seed is None:
        return None
    if not isinstance(seed, int) or isinstance(seed, bool):
        log.warning("No untrained network (step 0): the seed in %s is %r, not an integer", run_cfg, seed)
        return None
    trained, _ = load_model(ckpt_file)
    pl.seed_everything(seed, verbose=False)  # training seeds, then builds the model first: same weights
    hparams = dict(trained.hparams)
    run_model = cfg.get("model") if isinstance(cfg.get("model"), DictConfig) else {}
    weights, freeze = run_model.get("weights"), run_model.get("freeze", "backbone")
    if weights not in (None, "none") and freeze not in (None, "backbone") and "weights" in hparams:
        # fine-tuned pretrained weights: step 0 is the pretrained network (with its new head), not a random one
        try:
            model = type(trained)(**{**hparams, "weights": weights})
        except (WeightsError, OSError) as e:
            log.warning("No untrained network (step 0): its pretrained weights could not be loaded (%s)", e)
            return None
        return model.eval()
    if "weights" in hparams:  # a frozen backbone: the same in every checkpoint, copied instead of re-loaded
        hparams["weights"] = "none"
    model = type(trained)(**hparams)
    frozen = {n: p for n, p in trained.named_parameters() if not p.requires_grad}  # the same in every checkpoint
    model.load_state_dict(frozen, strict=False)
    return model.eval()


@dataclass(frozen=True)
class Explored:
    """One network to draw: its step (epochs trained, 0 = untrained) and the checkpoint file it came from."""

    step: int
    model: pl.LightningModule
    file: Path | None  # None: the untrained network, re-created from the run's seed
    data: str | None = None  # the DataModule its training config records (``_target_``), if any


def finite_model(path: Path) -> tuple[pl.LightningModule, int, str | None]:
    """The model of a checkpoint, its step (epochs trained) and the DataModule its training config records
    (``_target_``, ``None`` when unrecorded); weights holding NaN or infinity are refused."""
    model, ckpt = load_model(path)
    bad = nonfinite_tensors(ckpt["state_dict"])
    if bad:
        raise CheckpointError(
            f"{path}: the weights {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''} hold NaN or infinite values, "
            "so every picture of this network would show NaN instead of data; explore another checkpoint of the run "
            "(move this one out of the directory)"
        )
    epoch = ckpt.get("epoch", 0)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 1_000_000:
        raise CheckpointError(f"{path}: its epoch {epoch!r} is not an epoch number (an integer >= 0)")
    data = ((saved_training_config(ckpt, path) or {}).get("data") or {}).get("_target_")
    return model, epoch + 1, data  # step = epochs trained


def networks(files: list[Path], include_untrained: bool) -> list[Explored]:
    """The networks to explore in step order: each epoch once (``last.ckpt`` and an ``epochNN`` file of the same
    epoch are one network), and the untrained one when ``include_untrained`` and the run's seed allow."""
    by_step: dict[int, Explored] = {}
    for f in files:
        model, step, data = finite_model(f)
        if step in by_step:
            log.info("%s holds epoch %d, like %s: explored once", f.name, step, by_step[step].file.name)
            continue
        by_step[step] = Explored(step, model, f, data)
    if include_untrained and 0 not in by_step and (model0 := untrained_model(files[0])) is not None:
        by_step[0] = Explored(0, model0, None)
    return [by_step[s] for s in sorted(by_step)]


def explored_record(explored: list[Explored]) -> dict[str, Any]:
    """What ``explored.json`` holds: the explored steps, the steps between them without a checkpoint, and the
    checkpoint file of each step (the untrained network, step 0, has none)."""
    steps = [e.step for e in explored]
    return {
        "explored": steps,
        "missing": sorted(set(range(steps[0], steps[-1] + 1)) - set(steps)) if steps else [],
        "checkpoints": {str(e.step): e.file.name for e in explored if e.file is not None},
    }


def explore_device(name: object) -> torch.device:
    """``device=auto|cpu|cuda|cuda:N``: ``auto`` is CUDA where there is one; a GPU this machine lacks is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no GPU is visible to this process; use device=cpu or device=auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device={name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)


@contextmanager
def _named(cb: VisualizationCallback) -> Iterator[None]:
    """A layer or image the model/data lack: the error names the callback."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(
            f"{type(cb).__name__}: {e} (an experiment=transfer checkpoint: callbacks=transfer; one of the original "
            "model=alexnet (TransferClassifier): name its layers backbone.conv1..5, README 'Exploring a saved "
            "checkpoint')"
        ) from e


#: DataModules whose images are another's: the frozen-feature cache holds Fashion-MNIST through a backbone
SAME_IMAGES = {FrozenFeatureDataModule: FashionMNISTDataModule}


def _images_of(target: object) -> object:
    try:
        cls = get_class(str(target))
    except Exception:  # a class this environment cannot import: compared by name
        return str(target)
    return SAME_IMAGES.get(cls, cls)


def _data_group(target: str) -> str:
    """``data=<group>`` whose config builds ``target`` (for the message), else ``data._target_=<target>``."""
    for path in sorted((Path(CONFIG_DIR) / "data").glob("*.yaml")):
        if f"_target_: {target}\n" in path.read_text():
            return f"data={path.stem}"
    return f"data._target_={target}"


def check_trained_data(explored: list[Explored], data: DictConfig) -> None:
    """Refuse to draw a checkpoint's network on other images than it was trained on (e.g. the default Fashion-MNIST
    through a network trained on an image folder): its recorded data config names the DataModule."""
    wanted = data.get("_target_")
    for net in explored:
        trained = net.data
        if trained is None or wanted is None or _images_of(trained) == _images_of(wanted):
            continue
        raise ConfigError(
            f"{net.file} was trained on {trained} data, but this exploration reads {wanted}: give the run's data "
            f"config ({_data_group(trained)}{' data.root=DIR' if 'ImageFolder' in trained else ''}; the run's own "
            "is in its .hydra/config.yaml)"
        )


def check_classes(explored: list[Explored], datamodule: object) -> None:
    """The networks' class count must be the data's (a network trained on other classes draws nonsense)."""
    n_data = getattr(datamodule, "num_classes", None)
    for net in explored:
        n_model = getattr(net.model, "num_classes", None)
        if isinstance(n_data, int) and isinstance(n_model, int) and n_model != n_data:
            where = net.file.name if net.file is not None else "the untrained network"
            raise ConfigError(
                f"{where} classifies {n_model} classes, but the data ({type(datamodule).__name__}) has {n_data}: "
                "give the data config the network was trained on"
            )


def explore(cfg: DictConfig) -> Path:
    """Render every picture callback of ``cfg.callbacks`` for each checkpoint; returns the output directory."""
    files = checkpoints_in(cfg.ckpt)
    explored = networks(files, bool(cfg.include_untrained))  # every file read and checked before anything is drawn
    record = explored_record(explored)
    log.info(
        "Exploring steps (epochs trained) %s; missing (no checkpoint): %s",
        record["explored"],
        record["missing"] or "none",
    )
    device = explore_device(cfg.device)
    check_trained_data(explored, cfg.data)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    check_classes(explored, datamodule)
    callbacks = [c for c in instantiate_group(cfg.get("callbacks")) if isinstance(c, VisualizationCallback)]
    out = Path(cfg.paths.output_dir)
    writer = SummaryWriter(str(out))
    png_dir = out / "images" if cfg.save_png else None
    try:
        for i, net in enumerate(explored):
            model = net.model.to(device)
            if i == 0:  # the same session, probe and checks as in training: one probe pass per step for its consumers
                session = AnalysisSession.attach(callbacks)
                for cb in callbacks:
                    with _named(cb):
                        probe = session.probe(datamodule, cb.probe_spec, model) if cb.needs_probe else None
                        cb.prepare(model, probe)
            for cb in callbacks:
                with _named(cb), inference(model):
                    pictures = cb.render(model, cb.probe, net.step)
                pictures.write(writer, net.step, png_dir)  # images and scalars at step = epochs trained
            log.info("Pictures for step %d (%s)", net.step, net.file.name if net.file else "untrained")
            model.to("cpu")
        for cb in callbacks:  # what the end of fit adds: the UMAP animation, CKA summaries, ...
            for step, pictures in cb.finish(out).items():
                pictures.write(writer, step, png_dir)
    finally:
        writer.close()
    atomic_write(out / EXPLORED_JSON, lambda f: f.write(json.dumps(record, indent=1).encode()))
    log.info("Explored %d checkpoint(s) of %s: tensorboard --logdir %s", len(record["checkpoints"]), cfg.ckpt, out)
    if cfg.get("report", True):
        report_at_end(out)
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="explore")
def hydra_main(cfg: DictConfig) -> None:
    """Entry point of ``cnnfeat-explore``."""

    def checked_explore(cfg: DictConfig) -> Path:
        if OmegaConf.is_missing(cfg, "ckpt"):
            raise ConfigError(
                "ckpt=... is required: a .ckpt file or a run's checkpoints directory, e.g. "
                "cnnfeat-explore ckpt=outputs/runs/DATE/TIME-PID/checkpoints"
            )
        explore_device(cfg.device)
        read_checkpoint(checkpoints_in(cfg.ckpt)[0])  # fail early, with a clear message, on a bad file
        return explore(cfg)

    run_cli(checked_explore, cfg)


main = entry_point(hydra_main, "cnnfeat-explore")


if __name__ == "__main__":
    main()
