"""The driver writes a rank's records as they happened: metrics.jsonl's ``time`` is when the step ended on the rank
(what the launcher and orchestrator benchmarks time first steps and interleaved windows by), not when a poll fetched
it — up to the controller's and the driver's poll intervals later."""

from __future__ import annotations

import json

from distgpt.orchestrator.driver import _show
from distgpt.orchestrator.status import RecordEvent
from distgpt.train.metrics import MetricsSink, progress_bar


def test_a_records_rank_time_is_kept_and_a_record_without_one_gets_the_write_time(tmp_path):
    sink = MetricsSink(str(tmp_path), tensorboard=False)
    bar = progress_bar(10, 0, False)
    _show(RecordEvent(record={"time": 1000.5, "step": 1, "loss": 2.0, "tokens_per_s": 10.0}), sink, bar)
    _show(RecordEvent(record={"step": 2, "loss": 1.5}), sink, bar)
    sink.close()
    first, second = (json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert first["time"] == 1000.5 and first["step"] == 1
    assert second["time"] > 1000.5 and second["step"] == 2
