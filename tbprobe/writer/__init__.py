"""TensorBoard event files: a fast, durable, drop-in ``tensorboardX.SummaryWriter``."""

from tbprobe.writer.reader import (
    EventFileError,
    EventFileWarning,
    file_events,
    iter_records,
    read_events,
)
from tbprobe.writer.summary_writer import SummaryWriter

__all__ = [
    "EventFileError",
    "EventFileWarning",
    "SummaryWriter",
    "file_events",
    "iter_records",
    "read_events",
]
