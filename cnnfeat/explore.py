"""Draw cnnfeat's pictures from saved checkpoints, without training.

    cnnfeat-explore ckpt=outputs/runs/DATE/TIME-PID/checkpoints/last.ckpt
    cnnfeat-explore ckpt=outputs/runs/DATE/TIME-PID/checkpoints          # every epochNN-*.ckpt, in order
    cnnfeat-explore ckpt=... callbacks=transfer                          # for a TransferClassifier checkpoint

Given a directory of per-epoch checkpoints (train with ``callbacks.model_checkpoint.save_top_k=-1``), the
UMAP maps are fitted one after the other from warm starts, so the aligned trajectory and the filter
evolution are rebuilt after the fact; when the run's ``.hydra/config.yaml`` sits beside the checkpoints,
the untrained network (step 0) is re-created from the run's seed too. Pictures and scalars go to TensorBoard
at step = epochs trained (the training run's axis) and, with ``save_png=true`` (the default here), to
``<output dir>/images``. The probe images are built as in training (``cnnfeat.probe``), once per split.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from cnnfeat import lightning_api as pl
from cnnfeat.callbacks import VisualizationCallback
from cnnfeat.callbacks.base import inference, shared_probe
from cnnfeat.checkpoints import load_model, read_checkpoint
from cnnfeat.cli import CONFIG_DIR, instantiate_group, run_cli
from cnnfeat.errors import CheckpointError, ConfigError
from cnnfeat.report import report_at_end

log = logging.getLogger("cnnfeat")


def checkpoints_in(path: str | Path) -> list[Path]:
    """A checkpoint file, or a directory's ``epoch*.ckpt`` files ordered by their epoch (``last.ckpt`` if none)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"ckpt={path}: no such file or directory")
    numbered = [(int(m.group(1)), p) for p in path.glob("epoch*.ckpt") if (m := re.match(r"epoch(\d+)", p.name))]
    found = [p for _, p in sorted(numbered)] or sorted(path.glob("*.ckpt"))
    if not found:
        raise CheckpointError(f"ckpt={path}: no .ckpt files in this directory")
    return found


def untrained_model(ckpt_file: Path) -> pl.LightningModule | None:
    """The run's network before training, re-created from its seed (``None`` without the run's config)."""
    run_cfg = ckpt_file.parent.parent / ".hydra" / "config.yaml"
    if not run_cfg.is_file():
        return None
    cfg = OmegaConf.load(run_cfg)
    if cfg.get("seed") is None:
        return None
    trained, _ = load_model(ckpt_file)
    pl.seed_everything(cfg.seed, verbose=False)  # training seeds, then builds the model first: same weights
    hparams = dict(trained.hparams)
    if "weights" in hparams:  # a frozen backbone: the same in every checkpoint, copied instead of re-loaded
        hparams["weights"] = "none"
    model = type(trained)(**hparams)
    frozen = {n: p for n, p in trained.named_parameters() if not p.requires_grad}  # the same in every checkpoint
    model.load_state_dict(frozen, strict=False)
    return model.eval()


def explore(cfg: DictConfig) -> Path:
    """Render every picture callback of ``cfg.callbacks`` for each checkpoint; returns the output directory."""
    files = checkpoints_in(cfg.ckpt)
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    callbacks = [c for c in instantiate_group(cfg.get("callbacks")) if isinstance(c, VisualizationCallback)]
    out = Path(cfg.paths.output_dir)
    writer = SummaryWriter(str(out))
    png_dir = out / "images" if cfg.save_png else None
    models: list[tuple[int, pl.LightningModule]] = []
    if cfg.include_untrained and (model0 := untrained_model(files[0])) is not None:
        models.append((0, model0))
    for f in files:
        model, ckpt = load_model(f)
        models.append((int(ckpt.get("epoch", 0)) + 1, model))  # step = epochs trained
    try:
        for i, (step, model) in enumerate(models):
            model.to(device)
            for cb in callbacks:
                try:
                    if i == 0:  # the same probe and checks as in training
                        probe = shared_probe(datamodule, cb.probe_spec, model) if cb.needs_probe else None
                        cb.prepare(model, probe)
                    with inference(model):
                        pictures = cb.render(model, cb.probe, step)
                except ConfigError as e:  # a layer or image the model/data lack: name the callback
                    raise ConfigError(
                        f"{type(cb).__name__}: {e} (for a TransferClassifier checkpoint use callbacks=transfer)"
                    ) from e
                pictures.write(writer, step, png_dir)  # images and scalars at step = epochs trained
            log.info("Pictures for step %d (%s)", step, type(model).__name__)
            model.to("cpu")
        for cb in callbacks:  # what the end of fit adds: the UMAP animation, CKA summaries, ...
            for step, pictures in cb.finish(out).items():
                pictures.write(writer, step, png_dir)
    finally:
        writer.close()
    log.info("Explored %d checkpoint(s) of %s: tensorboard --logdir %s", len(files), cfg.ckpt, out)
    if cfg.get("report", True):
        report_at_end(out)
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="explore")
def main(cfg: DictConfig) -> None:
    """Entry point of ``cnnfeat-explore``."""

    def checked_explore(cfg: DictConfig) -> Path:
        read_checkpoint(checkpoints_in(cfg.ckpt)[0])  # fail early, with a clear message, on a bad file
        return explore(cfg)

    run_cli(checked_explore, cfg)


if __name__ == "__main__":
    main()
