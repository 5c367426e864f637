"""Golden TensorBoard event records for experiments/src/tensorboard.rs, written by TensorBoard's
own protobuf messages (event_pb2, summary_pb2) and its TFRecord writer (RecordWriter, with its
masked CRC-32C), at fixed wall times; then read back with TensorBoard's EventAccumulator.

    /tmp/venv/bin/python scripts/make_tensorboard_fixture.py   # needs `pip install tensorboard`
"""
import io
import json
import os
import tempfile

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

OUT = os.path.join(os.path.dirname(__file__), "..", "experiments", "tests", "fixtures", "tensorboard")

FILE_VERSION_TIME = 1796600000.125
EVENTS = [
    # (wall time, step, [(tag, value)]): one event per logged row, as ferrite writes them
    (1796600001.5, 1, [("sft/loss", 4.6035847), ("sft/lr", 0.003)]),
    (1796600002.25, 2, [("sft/loss", 3.25), ("sft/grad_norm", 9.141349)]),
    (1796600003.0, 1, [("train/reward_mean", 0.0), ("train/loss", -0.0123), ("train/kl", 1e-9)]),
    (1796600004.75, 300, [("eval/greedy_accuracy", 0.311), ("eval/pass@1", 0.181)]),
    (1796600005.0, 70000, [("train/rollout_tokens_per_s", 123456.78)]),
]


def main():
    buf = io.BytesIO()
    w = RecordWriter(buf)
    first = event_pb2.Event(wall_time=FILE_VERSION_TIME, file_version="brain.Event:2",
                            source_metadata=event_pb2.SourceMetadata(writer="ferrite"))
    w.write(first.SerializeToString())
    for wall, step, values in EVENTS:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in values])
        w.write(event_pb2.Event(wall_time=wall, step=step, summary=summary).SerializeToString())
    data = buf.getvalue()
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "golden.tfevents"), "wb") as f:
        f.write(data)
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump({"file_version_time": FILE_VERSION_TIME,
                   "events": [{"wall_time": w_, "step": s, "values": v} for w_, s, v in EVENTS]}, f, indent=1)
    # TensorBoard reads it back: every scalar under its tag, at its step
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "events.out.tfevents.1796600000.golden"), "wb") as f:
            f.write(data)
        acc = EventAccumulator(d)
        acc.Reload()
        for wall, step, values in EVENTS:
            for tag, v in values:
                got = [e for e in acc.Scalars(tag) if e.step == step]
                assert len(got) == 1 and abs(got[0].value - v) <= 1e-6 * max(1.0, abs(v)), (tag, got)
    print(f"tensorboard fixture written: {len(data)} bytes")


if __name__ == "__main__":
    main()
