"""End-to-end runs of examples/finetune_ferplus.py on the bundled FER+ sample."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import timm
import transfer_timm  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / 'examples' / 'finetune_ferplus.py'


def run_example(*args, launcher=None, timeout=600, extra_env=None):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'), PYTHONUNBUFFERED='1')
    env.update(extra_env or {})
    cmd = (launcher or [sys.executable]) + [str(EXAMPLE), *map(str, args)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f'{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}'
    return result


@pytest.fixture(scope='module')
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('default_run')
    result = run_example('--epochs', '2', '--output_dir', out)
    return out, result


def test_default_run_writes_export(default_run):
    out, _ = default_run
    export = out / 'export'
    for name in ('model.safetensors', 'config.json', 'README.md', 'confusion_matrix.png', 'metrics.json'):
        assert (export / name).is_file(), name
    config = json.loads((export / 'config.json').read_text())
    assert config['architecture'] == 'transfer_tiny'
    assert config['pretrained_cfg']['label_names'] == list(transfer_timm.FERPLUS_LABEL_NAMES)
    card = (export / 'README.md').read_text()
    assert card.startswith('---\nlibrary_name: timm\n')
    assert 'import transfer_timm' in card
    assert '![Confusion matrix](confusion_matrix.png)' in card


def test_cpu_threads_follow_omp_num_threads(default_run):
    _, result = default_run
    threads = os.environ.get('OMP_NUM_THREADS', '1')
    assert f'Using {threads} torch thread(s) per process on the CPU.' in result.stderr
    card = (default_run[0] / 'export' / 'README.md').read_text()
    assert f'{threads} torch threads per process' in card


def test_cpu_threads_under_accelerate_use_cores(default_run, tmp_path):
    # accelerate launch exports OMP_NUM_THREADS=1 and ACCELERATE_DYNAMO_BACKEND; the example then uses the cores.
    export = default_run[0] / 'export'
    result = run_example('--model', f'local-dir:{export}', '--pretrained', '--eval_only', '--max_eval_samples', '8',
                         '--output_dir', tmp_path, extra_env={'OMP_NUM_THREADS': '1', 'ACCELERATE_DYNAMO_BACKEND': 'NO'})
    cores = len(os.sched_getaffinity(0))
    assert f'Using {cores} torch thread(s) per process on the CPU.' in result.stderr


def test_cpu_threads_option_sets_threads(default_run, tmp_path):
    export = default_run[0] / 'export'
    result = run_example('--model', f'local-dir:{export}', '--pretrained', '--eval_only', '--max_eval_samples', '8',
                         '--cpu_threads', '1', '--output_dir', tmp_path, extra_env={'OMP_NUM_THREADS': '2'})
    assert 'Using 1 torch thread(s) per process on the CPU.' in result.stderr


def test_cpu_threads_rejects_zero():
    result = subprocess.run([sys.executable, str(EXAMPLE), '--cpu_threads', '0'], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 2
    assert 'expected a positive integer, got 0' in result.stderr


def test_export_loads_with_timm(default_run):
    out, _ = default_run
    export = out / 'export'
    saved = load_file(export / 'model.safetensors')
    best = load_file(out / 'best' / 'model.safetensors')
    assert saved.keys() == best.keys()
    for key in saved:
        assert torch.equal(saved[key], best[key]), key

    model = timm.create_model(f'local-dir:{export}', pretrained=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert model.pretrained_cfg['label_names'] == list(transfer_timm.FERPLUS_LABEL_NAMES)

    overlay = timm.create_model('transfer_tiny', pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(export / 'model.safetensors')))
    for key, value in overlay.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_results_match_card_metrics(default_run):
    out, _ = default_run
    results = json.loads((out / 'results.json').read_text())
    metrics = json.loads((out / 'export' / 'metrics.json').read_text())
    assert results['validation']['accuracy'] == metrics['accuracy']
    # The bundled sample has 10 majority-labelled validation faces per class.
    assert metrics['n'] == results['validation_images'] == 80
    assert sum(map(sum, metrics['confusion_matrix'])) == 80
    assert len(results['history']) == 2
    assert results['best_epoch'] in (1, 2)


def test_resume_continues_same_run(tmp_path):
    common = ['--epochs', '2', '--batch_size', '32', '--max_train_samples', '96', '--max_eval_samples', '32',
              '--checkpointing_steps', '2', '--checkpoints_total_limit', '10']
    full = tmp_path / 'full'
    run_example(*common, '--output_dir', full)
    resumed = tmp_path / 'resumed'
    # Continue from the checkpoint taken mid-way through the first epoch.
    run_example(*common, '--output_dir', resumed, '--resume_from_checkpoint', full / 'checkpoints' / 'step_2')

    final_full = load_file(full / 'checkpoints' / 'step_6' / 'model.safetensors')
    final_resumed = load_file(resumed / 'checkpoints' / 'step_6' / 'model.safetensors')
    for key in final_full:
        assert torch.equal(final_full[key], final_resumed[key]), key
    state_full = json.loads((full / 'checkpoints' / 'step_6' / 'training_state.json').read_text())
    state_resumed = json.loads((resumed / 'checkpoints' / 'step_6' / 'training_state.json').read_text())
    assert state_full['global_step'] == state_resumed['global_step'] == 6
    assert state_full['history'] == state_resumed['history']


def test_resume_latest_ignores_incomplete(tmp_path):
    out = tmp_path / 'run'
    run_example('--epochs', '1', '--max_train_samples', '64', '--max_eval_samples', '16', '--output_dir', out)
    ckpt_root = out / 'checkpoints'
    complete = sorted(ckpt_root.glob('step_*'))
    assert [p.name for p in complete] == ['step_1']
    assert not list(ckpt_root.glob('.tmp-*'))
    # A folder left by a killed save has no training_state.json and must not be picked.
    broken = ckpt_root / 'step_999'
    shutil.copytree(complete[0], broken)
    (broken / 'training_state.json').unlink()
    result = run_example('--epochs', '2', '--max_train_samples', '64', '--max_eval_samples', '16',
                         '--output_dir', out, '--resume_from_checkpoint', 'latest')
    assert 'Resumed from' in result.stderr
    assert 'step_1 at epoch 1' in result.stderr


def test_single_sample_last_batch_with_batchnorm1d(tmp_path):
    # ir18 ends in BatchNorm1d, which raises in training on a batch of one sample.
    out = tmp_path / 'ir18'
    result = run_example('--model', 'ir18', '--epochs', '1', '--batch_size', '32', '--max_train_samples', '33',
                         '--max_eval_samples', '8', '--output_dir', out)
    assert 'Training ir18' in result.stderr
    assert (out / 'export' / 'model.safetensors').is_file()


def test_one_and_two_processes_agree(default_run, tmp_path):
    export = default_run[0] / 'export'
    args = ['--model', f'local-dir:{export}', '--pretrained', '--eval_only', '--max_eval_samples', '77',
            '--eval_batch_size', '16']
    run_example(*args, '--output_dir', tmp_path / 'one')
    run_example(*args, '--output_dir', tmp_path / 'two', launcher=[
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29531'])
    one = json.loads((tmp_path / 'one' / 'eval_results.json').read_text())
    two = json.loads((tmp_path / 'two' / 'eval_results.json').read_text())
    assert one['num_processes'] == 1
    assert two['num_processes'] == 2
    # 77 samples do not split evenly over 2 processes x 16: padding must not be counted.
    assert one['n'] == two['n'] == 77
    assert one['confusion_matrix'] == two['confusion_matrix']
    assert one['accuracy'] == two['accuracy']


def test_help_documents_every_argument():
    result = subprocess.run([sys.executable, str(EXAMPLE), '--help'], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    for option in ('--model', '--data_dir', '--label_mode', '--resume_from_checkpoint', '--layer_decay', '--cpu_threads',
                   '--gradient_accumulation_steps', '--mixed_precision', '--max_train_samples'):
        assert option in result.stdout, option
