"""TensorBoard event files: a fast, durable, drop-in ``tensorboardX.SummaryWriter``."""

from tbprobe.writer.reader import EventFileError, iter_records, read_events
from tbprobe.writer.summary_writer import SummaryWriter

__all__ = ["EventFileError", "SummaryWriter", "iter_records", "read_events"]
