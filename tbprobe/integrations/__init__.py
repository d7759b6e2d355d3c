"""Callbacks for training frameworks; each imports its framework lazily, on first use.

- ``tbprobe.integrations.hf.TbProbeCallback``: Hugging Face ``transformers.Trainer``.
- ``tbprobe.integrations.lightning.TbProbeCallback``: Lightning ``Trainer``.
"""
