"""Audio clips for ``add_audio``: 16-bit PCM WAV written with the standard library.

Samples follow tensorboardX 2.6.5 (which writes through soundfile/libsndfile): amplitudes are
clipped to [-1, 1], scaled by 32767 and rounded half-to-even, in float32 for float32 input
and in float64 otherwise, so the PCM samples are the ones libsndfile would write. Unlike
tensorboardX no soundfile install is needed, and NaN samples raise instead of becoming noise.
"""

from __future__ import annotations

import io
import numbers
import wave

import numpy as np

from tbprobe.writer.proto import summary_pb2
from tbprobe.writer.values import to_numpy

_MAX_SAMPLE_RATE = (2**32 - 1) // 4  # the WAV header's byte rate (rate * 4 for stereo) is u32
_MAX_WAV_DATA = 2**32 - 64  # the WAV data chunk size is u32


def _check_sample_rate(sample_rate) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise TypeError(f"sample_rate: expected a number, got {type(sample_rate).__name__}")
    rate = float(sample_rate)
    if not rate.is_integer() or not 1 <= rate <= _MAX_SAMPLE_RATE:
        raise ValueError(
            f"sample_rate: expected a whole number of Hz in [1, {_MAX_SAMPLE_RATE}], "
            f"got {sample_rate!r}"
        )
    return int(rate)


def to_frames(snd, name: str = "snd_tensor") -> np.ndarray:
    """Audio as ``(L, C)`` frames: ``(L,)`` and ``(L, 1)`` are mono, ``(L, 2)`` stereo.

    Raises ValueError for other shapes, no frames, or NaN samples.

    Example: ``to_frames(np.zeros(8)).shape`` -> ``(8, 1)``.
    """
    arr = to_numpy(snd, name)
    shape = tuple(arr.shape)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] not in (1, 2):
        raise ValueError(f"{name}: expected shape (L,), (L, 1) or (L, 2), got {shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: has no samples")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name}: contains NaN")
    if arr.size * 2 > _MAX_WAV_DATA:
        raise ValueError(f"{name}: {arr.shape[0]} frames do not fit in one WAV file")
    return arr


def to_pcm16(frames: np.ndarray) -> np.ndarray:
    """Little-endian int16 samples of ``(L, C)`` amplitudes clipped to [-1, 1], converted as
    libsndfile 1.2 (tensorboardX's writer, through soundfile) does: ``floor(x * 32768)``,
    saturated to [-32768, 32767].

    Example: ``to_pcm16(np.array([[0.5], [2.0]]))`` -> ``[[16384], [32767]]``.
    """
    x = np.clip(frames.astype(np.float64), -1.0, 1.0)
    x *= 32768.0
    np.floor(x, out=x)
    return np.clip(x, -32768, 32767).astype("<i2")


def encode_wav(pcm16: np.ndarray, sample_rate: int) -> bytes:
    """WAV bytes of ``(L, C)`` int16 samples at ``sample_rate`` Hz.

    Example: ``wave.open(io.BytesIO(encode_wav(pcm, 16000))).getnframes()`` -> ``len(pcm)``.
    """
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(pcm16.shape[1])
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.ascontiguousarray(pcm16, "<i2").tobytes())
    return buf.getvalue()


def audio_value(tag: str, snd, sample_rate=44100) -> summary_pb2.Summary.Value:
    """A ``Summary.Value`` with ``snd`` as a 16-bit PCM WAV clip (``audio/wav``).

    ``snd`` is ``(L,)`` or ``(L, 1)`` mono or ``(L, 2)`` stereo, amplitudes in [-1, 1] (values
    outside are clipped, as in tensorboardX); ``sample_rate`` is a whole number of Hz. Like
    tensorboardX the value carries no metadata: both TensorBoard readers derive the audio
    plugin's metadata from the ``audio`` field.

    Example: ``audio_value("sine", np.sin(np.arange(16000) / 8), 16000).audio.length_frames``
    -> ``16000``.
    """
    if not isinstance(tag, str):
        raise TypeError(f"tag: expected a str, got {type(tag).__name__}")
    rate = _check_sample_rate(sample_rate)
    frames = to_frames(snd)
    length, channels = frames.shape
    audio = summary_pb2.Summary.Audio(
        sample_rate=rate,
        num_channels=channels,
        length_frames=length,
        encoded_audio_string=encode_wav(to_pcm16(frames), rate),
        content_type="audio/wav",
    )
    return summary_pb2.Summary.Value(tag=tag, audio=audio)
