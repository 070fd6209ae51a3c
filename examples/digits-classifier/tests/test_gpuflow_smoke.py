"""Smoke test written by `gpuflow init`: the project's training entry point (`entry` in
gpuflow.toml) runs through gpuflow's up -> run -> pull -> down path in the sandbox cloud
(moto on this machine: offline, no AWS account), as it would on a GPU instance.

The job gets GPUFLOW_SMOKE=1: let the script shrink itself when it sees it (one tiny epoch on a
few samples) and write its outputs, the saved model included, under $GPUFLOW_OUTPUT_DIR.
At teardown the gpuflow_sandbox fixture fails the test if anything is left: an instance,
a security group, a key pair, a sandbox directory or a running job process.
"""

import pytest

# (Added to what `gpuflow init` wrote: the example needs Keras + TensorFlow and scikit-learn,
# gpuflow's `train` extra; without them it is skipped, not failed.)
pytest.importorskip("keras", reason="the example needs keras and tensorflow (pip install 'gpuflow[train]')")
pytest.importorskip("sklearn", reason="the example needs scikit-learn (pip install 'gpuflow[train]')")

# Whether the entry point saves a Keras model (*.keras) that must load again.
EXPECT_KERAS_MODEL = True


def test_training_entry_point_runs_in_the_sandbox(gpuflow_sandbox):
    gpuflow_sandbox.up()
    try:
        run = gpuflow_sandbox.run(gpuflow_sandbox.entry, env={"GPUFLOW_SMOKE": "1"})
    finally:
        gpuflow_sandbox.down()
    assert run.exit_code == 0, f"the entry point failed in the sandbox (exit code {run.exit_code}):\n{run.log}"
    written = [path for path in run.outputs.rglob("*") if path.is_file()]
    assert written, "nothing came back from $GPUFLOW_OUTPUT_DIR: write the outputs there"
    if EXPECT_KERAS_MODEL:
        models = sorted(run.outputs.rglob("*.keras"))
        assert models, "no saved Keras model (*.keras) came back from $GPUFLOW_OUTPUT_DIR"
        keras = pytest.importorskip("keras", reason="loading the saved model needs keras")
        for path in models:
            keras.saving.load_model(path, compile=False)
