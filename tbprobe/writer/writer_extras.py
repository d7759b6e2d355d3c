"""The rest of tensorboardX's ``SummaryWriter`` API: images, media, text, graphs, plugins.

A mixin of ``SummaryWriter``; the builders live in ``image``, ``audio``, ``plugins``,
``embedding`` and ``graph``. Optional packages (matplotlib, onnx) are imported lazily.
"""

from __future__ import annotations

import time

from tbprobe.writer import values as _values
from tbprobe.writer.naming import check_tag


class ExtrasMixin:
    # ------------------------------------------------------------------ images
    def add_image(self, tag, img_tensor, global_step=None, walltime=None, dataformats="CHW"):
        """One image: ``(3, H, W)`` by default; see ``dataformats`` ("CHW", "HWC", "HW", ...).

        Float images are scaled by 255, then all are clipped to [0, 255]. A device tensor is
        converted on the device and PNG-encoded on the writer thread.

        Examples::

            writer.add_image("input", torch.rand(3, 64, 64), step)
        """
        self._add_image(tag, img_tensor, global_step, walltime, dataformats, batched=False)

    def add_images(self, tag, img_tensor, global_step=None, walltime=None, dataformats="NCHW"):
        """A batch of images, ``(N, 3, H, W)`` by default, laid out as one grid image. A list or
        tuple of same-shaped images (arrays or tensors) is a batch too, with ``dataformats``
        giving each image's layout (``"CHW"``, ``"HWC"``, ...).

        Examples::

            writer.add_images("batch", torch.rand(16, 3, 32, 32), step)
            writer.add_images("crops", [crop_a, crop_b], step, dataformats="CHW")
        """
        self._add_image(tag, img_tensor, global_step, walltime, dataformats, batched=True)

    def _add_image(self, tag, img, global_step, walltime, dataformats, batched):
        from tbprobe.writer import image

        if self._skip(global_step):
            return
        tag = self._clean(tag)
        step, wall = self._step_wall(global_step, walltime)
        listed = batched and isinstance(img, (list, tuple))  # a list of images is a batch
        if _values.is_device_tensor(img) or (listed and any(map(_values.is_device_tensor, img))):
            to_hwc = image.images_to_uint8_hwc_torch if batched else image.to_uint8_hwc_torch
            hwc = to_hwc(img, dataformats)

            def build(arr):
                return [image.image_value(tag, arr)]

            self._emit_deferred([hwc], build, step, wall)
            return
        if batched and image._is_image_list(img, dataformats):
            hwc = image.images_to_uint8_hwc(img, dataformats)
        else:
            to_hwc = image.images_to_uint8_hwc if batched else image.to_uint8_hwc
            hwc = to_hwc(_values.to_numpy(img, "img_tensor"), dataformats)
        self._emit([image.image_value(tag, hwc)], step, wall)

    def add_image_with_boxes(
        self,
        tag,
        img_tensor,
        box_tensor,
        global_step=None,
        walltime=None,
        dataformats="CHW",
        labels=None,
        *,
        rescale=1,
        **kwargs,
    ):
        """An image with boxes ``(N, 4)`` (xmin, ymin, xmax, ymax, in pixels) drawn on it, and
        optional ``labels`` (N strings; None for no label on that box). ``rescale`` resizes
        the drawn image by that factor. As in tensorboardX, labels whose count differs from
        the boxes' are dropped with a warning and the tag is written as given.

        Examples::

            writer.add_image_with_boxes("det", img, [[4, 4, 40, 30]], step, labels=["cat"])
        """
        from tbprobe.writer import boxes, image

        if kwargs:
            raise TypeError(f"add_image_with_boxes: unexpected arguments {sorted(kwargs)}")
        if self._skip(global_step):
            return
        tag = check_tag(tag)
        step, wall = self._step_wall(global_step, walltime)
        hwc = image.to_uint8_hwc(_values.to_numpy(img_tensor, "img_tensor"), dataformats)
        box_arr = _values.to_numpy(box_tensor, "box_tensor")
        hwc = boxes.draw_boxes(hwc, box_arr, labels, rescale=rescale)
        self._emit([image.image_value(tag, hwc)], step, wall)

    def add_figure(self, tag, figure, global_step=None, close=True, walltime=None):
        """A matplotlib figure (or a list of them, shown as a grid) rendered to an image."""
        from tbprobe.writer import image

        if self._skip(global_step):
            return
        tag = self._clean(tag)
        step, wall = self._step_wall(global_step, walltime)
        hwc = image.figure_to_hwc(figure, close=close)
        self._emit([image.image_value(tag, hwc)], step, wall)

    def add_video(
        self, tag, vid_tensor, global_step=None, fps=4, walltime=None, dataformats="NTCHW"
    ):
        """A batch of videos ``(N, T, C, H, W)`` as one animated GIF grid (encoded with pillow,
        no moviepy needed)."""
        from tbprobe.writer.video import video_value

        if self._skip(global_step):
            return
        tag = self._clean(tag)
        step, wall = self._step_wall(global_step, walltime)
        arr = _values.to_numpy(vid_tensor, "vid_tensor")
        self._emit([video_value(tag, arr, fps=fps, dataformats=dataformats)], step, wall)

    # ------------------------------------------------------------------ audio, text, tensors
    def add_audio(self, tag, snd_tensor, global_step=None, sample_rate=44100, walltime=None):
        """Audio in [-1, 1]: ``(L,)`` mono or ``(L, 2)`` stereo, stored as 16-bit WAV."""
        from tbprobe.writer.audio import audio_value

        if self._skip(global_step):
            return
        tag = check_tag(tag)  # as given: tensorboardX does not clean it here
        step, wall = self._step_wall(global_step, walltime)
        snd = _values.to_numpy(snd_tensor, "snd_tensor")
        self._emit([audio_value(tag, snd, sample_rate=sample_rate)], step, wall)

    def add_text(self, tag, text_string, global_step=None, walltime=None):
        """Markdown text, shown in the Text dashboard.

        Examples::

            writer.add_text("notes", "**lr** raised to 1e-3", step)
        """
        from tbprobe.writer.plugins import text_value

        if self._skip(global_step):
            return
        tag = check_tag(tag)  # as given: tensorboardX does not clean it here
        step, wall = self._step_wall(global_step, walltime)
        self._emit([text_value(tag, text_string)], step, wall)

    def add_tensor(self, tag, tensor, global_step=None, walltime=None):
        """A raw tensor as a ``TensorProto`` summary (torch's ``add_tensor``)."""
        from tbprobe.writer.plugins import tensor_value

        if self._skip(global_step):
            return
        tag = check_tag(tag)  # as given: tensorboardX does not clean it here
        step, wall = self._step_wall(global_step, walltime)
        self._emit([tensor_value(tag, _values.to_numpy(tensor, "tensor"))], step, wall)

    # ------------------------------------------------------------------ graphs
    def add_graph(self, model, input_to_model=None, verbose=False, use_strict_trace=True):
        """The model's graph, traced with ``torch.jit.trace`` on ``input_to_model``."""
        from tbprobe.writer.graph import graph_from_module
        from tbprobe.writer.proto import event_pb2

        graph, run_metadata = graph_from_module(model, input_to_model, verbose, use_strict_trace)
        self._emit_event(
            event_pb2.Event(wall_time=time.time(), graph_def=graph.SerializeToString())
        )
        if run_metadata is not None:
            ev = event_pb2.Event(wall_time=time.time())
            ev.tagged_run_metadata.tag = "profiler"  # tensorboardX's tag
            ev.tagged_run_metadata.run_metadata = run_metadata.SerializeToString()
            self._emit_event(ev)

    def add_onnx_graph(self, onnx_model_file):
        """The graph of an ONNX model file (needs the ``onnx`` package)."""
        from tbprobe.writer.graph import graph_from_onnx
        from tbprobe.writer.proto import event_pb2

        graph = graph_from_onnx(onnx_model_file)
        self._emit_event(
            event_pb2.Event(wall_time=time.time(), graph_def=graph.SerializeToString())
        )

    def add_openvino_graph(self, xmlname):
        """The graph of an OpenVINO IR ``.xml`` file."""
        from tbprobe.writer.graph import graph_from_openvino
        from tbprobe.writer.proto import event_pb2

        graph = graph_from_openvino(xmlname)
        self._emit_event(
            event_pb2.Event(wall_time=time.time(), graph_def=graph.SerializeToString())
        )

    # ------------------------------------------------------------------ plugins
    def add_embedding(
        self,
        mat,
        metadata=None,
        label_img=None,
        global_step=None,
        tag="default",
        metadata_header=None,
    ):
        """Projector data: ``mat`` ``(N, D)``, optional ``metadata`` (N labels, or rows with
        ``metadata_header``) and ``label_img`` ``(N, C, H, W)`` thumbnails, written as files
        under ``<logdir>/<step>/<tag>/`` (nothing with ``write_to_disk=False``)."""
        from tbprobe.writer.embedding import write_embedding
        from tbprobe.writer.naming import _check_step

        if self._skip(global_step):
            return
        write_embedding(
            self._logdir,
            _values.to_numpy(mat, "mat"),
            metadata=metadata,
            label_img=None if label_img is None else _values.to_numpy(label_img, "label_img"),
            global_step=_check_step(global_step),
            tag=tag,
            metadata_header=metadata_header,
            write=self._write_to_disk,
        )

    def add_pr_curve(
        self,
        tag,
        labels,
        predictions,
        global_step=None,
        num_thresholds=127,
        weights=None,
        walltime=None,
    ):
        """Precision-recall curve of binary ``labels`` against ``predictions`` in [0, 1]."""
        from tbprobe.writer.plugins import pr_curve_value

        if self._skip(global_step):
            return
        tag = check_tag(tag)  # as given: tensorboardX does not clean it here
        step, wall = self._step_wall(global_step, walltime)
        value = pr_curve_value(
            tag,
            _values.to_numpy(labels, "labels"),
            _values.to_numpy(predictions, "predictions"),
            num_thresholds=num_thresholds,
            weights=None if weights is None else _values.to_numpy(weights, "weights"),
        )
        self._emit([value], step, wall)

    def add_pr_curve_raw(
        self,
        tag,
        true_positive_counts,
        false_positive_counts,
        true_negative_counts,
        false_negative_counts,
        precision,
        recall,
        global_step=None,
        num_thresholds=127,
        weights=None,
        walltime=None,
    ):
        """Precision-recall curve from precomputed counts, each ``(num_thresholds,)``."""
        from tbprobe.writer.plugins import pr_curve_raw_value

        if self._skip(global_step):
            return
        tag = check_tag(tag)  # as given: tensorboardX does not clean it here
        step, wall = self._step_wall(global_step, walltime)
        arrays = [
            _values.to_numpy(v, n)
            for v, n in (
                (true_positive_counts, "true_positive_counts"),
                (false_positive_counts, "false_positive_counts"),
                (true_negative_counts, "true_negative_counts"),
                (false_negative_counts, "false_negative_counts"),
                (precision, "precision"),
                (recall, "recall"),
            )
        ]
        value = pr_curve_raw_value(tag, *arrays, num_thresholds=num_thresholds, weights=weights)
        self._emit([value], step, wall)

    def add_custom_scalars(self, layout):
        """Layout of the Custom Scalars dashboard:
        ``{category: {title: ["Multiline", [tags]] | ["Margin", [value, lower, upper]]}}``."""
        from tbprobe.writer.plugins import custom_scalars_value

        self._emit([custom_scalars_value(layout)], None, time.time())

    def add_custom_scalars_multilinechart(self, tags, category="default", title="untitled"):
        """A Custom Scalars chart with one line per tag in ``tags``."""
        from tbprobe.writer.plugins import custom_scalars_value, multiline_layout

        self._emit(
            [custom_scalars_value(multiline_layout(tags, category, title))], None, time.time()
        )

    def add_custom_scalars_marginchart(self, tags, category="default", title="untitled"):
        """A Custom Scalars margin chart from ``tags`` = [value, lower, upper]."""
        from tbprobe.writer.plugins import custom_scalars_value, margin_layout

        self._emit([custom_scalars_value(margin_layout(tags, category, title))], None, time.time())

    def add_mesh(
        self,
        tag,
        vertices,
        colors=None,
        faces=None,
        config_dict=None,
        global_step=None,
        walltime=None,
    ):
        """A 3-D mesh or point cloud: ``vertices`` ``(B, N, 3)``, ``colors`` ``(B, N, 3)``
        uint8, ``faces`` ``(B, F, 3)`` vertex indices."""
        from tbprobe.writer.plugins import mesh_values

        if self._skip(global_step):
            return
        tag = check_tag(tag)  # as given: tensorboardX does not clean it here
        step, wall = self._step_wall(global_step, walltime)
        values = mesh_values(
            tag,
            _values.to_numpy(vertices, "vertices"),
            colors=None if colors is None else _values.to_numpy(colors, "colors"),
            faces=None if faces is None else _values.to_numpy(faces, "faces"),
            config_dict=config_dict,
        )
        self._emit(values, step, wall)

    def add_hparams(self, hparam_dict, metric_dict, name=None, global_step=None):
        """One hyperparameter session, written to the sub-run ``name`` (default: the time),
        with its metrics as scalars there."""
        from tbprobe.writer.hparams import hparams_values
        from tbprobe.writer.naming import safe_subdir
        from tbprobe.writer.record import scalar_event, scalar_head

        if not isinstance(metric_dict, dict):
            raise TypeError(f"metric_dict: expected a dict, got {type(metric_dict).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name: expected a str or None, got {type(name).__name__}")
        run = name if name else str(time.time())
        key = safe_subdir(self._logdir, [run], "name")
        step, wall = self._step_wall(global_step, None)
        for value in hparams_values(hparam_dict, metric_dict):
            self._emit([value], step, wall, key=key)
        for metric, v in metric_dict.items():
            head = scalar_head(self._clean(metric, "metric_dict"))
            data = scalar_event(head, _values.to_float(v, f"metric_dict[{metric!r}]"), wall, step)
            self._put(key, data, len(data))

    def _clean(self, tag, name="tag"):
        from tbprobe.writer.naming import clean_tag

        return clean_tag(tag, name)
