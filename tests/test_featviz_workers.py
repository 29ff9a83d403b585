"""Optimised inputs side by side (``featviz.Workers``): the same images, numbers and files as one after the other."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnfeat import atlas, featviz
from cnnfeat.callbacks.atlas import AtlasCallback
from cnnfeat.callbacks.base import inference
from cnnfeat.errors import ConfigError
from cnnfeat.graph import capture
from cnnfeat.models import SmallCNN
from cnnfeat.probe import ProbeSpec, probe_from_datamodule

FAST = featviz.FeatVizSettings(steps=12, batch_size=4)


def trained_enough() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN().eval()


def test_output_of_call_ignores_other_threads_passes_through_the_same_model() -> None:
    """Two threads stop the same model at different layers (and calls) at once; each gets its own layer's output,
    equal to a forward hook's capture of a pass of its own."""
    model = trained_enough()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad(), capture(model, ["conv2", "fc1"]) as want:
        model(x)
    modules = dict(model.named_modules())
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def loop(name: str) -> None:
        try:
            start.wait()
            for _ in range(200):
                with torch.no_grad():
                    got = featviz.output_of_call(model, modules[name], 0, x)
                assert got is not None and torch.equal(got, want[name]), name
                assert featviz.output_of_call(model, modules[name], 1, x) is None, "called once per pass"
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(n,)) for n in ("conv2", "fc1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules()), "every hook removed"


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_give_the_images_and_numbers_of_one_after_the_other(workers: int) -> None:
    model = trained_enough()
    space = atlas.InputSpace((1, 28, 28), scale=(1.0,), shift=(0.0,))
    layers = {"conv1": [0, 3, 5], "conv3": list(range(9)), "fc2": [1, 7, 50, 99, 2]}
    positions = torch.randint(0, 7, (16, 2), generator=torch.Generator().manual_seed(1))
    references = {name: torch.rand(100) + 0.1 for name in layers}

    def args(name: str) -> tuple:
        pos = positions if name.startswith("conv") else None
        return (atlas.layer_fn(model, name, space), layers[name], space, FAST, references[name], pos, name)

    alone = {name: atlas.optimise_units(*args(name), torch.device("cpu")) for name in layers}
    threads_before = torch.get_num_threads()
    with featviz.Workers(workers, threads=1) as pool:
        assert torch.get_num_threads() == 1
        pending = {n: atlas.start_optimise_units(*args(n), torch.device("cpu"), submit=pool.submit) for n in layers}
    assert torch.get_num_threads() == threads_before, "the thread count is restored"
    assert len(pending["conv1"].starts) == 2 and len(pending["fc2"].starts) == 1, "a second start for conv units only"
    for name, p in pending.items():
        got, want = p.finish(), alone[name]
        fields = ("units", "images", "activation", "positions", "fidelity", "flagged", "objective_value", "targets")
        for field in fields:
            assert torch.equal(getattr(got, field), getattr(want, field)), (name, field)


def test_an_error_in_a_worker_reaches_the_caller_and_the_thread_count_comes_back() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("layer exploded")

    before = torch.get_num_threads()
    with featviz.Workers(2, threads=1) as pool:
        pending = featviz.start_visualise(broken, 3, (1, 8, 8), FAST, submit=pool.submit)
        with pytest.raises(RuntimeError, match="layer exploded"):
            pending.wait()
    assert torch.get_num_threads() == before
    with pytest.raises(featviz.FeatVizError, match="workers must be >= 1"):
        featviz.Workers(0)


def test_the_atlas_writes_the_same_optimised_inputs_with_two_workers(datamodule, tmp_path: Path) -> None:
    """The atlas callback's end of fit, with 1 and with 2 workers: byte-equal optimised-input arrays per layer."""
    probe = probe_from_datamodule(datamodule, ProbeSpec(max_images=64))
    saved = {}
    for workers in (1, 2):
        model = trained_enough()
        cb = AtlasCallback(
            max_units=4,
            probe_size=64,
            alive_probe_size=64,
            batch_size=32,
            featviz_workers=workers,
            featviz_settings={"steps": 12, "batch_size": 3},
        )
        cb.prepare(model, probe)
        with inference(model):
            cb.render(model, probe, 0)
        out = tmp_path / f"w{workers}"
        cb.finish(out)
        loaded = atlas.Atlas.load(out)
        assert loaded is not None
        saved[workers] = {info.name: loaded.featviz(info) for info in loaded.layers}
    assert set(saved[1]) == {"conv1", "conv2", "conv3", "fc2"}
    for name, arrays in saved[1].items():
        assert arrays is not None and arrays["images"].shape[0] == 4, name
        assert set(arrays) == set(saved[2][name]) and "seconds" in arrays
        for key, value in arrays.items():
            if key == "seconds":  # how long it took: the one thing that differs
                continue
            nan = value.dtype.kind == "f"
            assert np.array_equal(value, saved[2][name][key], equal_nan=nan), (name, key)


def test_the_relevance_path_check_gives_the_same_numbers_with_two_workers(datamodule) -> None:
    """The path check of the fit's last render (``_final``), with 1 and with 2 workers: the same check per layer."""
    from cnnfeat.callbacks import RelevanceCallback

    probe = probe_from_datamodule(datamodule, ProbeSpec(max_images=200))
    checks, tables = {}, {}
    for workers in (1, 2):
        model = trained_enough()
        cb = RelevanceCallback(
            probe_size=200,
            units=3,
            heatmaps=False,
            path_units=2,
            path_arbitrary=16,
            path_settings={"steps": 12, "batch_size": 1},
            workers=workers,
        )
        cb.prepare(model, probe)
        cb._final = True  # what on_train_epoch_end sets at the fit's last epoch
        with inference(model):
            pictures = cb.render(model, probe, 1)
        checks[workers] = cb.last_path_checks
        tables[workers] = {tag: text for tag, text in pictures.texts.items() if "path_table" in tag}
    assert set(checks[1]) == {"relu1", "relu2", "relu3"} and tables[1] == tables[2] and len(tables[1]) == 3
    for node, check in checks[1].items():
        other = checks[2][node]
        assert check.lower == other.lower
        for field in ("units", "optimised", "real", "arbitrary", "per_node", "flagged"):
            assert torch.equal(getattr(check, field), getattr(other, field)), (node, field)


def test_auto_workers_are_two_for_cnnfeats_models_on_a_cpu_and_one_otherwise() -> None:
    """A foreign model's forward may keep state on ``self`` or draw random numbers (MC dropout): side by side it would
    give other images than one after the other, so ``"auto"`` runs it one optimisation at a time."""

    class Foreign(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert featviz.workers_for(SmallCNN(), cpu, "auto") == 2
    assert featviz.workers_for(Foreign(), cpu, "auto") == 1
    assert featviz.workers_for(Foreign(), cpu, 3) == 3, "a number is what the user asked for"
    assert featviz.workers_for(SmallCNN(), gpu, "auto") == featviz.workers_for(SmallCNN(), gpu, 4) == 1
    for bad in (0, -1, 1.5, True, "two", None):
        with pytest.raises(ConfigError, match=r"workers must be an integer >= 1 or 'auto'"):
            featviz.check_workers("workers", bad)


def test_a_model_that_runs_its_own_threads_still_stops_at_the_layer() -> None:
    """Threads the model starts itself belong to the caller's pass (only another ``output_of_call`` is ignored)."""

    class TwoBranches(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(1, 4, 5, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with ThreadPoolExecutor(2) as pool:
                a, b = pool.submit(self.a, x), pool.submit(self.b, x)
                return a.result() + b.result()

    torch.manual_seed(0)
    model, x = TwoBranches().eval(), torch.rand(2, 1, 12, 12)
    with torch.no_grad():
        got = featviz.output_of_call(model, model.a, 0, x)
        assert got is not None and torch.equal(got, model.a(x))
