"""The built-in tasks: ``mlp``, ``cnn``, ``resnet18`` and ``vgg16`` on the bundled digits or a synthetic set.

Each model gets the data in the shape it takes: flat vectors for the MLP, 1×8×8 images for the small CNN and the
sequential ``convnet`` (the model block-wise training splits), and for
the CIFAR-sized models (ResNet-18, VGG-16: 3 channels, five halvings in VGG's features) 3×32×32 images, each
digits pixel repeated 4×4 and on every channel. Any input width and class count work: the MLP is built for the
data's features and classes; image models need square images.

``gradshard train --model cnn`` is the task ``gradshard.fl.builtin:builtin`` with options
``{"model": "cnn", "data": "digits", ...}``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradshard.fl import data as fldata
from gradshard.fl.task import Task, TaskError, TaskRef

MODELS = ("mlp", "cnn", "convnet", "resnet18", "vgg16")
_CIFAR_MODELS = ("resnet18", "vgg16")


def builtin_ref(model: str, data: str = "digits", test_fraction: float = 0.2, seed: int = 0, *,
                datasets: tuple[fldata.Dataset, fldata.Dataset] | None = None) -> TaskRef:
    """The reference of a built-in task (what the trainer passes to client functions). With ``datasets`` (the
    Python API's own data) the model is sized for them and the task's data is theirs (written by the driver)."""
    options: dict[str, Any] = {"model": model, "data": data, "test_fraction": test_fraction, "seed": seed}
    if datasets is None:  # sized here, once, so client functions never load the data set to build the model
        datasets = _load(data, test_fraction, seed)
    options.update(classes=datasets[0].num_classes, features=datasets[0].num_features)
    return TaskRef(target="gradshard.fl.builtin:builtin", options=options)


def _load(data: str, test_fraction: float, seed: int) -> tuple[fldata.Dataset, fldata.Dataset]:
    if data not in ("digits", "synthetic"):
        raise TaskError(f"unknown data set {data!r}; bundled: digits, synthetic")
    loader = fldata.load_digits if data == "digits" else fldata.make_synthetic
    return loader(test_fraction=test_fraction, seed=seed)


def shape_for(model: str, dataset: fldata.Dataset) -> fldata.Dataset:
    """``dataset`` in the input shape ``model`` takes (see the module docstring)."""
    if model == "mlp":
        return dataset.flattened()
    side = math.isqrt(dataset.num_features)
    if side * side != dataset.num_features and model != "mlp":
        raise TaskError(f"model {model!r} takes square images; {dataset.num_features} features per example are "
                        "not one (use --model mlp, or a task of your own)")
    images = dataset.flattened().as_images(1)
    if model == "convnet":
        return images
    if model == "cnn":
        if side % 2:
            raise TaskError(f"model 'cnn' needs an even image side, got {side}×{side}")
        return images
    if model in _CIFAR_MODELS:
        scale = max(1, -(-32 // side))
        x = images.x.repeat(scale, axis=2).repeat(scale, axis=3)
        x = np.ascontiguousarray(np.broadcast_to(x, (len(images), 3, *x.shape[2:])))
        return fldata.Dataset(x, images.y, images.num_classes)
    raise TaskError(f"unknown model {model!r}; built-in: {', '.join(MODELS)}")


def builtin(model: str = "mlp", data: str = "digits", test_fraction: float = 0.2, seed: int = 0,
            classes: int | None = None, features: int | None = None) -> Task:
    """A built-in model on a bundled data set, shaped for the model. ``classes`` and ``features`` size the model
    without loading the data (client functions read their data from the store)."""
    from gradshard.fl.models import build_model

    if model not in MODELS:
        raise TaskError(f"unknown model {model!r}; built-in: {', '.join(MODELS)}")
    def load() -> tuple[fldata.Dataset, fldata.Dataset]:
        train, test = _load(data, test_fraction, seed)
        return shape_for(model, train), shape_for(model, test)

    if classes is None or features is None:
        train, _ = _load(data, test_fraction, seed)
        classes, features = train.num_classes, train.num_features
    options: dict[str, Any] = {}
    if model == "mlp":
        options = {"in_features": features}
    elif model in ("cnn", "convnet"):
        options = {"image_size": math.isqrt(features)}
    n_classes = classes

    def make() -> Any:
        return build_model(model, n_classes, **options)

    return Task(model=make, data=load, name=model)
