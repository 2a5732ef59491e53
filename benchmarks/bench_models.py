#!/usr/bin/env python3
"""Measure the speed and arithmetic cost of the registered face models on one device.

For every selected model the script reports inference throughput at each inference
batch size and training throughput (forward, backward and AdamW step). It counts FLOPs
per image with ``torch.utils.flop_counter.FlopCounterMode`` and reports the achieved
GFLOP/s as a fraction of a large fp32 matmul timed in the same run. A second part times
the data pipeline of one FER+ training epoch (augmentation of uint8 batches, and
optionally PNG decoding) against the compact model's training step.

Example, a smoke run of a few seconds::

    python benchmarks/bench_models.py --models transfer_tiny --iters 2 --warmup 1 --data-images 512
"""
import argparse
import contextlib
import fnmatch
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2
from torch.utils.flop_counter import FlopCounterMode

import transfer_timm
from transfer_timm.data import SPLIT_FOLDERS, BatchAugment, create_eval_transform

_logger = logging.getLogger('bench_models')

COMPARISON_MODELS = ('vit_small_patch16_224', 'resnet50')
COMPACT_MODEL = 'transfer_tiny'
# FER+ training images that keep a majority label (FER2013Train, label mode 'majority').
FERPLUS_TRAIN_MAJORITY = 25045
NUM_CLASSES = 8


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            'Benchmark the TransFER and IR models of transfer_timm, plus timm\'s vit_small_patch16_224 and '
            'resnet50 for comparison. Every model is built with 8 classes and timed at its default input size. '
            'Results are printed as a Markdown table and written to a JSON file.'
        ),
    )
    parser.add_argument(
        '--models', nargs='+', default=['*'], metavar='PATTERN',
        help='Select models by name or shell-style pattern, for example "transfer_*" or ir50. All by default.',
    )
    parser.add_argument(
        '--device', choices=('cpu', 'cuda'), default='cpu',
        help='Run on this device (default: %(default)s). On cuda, timings use CUDA events after a device '
             'synchronisation.',
    )
    parser.add_argument(
        '--dtype', choices=('fp32', 'bf16'), default='fp32',
        help='Compute precision (default: %(default)s). bf16 runs the forward pass under torch.autocast and keeps '
             'fp32 weights.',
    )

    parser.add_argument('--compile', action='store_true', help='Wrap each model in torch.compile before timing it.')
    parser.add_argument(
        '--channels-last', action='store_true',
        help='Convert models and input batches to the channels_last memory format.',
    )

    parser.add_argument(
        '--infer-batch-sizes', type=int, nargs='+', default=[1, 32], metavar='N',
        help='Batch sizes at which inference throughput is measured (default: 1 32).',
    )
    parser.add_argument(
        '--train-batch-size', type=int, default=32, metavar='N',
        help='Batch size of the training step and of the data-pipeline batches (default: %(default)s).',
    )
    parser.add_argument(
        '--iters', type=int, default=10, metavar='N',
        help='Number of timed iterations per measurement (default: %(default)s).',
    )
    parser.add_argument(
        '--warmup', type=int, default=3, metavar='N',
        help='Number of untimed iterations before each measurement (default: %(default)s). With --compile they '
             'include compilation.',
    )
    parser.add_argument(
        '--threads', type=int, default=None, metavar='N',
        help='Number of CPU threads for torch (torch.set_num_threads). Defaults to the torch default.',
    )

    parser.add_argument(
        '--matmul-size', type=int, default=None, metavar='N',
        help='Side of the square matmul that sets the reference GFLOP/s. Defaults to 2048 on cpu and 8192 on cuda. '
             'The ratios use the fp32 matmul, and --dtype bf16 also reports a bf16 matmul.',
    )
    parser.add_argument('--no-train', action='store_true', help='Skip the training-step measurements.')
    parser.add_argument('--no-data', action='store_true', help='Skip the data-pipeline benchmark.')

    parser.add_argument(
        '--data-images', type=int, default=FERPLUS_TRAIN_MAJORITY, metavar='N',
        help='Number of synthetic uint8 48x48 images in the timed augmentation epoch. The default, %(default)s, is '
             'the number of FER+ training images that have a majority label.',
    )
    parser.add_argument(
        '--data-dir', type=Path, default=None, metavar='DIR',
        help='FER+ folder with Microsoft\'s split folders (FER2013Train, ...). When given, the PNGs of one split '
             'are decoded once into a uint8 array, and that decoding is timed too.',
    )
    parser.add_argument(
        '--data-split', choices=sorted(SPLIT_FOLDERS), default='train',
        help='Split whose PNGs --data-dir decodes (default: %(default)s).',
    )
    parser.add_argument(
        '--data-limit', type=int, default=None, metavar='N',
        help='Decode at most this many PNGs from the split (for quick runs). Defaults to all of them.',
    )

    parser.add_argument(
        '--output-json', type=Path, default=Path('benchmark_results.json'), metavar='PATH',
        help='Path of the JSON file that receives the environment, settings and all measurements '
             '(default: %(default)s).',
    )

    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f'--iters must be at least 1, got {args.iters}.')
    if args.warmup < 0:
        parser.error(f'--warmup must be 0 or more, got {args.warmup}.')
    if args.train_batch_size < 2:
        parser.error(f'--train-batch-size must be at least 2 because the IR heads use BatchNorm1d, '
                     f'got {args.train_batch_size}.')
    if any(b < 1 for b in args.infer_batch_sizes):
        parser.error(f'--infer-batch-sizes must all be positive, got {args.infer_batch_sizes}.')
    if args.data_images < 1:
        parser.error(f'--data-images must be positive, got {args.data_images}.')
    return args


# ---------------------------------------------------------------- environment


def cpu_model_name() -> str:
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device: torch.device) -> Dict:
    env = {
        'cpu': cpu_model_name(),
        'logical_cpus': os.cpu_count(),
        'usable_cpus': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'transfer_timm': transfer_timm.__version__,
        'device': str(device),
    }
    if device.type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(device)
        env['cuda'] = torch.version.cuda
    return env


def resolve_device(name: str) -> torch.device:
    if name == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda was requested, but torch finds no CUDA device. Use --device cpu.')
    return torch.device(name)


def make_autocast(device: torch.device, dtype_name: str) -> Callable[[], contextlib.AbstractContextManager]:
    """Return a factory of the autocast context for the requested precision."""
    if dtype_name == 'fp32':
        return contextlib.nullcontext
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise SystemExit(f'--dtype bf16 is not supported on {torch.cuda.get_device_name(device)}. Use --dtype fp32.')
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------- timing


def synchronize(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def seconds_per_iteration(step: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Run ``step`` ``warmup`` times untimed, then ``iters`` times, and return the mean seconds per call."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == 'cuda':
        # NOTE: the cuda paths of this script have only been read, not yet run on a GPU.
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / iters
    start_time = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start_time) / iters


def matmul_gflops(size: int, dtype: torch.dtype, device: torch.device, iters: int, warmup: int) -> float:
    """Time a square ``size`` x ``size`` matmul and return its GFLOP/s (2 n^3 FLOPs per product)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    # At least 3 warm-up and 10 timed products: with fewer, the first-call cost of the BLAS
    # library showed up as a reference less than half of later measurements.
    seconds = seconds_per_iteration(lambda: torch.mm(a, b), max(iters, 10), max(warmup, 3), device)
    return 2.0 * size ** 3 / seconds / 1e9


# ---------------------------------------------------------------- FLOP counting


@contextlib.contextmanager
def unfused_attention(model: nn.Module):
    """Switch attention modules to their explicit-matmul path while FLOPs are counted.

    FlopCounterMode (checked with torch 2.14) does not count the CPU kernel of
    scaled_dot_product_attention, but it counts the matmuls of the unfused path, which
    computes the same result.
    """
    switched = [m for m in model.modules() if getattr(m, 'fused_attn', False) is True]
    for module in switched:
        module.fused_attn = False
    try:
        yield
    finally:
        for module in switched:
            module.fused_attn = True


def count_flops(model: nn.Module, input_size, device: torch.device, train: bool) -> float:
    """Return FLOPs per image of one forward pass (eval) or one forward and backward pass (train).

    Counts matmuls and convolutions only, as FlopCounterMode does; element-wise work is left out.
    Training is counted at batch 2, because BatchNorm1d needs more than one sample.
    """
    batch_size = 2 if train else 1
    x = torch.randn(batch_size, *input_size, device=device)
    model.train(train)
    with unfused_attention(model), FlopCounterMode(display=False) as counter:
        if train:
            F.cross_entropy(model(x), torch.zeros(batch_size, dtype=torch.long, device=device)).backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


# ---------------------------------------------------------------- model benchmarks


def select_models(patterns: List[str]) -> List[str]:
    candidates = timm.list_models('transfer_*') + timm.list_models('ir*') + list(COMPARISON_MODELS)
    selected = [name for name in candidates if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not selected:
        raise SystemExit(f'--models {" ".join(patterns)} matches no model. Choose from: {", ".join(candidates)}.')
    return selected


def prepare(model: nn.Module, x: torch.Tensor, args) -> tuple:
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def bench_inference(name: str, input_size, batch_size: int, args, device, autocast) -> float:
    """Return inference images per second of ``name`` at ``batch_size``."""
    model = timm.create_model(name, num_classes=NUM_CLASSES).to(device).eval()
    model, x = prepare(model, torch.randn(batch_size, *input_size, device=device), args)
    runner = torch.compile(model) if args.compile else model

    def step():
        with torch.no_grad(), autocast():
            runner(x)

    return batch_size / seconds_per_iteration(step, args.iters, args.warmup, device)


def bench_training(name: str, input_size, args, device, autocast) -> float:
    """Return training images per second of ``name``: forward, cross-entropy, backward, AdamW step."""
    batch_size = args.train_batch_size
    model = timm.create_model(name, num_classes=NUM_CLASSES).to(device).train()
    model, x = prepare(model, torch.randn(batch_size, *input_size, device=device), args)
    target = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05)
    runner = torch.compile(model) if args.compile else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(runner(x), target)
        loss.backward()
        optimizer.step()

    return batch_size / seconds_per_iteration(step, args.iters, args.warmup, device)


def bench_model(name: str, args, device, autocast, matmul_fp32: float) -> Dict:
    model = timm.create_model(name, num_classes=NUM_CLASSES).to(device)
    input_size = tuple(resolve_data_config(model=model)['input_size'])
    result = {
        'model': name,
        'input_size': list(input_size),
        'params': sum(p.numel() for p in model.parameters()),
    }
    flops = count_flops(model, input_size, device, train=False)
    result['gflops_per_image'] = flops / 1e9
    result['gmacs_per_image'] = flops / 2e9
    if not args.no_train:
        result['train_gflops_per_image'] = count_flops(model, input_size, device, train=True) / 1e9
    del model

    result['inference'] = {}
    for batch_size in args.infer_batch_sizes:
        _logger.info('%s: inference at batch %d', name, batch_size)
        images_per_s = bench_inference(name, input_size, batch_size, args, device, autocast)
        achieved = result['gflops_per_image'] * images_per_s
        result['inference'][str(batch_size)] = {
            'images_per_s': images_per_s,
            'gflops_per_s': achieved,
            'fraction_of_matmul': achieved / matmul_fp32,
        }

    if not args.no_train:
        _logger.info('%s: training at batch %d', name, args.train_batch_size)
        images_per_s = bench_training(name, input_size, args, device, autocast)
        achieved = result['train_gflops_per_image'] * images_per_s
        result['train'] = {
            'batch_size': args.train_batch_size,
            'images_per_s': images_per_s,
            'step_s': args.train_batch_size / images_per_s,
            'gflops_per_s': achieved,
            'fraction_of_matmul': achieved / matmul_fp32,
        }
    return result


# ---------------------------------------------------------------- data pipeline


def decode_split(data_dir: Path, split: str, input_size, limit: Optional[int]) -> Dict:
    """Decode the PNGs of one FER+ split folder into a uint8 array with the compact model's transform."""
    folder = data_dir / SPLIT_FOLDERS[split]
    if not folder.is_dir():
        raise SystemExit(f'{folder}: split folder not found. --data-dir must contain {SPLIT_FOLDERS[split]}.')
    files = sorted(folder.glob('*.png'))
    if limit is not None:
        files = files[:limit]
    if not files:
        raise SystemExit(f'{folder}: no PNG files found.')
    transform = create_eval_transform(dict(input_size=input_size, interpolation='bilinear', crop_pct=1.0))

    start = time.perf_counter()
    decoded = np.empty((len(files), *input_size), dtype=np.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as img:
            decoded[i] = transform(img).numpy()
    seconds = time.perf_counter() - start
    return dict(images=decoded, folder=str(folder), count=len(files), seconds=seconds)


def augment_epoch_seconds(images: torch.Tensor, augment: BatchAugment, batch_size: int, device) -> float:
    """Time one shuffled pass of ``augment`` over ``images`` in batches, as a training loader would."""
    warm = images[:batch_size].to(device)
    augment(warm)
    synchronize(device)
    start = time.perf_counter()
    order = torch.randperm(images.shape[0])
    for i in range(0, images.shape[0], batch_size):
        augment(images[order[i:i + batch_size]].to(device, non_blocking=True))
    synchronize(device)
    return time.perf_counter() - start


def bench_data_pipeline(args, device, autocast, model_results: List[Dict]) -> Dict:
    cfg = timm.get_pretrained_cfg(COMPACT_MODEL).to_dict()
    input_size = tuple(cfg['input_size'])
    augment = BatchAugment(cfg['mean'], cfg['std'])
    batch_size = args.train_batch_size
    out = {'batch_size': batch_size, 'input_size': list(input_size)}

    compact = next((r for r in model_results if r['model'] == COMPACT_MODEL and 'train' in r), None)
    if compact is not None:
        train_images_per_s = compact['train']['images_per_s']
    else:
        _logger.info('%s: training at batch %d, for the data-pipeline comparison', COMPACT_MODEL, batch_size)
        train_images_per_s = bench_training(COMPACT_MODEL, input_size, args, device, autocast)
    out['compact_model'] = COMPACT_MODEL
    out['compact_train_step_s'] = batch_size / train_images_per_s

    _logger.info('data pipeline: augmenting %d synthetic images', args.data_images)
    synthetic = torch.randint(0, 256, (args.data_images, *input_size), dtype=torch.uint8)
    out['synthetic'] = summarize_epoch(synthetic, augment, batch_size, device, train_images_per_s)

    if args.data_dir is not None:
        _logger.info('data pipeline: decoding PNGs under %s', args.data_dir)
        decoded = decode_split(args.data_dir, args.data_split, input_size, args.data_limit)
        out['decode'] = {
            'folder': decoded['folder'],
            'images': decoded['count'],
            'seconds': decoded['seconds'],
            'images_per_s': decoded['count'] / decoded['seconds'],
        }
        out['decoded'] = summarize_epoch(
            torch.from_numpy(decoded['images']), augment, batch_size, device, train_images_per_s,
        )
    return out


def summarize_epoch(images: torch.Tensor, augment, batch_size: int, device, train_images_per_s: float) -> Dict:
    seconds = augment_epoch_seconds(images, augment, batch_size, device)
    count = images.shape[0]
    num_batches = -(-count // batch_size)
    compute_seconds = count / train_images_per_s
    return {
        'images': count,
        'epoch_s': seconds,
        'images_per_s': count / seconds,
        'batch_ms': 1000.0 * seconds / num_batches,
        'compact_train_epoch_s': compute_seconds,
        'loading_to_training_ratio': seconds / compute_seconds,
    }


# ---------------------------------------------------------------- report


def format_models_table(results: List[Dict], infer_batch_sizes: List[int]) -> str:
    big = str(max(infer_batch_sizes))
    header = ['model', 'input', 'params (M)', 'GFLOPs/img', 'GMACs/img']
    header += [f'infer b{b} img/s' for b in infer_batch_sizes]
    header += [f'infer b{big} GFLOP/s', 'of matmul', 'train img/s', 'train GFLOP/s', 'of matmul']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in results:
        if 'error' in r:
            lines.append(f'| {r["model"]} | error: {r["error"]} |' + ' |' * (len(header) - 2))
            continue
        row = [
            r['model'], 'x'.join(str(s) for s in r['input_size']), f'{r["params"] / 1e6:.2f}',
            f'{r["gflops_per_image"]:.3f}', f'{r["gmacs_per_image"]:.3f}',
        ]
        row += [f'{r["inference"][str(b)]["images_per_s"]:.1f}' for b in infer_batch_sizes]
        row += [f'{r["inference"][big]["gflops_per_s"]:.1f}', f'{r["inference"][big]["fraction_of_matmul"]:.1%}']
        if 'train' in r:
            row += [f'{r["train"]["images_per_s"]:.1f}', f'{r["train"]["gflops_per_s"]:.1f}',
                    f'{r["train"]["fraction_of_matmul"]:.1%}']
        else:
            row += ['-', '-', '-']
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def format_data_table(data: Dict) -> str:
    lines = [
        f'Data pipeline, batch {data["batch_size"]}, compared with one {data["compact_model"]} training step '
        f'({1000 * data["compact_train_step_s"]:.1f} ms):',
        '',
        '| stage | images | seconds | img/s | ms/batch | training epoch s | loading / training |',
        '|---|---|---|---|---|---|---|',
    ]
    if 'decode' in data:
        d = data['decode']
        lines.append(f'| decode PNGs once ({d["folder"]}) | {d["images"]} | {d["seconds"]:.2f} | '
                     f'{d["images_per_s"]:.0f} | - | - | - |')
    for key, label in (('synthetic', 'BatchAugment, synthetic uint8'), ('decoded', 'BatchAugment, decoded PNGs')):
        if key in data:
            e = data[key]
            lines.append(
                f'| {label} | {e["images"]} | {e["epoch_s"]:.2f} | {e["images_per_s"]:.0f} | {e["batch_ms"]:.2f} | '
                f'{e["compact_train_epoch_s"]:.1f} | {e["loading_to_training_ratio"]:.1%} |'
            )
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s', stream=sys.stderr)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    autocast = make_autocast(device, args.dtype)
    names = select_models(args.models)
    torch.manual_seed(0)

    env = describe_environment(device)
    print('Environment: ' + ', '.join(f'{k} {v}' for k, v in env.items()))
    matmul_size = args.matmul_size or (8192 if device.type == 'cuda' else 2048)
    matmul = {'size': matmul_size, 'fp32_gflops_per_s': matmul_gflops(matmul_size, torch.float32, device,
                                                                      args.iters, args.warmup)}
    if args.dtype == 'bf16':
        matmul['bf16_gflops_per_s'] = matmul_gflops(matmul_size, torch.bfloat16, device, args.iters, args.warmup)
    print(f'Reference: {matmul_size}x{matmul_size} fp32 matmul at {matmul["fp32_gflops_per_s"]:.1f} GFLOP/s'
          + (f', bf16 at {matmul["bf16_gflops_per_s"]:.1f} GFLOP/s' if 'bf16_gflops_per_s' in matmul else ''))

    results = []
    for name in names:
        _logger.info('%s: counting FLOPs', name)
        try:
            results.append(bench_model(name, args, device, autocast, matmul['fp32_gflops_per_s']))
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            _logger.error('%s: benchmark failed: %s', name, e)
            results.append({'model': name, 'error': str(e).splitlines()[0]})

    mode = [args.dtype]
    if args.compile:
        mode.append('compiled')
    if args.channels_last:
        mode.append('channels_last')
    print()
    print(f'Models ({", ".join(mode)}, {args.iters} timed iterations after {args.warmup} warm-up). FLOPs count '
          f'matmuls and convolutions, train FLOPs are forward plus backward, and "of matmul" is the fraction of '
          f'the fp32 matmul GFLOP/s:')
    print()
    print(format_models_table(results, args.infer_batch_sizes))

    data = None
    if not args.no_data:
        data = bench_data_pipeline(args, device, autocast, results)
        print()
        print(format_data_table(data))

    report = {
        'environment': env,
        'settings': {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        'matmul': matmul,
        'models': results,
        'data_pipeline': data,
    }
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    args.output_json.write_text(json.dumps(report, indent=2) + '\n', encoding='utf-8')
    print()
    print(f'Wrote {args.output_json}')
    return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())
