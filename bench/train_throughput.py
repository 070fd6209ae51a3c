"""Training throughput: the course's input path against training/'s tf.data pipeline.

The course CNN (528,054 weights) trains on the same synthetic CIFAR-shaped images, at the
same batch size, four ways in one process:

  (a) course, plain      numpy float32 arrays into ``model.fit(batch_size=32)``
  (b) tf.data, plain     training.pipeline: uint8 → parallel map (scale, one-hot) → prefetch
  (a) course, augmented  ``tf.keras.preprocessing.image.ImageDataGenerator(width/height
                         shift 0.1, horizontal flip).flow`` into ``model.fit``
  (b) tf.data, augmented training.pipeline.augment_batch (the same shift + flip) in the map

Rounds of paired epochs: the four models live side by side and each trains one epoch of
``--images`` images per round, in an order rotated every round, for ``--rounds`` rounds
after one warm-up epoch each (graph tracing, not counted).  Each round's ratios compare
epochs run seconds apart, so load that comes and goes on a shared machine hits every way
alike; the table gives the median images/s of each way, the median of the round ratios
and their interquartile range.  The target is (b) >= 1.5x (a) with augmentation.  The
"aug cost" row is what augmenting slows each way's training by — the course's figure is
also the most (b) can gain on this machine, since (b) cannot train faster than unaugmented
training.  A last row times the augmented input paths alone, without training: the rate
each can feed an accelerator at.

    python bench/train_throughput.py                       # 3,200 images x 12 rounds (~2 min on 2 cores)
    python bench/train_throughput.py --images 20000 --rounds 6 --json results.json

Compare ratios from one run rather than absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3200, help="images per epoch")
    parser.add_argument("--rounds", type=int, default=12, help="measured epochs per way, alternating (a) and (b)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of both ways (the course's 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("plain", "augmented"), default=None, help="run one input only")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    arguments = parser.parse_args(argv)
    if arguments.images < arguments.batch_size or arguments.batch_size < 1 or arguments.rounds < 1:
        parser.error("need --images >= --batch-size >= 1 and --rounds >= 1")
    return arguments


def epoch_rate_callback(images: int):
    """A Keras callback that keeps images/s of every epoch it sees (Keras imported lazily)."""
    import keras

    class EpochRate(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rates: list[float] = []
            self._start = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.rates.append(images / (time.perf_counter() - self._start))

    return EpochRate()


def _compiled_cnn():
    from training.models import build_cnn

    model = build_cnn((32, 32, 3), 10)
    model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def prepare(way: str, augmented: bool, data, arguments):
    """A fresh CNN and the ``model.fit`` arguments that feed it one way: one call = one epoch."""
    import keras
    import tensorflow as tf

    from training import pipeline

    images, labels = data.x_train, data.y_train
    timer = epoch_rate_callback(len(images))
    common = {"epochs": 1, "callbacks": [timer], "verbose": 0}
    if way == "course":
        x = images.astype("float32") / 255.0
        y = keras.utils.to_categorical(labels, 10)
        if augmented:
            generator = tf.keras.preprocessing.image.ImageDataGenerator(
                width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True
            )
            fit_arguments = {"x": generator.flow(x, y, batch_size=arguments.batch_size, seed=arguments.seed)}
        else:
            fit_arguments = {"x": x, "y": y, "batch_size": arguments.batch_size, "shuffle": True}
    else:
        dataset = pipeline.make_dataset(
            images,
            labels,
            num_classes=10,
            pixel_max=255.0,
            batch_size=arguments.batch_size,
            shuffle=True,
            seed=arguments.seed,
            augment=augmented,
        )
        # Each fit call iterates the dataset afresh: a new permutation and new augmentation.
        fit_arguments = {"x": dataset, "shuffle": False}
    return _compiled_cnn(), {**fit_arguments, **common}, timer


def measure_rotation(ways: list[tuple[str, bool]], data, arguments) -> dict[tuple[str, bool], list[float]]:
    """Every way trains one epoch per round, in an order rotated each round; images/s per epoch.

    All models live side by side, so the epochs compared in one round ran seconds apart
    and a shared machine's changing load hits every way alike.
    """
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(arguments.seed)
    prepared = {way: prepare(way[0], way[1], data, arguments) for way in ways}
    for model, fit_arguments, _ in prepared.values():
        model.fit(**fit_arguments)  # warm-up: tracing and first-iteration costs
    for round_index in range(arguments.rounds):
        shift = round_index % len(ways)
        for way in ways[shift:] + ways[:shift]:
            model, fit_arguments, _ = prepared[way]
            model.fit(**fit_arguments)
    return {way: timer.rates[1:] for way, (_, _, timer) in prepared.items()}


def paired_ratio(numerators: list[float], denominators: list[float]) -> dict:
    """Median and interquartile range of the per-round ratios."""
    ratios = [top / bottom for top, bottom in zip(numerators, denominators)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "median": round(statistics.median(ratios), 2),
        "interquartile": [round(quartiles[0], 2), round(quartiles[2], 2)],
        "rounds": [round(ratio, 3) for ratio in ratios],
    }


def measure_input_only(way: str, data, arguments) -> float:
    """Images/s the augmented input path delivers with no training attached (median of 3 passes).

    This is the ceiling the input puts on training: on a GPU, which trains this CNN far
    faster than 2 CPU cores, it is what decides the throughput.
    """
    import tensorflow as tf

    from training import pipeline

    images, labels = data.x_train, data.y_train
    if way == "course":
        generator = tf.keras.preprocessing.image.ImageDataGenerator(
            width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True
        )
        iterator = generator.flow(images.astype("float32") / 255.0, labels, batch_size=arguments.batch_size)

        def one_pass():
            for index in range(len(iterator)):
                iterator[index]

    else:
        dataset = pipeline.make_dataset(
            images, labels, num_classes=10, pixel_max=255.0, batch_size=arguments.batch_size,
            shuffle=True, seed=arguments.seed, augment=True,
        )

        def one_pass():
            for _ in dataset:
                pass

    one_pass()  # warm-up (tracing)
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        one_pass()
        rates.append(len(images) / (time.perf_counter() - started))
    return round(statistics.median(rates), 1)


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from training.data import make_synthetic
    from training.session import describe_devices

    data = make_synthetic((32, 32, 3), seed=arguments.seed, train_images=arguments.images, test_images=1)
    inputs = [False, True] if arguments.only is None else [arguments.only == "augmented"]
    ways = [(way, augmented) for augmented in inputs for way in ("course", "tf.data")]
    rates = measure_rotation(ways, data, arguments)

    print(
        f"\ncourse CNN, synthetic 32x32x3, {arguments.images} images/epoch, batch {arguments.batch_size}, "
        f"{arguments.rounds} rounds of one epoch per way after 1 warm-up; TF {tf.__version__}, "
        f"Keras {keras.__version__}; devices: {', '.join(describe_devices())}; {os.cpu_count()} CPUs"
    )
    header = f"{'input':<10} {'(a) course img/s':>18} {'(b) tf.data img/s':>18} {'(b)/(a)':>8}  {'round ratios, IQR':>18}"
    print(header)
    print("-" * len(header))
    results = []
    for augmented in inputs:
        course, pipelined = rates[("course", augmented)], rates[("tf.data", augmented)]
        ratio = paired_ratio(pipelined, course)
        results.append({
            "input": "augmented" if augmented else "plain",
            "course_images_per_second": round(statistics.median(course), 1),
            "tf_data_images_per_second": round(statistics.median(pipelined), 1),
            "ratio": ratio,
        })
        low, high = ratio["interquartile"]
        print(
            f"{results[-1]['input']:<10} {results[-1]['course_images_per_second']:>18,.0f} "
            f"{results[-1]['tf_data_images_per_second']:>18,.0f} {ratio['median']:>7.2f}x  {f'{low:.2f}-{high:.2f}x':>18}"
        )
    augmentation_cost = None
    if len(inputs) == 2:
        # What augmenting costs each way's training (plain / augmented images/s, paired by round).
        # The course's figure is also the most (b) can gain end to end on this machine: with
        # free augmentation, (b) augmented would train as fast as plain training does.
        augmentation_cost = {
            way: paired_ratio(rates[(way, False)], rates[(way, True)]) for way in ("course", "tf.data")
        }
        print(
            f"{'aug cost':<10} {augmentation_cost['course']['median']:>17.2f}x {augmentation_cost['tf.data']['median']:>17.2f}x"
            "            (plain / augmented img/s: the slowdown augmentation causes)"
        )
    input_only = None
    if arguments.only != "plain":
        course_input = measure_input_only("course", data, arguments)
        pipeline_input = measure_input_only("tf.data", data, arguments)
        ratio = pipeline_input / course_input
        print(f"{'aug input':<10} {course_input:>18,.0f} {pipeline_input:>18,.0f} {ratio:>7.2f}x   (input path alone, no training)")
        input_only = {"course": course_input, "tf_data": pipeline_input, "ratio": round(ratio, 2)}
    print("(a) augmented = ImageDataGenerator(width/height_shift 0.1, horizontal_flip).flow; "
          "(b) augmented = training.pipeline.augment_batch (same shift + flip) in a parallel tf.data map + prefetch")
    if arguments.json:
        arguments.json.write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(arguments).items()},
                                              "results": results, "augmentation_cost": augmentation_cost,
                                              "augmented_input_only": input_only, "epoch_rates": {
                                                  f"{way} {'augmented' if augmented else 'plain'}": [round(rate, 1) for rate in values]
                                                  for (way, augmented), values in rates.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
