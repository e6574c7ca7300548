"""Reading back the TensorBoard event files that training runs write, with TensorBoard's reader."""

from __future__ import annotations


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """`{tag: [(step, value), ...]}` of every event file in `log_dir`, in the order written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}
