"""Multi-worker training (training.distributed): the parity oracle and the failure paths.

Real worker processes on 127.0.0.1 with TF_CONFIG (free ports), one thread each.  The
reference is the same module with a one-worker TF_CONFIG at the same global batch: the
same custom loop, so a two-worker run must give the same history.csv and the same
weights (≤ 1e-5 relative: only the all-reduce order differs).

Lean on purpose (every TensorFlow process costs an import and a tracing): the processes of
the oracle all start at once in one fixture, and each case is proven once --
``cifar10_cnn``'s two-worker parity is proven through gpuflow (tests/jobs/test_multinode_parity.py),
``cifar10_augmentation``'s here by a plain two-worker run, and ``mnist_mlp``'s by the two-worker
run stopped with SIGTERM and resumed, which must end with the one-worker reference's history
and weights (parity and exact resume at once).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.training.multiworker_helpers import (
    assert_same_training, assert_two_worker_metrics, shard_lines, start, steps_per_epoch, wait_all,
)
from training import distributed
from training.errors import TrainingError


# TensorBoard is under test only in the two-worker cifar10_augmentation run (its output listing)
# and its reference; the mnist_mlp runs (the references, the stopped and resumed run, the
# killed one) go without it: the same argv on both sides of every comparison.
NO_TB = ("--no-tensorboard",)


def _wait_for(log: Path, text: str, processes) -> None:
    while text not in log.read_text():
        for process, process_log in processes:
            assert process.poll() is None, process_log.read_text()[-3000:]
        time.sleep(0.2)


def _stop_worker_1_when_it_trains(processes, failures: list) -> None:
    """SIGTERM to worker 1 only, once its log shows its shard (printed just before the first step)."""
    try:
        (_, _), (worker, worker_log) = processes
        _wait_for(worker_log, "shard: rows", processes)
        worker.send_signal(signal.SIGTERM)
    except BaseException as error:  # reported by the fixture
        failures.append(error)


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    """All at once: the one-worker references of mnist_mlp and cifar10_augmentation, a two-worker
    cifar10_augmentation run, and a two-worker mnist_mlp run whose worker 1 gets SIGTERM."""
    root = tmp_path_factory.mktemp("multiworker")
    references = {module: start(module, root / module.rsplit(".", 1)[-1] / "one", 1, extra=extra)
                  for module, extra in (("training.mnist_mlp", NO_TB), ("training.cifar10_augmentation", ()))}
    augmentation = start("training.cifar10_augmentation", root / "cifar10_augmentation" / "two", 2)
    stopped = start("training.mnist_mlp", root / "stopped", 2, extra=NO_TB)
    failures: list = []
    stopper = threading.Thread(target=_stop_worker_1_when_it_trains, args=(stopped, failures), daemon=True)
    stopper.start()
    try:
        stopper.join(timeout=600)
        assert not failures, failures
        stopped_codes = [process.wait(timeout=600) for process, _ in stopped]
        for module, processes in references.items():
            wait_all(processes, f"{module} (1 worker)")
        wait_all(augmentation, "training.cifar10_augmentation (2 workers)")
    finally:
        for process, _ in [*stopped, *augmentation, *references["training.mnist_mlp"],
                           *references["training.cifar10_augmentation"]]:
            if process.poll() is None:
                process.kill()
                process.wait()
    return root, stopped_codes


def test_two_workers_give_the_one_worker_history_and_weights(parity_runs):
    root, _ = parity_runs
    one, two = root / "cifar10_augmentation" / "one" / "w0", root / "cifar10_augmentation" / "two" / "w0"
    assert_same_training(one, two)
    assert_two_worker_metrics(two)
    assert json.loads((one / "metrics.json").read_text())["num_workers"] == 1


def test_only_the_chief_writes_the_output_and_each_log_shows_its_shard(parity_runs):
    root, _ = parity_runs
    module = "training.cifar10_augmentation"
    two = root / "cifar10_augmentation" / "two"
    assert sorted(p.name for p in (two / "w0").iterdir()) == [
        "best_model.keras", "history.csv", "metrics.json", "tensorboard", "training_curves.png"
    ]
    assert not (two / "w1").exists()  # the non-chief wrote only to its scratch directory...
    assert not list(two.glob("training-worker*"))  # ...which is gone
    for index in (0, 1):
        log = (two / f"log{index}").read_text()
        assert f"worker {index} of 2" in log and shard_lines(index) in log
        assert f"{steps_per_epoch(module)} steps per epoch" in log and "epoch 2/2" in log


def test_sigterm_on_one_worker_stops_all_at_one_step_and_the_rerun_matches_one_worker(parity_runs):
    """SIGTERM to worker 1 only: every worker saves at the same step and exits 75; run again,
    the workers restart together from the chief's checkpoint and end with the one-worker
    reference's history and weights (mnist_mlp's two-worker parity, and exact resume)."""
    root, codes = parity_runs
    output = root / "stopped"
    assert codes == [75, 75], (output / "log0").read_text()[-3000:]
    state = json.loads((output / "w0" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and 1 <= state["step"] and "stop requested" in state["reason"]
    assert not (output / "w1").exists()

    wait_all(start("training.mnist_mlp", output, 2, extra=NO_TB), "the resumed mnist_mlp run")
    resumed_log = (output / "log1").read_text()
    assert f"resuming with the chief at epoch 1, step {state['step'] + 1}" in resumed_log
    assert "worker 1 of 2" in resumed_log and shard_lines(1) in resumed_log
    assert f"{steps_per_epoch('training.mnist_mlp')} steps per epoch" in resumed_log
    assert_same_training(root / "mnist_mlp" / "one" / "w0", output / "w0")
    assert_two_worker_metrics(output / "w0")


def test_a_killed_worker_ends_the_others_with_a_clear_message(tmp_path):
    """SIGKILL on worker 1 mid-run: worker 0 ends within the collective timeout, exit 70, one line."""
    processes = start("training.mnist_mlp", tmp_path, 2, extra=("--epochs", "200", *NO_TB),
                       environment={distributed.TIMEOUT_VARIABLE: "10"})
    (chief, chief_log), (worker, worker_log) = processes
    try:
        _wait_for(worker_log, "epoch 1/200", processes)
        worker.send_signal(signal.SIGKILL)
        code = chief.wait(timeout=120)
    finally:
        for process in (chief, worker):
            if process.poll() is None:
                process.kill()
                process.wait()
    text = chief_log.read_text()
    assert code == distributed.WORKER_LOST_EXIT_CODE, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("training: error:")]
    assert len(errors) == 1 and "worker 0 of 2" in errors[0] and "another worker died" in errors[0]
    assert "Traceback" not in text


@pytest.mark.parametrize(
    "value",
    ['{"cluster": {"worker": []}}', "not json", '{"cluster": {"worker": ["a:1"]}, "task": {"index": 3}}',
     '{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}}'],
)
def test_a_malformed_tf_config_is_refused_with_one_line(value):
    with pytest.raises(TrainingError, match="TF_CONFIG is not a worker cluster"):
        distributed.cluster_from_environment({"TF_CONFIG": value})


def test_the_cluster_and_the_shards():
    cluster = distributed.cluster_from_environment(
        {"TF_CONFIG": '{"cluster": {"worker": ["h:1", "h:2", "h:3"]}, "task": {"type": "worker", "index": 2}}'}
    )
    assert (cluster.num_workers, cluster.index, cluster.is_chief) == (3, 2, False)
    assert distributed.cluster_from_environment({}) is None
    # The shards of a global batch tile it exactly, a partial batch included.
    for count in (64, 29, 3):
        bounds = [distributed.shard_bounds(count, 3, r) for r in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == count
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(2))
