"""Hyperparameter sessions for TensorBoard's HParams dashboard (``add_hparams``)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np
from google.protobuf import struct_pb2

from tbprobe.writer.plugins import _VERSION, HPARAMS_TAGS, _check_name, _metadata
from tbprobe.writer.proto import plugins_pb2, summary_pb2
from tbprobe.writer.values import is_tensor, to_float, to_numpy


def _hparam(value, where: str):
    """(struct Value, HParamDataType) of one hparam; None for a None value (skipped, as in
    tensorboardX). Never raises for a value: one odd hparam must not lose the session.

    NaN and infinities stay numbers: TensorBoard's hparams plugin shows them as unset, while a
    string among the numbers of one hparam makes its filters and sorting fail. Lists, tuples,
    dicts and other objects are written as their ``str()`` (tensorboardX leaves them unset).
    """
    if value is None:
        return None
    if is_tensor(value) or isinstance(value, np.ndarray):
        try:
            arr = to_numpy(value, where)
        except TypeError:
            arr = None
        if arr is not None and arr.size == 1:
            value = arr.reshape(()).item()
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value), plugins_pb2.DATA_TYPE_STRING
    if isinstance(value, (bool, np.bool_)):
        return struct_pb2.Value(bool_value=bool(value)), plugins_pb2.DATA_TYPE_BOOL
    if isinstance(value, numbers.Real):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            number = math.inf if value > 0 else -math.inf
        return struct_pb2.Value(number_value=number), plugins_pb2.DATA_TYPE_FLOAT64
    if callable(value) and hasattr(value, "__name__"):  # functions and classes by name
        return struct_pb2.Value(string_value=value.__name__), plugins_pb2.DATA_TYPE_STRING
    return struct_pb2.Value(string_value=_text(value)), plugins_pb2.DATA_TYPE_STRING


def _text(value) -> str:
    try:
        text = str(value)
    except Exception:  # a broken __str__: still show what it was
        text = object.__repr__(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _hparams_value(tag: str, **data) -> summary_pb2.Summary.Value:
    content = plugins_pb2.HParamsPluginData(version=_VERSION, **data).SerializeToString()
    return summary_pb2.Summary.Value(tag=tag, metadata=_metadata("hparams", content))


def hparams_values(hparam_dict, metric_dict) -> list[summary_pb2.Summary.Value]:
    """The three metadata-only values of one hparams session, in writing order:
    ``_hparams_/experiment``, ``_hparams_/session_start_info``, ``_hparams_/session_end_info``.

    ``hparam_dict`` maps str names to bool, str, int, float or one-element tensors; None values
    are skipped and callables logged by name, as in tensorboardX, and any other value (list,
    tuple, dict, ...) is logged as its ``str()``. ``metric_dict`` maps str tags to numbers, of
    which only the tags are used here (the writer logs the values as scalars).

    Example: ``hparams_values({"lr": 0.1, "layers": [64, 64]}, {"hparam/acc": 0.9})``.
    """
    for arg, name in ((hparam_dict, "hparam_dict"), (metric_dict, "metric_dict")):
        if not isinstance(arg, Mapping):
            raise TypeError(f"{name}: expected a dict, got {type(arg).__name__}")
        for key in arg:
            _check_name(key, name, "keys")
    start = plugins_pb2.SessionStartInfo()
    experiment = plugins_pb2.Experiment()
    for key, value in hparam_dict.items():
        parsed = _hparam(value, f"hparam_dict[{key!r}]")
        if parsed is not None:
            start.hparams[key].CopyFrom(parsed[0])
            experiment.hparam_infos.add(name=key, type=parsed[1])
    for key, value in metric_dict.items():
        to_float(value, f"metric_dict[{key!r}]")  # TypeError/ValueError for non-numbers
        experiment.metric_infos.add().name.tag = key
    end = plugins_pb2.SessionEndInfo(status=plugins_pb2.STATUS_SUCCESS)
    return [
        _hparams_value(HPARAMS_TAGS[0], experiment=experiment),
        _hparams_value(HPARAMS_TAGS[1], session_start_info=start),
        _hparams_value(HPARAMS_TAGS[2], session_end_info=end),
    ]
