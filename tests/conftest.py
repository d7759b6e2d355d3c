"""Suite-wide settings: hypothesis runs derandomised, so every run sees the same examples."""

from hypothesis import settings

settings.register_profile("tbprobe", derandomize=True, database=None, deadline=None)
settings.load_profile("tbprobe")
