"""The generated protobuf modules under the oldest (4.25) and newest (7.x) protobuf runtimes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)

SCRIPT = r"""
import google.protobuf, sys
from google.protobuf import text_format
from tbprobe.writer.proto import event_pb2, graph_pb2, plugins_pb2, projector_pb2, summary_pb2
ev = event_pb2.Event(wall_time=1.5, step=3)
v = ev.summary.value.add(tag="t", simple_value=2.0)
v.metadata.plugin_data.plugin_name = "hparams"
hp = plugins_pb2.HParamsPluginData(version=0)
hp.session_start_info.hparams["lr"].number_value = 0.1
v.metadata.plugin_data.content = hp.SerializeToString()
ev.summary.value.add(tag="h").histo.bucket.extend([1.0, 2.0])
back = event_pb2.Event.FromString(ev.SerializeToString())
assert back == ev, back
hp2 = plugins_pb2.HParamsPluginData.FromString(back.summary.value[0].metadata.plugin_data.content)
assert hp2.session_start_info.hparams["lr"].number_value == 0.1
cfg = projector_pb2.ProjectorConfig()
cfg.embeddings.add(tensor_name="x", tensor_path="00000/default/tensors.tsv")
assert text_format.Parse(text_format.MessageToString(cfg), projector_pb2.ProjectorConfig()) == cfg
graph_pb2.GraphDef(node=[graph_pb2.NodeDef(name="a", op="Const")]).SerializeToString()
print(google.protobuf.__version__)
"""


@pytest.mark.parametrize("which, major", [("oldest", "4.25"), ("newest", "7.")])
def test_generated_modules_under_protobuf(which, major):
    """Our *_pb2 modules import and round-trip events under protobuf 4.25 and 7.x."""
    target = VENV / f"protobuf-{which}"
    assert target.is_dir(), f"{target} missing: run `make venv` (scripts/setup_venv.sh)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(major), out.stdout
