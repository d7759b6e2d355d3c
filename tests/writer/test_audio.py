"""Audio clips: 16-bit PCM WAV decoded with the stdlib ``wave`` module and compared with the
samples libsndfile 1.2 (tensorboardX's encoder, via soundfile) writes, measured:
``floor(clip(x, -1, 1) * 32768)`` saturated to int16."""

from __future__ import annotations

import io
import math
import wave

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard import data_compat
from tensorboard.compat.proto import summary_pb2 as tb_summary_pb2

from tbprobe.writer.audio import audio_value

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None)


def decode(value):
    """(samples (L, C) int16, sample rate, channels) of the WAV in a Summary.Value."""
    with wave.open(io.BytesIO(value.audio.encoded_audio_string)) as w:
        assert w.getsampwidth() == 2
        frames = w.readframes(w.getnframes())
        rate, channels = w.getframerate(), w.getnchannels()
    return np.frombuffer(frames, "<i2").reshape(-1, channels), rate, channels


def libsndfile_samples(x) -> np.ndarray:
    """Reference, one sample at a time: libsndfile 1.2's float->PCM16 after tensorboardX's
    clip, as measured with soundfile 0.13 (floor of x * 32768, saturated)."""
    arr = np.asarray(x, dtype=np.float64)
    out = np.empty(arr.shape, np.int16)
    for idx, v in np.ndenumerate(arr):
        scaled = math.floor(min(max(float(v), -1.0), 1.0) * 32768.0)
        out[idx] = min(max(scaled, -32768), 32767)
    return out


def test_mono_matches_libsndfile_and_header():
    """A mono float64 clip decodes to libsndfile's samples; header and proto fields agree."""
    x = np.sin(np.arange(1000) / 7.0) * 0.9
    value = audio_value("sine", x, sample_rate=16000)
    samples, rate, channels = decode(value)
    np.testing.assert_array_equal(samples[:, 0], libsndfile_samples(x))
    assert (rate, channels) == (16000, 1)
    audio = value.audio
    assert audio.sample_rate == 16000 and audio.num_channels == 1
    assert audio.length_frames == 1000 and audio.content_type == "audio/wav"
    assert value.tag == "sine" and not value.HasField("metadata")


@pytest.mark.parametrize("shape", [(257,), (257, 1), (257, 2)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_shapes_and_dtypes(shape, dtype):
    """(L,), (L, 1) and (L, 2) in every float dtype give libsndfile's samples, in frame order."""
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(dtype)
    samples, _, channels = decode(audio_value("a", x))
    assert channels == (2 if len(shape) == 2 and shape[1] == 2 else 1)
    np.testing.assert_array_equal(samples, libsndfile_samples(x).reshape(len(x), -1))


def test_rounding_boundaries_floor():
    """Values near sample boundaries round down, as libsndfile does."""
    halves = (np.arange(-6, 7) + 0.5) / 32768.0
    samples, _, _ = decode(audio_value("a", halves))
    np.testing.assert_array_equal(samples[:, 0], libsndfile_samples(halves))
    assert samples[6, 0] == 0 and samples[7, 0] == 1  # 0.5 -> 0, 1.5 -> 1


def test_out_of_range_and_infinities_are_clipped():
    """Amplitudes beyond [-1, 1], including infinities, clip to 32767 and -32768."""
    x = np.array([2.0, -2.0, np.inf, -np.inf, 1.0, -1.0, 0.0])
    samples, _, _ = decode(audio_value("a", x))
    assert samples[:, 0].tolist() == [32767, -32768, 32767, -32768, 32767, -32768, 0]


def test_torch_inputs_incl_bf16_and_ints():
    """Torch tensors (bf16 widened exactly) and integer amplitudes follow the same rule."""
    t = torch.linspace(-1, 1, 101, dtype=torch.bfloat16)
    samples, _, _ = decode(audio_value("a", t))
    np.testing.assert_array_equal(samples[:, 0], libsndfile_samples(t.float().numpy()))
    samples, _, _ = decode(audio_value("a", torch.tensor([-3, 0, 1, 5])))
    assert samples[:, 0].tolist() == [-32768, 0, 32767, 32767]


def test_tensorboard_reads_the_value():
    """TensorBoard's legacy-audio migration turns our value into its audio tensor format."""
    value = audio_value("clip", np.zeros((40, 2)), sample_rate=8000)
    tb_value = tb_summary_pb2.Summary.Value.FromString(value.SerializeToString())
    migrated = data_compat.migrate_value(tb_value)
    assert migrated.metadata.plugin_data.plugin_name == "audio"
    assert migrated.tensor.string_val[0] == value.audio.encoded_audio_string


def test_matches_tensorboardx_when_soundfile_is_installed():
    """With soundfile present, tensorboardX's own WAV decodes to our samples."""
    pytest.importorskip("soundfile")
    from tensorboardX import summary as tbx_summary

    x = np.random.default_rng(1).uniform(-1.2, 1.2, (300, 2))
    theirs = tbx_summary.audio("a", x, sample_rate=22050).value[0]
    ours = audio_value("a", x, sample_rate=22050)
    np.testing.assert_array_equal(decode(ours)[0], decode(theirs)[0])
    assert ours.audio.num_channels == theirs.audio.num_channels
    assert ours.audio.length_frames == theirs.audio.length_frames


@SETTINGS
@given(
    st.sampled_from(
        [(0,), (5, 3), (5, 0), (2, 3, 4), (), (0, 2)],
    )
)
def test_bad_shapes_raise(shape):
    """Shapes other than (L,), (L, 1), (L, 2) with L >= 1 raise ValueError naming snd_tensor."""
    with pytest.raises(ValueError, match="snd_tensor"):
        audio_value("a", np.zeros(shape))


def test_nan_and_non_numeric_raise():
    """NaN samples raise ValueError; strings raise TypeError; both name snd_tensor."""
    with pytest.raises(ValueError, match="snd_tensor"):
        audio_value("a", np.array([0.0, np.nan]))
    with pytest.raises(TypeError, match="snd_tensor"):
        audio_value("a", "noise")


@SETTINGS
@given(st.sampled_from([0, -8000, 44100.5, float("nan"), float("inf"), True, "44100", None, 2**31]))
def test_bad_sample_rates_raise(rate):
    """Sample rates that are not a positive whole number of Hz in WAV's range raise."""
    with pytest.raises((ValueError, TypeError), match="sample_rate"):
        audio_value("a", np.zeros(4), sample_rate=rate)


def test_whole_float_sample_rate_is_accepted():
    """A float sample rate with no fractional part is accepted as that many Hz."""
    _, rate, _ = decode(audio_value("a", np.zeros(4), sample_rate=48000.0))
    assert rate == 48000
