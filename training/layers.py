"""Custom Keras layers saved inside the models, and the loader that knows them (imports
Keras: import this module lazily).

``ImagenetPreprocessing`` puts keras.applications' ``preprocess_input`` inside the
model, as a serialisable layer (a Lambda would need ``safe_mode=False`` to reload), so
a saved transfer-learning model takes the same [0, 1] images as every other module's.
"""

from __future__ import annotations

from pathlib import Path

import keras

# keras.applications.imagenet_utils, mode "caffe": BGR order, ImageNet channel means.
_CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)
MODES = ("caffe", "tf")


@keras.saving.register_keras_serializable(package="training")
class ImagenetPreprocessing(keras.layers.Layer):
    """[0, 1] RGB images → the input a keras.applications base expects.

    ``caffe`` (VGG16, ResNet50): scale to 0..255, RGB → BGR, subtract the ImageNet means.
    ``tf`` (MobileNetV2): scale to [-1, 1].
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode

    def call(self, inputs):
        if self.mode == "tf":
            return inputs * 2.0 - 1.0
        bgr = keras.ops.flip(inputs * 255.0, axis=-1)
        return bgr - keras.ops.convert_to_tensor(_CAFFE_BGR_MEANS, dtype=bgr.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def load_model(path: Path):
    """Load a ``.keras`` model written by any training module (with the layers above)."""
    return keras.models.load_model(Path(path), compile=True)
