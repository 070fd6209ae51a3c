"""Title: See what the network learned — filters, feature maps, activation maximisation,
saliency, CAM / Grad-CAM, confusion matrix and the worst mistakes
Reaches: pictures, not numbers; per-class precision and recall in visualization.json.

The course's part on *looking inside* CNNs, for any classifier these modules save:

* ``filters.png`` — the first convolution's kernels (RGB for colour inputs);
* ``feature_maps.png`` — one test image's activations after every convolution / pooling;
* ``activation_maximization.png`` — inputs that maximise a few filters of the last
  convolution and each class score: gradient ascent from noise around the median pixel,
  with jitter, blur and L2 decay, a fixed seed and a fixed number of steps;
* ``saliency.png`` — under each image, |d class score / d input| (the plain gradient) and
  SmoothGrad (the gradient averaged over noisy copies of the image);
* ``cam.png`` — where the network looked: true CAM (sum_k w_k A_k of the last feature
  map) for a GlobalAveragePooling2D + Dense head (the transfer-learning models), Grad-CAM
  for the course CNN's Flatten + Dense head, laid over the image with each cell drawn at
  the centre of its receptive field (:func:`geometry_of`);
* ``confusion_matrix.png`` (counts and row-normalised) and ``misclassified.png`` (the
  most confident mistakes);
* ``visualization.json`` — accuracy, per-class precision / recall / F1, the confusion
  matrix, which layer each picture used, the activation-maximisation gains, and why a
  picture was skipped (a model without convolutions has no filters, feature maps or CAM).

Class scores are the logits (the last Dense layer before its softmax). The model is
run in inference mode on [0, 1] images, as every module feeds it.

Model → data → probe → pictures:

    python -m training.visualize runs/cnn/best_model.keras               # dataset from metrics.json beside it
    python -m training.visualize best_model.keras --dataset digits --images 12 --output pictures
    python -m training.cifar10_cnn --dataset digits --visualize          # at the end of a training run

Outputs in ``--output`` (default: ``visualization/`` beside the model): the PNGs above
and visualization.json.

The package: :mod:`~training.visualize.command` (options, loading), :mod:`~training.visualize.probe`
(the model opened up), :mod:`~training.visualize.maps` (CAM, Grad-CAM, saliency),
:mod:`~training.visualize.maximization`, :mod:`~training.visualize.pictures` and
:mod:`~training.visualize.report` (all of it for one model: :func:`visualize_model`).
Importing it imports neither TensorFlow nor matplotlib.
"""

from training.visualize.command import VisualizeOptions, load_classifier, main, parse_options, visualize
from training.visualize.maps import (
    class_activation_maps,
    geometry_of,
    grad_cam,
    heat,
    localisation_maps,
    place,
    saliency_maps,
    smoothgrad_maps,
)
from training.visualize.maximization import (
    class_objective,
    filter_objective,
    maximize,
    selective_filters,
    starting_noise,
)
from training.visualize.probe import Probe, Step
from training.visualize.report import (
    DEFAULT_IMAGES,
    DEFAULT_STEPS,
    MAXIMIZED_FILTERS,
    PICTURES,
    REPORT_FILE,
    ImageSet,
    after_training,
    image_set,
    per_class_metrics,
    visualize_model,
)

__all__ = [
    "DEFAULT_IMAGES", "DEFAULT_STEPS", "MAXIMIZED_FILTERS", "PICTURES", "REPORT_FILE", "ImageSet", "Probe", "Step",
    "VisualizeOptions", "after_training", "class_activation_maps", "class_objective", "filter_objective",
    "geometry_of", "grad_cam", "heat", "image_set", "load_classifier", "localisation_maps", "main", "maximize",
    "parse_options", "per_class_metrics", "place", "saliency_maps", "selective_filters", "smoothgrad_maps",
    "starting_noise",
    "visualize", "visualize_model",
]
