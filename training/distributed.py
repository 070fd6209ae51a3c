"""Training across several workers: ``tf.distribute.MultiWorkerMirroredStrategy`` driven
by ``TF_CONFIG``, with a custom training loop.

Why a custom loop: Keras 3's ``model.fit`` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585, ``ValueError: Attempt to convert a value (PerReplica…)``).  The
loop here is what fit does, written with TensorFlow's documented pieces: ``strategy.run``
of a step with the Keras 3 model and optimizer (the optimizer all-reduces the gradients),
the loss averaged over the *global* batch (``tf.nn.compute_average_loss``, global batch =
``--batch-size``), and the batches sharded by replica (``distribute_datasets_from_function``).
It drives the run's Keras callbacks (the epoch timer, ``ModelCheckpoint``, ``CSVLogger``)
as fit would, so the outputs are the same files with the same columns.

* **Shards.**  Every worker builds the same global batch from (seed, epoch, step)
  (:class:`training.pipeline.TrainStream`) and keeps its replica's contiguous slice, so
  the union of the shards is exactly the one-worker batch.  Dropout draws its mask for
  the whole global batch from (seed, step, layer) and each replica keeps its slice: the
  same masks, however many workers (the parity oracle in tests/training/ relies on it).
* **One small all-reduce per step** carries the epoch's loss and accuracy sums, the
  stop votes (SIGTERM / SIGUSR1 on *any* worker) and the chief's save-every-N-seconds
  decision, so every worker saves and stops at the same step.
* **Checkpoints.**  Every worker saves at the same steps (reading synchronised-on-read
  variables is a collective), the chief into ``<output>/checkpoint/``, the others into a
  scratch ``--output`` (:func:`worker_output`) that is removed when they end.  On a restart the chief's checkpoint is broadcast to every
  worker (an all-reduce to which only the chief contributes), so all restart together
  from the chief's step.
* **No waiting forever.**  Once training runs, a watchdog thread ends a worker that made
  no progress for ``GPUFLOW_WORKER_TIMEOUT`` seconds (default 60); before the first step
  (peers importing TensorFlow, tracing) the limit is 3x that, at least 180 s, which is also
  the collectives' own timeout (``CommunicationOptions(timeout_seconds=...)``).  A peer
  that never started blocks TF in C++, where signals are not seen; a dead peer also stops
  TF's heartbeats and fails the next collective.  Either way: one line naming what
  happened, exit code 70.

Imports TensorFlow only inside its functions, except :func:`cluster_from_environment`
and :func:`worker_output`, which need none (they run before TensorFlow is imported).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training import checkpoint
from training.checkpoint import Interrupted, Position
from training.errors import TrainingError

TIMEOUT_VARIABLE = "GPUFLOW_WORKER_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 60.0
START_UP_MINIMUM_SECONDS = 180.0
WORKER_LOST_EXIT_CODE = 70  # EX_SOFTWARE: a peer died or hung; the run cannot go on
_DROPOUT_STREAM = 3  # a stateless stream of --seed of its own (pipeline.py uses 1 and 2)


class WorkerLost(TrainingError):
    """A collective timed out or a peer went away: this worker cannot continue."""

    exit_code = WORKER_LOST_EXIT_CODE


# --------------------------------------------------------------------------- the cluster (no TensorFlow)


@dataclass(frozen=True)
class Cluster:
    """This process's place in ``TF_CONFIG``: ``index`` of ``num_workers``; worker 0 is the chief."""

    num_workers: int
    index: int

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    def describe(self) -> str:
        role = "chief" if self.is_chief else "non-chief"
        return f"worker {self.index} of {self.num_workers} ({role})"


def cluster_from_environment(environ=None) -> Cluster | None:
    """The cluster ``TF_CONFIG`` names (``cluster.worker`` + ``task``), None without one.

    Any ``TF_CONFIG`` with workers selects the multi-worker loop, one worker included (that
    is the one-worker reference of the parity test); a malformed one is refused with one line."""
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        task = config.get("task", {})
        if not isinstance(workers, list) or not workers or not all(isinstance(w, str) and ":" in w for w in workers):
            raise ValueError("cluster.worker must be a list of host:port")
        if set(config["cluster"]) - {"worker"}:
            raise ValueError(f"only workers are supported, not {sorted(set(config['cluster']) - {'worker'})}")
        if task.get("type", "worker") != "worker":
            raise ValueError(f"task.type must be worker, not {task.get('type')!r}")
        index = task.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(workers):
            raise ValueError(f"task.index {index!r} is not one of the {len(workers)} workers")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TrainingError(
            f"TF_CONFIG is not a worker cluster ({str(exc).splitlines()[0][:160] or type(exc).__name__}): "
            'set it to {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": I}} or unset it'
        ) from exc
    return Cluster(num_workers=len(workers), index=index)


def timeout_seconds(environ=None) -> float:
    environ = os.environ if environ is None else environ
    text = environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        value = float(text)
        if not 0 < value < float("inf"):
            raise ValueError
    except ValueError:
        raise TrainingError(f"{TIMEOUT_VARIABLE}={text!r}: expected a number of seconds > 0") from None
    return value


def start_up_seconds(seconds: float) -> float:
    """How long a worker waits for its peers before the first step: a peer still importing
    TensorFlow on a busy machine is not dead (3x the limit, at least 180 s)."""
    return max(3 * seconds, START_UP_MINIMUM_SECONDS)


def worker_output(output: Path, cluster: Cluster | None) -> Path:
    """Where this worker writes: ``output`` on the chief (or alone); a fresh scratch directory
    on the other workers (their model files, history and curves are the chief's, repeated)."""
    if cluster is None or cluster.is_chief:
        return output
    scratch = Path(tempfile.mkdtemp(prefix=f"training-worker{cluster.index}-scratch-"))
    _scratch.append(scratch)
    return scratch


_scratch: list[Path] = []


def remove_scratch() -> None:
    """The scratch directories of this process go (at the end of a run, whatever its end)."""
    while _scratch:
        shutil.rmtree(_scratch.pop(), ignore_errors=True)


# --------------------------------------------------------------------------- the strategy


def make_strategy(cluster: Cluster):
    """MultiWorkerMirroredStrategy from TF_CONFIG, with the collective timeout (the watchdog
    covers the start-up, which can block before any collective runs)."""
    import tensorflow as tf

    if _strategies:  # one per process: TF configures its collectives once (a second session reuses it)
        return _strategies[0]
    seconds = timeout_seconds()
    # A collective's own timeout covers the start too (the first one waits for every peer to
    # have imported TensorFlow and built the model): the start-up limit.  Once training runs,
    # the watchdog holds every worker to ``seconds``.
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=start_up_seconds(seconds),
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
    )
    watchdog = Watchdog.start(seconds, cluster)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    watchdog.beat()
    strategy._gpuflow_watchdog = watchdog  # noqa: SLF001  (one per process; fit() beats it)
    strategy._gpuflow_cluster = cluster  # noqa: SLF001
    _strategies.append(strategy)
    return strategy


_strategies: list = []


class Watchdog:
    """Ends this process with one line when no progress was reported for ``seconds``."""

    _current: "Watchdog | None" = None

    def __init__(self, seconds: float, cluster: Cluster):
        self.seconds = seconds
        self.cluster = cluster
        self.last = time.monotonic()
        self.what = "waiting for the other workers to start"
        self.paused = False
        self.training = False  # until the first step: the start-up limit

    @classmethod
    def start(cls, seconds: float, cluster: Cluster) -> "Watchdog":
        if cls._current is None:
            cls._current = cls(seconds, cluster)
            threading.Thread(target=cls._current._watch, name="worker-watchdog", daemon=True).start()
        cls._current.seconds = seconds
        cls._current.beat("waiting for the other workers to start")
        return cls._current

    def beat(self, what: str | None = None) -> None:
        self.last = time.monotonic()
        if what is not None:
            self.what = what

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.seconds / 4))
            limit = self.seconds if self.training else start_up_seconds(self.seconds)
            if not self.paused and time.monotonic() - self.last > limit:
                print(
                    f"training: error: {self.cluster.describe()}: no progress for {limit:g} s while "
                    f"{self.what}: another worker died, hung or never started ({TIMEOUT_VARIABLE} sets the limit); "
                    f"ending this worker",
                    file=sys.stderr,
                    flush=True,
                )
                remove_scratch()
                os._exit(WORKER_LOST_EXIT_CODE)


# --------------------------------------------------------------------------- shards and dropout


def shard_bounds(count: int, replicas: int, replica: int) -> tuple[int, int]:
    """[start, stop) of ``replica``'s contiguous share of a global batch of ``count``."""
    return (count * replica) // replicas, (count * (replica + 1)) // replicas


class _ShardedDropout:
    """Replaces one Dropout layer's ``call`` during the loop: the mask of the whole global
    batch drawn from (seed, step, layer), this replica's rows kept."""

    def __init__(self, layer, number: int, context: dict):
        self.layer, self.number, self.context = layer, number, context

    def __call__(self, inputs, training=False):
        import tensorflow as tf

        rate = float(self.layer.rate)
        if not training or rate <= 0:
            return inputs
        context = self.context
        seed = tf.random.experimental.stateless_fold_in(context["seed"], context["step"])
        seed = tf.random.experimental.stateless_fold_in(seed, self.number)
        shape = tf.shape(inputs)
        noise = self.layer.noise_shape
        if noise is not None:
            shape = tf.stack([shape[i] if n is None else n for i, n in enumerate(noise)])
        global_shape = tf.concat([tf.reshape(context["global_count"], [1]), shape[1:]], axis=0)
        uniform = tf.random.stateless_uniform(global_shape, seed=seed)
        keep = uniform[context["offset"] : context["offset"] + shape[0]] >= rate
        scale = tf.cast(1.0 / (1.0 - rate), inputs.dtype)
        return tf.where(keep, inputs * scale, tf.zeros_like(inputs))


def _all_layers(model):
    found, pending = [], list(getattr(model, "layers", []))
    while pending:
        layer = pending.pop(0)
        found.append(layer)
        pending.extend(getattr(layer, "layers", []))
    return found


# --------------------------------------------------------------------------- the loop


def fit(owner, model, train, *, validation_data, build_state, verbose: int = 2) -> None:
    """What :meth:`training.callbacks.CourseCallbacks.fit` does, across workers.

    ``owner`` is the run's CourseCallbacks; ``train`` its TrainStream (global batches);
    ``build_state`` creates the optimizer's and metrics' variables (callbacks.build_state)."""
    import keras
    import tensorflow as tf

    strategy = model.distribute_strategy
    cluster: Cluster = strategy._gpuflow_cluster  # noqa: SLF001
    watchdog: Watchdog = strategy._gpuflow_watchdog  # noqa: SLF001
    replicas = strategy.num_replicas_in_sync
    local_replicas = strategy.extended._num_devices_per_worker  # noqa: SLF001
    steps_per_epoch, batch_size, epochs = owner.steps_per_epoch, owner.options.batch_size, owner.epochs
    options = owner.options

    build_state(model, train.batches(0).element_spec)
    watchdog.beat("restoring the chief's checkpoint")
    position, sums = _restore(owner, model, strategy, cluster)
    watchdog.beat()
    if position.epochs_done >= epochs:
        watchdog.paused = True
        return

    # -- what each replica sees: its slice of every global batch, with where that slice sits
    count = len(train.images)

    def dataset_fn(context):
        start_epoch, start_step = position.epochs_done, position.step
        pipeline = context.input_pipeline_id

        def slices(images, labels):
            total = tf.shape(images)[0]
            parts = []
            for local in range(local_replicas):
                replica = pipeline * local_replicas + local
                low = (total * replica) // replicas
                high = (total * (replica + 1)) // replicas
                parts.append((images[low:high], labels[low:high], low, total))
            return tf.data.Dataset.from_tensors(parts[0]) if len(parts) == 1 else _concatenate(parts)

        return train.batches(start_epoch, start_step).flat_map(slices)

    def _concatenate(parts):
        dataset = tf.data.Dataset.from_tensors(parts[0])
        for part in parts[1:]:
            dataset = dataset.concatenate(tf.data.Dataset.from_tensors(part))
        return dataset

    distributed = strategy.distribute_datasets_from_function(dataset_fn)
    iterator = iter(distributed)

    # -- the step
    context: dict = {"seed": tf.constant([options.seed, _DROPOUT_STREAM], dtype=tf.int64)}
    dropouts = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.Dropout)]
    loss_function = keras.losses.get(model.loss)
    optimizer = model.optimizer

    def replica_step(images, labels, offset, total, votes):
        context.update(step=optimizer.iterations, offset=offset, global_count=total)
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            per_example = loss_function(labels, probabilities)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=tf.cast(total, tf.int64))
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
        correct = tf.cast(tf.equal(tf.argmax(probabilities, -1), tf.argmax(labels, -1)), tf.float64)
        first = tf.cast(tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group % local_replicas, 0), tf.float64)
        stats = tf.stack([
            tf.reduce_sum(tf.cast(per_example, tf.float64)),
            tf.reduce_sum(correct),
            tf.cast(tf.shape(per_example)[0], tf.float64),
            votes[0] * first,  # stop votes: one per worker
            votes[1] * first,  # the chief's "save now"
        ])
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, stats)

    @tf.function(reduce_retracing=True)
    def train_step(batch, votes):
        images, labels, offset, total = batch
        stats = strategy.run(replica_step, args=(images, labels, offset, total, votes))
        return strategy.experimental_local_results(stats)[0]

    @tf.function(reduce_retracing=True)
    def evaluate_step(images, labels):
        probabilities = model(images, training=False)
        per_example = loss_function(labels, probabilities)
        correct = tf.cast(tf.equal(tf.argmax(probabilities, -1), tf.argmax(labels, -1)), tf.float64)
        return tf.stack([tf.reduce_sum(tf.cast(per_example, tf.float64)), tf.reduce_sum(correct),
                         tf.cast(tf.shape(per_example)[0], tf.float64)])

    # -- the callbacks fit would run (not the step checkpoint: saving is decided here, collectively)
    callbacks = keras.callbacks.CallbackList(
        [c for c in owner.keras if c is not owner.step_checkpoint], model=model, epochs=epochs, steps=steps_per_epoch,
        verbose=0,
    )
    first_shard = shard_bounds(batch_size, replicas, cluster.index * local_replicas)[0]
    last_shard = shard_bounds(batch_size, replicas, cluster.index * local_replicas + local_replicas - 1)[1]
    print(
        f"training: {cluster.describe()}: MultiWorkerMirroredStrategy, {replicas} replica(s) in all, "
        f"{local_replicas} here; shard: rows {first_shard}-{last_shard - 1} of each global batch of {batch_size} "
        f"(~{last_shard - first_shard} images/step, ~{(count * (last_shard - first_shard)) // batch_size} of {count} "
        f"per epoch); {steps_per_epoch} steps per epoch",
        flush=True,
    )

    originals = {id(layer): layer.__dict__.get("call") for layer in dropouts}
    for number, layer in enumerate(dropouts):
        object.__setattr__(layer, "call", _ShardedDropout(layer, number, context))
    last_save = time.monotonic()
    epoch, step = position.epochs_done, position.step
    try:
        callbacks.on_train_begin()
        while epoch < epochs:
            callbacks.on_epoch_begin(epoch)
            if step > 0:
                owner.timer.carry_seconds = owner.saved.epoch_seconds_before if owner.saved else 0.0
            steps_here = 0
            while step < steps_per_epoch:
                stop_vote = 1.0 if checkpoint.stop_requested() else 0.0
                every = options.save_every_seconds
                save_vote = 1.0 if cluster.is_chief and every and time.monotonic() - last_save >= every else 0.0
                watchdog.beat(f"training epoch {epoch + 1} step {step + 1}")
                stats = train_step(next(iterator), tf.constant([stop_vote, save_vote], tf.float64)).numpy()
                watchdog.beat()
                watchdog.training = True
                sums = sums + stats[:3]
                step += 1
                steps_here += 1
                callbacks.on_train_batch_end(step - 1)
                if step >= steps_per_epoch:
                    break
                global_step = epoch * steps_per_epoch + step
                here = Position(epoch, step)
                if stats[3] > 0:
                    _save(owner, model, cluster, here, "stop requested (a worker got SIGTERM/SIGUSR1)", sums)
                    raise Interrupted(here.epoch, here.step)
                if options.save_every_steps and global_step % options.save_every_steps == 0:
                    _save(owner, model, cluster, here, f"every {options.save_every_steps} steps", sums)
                    last_save = time.monotonic()
                elif stats[4] > 0:
                    _save(owner, model, cluster, here, f"every {every:g} seconds", sums)
                    last_save = time.monotonic()
            callbacks.on_test_begin()
            watchdog.beat(f"validating epoch {epoch + 1}")
            validation = np.zeros(3)
            for images, labels in validation_data:
                validation += evaluate_step(images, labels).numpy()
            watchdog.beat()
            logs = {
                "accuracy": sums[1] / sums[2], "loss": sums[0] / sums[2],
                "val_accuracy": validation[1] / validation[2], "val_loss": validation[0] / validation[2],
            }
            print(
                f"training: {cluster.describe()}: epoch {epoch + 1}/{epochs}: {steps_here} steps on this shard "
                f"(global step {(epoch + 1) * steps_per_epoch}); loss {logs['loss']:.4f} accuracy {logs['accuracy']:.4f} "
                f"val_loss {logs['val_loss']:.4f} val_accuracy {logs['val_accuracy']:.4f}",
                flush=True,
            )
            callbacks.on_epoch_end(epoch, logs)
            owner.rows = [row for row in owner.history() if row.get("epoch", -1) <= epoch]
            epoch, step, sums = epoch + 1, 0, np.zeros(3)
            _save(owner, model, cluster, Position(epoch, 0), "epoch end", sums)
            last_save = time.monotonic()
        callbacks.on_train_end()
    except tf.errors.OpError as exc:  # a collective failed: in a step, or reading variables to save them
        raise WorkerLost(_lost(cluster, exc, f"epoch {epoch + 1} step {step + 1}")) from None
    finally:
        for layer in dropouts:
            original = originals[id(layer)]
            if original is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", original)
        # No collective runs after training (evaluation and outputs are local): the watchdog rests.
        watchdog.paused = True


def _lost(cluster: Cluster, exc, where: str) -> str:
    text = getattr(exc, "message", "") or str(exc)
    unhealthy = sorted({int(task) for task in re.findall(r"/job:worker/replica:\d+/task:(\d+)", text)} - {cluster.index})
    reason = re.sub(r"\{\{[^}]*\}\}\s*", "", text).strip().splitlines()
    who = f"worker {', '.join(map(str, unhealthy))} stopped answering" if unhealthy else "another worker died or hung"
    return (
        f"{cluster.describe()}: the collective at {where} failed, {who} ({type(exc).__name__}: "
        f"{reason[0][:200] if reason else '?'}); the run cannot continue, another worker died or hung"
    )


def _save(owner, model, cluster: Cluster, position: Position, reason: str, sums) -> None:
    """Every worker writes the step checkpoint (with the unfinished epoch's sums) at the same
    step: the chief into --output, the others into their scratch directory (reading some
    variables is a collective, as MultiWorkerMirroredStrategy's guide says; a restart takes
    the chief's)."""
    partial = 0.0
    if position.step > 0:
        partial = owner.timer.carry_seconds + time.perf_counter() - owner.timer.epoch_start
    owner.save_checkpoint(model, position, reason, partial, extra={"epoch_sums": [float(v) for v in sums]})


def _restore(owner, model, strategy, cluster: Cluster):
    """(position, the unfinished epoch's sums) — the chief's, on every worker."""
    arrays: dict = {}
    sums = np.zeros(3)
    if cluster.is_chief and owner.saved is not None:
        arrays = dict(owner.saved.arrays)
        state = checkpoint.read_state(owner.output) or {}
        sums = np.asarray(state.get("epoch_sums", [0.0, 0.0, 0.0]), dtype=np.float64)
        arrays["__position__"] = np.array([owner.position.epochs_done, owner.position.step], dtype=np.int64)
        arrays["__sums__"] = sums
    blob = b""
    if arrays:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        blob = buffer.getvalue()
    length = int(_broadcast(strategy, cluster, np.array([len(blob)], dtype=np.int64))[0])
    if length == 0:
        return Position(0, 0), sums
    padded = np.zeros((length + 3) // 4 * 4, dtype=np.uint8)
    padded[: len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    received = _broadcast(strategy, cluster, padded.view(np.int32)).view(np.uint8)[:length].tobytes()
    with np.load(io.BytesIO(received), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    epochs_done, step = (int(v) for v in arrays.pop("__position__"))
    sums = arrays.pop("__sums__").astype(np.float64)
    groups = checkpoint.variable_groups(model)
    checkpoint.check_fits(model, arrays, checkpoint.checkpoint_dir(owner.output))
    checkpoint.assign(groups["model"], arrays, "model")
    checkpoint.assign(groups["optimizer"], arrays, "optimizer")
    if not cluster.is_chief:
        print(f"training: {cluster.describe()}: resuming with the chief at epoch {epochs_done + 1}, step {step + 1}",
              flush=True)
    return Position(epochs_done, step), sums


def _broadcast(strategy, cluster: Cluster, value: np.ndarray) -> np.ndarray:
    """The chief's ``value`` on every worker (a sum to which only the chief's first replica adds)."""
    import tensorflow as tf

    def replica_fn(tensor):
        context = tf.distribute.get_replica_context()
        mine = tf.logical_and(tf.constant(cluster.is_chief), tf.equal(context.replica_id_in_sync_group, 0))
        return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.where(mine, tensor, tf.zeros_like(tensor)))

    try:
        result = strategy.run(tf.function(replica_fn), args=(tf.constant(value),))
        return strategy.experimental_local_results(result)[0].numpy()
    except tf.errors.OpError as exc:
        raise WorkerLost(_lost(cluster, exc, "the start (sharing the chief's checkpoint)")) from None
