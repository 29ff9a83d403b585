"""Any torchvision classification network, adapted to the data's channels and classes (``model=torchvision``).

``TorchvisionClassifier(arch=...)`` builds ``torchvision.models.get_model(arch)`` and adapts it the usual way:

- **the first conv** (the stem) takes ``in_channels``: with pretrained RGB weights, a grey stem gets the sum of the
  three RGB kernels (a grey image then gives the RGB network's response to that image in three identical channels);
  other channel counts repeat the RGB kernels and scale them by 3 / C. With random weights the family's own
  initial kernels are cut (or repeated) to C channels;
- **the head** (the module computing the logits) gets ``num_classes`` outputs: torchvision builds it so; with
  pretrained weights every other tensor is loaded and the head is new unless the file's head has that size;
- **the input size**: images smaller than the architecture takes (its weights' ``min_size``: 32 for VGG and
  ConvNeXt, 29 DenseNet, 63 AlexNet, 75 Inception-v3, 224 ViT/Swin/MaxViT) are upsampled to that size on the device
  (``input_size`` sets another). ``small_input=true`` (ResNet family only) instead swaps the ImageNet stem for the
  CIFAR one (3x3 conv, stride 1, no max-pool), keeping 28-32 px images at full resolution.

Stem and head per family (the first ``Conv2d`` and the last ``Linear`` of the network, in definition order, checked
for every family in the tests):

======================================  ======================  ================  =================================
family                                  stem                    head              notes
======================================  ======================  ================  =================================
resnet, resnext, wide_resnet            conv1                   fc                ``small_input`` available
regnet                                  stem.0                  fc
vgg, alexnet                            features.0              classifier.6
densenet                                features.conv0          classifier
mobilenet_v2 / efficientnet / mnasnet   features.0.0 / layers.0 classifier.1
mobilenet_v3                            features.0.0            classifier.3
squeezenet                              features.0              classifier.1      a 1x1 conv: features() pools
shufflenet_v2                           conv1.0                 fc
convnext                                features.0.0            classifier.2
googlenet, inception_v3                 conv1.conv / Conv2d_1a  fc                auxiliary heads off
vit                                     conv_proj               heads.head        runs at 224 (its fixed size)
swin                                    features.0.0            head              runs at 224 by default
maxvit                                  stem.0.0                classifier.5      runs at 224 (its fixed size)
======================================  ======================  ================  =================================

``weights``: ``imagenet`` (the architecture's ``<Arch>_Weights.DEFAULT`` from the torch hub cache; offline and
absent: a message naming the file and where to put it), ``none`` (random; ``seed`` fixes it, else the run's seed
does) or a path to a state dict (torchvision's keys, or a cnnfeat checkpoint's ``net.*``). ``freeze=backbone`` trains
only the top (see :class:`~cnnfeat.models.classifier.NetClassifier`); :class:`FrozenTorchvision` is the same frozen
part for the frozen-feature cache (``experiment=transfer_torchvision``, ``experiment=transfer``).

The **top** is what follows the feature vector: the outermost block ending in the head that holds only Linear,
dropout and activation layers (AlexNet/VGG/MobileNet/EfficientNet/MNASNet ``classifier``, ViT ``heads``), else the
head itself (ResNet ``fc``, DenseNet ``classifier``, ConvNeXt ``classifier.2``, MaxViT ``classifier.5``, Swin
``head``). ``head_hidden=[...]`` replaces it by a new MLP (the lecture's recipe: ``experiment=transfer`` is AlexNet with
``head_hidden=[4096, 4096]``, ``head_dropout=0.5`` and ``grey_to_rgb=true``, the numbers of the original
``TransferClassifier``); SqueezeNet's conv head is refused.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn

from cnnfeat.errors import ConfigError, WeightsError, check_bool, check_int
from cnnfeat.models.classifier import NetClassifier, check_freeze, plain
from cnnfeat.models.parts import file_state_dict, hub_state_dict, imagenet_stats, tensors_fingerprint

log = logging.getLogger("cnnfeat")

NORMALIZE_CHOICES = ("imagenet", "none")
#: families whose ImageNet stem ``small_input=true`` replaces with the CIFAR one
SMALL_INPUT_FAMILIES = ("resnet", "resnext", "wide_resnet")
#: auxiliary classifiers of the Inception family: built off, their tensors in ImageNet files skipped
_AUX = ("aux1.", "aux2.", "AuxLogits.")


def architectures() -> list[str]:
    """Every classification architecture of the installed torchvision (``torchvision.models.list_models``)."""
    return tvm.list_models(module=tvm)


def check_arch(arch: Any) -> str:
    """``arch`` if torchvision builds it, else a :class:`ConfigError` with the closest names and the full list."""
    names = architectures()
    if arch not in names:
        close = difflib.get_close_matches(str(arch), names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"model.arch={arch!r} is not a torchvision classification model.{hint} Choose one of {names}")
    return arch


def min_input_size(arch: str) -> int:
    """The smallest image side ``arch`` takes (its default weights' ``min_size``; the fixed size of ViT and MaxViT)."""
    return int(tvm.get_model_weights(arch).DEFAULT.meta["min_size"][0])


def stem_and_head(net: nn.Module) -> tuple[str, str]:
    """Names of the first ``Conv2d`` (the stem) and of the module computing the logits (the last ``Linear``, else the
    last ``Conv2d``: SqueezeNet's 1x1 conv), in definition order."""
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not convs:
        raise ConfigError(f"{type(net).__name__} has no Conv2d layer to adapt to the input channels")
    return convs[0], (linears[-1] if linears else convs[-1])


#: what a classifier block may hold to count as the network's MLP top (besides the blocks it nests)
MLP_PARTS = (nn.Linear, nn.Dropout, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.Identity)


def top_block(net: nn.Module, head: str) -> str:
    """The network's top: the outermost ``Sequential`` that ends in the head and holds only ``Linear``, dropout and
    activation layers (AlexNet's and VGG's ``classifier``, MobileNet's and EfficientNet's, ViT's ``heads``), so that
    its input is the feature vector; the head itself where the block before it does more (ConvNeXt's and MaxViT's
    norm and pooling) or there is none (ResNet's ``fc``)."""
    top, parts = head, head.split(".")
    for i in range(len(parts) - 1, 0, -1):
        block = net.get_submodule(".".join(parts[:i]))
        children = list(block.named_children())
        inner = net.get_submodule(top)
        if not (isinstance(block, nn.Sequential) and children and children[-1][1] is inner):
            break
        if not all(m is inner or isinstance(m, MLP_PARTS) for _, m in children):
            break
        top = ".".join(parts[:i])
    return top


def mlp_top(in_features: int, hidden: Sequence[int], dropout: float, num_classes: int) -> nn.Sequential:
    """A new MLP top: per hidden width dropout, ``Linear`` and ReLU, then the ``Linear`` head (AlexNet's classifier
    layout: ``[4096, 4096]`` gives its seven layers, the head at index 6), PyTorch's default initialisation."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Dropout(dropout), nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def check_head_spec(hidden: Any, dropout: Any) -> tuple[int, ...] | None:
    """``model.head_hidden`` (``None`` or a list of widths >= 1) and ``model.head_dropout`` (in [0, 1)), checked."""
    if not (isinstance(dropout, int | float) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
        raise ConfigError(f"model.head_dropout must be a number in [0, 1), got {dropout!r}")
    if hidden is None:
        return None
    ok = isinstance(hidden, Sequence) and not isinstance(hidden, str)
    if not ok or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
        raise ConfigError(
            f"model.head_hidden must be null or a list of layer widths >= 1, e.g. [4096, 4096], got {hidden!r}"
        )
    return tuple(hidden)


def adapt_channels(weight: torch.Tensor, channels: int, pretrained: bool) -> torch.Tensor:
    """A stem kernel (out, 3, k, k) for ``channels`` inputs: pretrained RGB kernels summed for grey, else repeated and
    scaled by 3 / C (the same response to C identical channels); random kernels cut or repeated, unscaled."""
    have = weight.shape[1]
    if channels == have:
        return weight
    if pretrained and channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeated = weight.repeat(1, math.ceil(channels / have), 1, 1)[:, :channels]
    return repeated * (have / channels) if pretrained else repeated.clone()


def _new_stem(old: nn.Conv2d, in_channels: int, small_input: bool) -> nn.Conv2d:
    if small_input:  # the CIFAR ResNet stem: 3x3, stride 1, initialised as torchvision's ResNet initialises convs
        conv = nn.Conv2d(in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        return conv
    conv = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    with torch.no_grad():
        conv.weight.copy_(adapt_channels(old.weight, in_channels, pretrained=False))
        if old.bias is not None:
            conv.bias.copy_(old.bias)
    return conv


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Random draws from ``seed`` without touching the global RNG (``None``: the global RNG, i.e. the run's seed)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _strip_prefix(state: Mapping[str, torch.Tensor], own: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A cnnfeat checkpoint's ``net.*`` keys (or ``module.*``/``model.*``) as the network's own."""
    if any(k in own for k in state):
        return dict(state)
    for prefix in ("net.", "module.", "model."):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if any(k in own for k in stripped):
            return stripped
    return dict(state)


def load_weights(
    net: nn.Module,
    state: Mapping[str, torch.Tensor],
    arch: str,
    stem: str,
    head: str,
    small_input: bool,
    source: str,
    new_top: str | None = None,
) -> list[str]:
    """Load ``state`` into ``net``, adapting the stem's input channels; a head of another size stays new, and so
    does the block ``new_top`` (its tensors are skipped: a new MLP head replaces it).

    Returns what was adapted (for the log); a state dict of another network is refused, naming what does not fit.
    """
    own = net.state_dict()
    state = _strip_prefix(state, own)
    in_channels = own[f"{stem}.weight"].shape[1]
    loaded: dict[str, torch.Tensor] = {}
    unexpected, shapes, notes = [], [], []
    new_head = False
    for key, value in state.items():
        if key not in own:
            if not key.startswith(_AUX):
                unexpected.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"model.weights={source}: {key} is a {type(value).__name__}, not a tensor")
        want = own[key].shape
        if key.startswith(f"{stem}.") and small_input:
            continue  # the CIFAR stem replaces the ImageNet one
        if new_top is not None and key.startswith(f"{new_top}."):
            continue  # a new MLP head replaces it
        same_kernels = value.ndim == 4 and value.shape[0] == want[0] and value.shape[2:] == want[2:]
        if key == f"{stem}.weight" and value.shape != want and same_kernels:
            notes.append(f"{stem} adapted from {value.shape[1]} to {in_channels} input channels")
            value = adapt_channels(value, in_channels, pretrained=True)
        if key.startswith(f"{head}.") and value.shape != want:
            new_head = True
            continue
        if value.shape != want:
            shapes.append(f"{key}: {tuple(value.shape)} in the file, {tuple(want)} in {arch}")
            continue
        loaded[key] = value
    if not loaded or len(unexpected) > len(loaded):
        raise WeightsError(
            f"model.weights={source} is not a {arch} state dict (keys like {sorted(state)[:5]}; {arch} has keys "
            f"like {list(own)[:5]})"
        )
    if shapes:
        raise WeightsError(f"model.weights={source}: tensors do not fit {arch}: {'; '.join(shapes[:3])}")
    skipped = (
        ((f"{stem}.",) if small_input else ())
        + ((f"{head}.",) if new_head else ())
        + ((f"{new_top}.",) if new_top is not None else ())
    )
    missing = [k for k in own if k not in loaded and not k.startswith(skipped)]
    if missing or unexpected:
        raise WeightsError(
            f"model.weights={source} does not match {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    net.load_state_dict(loaded, strict=False)
    if new_head and new_top is None:
        notes.append(f"{head} new, for {own[f'{head}.weight'].shape[0]} classes")
    if small_input:
        notes.append(f"{stem} new, the small-input stem")
    return notes


def build_net(
    arch: str,
    num_classes: int,
    in_channels: int,
    input_size: int,
    weights: str | os.PathLike | None,
    seed: int | None,
    small_input: bool,
    transform_input: bool,
    head_hidden: Sequence[int] | None = None,
    head_dropout: float = 0.5,
) -> tuple[nn.Module, str, str, str]:
    """The adapted network with the names of its stem, head and top (see the module docstring).

    ``head_hidden`` (a list of widths): the top (:func:`top_block`) is replaced, after the weights are loaded, by a
    new MLP (:func:`mlp_top`) drawn from the global RNG (the run's seed), not from ``seed``: as the lecture's
    ``TransferClassifier`` draws its head, so that runs of several seeds vary the head over one frozen backbone.
    """
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if arch in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True, transform_input=transform_input)
    elif arch.startswith("vit_"):
        kwargs["image_size"] = input_size
    elif arch.startswith("maxvit"):
        kwargs["input_size"] = (input_size, input_size)
    with _seeded(seed):
        try:
            net = tvm.get_model(arch, weights=None, **kwargs)
        except (AssertionError, ValueError) as e:  # e.g. ViT: an image size that its patches do not divide
            raise ConfigError(f"model.arch={arch} cannot be built for {input_size} px inputs: {e}") from e
        stem, head = stem_and_head(net)
        old = net.get_submodule(stem)
        if in_channels != old.in_channels or small_input:
            net.set_submodule(stem, _new_stem(old, in_channels, small_input))
        if small_input:
            net.maxpool = nn.Identity()
    top = head
    if head_hidden is not None:
        if not isinstance(net.get_submodule(head), nn.Linear):
            raise ConfigError(
                f"model.head_hidden replaces {arch}'s top (the layers after its feature vector) by an MLP, but its "
                f"head ({head}) is a {type(net.get_submodule(head)).__name__} on a spatial map, not a Linear on a "
                "feature vector: leave model.head_hidden null"
            )
        top = top_block(net, head)
    if weights is not None and str(weights).lower() != "none":
        if str(weights).lower() == "imagenet":
            enum = tvm.get_model_weights(arch).DEFAULT
            label = type(enum).__name__.removesuffix("_Weights")
            state, source = hub_state_dict(enum, label, f"{arch}.pth"), "imagenet"
        else:
            state, source = file_state_dict(weights, f"a {arch} state dict"), str(weights)
        new_top = top if head_hidden is not None else None
        notes = load_weights(net, state, arch, stem, head, small_input, source, new_top)
        log.info("%s: loaded weights from %s%s", arch, source, f" ({'; '.join(notes)})" if notes else "")
    if head_hidden is not None:
        width = next(m for m in net.get_submodule(top).modules() if isinstance(m, nn.Linear)).in_features
        mlp = mlp_top(width, head_hidden, head_dropout, num_classes)
        net.set_submodule(top, mlp)
        head = f"{top}.{len(mlp) - 1}"
        log.info("%s: %s replaced by a new MLP head %s", arch, top, [width, *head_hidden, num_classes])
    return net, stem, head, top


class TorchvisionClassifier(NetClassifier):
    """A torchvision classification network (``arch``, any of ``torchvision.models.list_models()``), adapted to
    ``in_channels`` x ``image_size`` x ``image_size`` images in [0, 1] and ``num_classes`` classes.

    ``weights``: ``imagenet`` | ``none`` | a state-dict path. ``freeze``: ``none`` | ``backbone`` (only the top
    trains). ``small_input``: the CIFAR stem (ResNet family). ``input_size``: the side images are resized to
    (``None``: ``image_size``, raised to the architecture's minimum). ``normalize``: ``imagenet`` standardises with
    ImageNet's mean/std (grey: their channel means), ``none`` passes images as they come. ``seed``: the network's
    random initialisation (``None``: the global RNG, i.e. the run's ``seed``). ``head_hidden``: ``None`` keeps the
    network's own top (its last Linear new for ``num_classes``); a list of widths replaces the top (the layers after
    the feature vector, :func:`top_block`) by a new MLP with ``head_dropout`` before each hidden Linear, drawn from
    the run's seed (:func:`build_net`). ``grey_to_rgb``: grey images are repeated to 3 channels in front of the
    network's RGB stem, standardised with ImageNet's RGB mean/std (the RGB network on the grey picture, as
    ``FrozenAlexNet`` does) instead of a 1-channel stem. ``channels_last``: the network's weights in channels-last
    memory (as ``TransferClassifier`` runs AlexNet: ~1.7x faster convolutions on a CPU; the vectors' last bits differ
    from the default layout's, so it is part of the cache key). Layer names are ``net.<torchvision's>``.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 224,
        weights: str | None = "imagenet",
        freeze: str | None = "none",
        small_input: bool = False,
        input_size: int | None = None,
        normalize: str = "imagenet",
        seed: int | None = None,
        head_hidden: Sequence[int] | None = None,
        head_dropout: float = 0.5,
        grey_to_rgb: bool = False,
        channels_last: bool = False,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, scheduler=scheduler)
        check_arch(arch)
        hidden = check_head_spec(plain(head_hidden), head_dropout)
        check_bool("model.grey_to_rgb", grey_to_rgb)
        check_bool("model.channels_last", channels_last)
        if grey_to_rgb and in_channels != 1:
            raise ConfigError(
                f"model.grey_to_rgb=true repeats grey images (1 channel) to the network's 3, but the data has "
                f"{in_channels} channels (model.in_channels): leave it false"
            )
        check_int("model.in_channels", in_channels)
        check_int("model.image_size", image_size)
        check_int("model.input_size", input_size, allow_none=True)
        check_int("model.seed", seed, minimum=0, allow_none=True)
        check_bool("model.small_input", small_input)
        frozen = check_freeze(freeze)
        weights = os.fspath(weights) if isinstance(weights, os.PathLike) else weights  # saved as a plain string
        if normalize not in NORMALIZE_CHOICES:
            raise ConfigError(f"model.normalize must be one of {list(NORMALIZE_CHOICES)}, got {normalize!r}")
        if small_input and not arch.startswith(SMALL_INPUT_FAMILIES):
            raise ConfigError(
                f"model.small_input=true replaces the ResNet stem ({', '.join(SMALL_INPUT_FAMILIES)} families), not "
                f"{arch}'s: leave it false (small images are upsampled to the size {arch} takes)"
            )
        head_hidden = list(hidden) if hidden is not None else None  # saved as a plain list
        self.save_hyperparameters()
        self.arch = arch
        size = input_size or (image_size if small_input else max(image_size, min_input_size(arch)))
        if size != image_size:
            log.info("%s: %d px images are resized to %d px on the device", arch, image_size, size)
        channels = 3 if grey_to_rgb else in_channels  # what the network's stem takes
        mean, std = imagenet_stats(channels) if normalize == "imagenet" else (None, None)
        transform_input = channels == 3 and normalize == "imagenet"  # GoogLeNet/Inception: their own input scaling
        net, self.stem_name, head, top = build_net(
            arch, num_classes, channels, size, weights, seed, small_input, transform_input, hidden, head_dropout
        )
        self.attach(net, head, in_channels, image_size, size, mean, std, frozen, top, grey_to_rgb)
        if channels_last:  # AlexNet's convolutions ~1.7x faster on a CPU; last bits differ from the default layout
            self.net.to(memory_format=torch.channels_last)
        if input_size is not None and input_size < min_input_size(arch):
            self.check_example()  # below the size the architecture's weights list: try it (clear error if too small)

    def check_example(self) -> None:
        """One forward pass of ``example_input_array``: the network takes the input size and gives the logits."""
        x = self.example_input_array.to(next(self.parameters()).device)
        was = self.training
        try:
            self.eval()
            with torch.no_grad():
                out = self(x)
        except RuntimeError as e:
            if x.is_meta:  # built on the meta device (checkpoints): let the caller build it for real
                raise
            raise ConfigError(
                f"model.arch={self.arch} cannot take {self.in_channels}x{self.input_size}x{self.input_size} inputs "
                f"({str(e).splitlines()[0][:200]}); set model.input_size to at least {min_input_size(self.arch)}"
            ) from e
        finally:
            self.train(was)
        if tuple(out.shape) != (1, self.num_classes):
            raise ConfigError(f"model.arch={self.arch} gives outputs {tuple(out.shape)}, not (1, {self.num_classes})")

    def preprocessing(self) -> str:
        """What happens to an image before the frozen part, as it enters cache keys."""
        h = self.hparams
        rgb = "|grey-to-rgb" if h.get("grey_to_rgb") else ""
        layout = "|channels-last" if h.get("channels_last") else ""  # the last bits of the vectors depend on it
        return (
            f"{self.arch}|in{h.in_channels}|{h.image_size}->{self.input_size}|norm-{h.normalize}"
            f"|small{int(h.small_input)}|classes{self.num_classes}{rgb}{layout}"
        )

    def fingerprint(self) -> str:
        """Hash of everything before the top (weights and preprocessing): the frozen-feature cache's key."""
        return tensors_fingerprint(self.frozen_tensors(), self.preprocessing())


class FrozenTorchvision(nn.Module):
    """A torchvision network's frozen part for the frozen-feature cache: images -> the top's input (N, D).

    Built from the same arguments as the ``TorchvisionClassifier(freeze="backbone")`` it feeds, so its weights and
    preprocessing are that model's (``fingerprint()`` equal; the picture callbacks' probe refuses a model whose own
    forward disagrees with the cached vectors). ``name`` (the architecture) names the cache folder. ``head_hidden``:
    ``None`` caches the head's input, a list (its widths do not matter here) the input of the top a new MLP head
    replaces (AlexNet: the 9216-d pooled conv features). ``channels_last`` as the model's. Building it leaves the
    global RNG as it was.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        weights: str | None = "imagenet",
        seed: int = 0,
        input_size: int | None = None,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        small_input: bool = False,
        normalize: str = "imagenet",
        head_hidden: Sequence[int] | None = None,
        grey_to_rgb: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        check_int("backbone.seed", seed, minimum=0)
        self.name = arch
        with torch.random.fork_rng(devices=[]):  # the new top's draws (never used here) stay off the run's RNG
            self.model = TorchvisionClassifier(
                arch,
                num_classes,
                in_channels,
                image_size,
                weights,
                "backbone",
                small_input,
                input_size,
                normalize,
                seed,
                head_hidden=None if head_hidden is None else [],  # the smallest new top: the frozen part is the same
                grey_to_rgb=grey_to_rgb,
                channels_last=channels_last,
            )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTorchvision:
        """Stays in eval mode: the frozen part never trains."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.top_input(x)

    def fingerprint(self) -> str:
        """Hash of the frozen weights and the preprocessing: the cache key of its features."""
        return self.model.fingerprint()
