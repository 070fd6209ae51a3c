"""Keras 3 training modules that gpuflow runs on GPU instances.

Each module runs as ``python -m training.<module> [options]``:

* :mod:`training.mnist_mlp`            — the course MLP on MNIST (669,706 weights)
* :mod:`training.cifar10_cnn`          — the course CNN on CIFAR-10 (528,054 weights)
* :mod:`training.cifar10_augmentation` — the same CNN with shift/flip augmentation in tf.data
* :mod:`training.transfer_learning`    — the four transfer-learning cases and bottleneck features
* :mod:`training.visualize`            — pictures of what a saved model learned (filters, feature
  maps, activation maximisation, saliency, CAM / Grad-CAM, confusion matrix, mistakes)

Each module shows its own steps top to bottom (data, model, ``compile``, ``fit``,
``evaluate``) and calls small helpers: :mod:`training.cli` (options, one-line errors),
:mod:`training.data` (datasets and readers, numpy only), :mod:`training.pipeline`
(tf.data), :mod:`training.session` (seed, precision, strategy, optimizer),
:mod:`training.callbacks` (best model, history, ``fit`` from the step checkpoint),
:mod:`training.checkpoint` (the step checkpoint and the stop signals), :mod:`training.outputs`
(metrics.json, the curves) and :mod:`training.layers` (the custom layer, the loader).

This package never imports gpuflow or infra: it runs on instances where only TensorFlow is
installed.  Importing it does not import TensorFlow either; the heavy imports happen
inside the functions that need them.
"""
