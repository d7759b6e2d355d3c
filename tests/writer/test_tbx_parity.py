"""tensorboardX parity of image lists, 2-channel images, boxes, tag cleaning, hparams values,
device scalars in add_scalars and write_to_disk=False, read back with TensorBoard's readers."""

import io
import json
import math
import os
import threading

import numpy as np
import pytest
import tensorboardX
import torch
from PIL import Image
from tensorboard.plugins.hparams import plugin_data_pb2

from tbprobe import SummaryWriter
from tbprobe.writer import device as device_mod
from tbprobe.writer import values as values_mod

from .conftest import accumulate, values_by_tag


def _image(logdir, tag):
    (e,) = accumulate(logdir).Images(tag)
    im = Image.open(io.BytesIO(e.encoded_image_string))
    im.load()
    return e, im


def _both(tmp_path, write) -> tuple[str, str]:
    """``write(writer)`` with our writer and with tensorboardX's, each closed: their logdirs."""
    ours, ref = str(tmp_path / "ours"), str(tmp_path / "tbx")
    with SummaryWriter(ours) as w:
        write(w)
    t = tensorboardX.SummaryWriter(ref)
    write(t)
    t.close()
    return ours, ref


def _force_device_path(monkeypatch):
    """Treat CPU tensors as device tensors: the deferred, sync-free path runs on the CPU."""
    monkeypatch.setattr(values_mod, "is_device_tensor", lambda v: isinstance(v, torch.Tensor))


# ----------------------------------------------------------------------------- add_images lists


def _rand(seed, shape):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda: [_rand(i, (3, 4, 6)) for i in range(5)], "CHW"),
        (lambda: tuple(_rand(i, (3, 4, 6)).numpy() for i in range(5)), "CHW"),
        (lambda: [_rand(i, (3, 4, 6)).permute(1, 2, 0).numpy() for i in range(9)], "HWC"),
        (lambda: [_rand(i, (2, 4, 6)) for i in range(3)], "CHW"),
        (lambda: [_rand(i, (4, 6, 1)).double() for i in range(3)], "hwc"),
    ],
)
@pytest.mark.parametrize("device_path", [False, True])
def test_add_images_list_equals_stacked(tmp_path, monkeypatch, make, fmt, device_path):
    """A list/tuple of images with a per-image dataformats writes the grid of the stacked batch."""
    images = make()
    stacked = np.stack([np.asarray(x) for x in images])
    ref_dir, ours_dir = str(tmp_path / "ref"), str(tmp_path / "ours")
    with SummaryWriter(ref_dir) as w:
        w.add_images("x", stacked, 3, dataformats="N" + fmt)
    if device_path and torch.is_tensor(images[0]):
        _force_device_path(monkeypatch)
    with SummaryWriter(ours_dir) as w:
        w.add_images("x", images, 3, dataformats=fmt)
    monkeypatch.undo()
    (e, ours), (r, ref) = _image(ours_dir, "x"), _image(ref_dir, "x")
    assert (e.step, e.width, e.height) == (3, r.width, r.height)
    assert ours.mode == ref.mode and np.array_equal(np.asarray(ours), np.asarray(ref))


def test_add_images_list_matches_tensorboardx(tmp_path):
    """The grid of a list equals tensorboardX's for the same list."""
    images = [_rand(i, (3, 5, 4)) for i in range(10)]
    ours, ref = _both(tmp_path, lambda w: w.add_images("x", images, 1, dataformats="CHW"))
    a, b = _image(ours, "x")[1].convert("RGB"), _image(ref, "x")[1].convert("RGB")
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_add_images_list_each_scaled_by_its_dtype(logdir):
    """uint8 and float images in one list are each scaled by their own dtype."""
    images = [np.full((1, 2, 2), 0.5), np.full((1, 2, 2), 200, np.uint8)]
    with SummaryWriter(logdir) as w:
        w.add_images("x", images, 0, dataformats="CHW")
    px = np.asarray(_image(logdir, "x")[1])
    assert px.shape == (2, 4) and (px[:, :2] == 127).all() and (px[:, 2:] == 200).all()


@pytest.mark.parametrize(
    "images, match",
    [
        ([], "empty"),
        ((), "empty"),
        ([np.zeros((3, 4, 4)), np.zeros((3, 4, 5))], "share one shape"),
        ([torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)], "share one shape"),
        ([np.zeros((5, 4, 4))], "channels"),
    ],
)
def test_add_images_bad_list(logdir, images, match):
    """An empty list or images of different shapes raise ValueError naming img_tensor."""
    with SummaryWriter(logdir) as w, pytest.raises(ValueError, match=f"img_tensor.*{match}"):
        w.add_images("x", images, 0, dataformats="CHW")


def test_add_images_bad_list_on_device_path(logdir, monkeypatch):
    """The device path checks a list the same way."""
    _force_device_path(monkeypatch)
    with SummaryWriter(logdir) as w:
        with pytest.raises(ValueError, match="img_tensor.*share one shape"):
            w.add_images("x", [torch.zeros(3, 4, 4), torch.zeros(3, 4, 5)], 0, dataformats="CHW")
        with pytest.raises(TypeError, match="img_tensor"):
            w.add_images("x", [torch.zeros(3, 4, 4), np.zeros((3, 4, 4))], 0, dataformats="CHW")


# ----------------------------------------------------------------------------- 2-channel images


@pytest.mark.parametrize("device_path", [False, True])
def test_two_channel_image_is_gray_alpha_png(logdir, monkeypatch, device_path):
    """A (2, H, W) image is written as an LA PNG with colorspace 2, as tensorboardX writes it."""
    x = _rand(0, (2, 5, 7))
    if device_path:
        _force_device_path(monkeypatch)
    with SummaryWriter(logdir) as w:
        w.add_image("la", x, 1)
        w.add_images("la_grid", torch.stack([x, x]), 1)
    monkeypatch.undo()
    expected = (x * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    _, im = _image(logdir, "la")
    assert im.mode == "LA" and np.array_equal(np.asarray(im), expected)
    (_, v) = values_by_tag(logdir)["la"][0]
    assert (v.image.height, v.image.width, v.image.colorspace) == (5, 7, 2)
    _, grid = _image(logdir, "la_grid")
    assert grid.mode == "LA" and np.array_equal(np.asarray(grid), np.hstack([expected] * 2))


def test_two_channel_image_matches_tensorboardx(tmp_path):
    """The LA pixels equal tensorboardX's for the same HWC array."""
    x = np.random.default_rng(1).random((6, 4, 2)).astype(np.float32)
    ours, ref = _both(tmp_path, lambda w: w.add_image("la", x, 0, dataformats="HWC"))
    a, b = _image(ours, "la")[1], _image(ref, "la")[1]
    assert a.mode == b.mode == "LA" and np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- boxes


def test_add_image_with_boxes_rescale_labels_and_nan(logdir):
    """rescale doubles the written image; a label-count mismatch warns and still writes; a NaN
    box is skipped and the image still written."""
    img = np.zeros((3, 20, 30))
    with SummaryWriter(logdir) as w:
        w.add_image_with_boxes("big", img, np.array([[1, 1, 5, 5]]), 0, rescale=2)
        with pytest.warns(RuntimeWarning, match="labels"):
            w.add_image_with_boxes("mis", img, [[1, 1, 5, 5], [6, 6, 9, 9]], 0, labels=["a"])
        with pytest.warns(RuntimeWarning, match="NaN"):
            w.add_image_with_boxes("nan", img, [[1, 1, 5, np.nan], [10, 10, 25, 18]], 0)
        w.add_image_with_boxes("none", img, [[1, 1, 5, 5]], 0, labels=[None])
        with pytest.raises(TypeError, match="bogus"):
            w.add_image_with_boxes("x", img, [[1, 1, 5, 5]], 0, bogus=1)
    e, im = _image(logdir, "big")
    assert (e.width, e.height) == im.size == (60, 40)
    for tag in ("mis", "nan", "none"):
        px = np.asarray(_image(logdir, tag)[1].convert("RGB"))
        assert px.shape == (20, 30, 3) and (px[..., 0] == 255).sum() > 0  # red boxes drawn
    nan_px = np.asarray(_image(logdir, "nan")[1].convert("RGB"))
    assert (nan_px[:8, :, 0] == 0).all()  # the NaN box (near y=1) was not drawn


# ----------------------------------------------------------------------------- tag cleaning

TAG_CALLS = {
    "scalar": lambda w, t: w.add_scalar(t, 1.0, 0),
    "histogram": lambda w, t: w.add_histogram(t, np.arange(4.0), 0),
    "histogram_raw": lambda w, t: w.add_histogram_raw(t, 0, 1, 2, 1, 1, [1.0], [2], 0),
    "image": lambda w, t: w.add_image(t, np.zeros((3, 4, 4)), 0),
    "images": lambda w, t: w.add_images(t, np.zeros((2, 3, 4, 4)), 0),
    "image_with_boxes": lambda w, t: w.add_image_with_boxes(t, np.zeros((3, 8, 8)), [[1, 1, 4, 4]]),
    "audio": lambda w, t: w.add_audio(t, np.zeros(20), 0),
    "text": lambda w, t: w.add_text(t, "hello", 0),
    "pr_curve": lambda w, t: w.add_pr_curve(t, np.array([0, 1]), np.array([0.2, 0.8]), 0),
    "pr_curve_raw": lambda w, t: w.add_pr_curve_raw(t, *([np.ones(3)] * 6), 0, num_thresholds=3),
    "mesh": lambda w, t: w.add_mesh(t, np.zeros((1, 3, 3)), global_step=0),
}


@pytest.mark.parametrize("method", sorted(TAG_CALLS))
def test_tags_cleaned_exactly_where_tensorboardx_cleans(tmp_path, method):
    """Each method writes the tag tensorboardX writes: cleaned for scalars, histograms and
    images, as given for text, audio, PR curves, meshes, boxes and raw histograms."""
    tag = "Run config (x)/a b"
    ours, ref = _both(tmp_path, lambda w: TAG_CALLS[method](w, tag))
    assert sorted(values_by_tag(ours)) == sorted(values_by_tag(ref))
    a = accumulate(ours).Tags()
    assert {k: sorted(v) for k, v in a.items() if isinstance(v, list) and v} == {
        k: sorted(v) for k, v in accumulate(ref).Tags().items() if isinstance(v, list) and v
    }


def test_add_tensor_tag_as_given(logdir):
    """add_tensor (torch's API) keeps its tag as torch.utils.tensorboard does."""
    with SummaryWriter(logdir) as w:
        w.add_tensor("raw tensor", torch.ones(2), 0)
    assert list(values_by_tag(logdir)) == ["raw tensor"]


def test_uncleaned_tags_still_checked_and_stay_inside_logdir(tmp_path):
    """Tags written as given are still validated, and tags that name directories stay safe."""
    logdir = str(tmp_path / "run")
    with SummaryWriter(logdir) as w:
        for bad, error in ((3, TypeError), ("", ValueError), ("x" * 5000, ValueError)):
            with pytest.raises(error, match="tag"):
                w.add_text(bad, "t", 0)
        with pytest.raises(ValueError, match="tag"):
            w.add_audio("\ud800", np.zeros(4), 0)
        w.add_text("../../escape", "t", 0)
        w.add_scalars("../../up", {"../../x": 1.0}, 0)
        w.add_embedding(np.eye(2), tag="../../e")
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert "../../escape/text_summary" in values_by_tag(logdir)


# ----------------------------------------------------------------------------- hparams


def _session_start(run_dir):
    """The hparams of a session, decoded with TensorBoard's own plugin protos."""
    meta = accumulate(run_dir).SummaryMetadata("_hparams_/session_start_info")
    data = plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content)
    return data.session_start_info.hparams


def test_hparams_odd_values_never_lose_the_session(logdir):
    """Lists, tuples, dicts and objects are written as str(); NaN/inf stay numbers; None is
    skipped as in tensorboardX; the metrics are written."""

    class Opaque:
        def __str__(self):
            raise RuntimeError("no str")

    hp = {
        "lr": 0.1,
        "layers": [64, 64],
        "betas": (0.9, 0.99),
        "sched": {"kind": "cos"},
        "arr": np.array([1, 2]),
        "wd": math.nan,
        "clip": math.inf,
        "skip": None,
        "opaque": Opaque(),
        "name": "adam",
    }
    with SummaryWriter(logdir) as w:
        w.add_hparams(hp, {"hp/acc": 0.9}, name="s")
    run = os.path.join(logdir, "s")
    got = _session_start(run)
    assert got["layers"].string_value == "[64, 64]"
    assert got["betas"].string_value == "(0.9, 0.99)"
    assert got["sched"].string_value == "{'kind': 'cos'}"
    assert got["arr"].string_value == "[1 2]"
    assert got["opaque"].string_value.startswith("<") and "Opaque" in got["opaque"].string_value
    assert math.isnan(got["wd"].number_value) and got["clip"].number_value == math.inf
    assert got["lr"].number_value == 0.1 and got["name"].string_value == "adam"
    assert "skip" not in got
    assert accumulate(run).Scalars("hp/acc")[0].value == pytest.approx(0.9)


def test_hparams_nan_shown_as_unset_by_tensorboard(tmp_path):
    """TensorBoard's hparams backend lists, sorts and filters sessions with a NaN hparam
    (shown as unset) without error."""
    from tensorboard import context as tb_context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    d = str(tmp_path)
    with SummaryWriter(d) as w:
        w.add_hparams({"wd": 0.1, "layers": [8]}, {"hp/acc": 0.9}, name="a")
        w.add_hparams({"wd": math.nan, "layers": [8, 8]}, {"hp/acc": 0.8}, name="b")
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(d)
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, d)
    ctx = backend_context.Context(base_plugin.TBContext(data_provider=provider, logdir=d))
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=10)
    request.allowed_statuses.extend([api_pb2.STATUS_SUCCESS])
    wd = request.col_params.add(hparam="wd", order=api_pb2.ORDER_ASC)
    wd.filter_interval.min_value, wd.filter_interval.max_value = 0.0, 1.0
    request.col_params.add(hparam="layers").filter_regexp = ".*"
    groups = list_session_groups.Handler(tb_context.RequestContext(), ctx, "", request).run()
    by_name = {g.name: g for g in groups.session_groups}
    assert sorted(by_name) == ["a", "b"]
    assert "wd" not in by_name["b"].hparams and by_name["a"].hparams["wd"].number_value == 0.1
    assert by_name["b"].hparams["layers"].string_value == "[8, 8]"


# ----------------------------------------------------------------------------- add_scalars


def test_add_scalars_device_tensors_without_sync(logdir, tmp_path, monkeypatch):
    """Device tensors in add_scalars take add_scalar's deferred path (a host copy per value,
    no reading on the caller's thread); sub-runs and export_scalars_to_json get the values."""
    copies = []
    real_host_copy = device_mod.host_copy
    monkeypatch.setattr(device_mod, "host_copy", lambda ts: copies.append(ts) or real_host_copy(ts))
    _force_device_path(monkeypatch)
    values = {"train": torch.tensor(0.5), "val": torch.tensor([2.5], dtype=torch.bfloat16)}
    with SummaryWriter(logdir) as w:
        with monkeypatch.context() as m:  # reading a tensor's value here would be a sync
            for attr in ("__float__", "item", "tolist", "numpy", "cpu"):
                m.setattr(torch.Tensor, attr, _not_on_this_thread(getattr(torch.Tensor, attr)))
            w.add_scalars("loss", values, 4)
            w.add_scalars("loss", {"train": 1.0, "val": torch.tensor(3.0)}, 5)
        assert len(copies) == 3
        out = tmp_path / "s.json"
        w.export_scalars_to_json(str(out))
        w.add_scalars("loss", {"val": torch.tensor(7.0)}, 6)
        assert w.scalar_dict[os.path.join(logdir, "loss", "val")][0][1:] == [6, 7.0]
    data = json.loads(out.read_text())
    assert [row[1:] for row in data[os.path.join(logdir, "loss", "train")]] == [[4, 0.5], [5, 1.0]]
    assert [row[1:] for row in data[os.path.join(logdir, "loss", "val")]] == [[4, 2.5], [5, 3.0]]
    val = accumulate(os.path.join(logdir, "loss", "val")).Scalars("loss")
    assert [(e.step, e.value) for e in val] == [(4, 2.5), (5, 3.0), (6, 7.0)]
    train = accumulate(os.path.join(logdir, "loss", "train")).Scalars("loss")
    assert [(e.step, e.value) for e in train] == [(4, 0.5), (5, 1.0)]


def _not_on_this_thread(method):
    """``method``, failing when called on this (the training) thread: the writer thread may."""
    caller = threading.get_ident()

    def guarded(*args, **kwargs):
        if threading.get_ident() == caller:
            raise AssertionError("a device value was read on the caller's thread")
        return method(*args, **kwargs)

    return guarded


def test_add_scalars_bad_device_tensor(logdir, monkeypatch):
    """A device tensor with several values raises ValueError naming scalar_value."""
    _force_device_path(monkeypatch)
    with SummaryWriter(logdir) as w, pytest.raises(ValueError, match="single value"):
        w.add_scalars("m", {"a": torch.ones(3)}, 0)


# ----------------------------------------------------------------------------- write_to_disk


def test_write_to_disk_false_embedding_writes_nothing(logdir):
    """add_embedding with write_to_disk=False checks its input and writes no file."""
    with SummaryWriter(logdir, write_to_disk=False) as w:
        w.add_embedding(np.eye(3), metadata=["a", "b", "c"], label_img=np.zeros((3, 1, 2, 2)))
        with pytest.raises(ValueError, match="metadata"):
            w.add_embedding(np.eye(3), metadata=["a"])
    assert not os.path.exists(logdir)
