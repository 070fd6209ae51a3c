"""Following a job polls soon and often at first (a short job's end is seen within a
fraction of its own length), then ever more calmly up to the poll interval."""

from __future__ import annotations

import io
import types

from gpuflow.jobs import follow
from gpuflow.transport.local import LocalRunner


def test_polls_start_at_fifty_milliseconds_and_grow_by_half_up_to_the_interval(tmp_path, monkeypatch):
    runner = LocalRunner(tmp_path)
    run_dir = runner.base_dir + "/runs/r1"
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "job.log").write_bytes(b"hello\n")
    slept: list[float] = []

    def sleep(seconds: float) -> None:  # the job ends after the eighth wait
        slept.append(seconds)
        if len(slept) == 8:
            (tmp_path / "runs" / "r1" / "exit_code").write_text("0\n")

    monkeypatch.setattr(follow.time, "sleep", sleep)
    out = io.BytesIO()
    exit_code, offset = follow.follow_log(types.SimpleNamespace(runner=runner), run_dir, out, poll_interval=0.5)
    assert (exit_code, offset, out.getvalue()) == (0, 6, b"hello\n")
    assert [round(seconds, 4) for seconds in slept] == [0.05, 0.075, 0.1125, 0.1688, 0.2531, 0.3797, 0.5, 0.5]
