"""ONNX export with a dynamic batch axis, checked against PyTorch with onnxruntime."""
import json

import numpy as np
import pytest
import torch

from inference_support import create_test_model, save_local_export
from transfer_timm.cli import main
from transfer_timm.inference import load_model
from transfer_timm.models import FERPLUS_LABEL_NAMES

onnx = pytest.importorskip('onnx')
onnxruntime = pytest.importorskip('onnxruntime')


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return save_local_export(create_test_model(seed=2), tmp_path_factory.mktemp('export') / 'model')


@pytest.fixture(scope='module')
def exported(model_dir, tmp_path_factory):
    """Export once through the CLI with --check, for the other tests to inspect."""
    path = tmp_path_factory.mktemp('onnx') / 'transfer_tiny.onnx'
    status = main(['export-onnx', f'local-dir:{model_dir}', str(path), '--check'])
    assert status == 0
    return path


def test_cli_export_writes_file(exported):
    assert exported.is_file()
    onnx.checker.check_model(str(exported))


def test_batch_axis_is_dynamic(exported):
    graph = onnx.load(str(exported)).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert graph.input[0].name == 'input'
    assert graph.output[0].name == 'logits'
    assert batch_dim.dim_param
    assert not batch_dim.HasField('dim_value')


@pytest.mark.parametrize('batch_size', [1, 3])
def test_onnxruntime_matches_pytorch(exported, model_dir, batch_size):
    model = load_model(f'local-dir:{model_dir}').eval()
    session = onnxruntime.InferenceSession(str(exported), providers=['CPUExecutionProvider'])
    x = torch.randn(batch_size, 1, 48, 48, generator=torch.Generator().manual_seed(batch_size))
    with torch.no_grad():
        expected = model(x).numpy()
    actual = session.run(['logits'], {'input': x.numpy()})[0]
    assert actual.shape == (batch_size, 8)
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 0.1, 'the test model gives near-zero logits, so the comparison is weak'


def test_metadata_describes_preprocessing(exported):
    props = {prop.key: prop.value for prop in onnx.load(str(exported)).metadata_props}
    assert json.loads(props['label_names']) == list(FERPLUS_LABEL_NAMES)
    assert json.loads(props['input_size']) == [1, 48, 48]
    assert json.loads(props['mean']) == [0.5]
    assert json.loads(props['std']) == [0.5]
    assert props['interpolation'] == 'bilinear'
    assert props['architecture'] == 'transfer_tiny'


def test_verify_onnx_detects_mismatch(exported, model_dir):
    from transfer_timm.inference.onnx_export import OnnxCheckError, verify_onnx

    other = create_test_model(seed=5)
    with pytest.raises(OnnxCheckError, match='differ'):
        verify_onnx(other, exported)
    assert verify_onnx(load_model(f'local-dir:{model_dir}'), exported) < 1e-4
