"""The probe: a flat Keras model from the image to every layer output a picture needs,
with nested models (a transfer model's base and head) inlined layer by layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from training.errors import TrainingError

CONVOLUTIONS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")
POOLINGS = ("MaxPooling2D", "AveragePooling2D")


@dataclass(frozen=True)
class Step:
    """One layer call inside the model, nested models inlined: its layer and tensors."""

    layer: object
    inputs: object
    output: object

    @property
    def kind(self) -> str:
        return type(self.layer).__name__


class Probe:
    """A flat Keras model from the image to every layer output that a picture needs.

    Nested models (a transfer model's base and head) are inlined by calling their layers
    again on new symbolic tensors: the layers and weights are the model's own.  Class
    scores are the logits: the last Dense layer's ``x @ W + b``, before its softmax.
    """

    def __init__(self, model):
        import keras

        self.model = model
        inputs = keras.Input(shape=tuple(model.inputs[0].shape[1:]), name="image")
        self.image = inputs
        self.steps: list[Step] = []
        probabilities = _call_inlined(model, inputs, self.steps)
        dense = [step for step in self.steps if step.kind == "Dense"]
        if not dense:
            raise TrainingError("the model has no Dense classifier at its end: cannot compute class scores")
        self.classifier = dense[-1]
        kernel = self.classifier.layer.kernel
        features = keras.ops.cast(self.classifier.inputs, kernel.dtype)
        logits = keras.ops.matmul(features, kernel)
        if self.classifier.layer.use_bias:
            logits = logits + self.classifier.layer.bias
        spatial = [step for step in self.steps if _is_feature_map(step.output)]
        self.convolutions = [step for step in spatial if step.kind in CONVOLUTIONS]
        self.feature_steps = [step for step in spatial if step.kind in CONVOLUTIONS + POOLINGS]
        self.cam_step = self._gap_head_feature_map()
        self.gradcam_step = self._last_convolution_block()
        wanted = {id(step.output): step.output for step in self.feature_steps}
        for step in (self.cam_step, self.gradcam_step):
            if step is not None:
                wanted[id(step.output)] = step.output
        self._index = {key: position for position, key in enumerate(wanted)}
        self.flat = keras.Model(inputs, [*wanted.values(), logits, probabilities], name="probe")

    def _gap_head_feature_map(self) -> Step | None:
        """The map A of a ``A → GlobalAveragePooling2D → (Dropout) → Dense`` head, else None."""
        position = self.steps.index(self.classifier)
        before = position - 1
        while before >= 0 and self.steps[before].kind == "Dropout":
            before -= 1
        if before < 0 or self.steps[before].kind != "GlobalAveragePooling2D":
            return None
        pooling = self.steps[before]
        if getattr(pooling.layer, "keepdims", False) or getattr(pooling.layer, "data_format", "channels_last") != "channels_last":
            return None
        producers = [step for step in self.steps[:before] if step.output is pooling.inputs]
        return producers[-1] if producers else None

    def _last_convolution_block(self) -> Step | None:
        """The last convolution, or the last layer after it that keeps its spatial size
        (its BatchNorm / activation): the map Grad-CAM weighs."""
        if not self.convolutions:
            return None
        last = self.convolutions[-1]
        chosen = last
        for step in self.steps[self.steps.index(last) + 1 :]:
            if not _is_feature_map(step.output) or step.kind in POOLINGS:
                break
            if tuple(step.output.shape[1:3]) == tuple(last.output.shape[1:3]):
                chosen = step
        return chosen

    def run(self, images: np.ndarray, steps: Sequence[Step] = ()):
        """(feature maps of ``steps``, logits, probabilities) as tensors, for gradients."""
        outputs = self.flat(images, training=False)
        maps = [outputs[self._index[id(step.output)]] for step in steps]
        return maps, outputs[-2], outputs[-1]

    def predict(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(logits, probabilities) as numpy, in batches."""
        logits, probabilities = [], []
        for start in range(0, len(images), batch_size):
            _, batch_logits, batch_probabilities = self.run(images[start : start + batch_size])
            logits.append(np.asarray(batch_logits, dtype=np.float32))
            probabilities.append(np.asarray(batch_probabilities, dtype=np.float32))
        return np.concatenate(logits), np.concatenate(probabilities)

    def maps(self, step: Step, images: np.ndarray) -> np.ndarray:
        (feature_map,), _, _ = self.run(images, [step])
        return np.asarray(feature_map, dtype=np.float32)


def _is_feature_map(tensor) -> bool:
    return hasattr(tensor, "shape") and len(tensor.shape) == 4


def _call_inlined(model, inputs, steps: list[Step]):
    """Call ``model``'s layers on ``inputs``, recording each call; nested models are entered."""
    import keras

    if isinstance(model, keras.Sequential):
        outputs = inputs
        for layer in model.layers:
            outputs = _call_recorded(layer, steps, outputs)
        return outputs

    def operation_fn(operation):
        return lambda *args, **kwargs: _call_recorded(operation, steps, *args, **kwargs)

    # The graph walk Functional.call itself uses (keras.src.ops.function.Function); its
    # operation_fn hook lets a nested model's layers be called one by one.
    return model._run_through_graph(inputs, operation_fn=operation_fn)


def _call_recorded(layer, steps: list[Step], *args, **kwargs):
    import keras

    if isinstance(layer, keras.Model):
        return _call_inlined(layer, args[0], steps)
    kwargs.pop("training", None)  # the probe always runs in inference mode
    output = layer(*args, **kwargs)
    steps.append(Step(layer, args[0] if len(args) == 1 else list(args), output))
    return output
