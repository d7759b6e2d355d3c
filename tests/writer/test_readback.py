"""Every SummaryWriter method, read back with TensorBoard's EventAccumulator and compared with
what tensorboardX writes for the same call."""

import io
import json
import os
import wave

import numpy as np
import pytest
import tensorboardX
import torch
from PIL import Image

from tbprobe import SummaryWriter

from .conftest import accumulate, values_by_tag

RNG = np.random.default_rng(0)


def _both(tmp_path, call):
    """Run ``call(writer)`` on a tbprobe and a tensorboardX writer; return both logdirs."""
    ours, ref = str(tmp_path / "ours"), str(tmp_path / "tbx")
    with SummaryWriter(ours) as w:
        call(w)
    w = tensorboardX.SummaryWriter(ref)
    call(w)
    w.close()
    return ours, ref


def _pixels(encoded):
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGBA"))


@pytest.mark.parametrize(
    "img, fmt",
    [
        (RNG.random((3, 20, 30)), "CHW"),
        (RNG.random((20, 30, 3)).astype(np.float32), "HWC"),
        (RNG.random((20, 30)), "HW"),
        ((RNG.random((3, 8, 9)) * 255).astype(np.uint8), "CHW"),
        (torch.rand(4, 10, 12), "CHW"),
        (torch.rand(1, 10, 12, dtype=torch.float64), "CHW"),
    ],
    ids=["chw", "hwc32", "hw", "uint8", "rgba_tensor", "gray_tensor"],
)
def test_add_image_same_pixels(tmp_path, img, fmt):
    """add_image decodes to tensorboardX's pixels."""
    ours, ref = _both(tmp_path, lambda w: w.add_image("img", img, 3, dataformats=fmt))
    a, b = accumulate(ours).Images("img")[0], accumulate(ref).Images("img")[0]
    assert (a.step, a.width, a.height) == (b.step, b.width, b.height)
    np.testing.assert_array_equal(_pixels(a.encoded_image_string), _pixels(b.encoded_image_string))


def test_add_image_clips_out_of_range(logdir):
    """Values outside [0, 1] are scaled by 255 and clipped to [0, 255]; NaN becomes 0."""
    img = np.array([[[-1.0, 0.5, 2.0, np.nan]]])  # (1, 1, 4) CHW
    with SummaryWriter(logdir) as w:
        w.add_image("img", img, 0)
    (e,) = accumulate(logdir).Images("img")
    assert _pixels(e.encoded_image_string)[0, :, 0].tolist() == [0, 127, 255, 0]


def test_add_images_grid_same_pixels(tmp_path):
    """add_images lays out the batch as tensorboardX's grid."""
    batch = torch.rand(5, 3, 8, 6, generator=torch.Generator().manual_seed(1))
    ours, ref = _both(tmp_path, lambda w: w.add_images("b", batch, 1))
    a, b = accumulate(ours).Images("b")[0], accumulate(ref).Images("b")[0]
    np.testing.assert_array_equal(_pixels(a.encoded_image_string), _pixels(b.encoded_image_string))


def test_add_image_with_boxes(logdir):
    """Boxes are drawn onto the image and the image is readable."""
    img = np.zeros((3, 32, 32))
    with SummaryWriter(logdir) as w:
        w.add_image_with_boxes("bx", img, np.array([[2, 2, 20, 20]]), 0, labels=["cat"])
        with pytest.raises(TypeError, match="labels"):
            w.add_image_with_boxes("bx", img, np.array([[2, 2, 20, 20]]), 0, labels=[1])
    (e,) = accumulate(logdir).Images("bx")
    px = _pixels(e.encoded_image_string)
    assert px.shape[:2] == (32, 32) and px[..., :3].max() > 0


def test_add_figure(logdir):
    """A matplotlib figure is rendered to an image."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2, 1), dpi=50)
    plt.plot([0, 1], [1, 0])
    with SummaryWriter(logdir) as w:
        w.add_figure("fig", fig, 0)
    (e,) = accumulate(logdir).Images("fig")
    assert (e.width, e.height) == (100, 50)


def test_add_video_gif(logdir):
    """add_video writes an animated GIF with T frames."""
    vid = torch.rand(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with SummaryWriter(logdir) as w:
        w.add_video("v", vid, 0, fps=10)
    (e,) = accumulate(logdir).Images("v")
    gif = Image.open(io.BytesIO(e.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 4


@pytest.mark.parametrize("shape", [(800,), (800, 1), (800, 2)])
def test_add_audio(logdir, shape):
    """Mono and stereo audio come back as 16-bit WAV with the samples given."""
    snd = np.sin(np.linspace(0, 60, int(np.prod(shape)))).reshape(shape) * 0.5
    with SummaryWriter(logdir) as w:
        w.add_audio("a", snd, 0, sample_rate=8000)
    (e,) = accumulate(logdir).Audio("a")
    assert e.sample_rate == 8000 and e.content_type == "audio/wav"
    with wave.open(io.BytesIO(e.encoded_audio_string)) as wav:
        channels = 1 if len(shape) == 1 else shape[1]
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getnframes()) == (channels, 2, 800)
        pcm = np.frombuffer(wav.readframes(800), dtype="<i2").reshape(800, channels)
    np.testing.assert_allclose(pcm / 32767.0, snd.reshape(800, channels), atol=1e-4)


def test_add_text_and_tensor(tmp_path):
    """add_text and add_tensor are served as tensors with their plugins."""
    ours, ref = _both(tmp_path, lambda w: w.add_text("note", "**hi**", 2))
    a, b = accumulate(ours), accumulate(ref)
    assert a.Tensors("note/text_summary")[0].tensor_proto.string_val == [b"**hi**"]
    assert a.Tensors("note/text_summary")[0].step == b.Tensors("note/text_summary")[0].step
    assert a.summary_metadata["note/text_summary"].plugin_data.plugin_name == "text"
    d = str(tmp_path / "t")
    with SummaryWriter(d) as w:
        w.add_tensor("raw", torch.arange(6, dtype=torch.float32).reshape(2, 3), 1)
    from tensorboard.util import tensor_util

    got = tensor_util.make_ndarray(accumulate(d).Tensors("raw")[0].tensor_proto)
    np.testing.assert_array_equal(got, np.arange(6).reshape(2, 3))


def test_text_metadata_sent_once_per_tag(logdir):
    """Plugin metadata goes out with a tag's first event only."""
    with SummaryWriter(logdir) as w:
        for s in range(3):
            w.add_text("t", f"step {s}", s)
    vals = values_by_tag(logdir)["t/text_summary"]
    assert [v.HasField("metadata") for _, v in vals] == [True, False, False]
    assert len(accumulate(logdir).Tensors("t/text_summary")) == 3


def test_add_pr_curve_equals_tensorboardx(tmp_path):
    """PR curve tensors equal tensorboardX's."""
    labels = RNG.integers(0, 2, 100)
    preds = RNG.random(100)
    ours, ref = _both(tmp_path, lambda w: w.add_pr_curve("pr", labels, preds, 1, num_thresholds=11))
    from tensorboard.util import tensor_util

    a = tensor_util.make_ndarray(accumulate(ours).Tensors("pr")[0].tensor_proto)
    b = tensor_util.make_ndarray(accumulate(ref).Tensors("pr")[0].tensor_proto)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_add_pr_curve_raw(tmp_path):
    """add_pr_curve_raw writes the given counts."""
    n = 5
    args = [np.arange(n, dtype=float) + i for i in range(6)]
    ours, ref = _both(tmp_path, lambda w: w.add_pr_curve_raw("r", *args, 0, num_thresholds=n))
    from tensorboard.util import tensor_util

    a = tensor_util.make_ndarray(accumulate(ours).Tensors("r")[0].tensor_proto)
    b = tensor_util.make_ndarray(accumulate(ref).Tensors("r")[0].tensor_proto)
    np.testing.assert_allclose(a, b)


def test_custom_scalars_layout(tmp_path):
    """Custom scalar layouts (multiline, margin, explicit) are written like tensorboardX's."""

    def call(w):
        w.add_custom_scalars_multilinechart(["a", "b"], category="c", title="t")

    ours, ref = _both(tmp_path, call)
    from tbprobe.writer.proto import plugins_pb2

    a = accumulate(ours).Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    b = accumulate(ref).Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    assert plugins_pb2.Layout.FromString(a) == plugins_pb2.Layout.FromString(b)
    layout = {"cat": {"m": ["Multiline", ["x"]], "g": ["Margin", ["v", "lo", "hi"]]}}
    ours, ref = _both(tmp_path / "2", lambda w: w.add_custom_scalars(layout))
    a = accumulate(ours).Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    b = accumulate(ref).Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    assert plugins_pb2.Layout.FromString(a) == plugins_pb2.Layout.FromString(b)


def test_add_mesh(tmp_path):
    """Mesh components are written as tensors with tensorboardX's tags."""
    verts = torch.rand(1, 4, 3)
    faces = torch.tensor([[[0, 1, 2], [1, 2, 3]]])
    colors = torch.randint(0, 255, (1, 4, 3))
    ours, ref = _both(tmp_path, lambda w: w.add_mesh("m", verts, colors, faces, global_step=1))
    a, b = accumulate(ours), accumulate(ref)
    assert sorted(a.Tags()["tensors"]) == sorted(b.Tags()["tensors"])


def test_add_hparams(tmp_path):
    """add_hparams writes the hparams plugin values and metrics into a sub-run."""
    ours, ref = _both(
        tmp_path, lambda w: w.add_hparams({"lr": 0.1, "opt": "adam"}, {"acc": 0.9}, name="r1")
    )
    a = accumulate(os.path.join(ours, "r1"))
    b = accumulate(os.path.join(ref, "r1"))
    assert sorted(a.Tags()["tensors"]) == sorted(b.Tags()["tensors"])
    assert a.Scalars("acc")[0].value == pytest.approx(0.9)
    for tag in a.Tags()["tensors"]:
        assert a.summary_metadata[tag].plugin_data.plugin_name == "hparams"


def test_add_graph_readable(logdir):
    """add_graph writes a graph TensorBoard can load."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return torch.relu(self.fc(x))

    with SummaryWriter(logdir) as w:
        w.add_graph(Net(), torch.zeros(1, 4))
    g = accumulate(logdir).Graph()
    assert any("Linear" in n.name or "fc" in n.name for n in g.node)


def test_add_embedding_files(tmp_path):
    """add_embedding writes the projector files tensorboardX writes."""
    mat = RNG.random((6, 3))
    meta = [f"n{i}" for i in range(6)]
    imgs = torch.rand(6, 3, 4, 4)
    ours, ref = _both(tmp_path, lambda w: w.add_embedding(mat, meta, imgs, 2, tag="emb"))
    for root in (ours, ref):
        assert os.path.exists(os.path.join(root, "projector_config.pbtxt"))
    ours_files = sorted(
        os.path.relpath(os.path.join(r, f), ours)
        for r, _, fs in os.walk(ours)
        for f in fs
        if "tfevents" not in f
    )
    ref_files = sorted(
        os.path.relpath(os.path.join(r, f), ref)
        for r, _, fs in os.walk(ref)
        for f in fs
        if "tfevents" not in f
    )
    assert ours_files == ref_files


def test_export_scalars_json_roundtrip(logdir, tmp_path):
    """export_scalars_to_json writes valid JSON after add_scalars."""
    with SummaryWriter(logdir) as w:
        w.add_scalars("m", {"a": 1.0}, 0)
        w.export_scalars_to_json(str(tmp_path / "x.json"))
        assert w.scalar_dict == {}
    assert json.loads((tmp_path / "x.json").read_text())


def test_optional_package_missing_names_it(logdir, tmp_path, monkeypatch):
    """A method whose optional package is missing raises ImportError naming the package."""
    import sys

    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with SummaryWriter(logdir) as w, pytest.raises(ImportError, match="onnx"):
        w.add_onnx_graph(str(model))
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with SummaryWriter(logdir) as w, pytest.raises(ImportError, match="matplotlib"):
        w.add_figure("f", object(), 0)
