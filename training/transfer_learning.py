"""Title: Transfer learning — the course's four cases and bottleneck features
Demonstrates: reusing a pretrained network's features for a new task — freezing or
fine-tuning its layers, cutting it early or late, and training only a new head on
features computed once.
Reaches: what the base allows; the course got 46.65% on 133 dog breeds from VGG16
bottleneck features (GAP + Dense 133) and 82.68% on CIFAR-10 from InceptionV3 features.

A pretrained base (a ``keras.applications`` model — VGG16, ResNet50 or MobileNetV2 — or a
``.keras`` model saved by an earlier run of these modules, e.g. the CNN of
:mod:`training.cifar10_cnn`) gets a new head, GlobalAveragePooling2D + Dense softmax as
in the course.  ``--case`` picks the course's recipe by how much data there is and how
similar it is to the base's training data:

=================  ==========================================================  ========
case               what is trained                                             lr
=================  ==========================================================  ========
small-similar      the new head only; the whole base is frozen                 1e-3
small-different    the new head only, on a base cut early (generic features)   1e-3
large-similar      everything, starting from the pretrained weights (fine-tune) 1e-4
large-different    everything, from the pretrained weights at a higher rate     1e-3
                   (``--weights none``: retrain from scratch); BatchNorm trains
=================  ==========================================================  ========

``--bottleneck`` (frozen cases only) is the course's bottleneck-feature workflow: run the
frozen base once over every image, save the features to
``<output>/bottleneck_features.npz`` (reused by later runs with the same base and data),
then train only the head on them — many epochs for the price of one forward pass.

How to run it:

    python -m training.transfer_learning --base vgg16 --weights imagenet --case small-similar
    python -m training.transfer_learning --base resnet50 --weights ~/resnet50_notop.h5 --bottleneck
    python -m training.transfer_learning --base-model runs/cnn/best_model.keras --case small-different

Images enter the model as [0, 1] RGB (grey images are repeated to 3 channels), are
resized to ``--image-size`` and go through the base's ImageNet preprocessing inside the
model, so the saved model takes the same input as every other module's.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from training import cli, outputs, visualize
from training.callbacks import CourseCallbacks
from training.data import Splits, hold_out_validation, load_dataset
from training.errors import TrainingError
from training.pipeline import make_dataset, make_splits_datasets
from training.session import make_optimizer, start_session

MODULE = "training.transfer_learning"
VALIDATION_FRACTION = 0.1
FEATURES_FILE = "bottleneck_features.npz"

CASES = ("small-similar", "small-different", "large-similar", "large-different")
FROZEN_CASES = ("small-similar", "small-different")
CASE_LEARNING_RATES = {
    "small-similar": 1e-3,
    "small-different": 1e-3,
    "large-similar": 1e-4,
    "large-different": 1e-3,
}

# keras.applications bases: constructor name, ImageNet preprocessing mode, and where
# to cut them: "full" is the last convolutional feature map, "early" a mid-level one.
BASES = {
    "vgg16": {"application": "VGG16", "mode": "caffe", "full": "block5_pool", "early": "block3_pool"},
    "resnet50": {"application": "ResNet50", "mode": "caffe", "full": "conv5_block3_out", "early": "conv3_block4_out"},
    "mobilenetv2": {"application": "MobileNetV2", "mode": "tf", "full": "out_relu", "early": "block_6_expand_relu"},
}
MIN_IMAGE_SIZE = 32  # the smallest input keras.applications accepts


# --------------------------------------------------------------------------- options


def build_parser():
    parser = cli.build_parser(
        MODULE,
        "Transfer learning: a pretrained base + GAP/Dense head, the course's four cases, bottleneck features.",
        default_dataset="cifar10",
        default_epochs=10,
        default_batch_size=32,
        default_optimizer="adam",
        default_learning_rate=None,
    )
    parser.add_argument("--case", choices=CASES, default="small-similar", help="which of the course's four cases")
    parser.add_argument("--base", choices=tuple(BASES), default="vgg16", help="the keras.applications base")
    parser.add_argument(
        "--weights",
        default=None,
        help="the base's weights: imagenet (downloaded into $KERAS_HOME/models), a local weights file, "
        "or none (random) [default: imagenet]",
    )
    parser.add_argument(
        "--base-model",
        type=Path,
        default=None,
        help="a .keras model saved by an earlier run (e.g. training.cifar10_cnn's best_model.keras) to use as the base",
    )
    parser.add_argument(
        "--image-size",
        type=cli.positive_int,
        default=None,
        help=f"side the images are resized to for a keras.applications base [default: the dataset's, at least {MIN_IMAGE_SIZE}]",
    )
    parser.add_argument(
        "--bottleneck",
        action="store_true",
        help=f"extract features once with the frozen base into {FEATURES_FILE}, then train only the head",
    )
    return parser


def validate(namespace) -> None:
    """Checks that need no TensorFlow: combinations of options and files that must exist."""
    if namespace.base_model is not None:
        if namespace.weights is not None:
            raise TrainingError("--weights applies to a keras.applications base; drop it when using --base-model")
        if namespace.base_model.suffix != ".keras" or not namespace.base_model.is_file():
            raise TrainingError(f"--base-model {namespace.base_model} is not a .keras file: pass a saved best_model.keras")
    weights = namespace.weights or "imagenet"
    if weights not in ("imagenet", "none") and not Path(weights).expanduser().is_file():
        raise TrainingError(f"--weights {weights}: no such file; pass imagenet, none or the path of a weights file")
    if namespace.bottleneck and namespace.case not in FROZEN_CASES:
        raise TrainingError(
            f"--bottleneck needs a frozen base, but --case {namespace.case} trains it: use --case small-similar or small-different"
        )
    if namespace.bottleneck and namespace.visualize:
        raise TrainingError(
            "--visualize needs a model that takes images, but --bottleneck trains a head on features: drop one of them"
        )
    if namespace.image_size is not None and namespace.image_size < MIN_IMAGE_SIZE:
        raise TrainingError(f"--image-size must be at least {MIN_IMAGE_SIZE} for keras.applications bases")


# --------------------------------------------------------------------------- 1. the data


def load_data(options: cli.RunOptions) -> Splits:
    """The images as stored (uint8) with integer labels; the first 10% of the training
    images held out for validation."""
    data = load_dataset(
        options.dataset, data_dir=options.data_dir, limit=options.limit, seed=options.seed, synthetic_shape=(32, 32, 3)
    )
    return hold_out_validation(data, fraction=VALIDATION_FRACTION, position="first")


# --------------------------------------------------------------------------- 2. the model: a pretrained base + a new head


def _cut_layer_of_saved_model(model, case: str) -> str:
    """Where to cut a model saved by these modules: its last 4-D feature map ("full"),
    or for small-different the middle pooling layer (generic, earlier features)."""
    feature_layers = [layer for layer in model.layers if len(getattr(layer, "output").shape) == 4]
    if not feature_layers:
        raise TrainingError(f"--base-model has no convolutional feature map to cut at (layers: {[l.name for l in model.layers]})")
    if case == "small-different":
        pools = [layer for layer in feature_layers if "pooling" in type(layer).__name__.lower()]
        if len(pools) >= 2:
            return pools[(len(pools) - 1) // 2].name
    return feature_layers[-1].name


def load_base(namespace, input_shape: tuple[int, ...]):
    """(feature-extractor model from [0, 1] images of ``input_shape``, description dict).

    The extractor includes the channel repeat, the resize and the ImageNet preprocessing,
    and ends at the cut layer of the base.
    """
    import keras

    from training.layers import ImagenetPreprocessing

    height, width, channels = input_shape
    cut = "early" if namespace.case == "small-different" else "full"
    if namespace.base_model is not None:
        try:
            base = keras.models.load_model(namespace.base_model, compile=False)
        except (ValueError, OSError, TypeError, KeyError) as exc:
            raise TrainingError(
                f"cannot load --base-model {namespace.base_model}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc
        base_shape = tuple(base.inputs[0].shape[1:])
        layer_name = _cut_layer_of_saved_model(base, namespace.case)
        description = {"base": str(namespace.base_model), "weights": "from the saved model", "cut_layer": layer_name}
        preprocessing = None
    else:
        spec = BASES[namespace.base]
        size = namespace.image_size or max(MIN_IMAGE_SIZE, height, width)
        weights = namespace.weights or "imagenet"
        keras_weights = None if weights == "none" else (weights if weights == "imagenet" else str(Path(weights).expanduser()))
        application = getattr(keras.applications, spec["application"])
        try:
            base = application(include_top=False, weights=keras_weights, input_shape=(size, size, 3))
        except ValueError as exc:
            raise TrainingError(f"cannot load --weights {weights} into {namespace.base}: {str(exc).splitlines()[0]}") from exc
        except Exception as exc:  # keras reports a failed download as a plain Exception
            if weights != "imagenet":
                raise
            raise TrainingError(
                f"could not fetch the imagenet weights of {namespace.base} ({str(exc).splitlines()[0]}); without network, "
                "pass --weights PATH to a local weights file (or --weights none)"
            ) from exc
        base_shape = (size, size, 3)
        layer_name = spec[cut]
        description = {"base": namespace.base, "weights": weights, "cut_layer": layer_name}
        preprocessing = ImagenetPreprocessing(spec["mode"])

    extractor_base = keras.Model(base.inputs, base.get_layer(layer_name).output, name=f"base_to_{layer_name}")
    extractor_base.trainable = namespace.case not in FROZEN_CASES

    inputs = keras.Input(shape=input_shape)
    images = inputs
    if channels != base_shape[2]:
        if channels == 1 and base_shape[2] == 3:
            images = keras.layers.Concatenate(name="grey_to_rgb")([images, images, images])
        else:
            raise TrainingError(f"the base takes {base_shape[2]}-channel images, the dataset has {channels}")
    if (height, width) != tuple(base_shape[:2]):
        images = keras.layers.Resizing(base_shape[0], base_shape[1], name="resize_to_base")(images)
    if preprocessing is not None:
        images = preprocessing(images)
    # Frozen and fine-tuned bases keep BatchNorm in inference mode (the Keras guide's advice);
    # large-different retrains them, statistics included.
    features = extractor_base(images, training=None if namespace.case == "large-different" else False)
    description["image_size"] = list(base_shape)
    return keras.Model(inputs, features, name="feature_extractor"), description


def build_head(feature_shape: tuple[int, ...], num_classes: int, name: str = "head"):
    """GlobalAveragePooling2D + Dense softmax, the course's head."""
    import keras

    inputs = keras.Input(shape=feature_shape)
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32")(pooled)
    return keras.Model(inputs, outputs, name=name)


# --------------------------------------------------------------------------- bottleneck features


def extract_features(namespace, options: cli.RunOptions, splits: Splits) -> tuple[Splits, dict]:
    """Features of every split from the frozen base, computed once and cached in the output."""
    start_session(options)
    path = options.output / FEATURES_FILE
    weights_file = namespace.base_model or (
        Path(namespace.weights).expanduser() if namespace.weights not in (None, "imagenet", "none") else None
    )
    signature = json.dumps(
        {
            "base": str(namespace.base_model) if namespace.base_model else namespace.base,
            "weights": namespace.weights or "imagenet",
            # A file replaced in place (same path, new content) must not reuse old features.
            "weights_file_stat": [weights_file.stat().st_size, weights_file.stat().st_mtime_ns] if weights_file else None,
            "case": namespace.case,
            "image_size": namespace.image_size,
            "dataset": splits.name,
            "source": splits.source,
            "samples": splits.counts(),
            "limit": options.limit,
            "seed": options.seed if splits.name == "synthetic" else None,
        },
        sort_keys=True,
    )
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["signature"]) == signature:
                arrays = {key: cached[key] for key in cached.files if key != "signature"}
                description = json.loads(str(cached["description"]))
                return _feature_splits(splits, arrays), {**description, "features_reused": True, "extraction_seconds": 0.0}

    started = time.perf_counter()
    extractor, description = load_base(namespace, splits.image_shape)
    arrays = {}
    for part in ("train", "val", "test"):
        images, labels = getattr(splits, f"x_{part}"), getattr(splits, f"y_{part}")
        dataset = make_dataset(
            images,
            labels,
            num_classes=splits.num_classes,
            pixel_max=splits.pixel_max,
            batch_size=options.batch_size,
            shuffle=False,
            seed=options.seed,
        )
        arrays[f"x_{part}"] = np.asarray(extractor.predict(dataset, verbose=0), dtype=np.float32)
        arrays[f"y_{part}"] = labels
    description["feature_shape"] = list(arrays["x_train"].shape[1:])
    np.savez(path, signature=np.array(signature), description=np.array(json.dumps(description)), **arrays)
    return _feature_splits(splits, arrays), {
        **description,
        "features_reused": False,
        "extraction_seconds": round(time.perf_counter() - started, 3),
    }


def _feature_splits(splits: Splits, arrays: dict) -> Splits:
    return Splits(
        name=splits.name,
        source=f"{splits.source} -> bottleneck features",
        x_train=arrays["x_train"],
        y_train=arrays["y_train"],
        x_val=arrays["x_val"],
        y_val=arrays["y_val"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        num_classes=splits.num_classes,
        pixel_max=1.0,
    )


# --------------------------------------------------------------------------- 3. train and evaluate


def train(options: cli.RunOptions, namespace, *, extra_callbacks: Sequence[object] = ()) -> dict:
    """A new head on a pretrained base (``--case``), or on its bottleneck features; returns metrics.json's content."""
    splits = load_data(options)
    described = {"case": namespace.case, "bottleneck": bool(namespace.bottleneck)}
    if namespace.bottleneck:
        # The frozen base runs once over every image; from here on the "images" are its features.
        splits, base = extract_features(namespace, options, splits)
        described.update(base, features_file=FEATURES_FILE)

    # Seed, precision policy, and a MirroredStrategy when there are several GPUs.
    session = start_session(options)
    with session.strategy.scope():
        if namespace.bottleneck:
            model = build_head(splits.image_shape, splits.num_classes)
        else:
            import keras

            # images → (grey to RGB, resize, ImageNet preprocessing) → the base, cut → GAP → Dense softmax
            extractor, base = load_base(namespace, splits.image_shape)
            described.update(base)
            head = build_head(tuple(extractor.output.shape[1:]), splits.num_classes)
            model = keras.Model(extractor.inputs, head(extractor.outputs[0]), name=f"transfer_{namespace.case}")
        model.compile(
            optimizer=make_optimizer(options.optimizer, options.learning_rate),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=options.xla,
        )

    # tf.data: scaled to [0, 1], one-hot labels, each epoch's order drawn from (seed, epoch), prefetched.
    train_data, validation_data, test_data = make_splits_datasets(
        splits, batch_size=options.batch_size, seed=options.seed
    )
    # Keep the best epoch (best_model.keras), log each epoch (history.csv), save the step checkpoint
    # (checkpoint/: each epoch end, every --save-every-steps / --save-every-seconds, on SIGTERM).
    identity = {key: str(value) for key, value in described.items() if key in ("case", "bottleneck")}
    identity["base"] = str(namespace.base_model) if namespace.base_model else namespace.base
    callbacks = CourseCallbacks(options, train_data, identity=identity, extra=extra_callbacks)
    # model.fit from where the step checkpoint stands (the start, or the step after a stop).
    callbacks.fit(model, train_data, validation_data=validation_data)

    # The test accuracy of the best epoch's weights; metrics.json says which base and case.
    best_model = callbacks.best_model(model)
    test_loss, test_accuracy = best_model.evaluate(test_data, verbose=0)
    metrics = outputs.finish(
        options, session, splits, best_model, callbacks, test_loss, test_accuracy, extra=described
    )
    if options.visualize:  # not with --bottleneck (refused by validate): that model takes features
        visualize.after_training(best_model, splits, options)
    return metrics


def _main(argv: Sequence[str] | None) -> dict:
    options, namespace = cli.parse_options(build_parser(), argv, MODULE, validate=validate)
    if namespace.learning_rate is None:
        options = replace(options, learning_rate=CASE_LEARNING_RATES[namespace.case])
    return train(options, namespace)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_cli(_main, argv)


if __name__ == "__main__":
    cli.exit_process(main())
