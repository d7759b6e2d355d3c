"""Embedding projector files, compared with what tensorboardX 2.6.5's ``add_embedding`` writes
in a temporary directory; ``projector_config.pbtxt`` is loaded with TensorBoard's own proto."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

tensorboardX = pytest.importorskip("tensorboardX")

from tensorboard.plugins.projector import projector_config_pb2  # noqa: E402

from tbprobe.writer.embedding import encode_tag, write_embedding  # noqa: E402

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None)
BAD = (ValueError, TypeError)


def tbx_embedding(logdir, *args, **kwargs):
    """tensorboardX's add_embedding into ``logdir`` (its stdout warnings silenced)."""
    with contextlib.redirect_stdout(io.StringIO()), tensorboardX.SummaryWriter(logdir) as w:
        w.add_embedding(*args, **kwargs)


def load_config(logdir) -> projector_config_pb2.ProjectorConfig:
    """projector_config.pbtxt parsed as TensorBoard's projector plugin parses it."""
    with open(os.path.join(logdir, "projector_config.pbtxt"), encoding="utf-8") as f:
        return text_format.Parse(f.read(), projector_config_pb2.ProjectorConfig())


def files_under(root) -> set[str]:
    """Relative paths of every file below ``root`` except event files."""
    out = set()
    for d, _, names in os.walk(root):
        out |= {os.path.relpath(os.path.join(d, n), root) for n in names if "tfevents" not in n}
    return out


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _case(name):
    rng = np.random.default_rng(0)
    if name == "labels_sprite":
        kw = dict(metadata=[f"w{i}" for i in range(10)], global_step=3, tag="my/emb")
        return rng.standard_normal((10, 4)).astype(np.float32), dict(
            kw, label_img=rng.random((10, 3, 5, 5))
        )
    if name == "header":
        meta = [[i, f"x{i}", 0.5 * i] for i in range(7)]
        return rng.standard_normal((7, 3)), dict(metadata=meta, metadata_header=["id", "name", "v"])
    if name == "gray_torch":
        mat = torch.from_numpy(rng.integers(-5, 5, (100, 6)))
        img = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        return mat, dict(metadata=np.arange(100), label_img=img, global_step=12345, tag="a%b/c d")
    if name == "single":
        return rng.standard_normal((1, 2)).astype(np.float16), dict(
            label_img=rng.random((1, 3, 4, 4))
        )
    raise KeyError(name)


@pytest.mark.parametrize("case", ["labels_sprite", "header", "gray_torch", "single"])
def test_files_match_tensorboardx(tmp_path, case):
    """tensors.tsv and metadata.tsv are byte-identical, sprite pixels and config entries equal."""
    mat, kwargs = _case(case)
    tbx_dir, our_dir = str(tmp_path / "tbx"), str(tmp_path / "ours")
    tbx_embedding(tbx_dir, mat, **kwargs)
    written = write_embedding(our_dir, mat, **kwargs)
    assert files_under(tbx_dir) == files_under(our_dir)
    for rel in files_under(our_dir):
        ours, theirs = os.path.join(our_dir, rel), os.path.join(tbx_dir, rel)
        if rel.endswith(".tsv"):
            with open(ours, "rb") as a, open(theirs, "rb") as b:
                assert a.read() == b.read(), rel
        elif rel.endswith(".png"):
            n, _, h, w = np.shape(kwargs["label_img"])
            used = int(np.ceil(n / (pixels(ours).shape[1] // w))) * h  # rows holding images
            np.testing.assert_array_equal(pixels(ours)[:used], pixels(theirs)[:used])
            assert not pixels(ours)[used:].any()  # tensorboardX leaves this uninitialised
    assert load_config(our_dir) == load_config(tbx_dir)
    assert os.path.isdir(written) and written.startswith(our_dir)


def test_config_appends_and_loads_with_tensorboard(tmp_path):
    """Each call appends one embeddings entry that TensorBoard's ProjectorConfig parses."""
    logdir = str(tmp_path)
    write_embedding(logdir, np.eye(3), metadata=["a", "b", "c"], tag='say "hi"')
    write_embedding(logdir, np.eye(3), label_img=np.zeros((3, 3, 2, 2)), global_step=7)
    config = load_config(logdir)
    assert [e.tensor_name for e in config.embeddings] == ['say "hi":00000', "default:00007"]
    first, second = config.embeddings
    assert first.tensor_path == '00000/say "hi"/tensors.tsv'
    assert first.metadata_path == '00000/say "hi"/metadata.tsv'
    assert second.sprite.image_path == "00007/default/sprite.png"
    assert list(second.sprite.single_image_dim) == [2, 2]
    assert not second.metadata_path


@pytest.mark.parametrize("tag", ["default", "my/emb", "100%", "a\\b", "x y", "naïve"])
def test_directory_names_match_tensorboardx(tag):
    """Ordinary tags get tensorboardX's directory names."""
    assert encode_tag(tag) == tensorboardX.SummaryWriter._encode(tag)


NASTY_TAGS = ["..", ".", "../..", "/etc/passwd", "../../x", "a\x00b", "\\..\\..", "%2e%2e", "~"]


@SETTINGS
@given(st.one_of(st.sampled_from(NASTY_TAGS), st.text(min_size=1, max_size=12)))
def test_no_tag_leads_outside_logdir(tag):
    """Whatever the tag, every file lands inside logdir, one directory below the step."""
    with tempfile.TemporaryDirectory() as top:
        logdir = os.path.join(top, "run")
        try:
            written = write_embedding(logdir, np.ones((2, 2)), metadata=["a", "b"], tag=tag)
        except ValueError:  # e.g. an unpaired surrogate cannot be a file name
            assert not os.path.exists(logdir)
            return
        assert os.path.dirname(written) == os.path.join(logdir, "00000")
        assert set(os.listdir(top)) == {"run"}
        assert files_under(logdir) == {
            "projector_config.pbtxt",
            os.path.join("00000", encode_tag(tag), "metadata.tsv"),
            os.path.join("00000", encode_tag(tag), "tensors.tsv"),
        }
        assert load_config(logdir).embeddings[0].tensor_name == f"{tag}:00000"


def test_existing_directory_warns_and_is_overwritten(tmp_path):
    """The same step and tag twice warns, as tensorboardX does, and keeps the newest data."""
    write_embedding(str(tmp_path), np.zeros((2, 2)))
    with pytest.warns(UserWarning, match="global_step"):
        written = write_embedding(str(tmp_path), np.ones((2, 2)))
    with open(os.path.join(written, "tensors.tsv")) as f:
        assert f.read() == "1.0\t1.0\n1.0\t1.0\n"
    assert len(load_config(str(tmp_path)).embeddings) == 2


def test_torch_labels_uint8_images_and_bool_mat(tmp_path):
    """Torch labels print as numbers, uint8 images keep their values, bool rows become 0/1."""
    img = torch.full((2, 3, 2, 2), 100, dtype=torch.uint8)
    written = write_embedding(
        str(tmp_path), torch.tensor([[True, False], [False, True]]), torch.tensor([4, 5]), img
    )
    with open(os.path.join(written, "metadata.tsv")) as f:
        assert f.read() == "4\n5\n"
    with open(os.path.join(written, "tensors.tsv")) as f:
        assert f.read() == "1\t0\n0\t1\n"
    sprite = pixels(os.path.join(written, "sprite.png"))
    assert sprite.shape == (4, 4, 3) and (sprite[:2] == 100).all() and not sprite[2:].any()


def _bad_calls():
    mat = np.ones((3, 2))
    ok = dict(mat=mat)
    return [
        (dict(mat=np.ones(3)), "mat"),
        (dict(mat=np.ones((3, 2, 1))), "mat"),
        (dict(mat=np.ones((0, 2))), "mat"),
        (dict(mat=np.array([[1.0, np.nan]] * 3)), "mat"),
        (dict(mat=[["a", "b"]]), "mat"),
        (dict(ok, metadata=["a", "b"]), "metadata"),
        (dict(ok, metadata="abc"), "metadata"),
        (dict(ok, metadata=["a", "b\tc", "d"]), "metadata"),
        (dict(ok, metadata=["a", "b\nc", "d"]), "metadata"),
        (dict(ok, metadata=[[1, 2], [3], [4, 5]], metadata_header=["x", "y"]), "metadata"),
        (dict(ok, metadata=[[1, 2]] * 3, metadata_header="xy"), "metadata_header"),
        (dict(ok, label_img=np.ones((3, 3, 4, 5))), "label_img"),
        (dict(ok, label_img=np.ones((2, 3, 4, 4))), "label_img"),
        (dict(ok, label_img=np.ones((3, 2, 4, 4))), "label_img"),
        (dict(ok, label_img=np.ones((3, 4, 4, 4))), "label_img"),
        (dict(ok, label_img=np.ones((3, 4, 4))), "label_img"),
        (dict(ok, global_step=-1), "global_step"),
        (dict(ok, global_step=float("nan")), "global_step"),
        (dict(ok, global_step=2**63), "global_step"),
        (dict(ok, global_step="3"), "global_step"),
        (dict(ok, tag=""), "tag"),
        (dict(ok, tag=None), "tag"),
        (dict(ok, tag="x" * 300), "tag"),
    ]


@SETTINGS
@given(st.sampled_from(_bad_calls()))
def test_bad_inputs_raise_and_write_nothing(call):
    """Bad shapes, counts, labels, images, steps and tags raise before any file is written."""
    kwargs, name = call
    with tempfile.TemporaryDirectory() as top:
        logdir = os.path.join(top, "run")
        with pytest.raises(BAD, match=name):
            write_embedding(logdir, **kwargs)
        assert not os.path.exists(logdir)


def test_sprite_over_projector_limit_raises():
    """A sprite wider than 8192 pixels raises (checked before any pixel is converted)."""
    huge = np.broadcast_to(np.zeros((1, 1, 1, 1), np.float32), (1, 1, 8193, 8193))
    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="8192"):
            write_embedding(logdir, np.ones((1, 2)), label_img=huge)
