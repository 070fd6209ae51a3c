"""Training throughput: the course's input path against training/'s tf.data pipeline.

The course CNN (528,054 weights) trains on the same synthetic CIFAR-shaped images, at the
same batch size, four ways in one process:

  (a) course, plain      numpy float32 arrays into ``model.fit(batch_size=32)``
  (b) tf.data, plain     training.pipeline: uint8 → parallel map (scale, one-hot) → prefetch
  (a) course, augmented  ``tf.keras.preprocessing.image.ImageDataGenerator(width/height
                         shift 0.1, horizontal flip).flow`` into ``model.fit``
  (b) tf.data, augmented training.pipeline with RandomFlip + RandomTranslation in the map

Each way runs ``--epochs`` epochs of ``--images`` images; the first epoch (graph tracing,
warm-up) is not counted, images/s is the median over the others (and over ``--repeats``
alternations of (a) and (b)).  The table gives each (b)/(a) ratio; the target is
(b) >= 1.5x (a) with augmentation.  A last row times the augmented input paths alone,
without training: the rate each can feed an accelerator at.

    python bench/train_throughput.py                       # 1,600 images x 4 epochs x 4 alternations (~80 s on 2 cores)
    python bench/train_throughput.py --images 20000 --epochs 4 --repeats 2 --json results.json

Timings on a shared machine are noisy: run it when the machine is idle, and compare
ratios from one run rather than absolute numbers across runs.
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
    parser.add_argument("--images", type=int, default=1600, help="images per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per way (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of both ways (the course's 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=4, help="alternate (a) and (b) this many times; medians over all (less drift)"
    )
    parser.add_argument("--only", choices=("plain", "augmented"), default=None, help="run one pair only")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    arguments = parser.parse_args(argv)
    if arguments.images < arguments.batch_size or arguments.epochs < 2 or arguments.batch_size < 1 or arguments.repeats < 1:
        parser.error("need --images >= --batch-size >= 1, --epochs >= 2 (the first epoch is warm-up), --repeats >= 1")
    return arguments


def _epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []
            self._start = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def _fresh_model(seed: int):
    import keras

    from training.models import build_cnn

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build_cnn((32, 32, 3), 10)
    model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def measure(way: str, augmented: bool, data, arguments) -> dict:
    """Train a fresh CNN one way; images/s = median over the epochs after the first."""
    import keras
    import tensorflow as tf

    from training import pipeline

    images, labels = data.x_train, data.y_train
    model = _fresh_model(arguments.seed)
    timer = _epoch_timer()
    fit_options = {"epochs": arguments.epochs, "callbacks": [timer], "verbose": 0}
    if way == "course":
        x = images.astype("float32") / 255.0
        y = keras.utils.to_categorical(labels, 10)
        if augmented:
            generator = tf.keras.preprocessing.image.ImageDataGenerator(
                width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True
            )
            model.fit(generator.flow(x, y, batch_size=arguments.batch_size, seed=arguments.seed), **fit_options)
        else:
            model.fit(x, y, batch_size=arguments.batch_size, shuffle=True, **fit_options)
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
        model.fit(dataset, shuffle=False, **fit_options)  # the pipeline shuffles
    return {
        "way": way,
        "augmented": augmented,
        "rates": [len(images) / seconds for seconds in timer.seconds[1:]],
        "epoch_seconds": [round(seconds, 3) for seconds in timer.seconds],
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


def _combine(measurements: list[dict]) -> dict:
    """One way's repeats: images/s is the median over every measured epoch."""
    rates = [rate for measurement in measurements for rate in measurement["rates"]]
    return {
        "way": measurements[0]["way"],
        "augmented": measurements[0]["augmented"],
        "images_per_second": round(statistics.median(rates), 1),
        "epoch_rates": [round(rate, 1) for rate in rates],
    }


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from training.data import make_synthetic
    from training.run import describe_devices

    data = make_synthetic((32, 32, 3), seed=arguments.seed, train_images=arguments.images, test_images=1)
    pairs = [("plain", False), ("augmented", True)]
    if arguments.only:
        pairs = [pair for pair in pairs if pair[0] == arguments.only]
    results = []
    for label, augmented in pairs:
        runs = {"course": [], "tf.data": []}
        for _ in range(arguments.repeats):
            for way in runs:
                runs[way].append(measure(way, augmented, data, arguments))
        course, pipelined = (_combine(runs[way]) for way in ("course", "tf.data"))
        results.append((label, course, pipelined))

    print(
        f"\ncourse CNN, synthetic 32x32x3, {arguments.images} images/epoch, batch {arguments.batch_size}, "
        f"median of epochs 2..{arguments.epochs} x {arguments.repeats} repeat(s); TF {tf.__version__}, Keras {keras.__version__}; "
        f"devices: {', '.join(describe_devices())}; {os.cpu_count()} CPUs"
    )
    header = f"{'input':<10} {'(a) course img/s':>18} {'(b) tf.data img/s':>18} {'(b)/(a)':>8}"
    print(header)
    print("-" * len(header))
    summary = []
    for label, course, pipelined in results:
        ratio = pipelined["images_per_second"] / course["images_per_second"]
        print(f"{label:<10} {course['images_per_second']:>18,.0f} {pipelined['images_per_second']:>18,.0f} {ratio:>7.2f}x")
        summary.append({"input": label, "course": course, "tf_data": pipelined, "ratio": round(ratio, 2)})
    input_only = None
    if arguments.only != "plain":
        course_input = measure_input_only("course", data, arguments)
        pipeline_input = measure_input_only("tf.data", data, arguments)
        ratio = pipeline_input / course_input
        print(f"{'aug input':<10} {course_input:>18,.0f} {pipeline_input:>18,.0f} {ratio:>7.2f}x   (input path alone, no training)")
        input_only = {"course": course_input, "tf_data": pipeline_input, "ratio": round(ratio, 2)}
    print("(a) augmented = ImageDataGenerator(width/height_shift 0.1, horizontal_flip).flow; "
          "(b) augmented = RandomFlip + RandomTranslation in a parallel tf.data map + prefetch")
    if arguments.json:
        arguments.json.write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(arguments).items()},
                                              "results": summary, "augmented_input_only": input_only}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
