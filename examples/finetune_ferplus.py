"""Fine-tune or train a timm model on FER+ with Accelerate.

Runs unchanged on one CPU process, several CPU processes (``torchrun --nproc_per_node 2``,
gloo) and one or more GPUs (``accelerate launch``). With no data argument it trains on
the small FER+ sample bundled in ``examples/data/ferplus_sample``.

    accelerate launch examples/finetune_ferplus.py
    accelerate launch examples/finetune_ferplus.py --data_dir ../shared/ferplus --epochs 30

Images are decoded once into uint8 tensors at the model's input size; augmentation runs
on whole batches on the training device (``transfer_timm.data.BatchAugment``). The
best checkpoint by validation accuracy is exported to ``OUTPUT_DIR/export``, a folder
that ``timm.create_model('local-dir:OUTPUT_DIR/export', pretrained=True)`` loads.
"""
import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

import timm
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2

import transfer_timm  # noqa: F401  (registers the TransFER and IR models with timm)
from transfer_timm.data import FERPLUS_CLASSES, LABEL_MODES, BatchAugment, create_eval_transform, normalize
from transfer_timm.data.cache import decode_to_tensors
from transfer_timm.training import (
    atomic_replace_dir, atomic_save_safetensors, atomic_write_json, confusion_matrix, export_model,
    metrics_from_confusion,
)

logger = get_logger(__name__)

SAMPLE_DIR = Path(__file__).resolve().parent / 'data' / 'ferplus_sample'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Fine-tune or train a timm model (default: compact TransFER) on FER+ with Accelerate.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Model.
    parser.add_argument('--model', default='transfer_tiny',
                        help='Any timm model name, name.tag, local-dir:PATH or hf-hub:ID.')
    parser.add_argument('--pretrained', action='store_true',
                        help='Start from the pretrained weights of --model instead of a random initialisation.')
    parser.add_argument('--ir_stem_checkpoint', default=None,
                        help='IR checkpoint (face.evoLVe .pth or IRNet safetensors) whose input layer and first '
                             'units initialise the CNN stem of a TransFER model, e.g. an MS-Celeb-1M IR-50.')
    parser.add_argument('--in_chans', type=int, default=None,
                        help='Input channels: 1 feeds grayscale faces, 3 feeds RGB. None keeps the model\'s pretrained cfg.')
    parser.add_argument('--drop_path_rate', type=float, default=0.1, help='Stochastic depth rate of the model.')
    parser.add_argument('--mad_p', type=float, default=None,
                        help='MAD drop probability for TransFER models. None keeps the model\'s own (0.6).')
    parser.add_argument('--msad_p', type=float, default=None,
                        help='MSAD drop probability for TransFER models. None keeps the model\'s own (0.3).')

    # Data.
    data = parser.add_argument_group('data (at most one source; none trains on the bundled sample)')
    data.add_argument('--data_dir', default=None,
                      help='FER+ folder in Microsoft\'s layout, containing FER2013Train and FER2013Valid. Without any '
                           'data option the bundled sample in examples/data/ferplus_sample is used.')
    data.add_argument('--fer2013_csv', default=None,
                      help='Kaggle fer2013.csv; needs --ferplus_csv with Microsoft\'s fer2013new.csv.')
    data.add_argument('--ferplus_csv', default=None, help='Microsoft\'s fer2013new.csv that goes with --fer2013_csv.')
    data.add_argument('--dataset', default=None,
                      help='Hub dataset id, or local parquet files or imagefolder path, read with datasets.load_dataset.')
    data.add_argument('--image_column', default='image', help='Image column of --dataset.')
    data.add_argument('--label_column', default='label', help='Label column of --dataset; labels are matched by name.')
    data.add_argument('--train_split', default='train', help='Split used for training.')
    data.add_argument('--eval_split', default='validation', help='Split used for validation and model selection.')
    data.add_argument('--label_mode', default='majority', choices=LABEL_MODES,
                      help='FER+ label mode (Barsoum et al. 2016) used to build the training targets.')
    data.add_argument('--eval_label_mode', default='majority', choices=LABEL_MODES,
                      help='FER+ label mode that selects and labels the validation images; accuracy is '
                           'measured against the top label of this mode.')
    data.add_argument('--skip_bad_images', action='store_true',
                      help='Skip unreadable images and count them in the log instead of stopping with an error.')
    data.add_argument('--max_train_samples', type=int, default=None, help='Use only the first N training images.')
    data.add_argument('--max_eval_samples', type=int, default=None, help='Use only the first N validation images.')

    # Augmentation.
    aug = parser.add_argument_group('augmentation')
    aug.add_argument('--crop_scale', type=float, nargs=2, default=(0.8, 1.0),
                     help='Range of the random crop area, as a fraction of the face.')
    aug.add_argument('--hflip', type=float, default=0.5, help='Probability of a horizontal flip.')
    aug.add_argument('--rotate', type=float, default=10.0, help='Maximum rotation in degrees.')
    aug.add_argument('--randaugment', type=float, nargs=2, default=(2, 5), metavar=('N', 'M'),
                     help='Number of photometric RandAugment-style operations and their magnitude out of 10.')
    aug.add_argument('--random_erasing', type=float, default=0.25, help='Probability of erasing one rectangle.')
    aug.add_argument('--label_smoothing', type=float, default=0.0, help='Label smoothing of the majority loss.')

    # Optimisation.
    opt = parser.add_argument_group('optimisation')
    opt.add_argument('--epochs', type=int, default=3, help='Number of training epochs.')
    opt.add_argument('--batch_size', type=int, default=64, help='Training batch size per process.')
    opt.add_argument('--eval_batch_size', type=int, default=256, help='Validation batch size per process.')
    opt.add_argument('--optimizer', default='adamw', help='Any timm optimizer name (adamw, sgd, lamb, ...).')
    opt.add_argument('--learning_rate', type=float, default=1e-3, help='Peak learning rate.')
    opt.add_argument('--momentum', type=float, default=0.9, help='Momentum for SGD-type optimizers.')
    opt.add_argument('--weight_decay', type=float, default=0.05,
                     help='Weight decay; parameters named by the model\'s no_weight_decay() and all biases '
                          'and norms get none.')
    opt.add_argument('--layer_decay', type=float, default=None,
                     help='Layer-wise learning rate decay through the model\'s group_matcher, e.g. 0.75.')
    opt.add_argument('--lr_schedule', default='cosine', choices=('cosine', 'step', 'constant'),
                     help='Learning rate schedule over optimizer steps.')
    opt.add_argument('--warmup_epochs', type=float, default=0.0, help='Linear warm-up length in epochs.')
    opt.add_argument('--lr_milestones', type=float, nargs='*', default=(),
                     help='Epochs at which the step schedule multiplies the learning rate by --lr_gamma.')
    opt.add_argument('--lr_gamma', type=float, default=0.1, help='Factor of the step schedule.')
    opt.add_argument('--min_lr_ratio', type=float, default=0.01, help='Final learning rate of the cosine schedule, '
                                                                      'as a fraction of the peak.')
    opt.add_argument('--gradient_accumulation_steps', type=int, default=1,
                     help='Number of batches whose gradients are summed before one optimizer step.')
    opt.add_argument('--clip_grad', type=float, default=None, help='Clip the gradient norm to this value.')
    opt.add_argument('--mixed_precision', default=None, choices=('no', 'fp16', 'bf16'),
                     help='Mixed precision mode; default: the accelerate config (bf16 is the choice on recent GPUs).')
    opt.add_argument('--cpu', action='store_true',
                     help='Train on the CPU even when a GPU is available. Without a GPU this is the default, and '
                          'several processes started by torchrun then train together over gloo.')
    opt.add_argument('--cpu_threads', type=positive_int, default=None,
                     help='Torch threads per process when training on the CPU. Default: OMP_NUM_THREADS if set, else '
                          'the usable CPU cores divided by the processes on this machine. Under accelerate launch, '
                          'which sets OMP_NUM_THREADS=1 unless given --num_cpu_threads_per_process, a value of 1 '
                          'counts as unset, so pass --cpu_threads 1 for one thread.')
    opt.add_argument('--compile', action='store_true', help='Compile the model with torch.compile (CUDA mostly).')
    opt.add_argument('--seed', type=int, default=42, help='Random seed for initialisation, shuffling and augmentation.')

    # Checkpoints and output.
    out = parser.add_argument_group('checkpoints and output')
    out.add_argument('--output_dir', default='outputs/finetune_ferplus', help='Folder for checkpoints and the export.')
    out.add_argument('--checkpointing_steps', default='epoch',
                     help="Save a resumable checkpoint every N optimizer steps, or 'epoch' after every epoch.")
    out.add_argument('--checkpoints_total_limit', type=int, default=2, help='Number of recent checkpoints kept.')
    out.add_argument('--resume_from_checkpoint', default=None,
                     help="Checkpoint folder to resume from, or 'latest' for the newest one in OUTPUT_DIR/checkpoints.")
    out.add_argument('--with_tracking', action='store_true', help='Log metrics through accelerate\'s trackers.')
    out.add_argument('--report_to', default='all',
                     help='Trackers for --with_tracking: tensorboard, wandb, ... or all installed ones.')
    out.add_argument('--eval_only', action='store_true',
                     help='Only evaluate --model on the validation split, write OUTPUT_DIR/eval_results.json and exit.')
    out.add_argument('--log_every', type=int, default=50, help='Log the training loss every N optimizer steps.')

    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.data_dir, args.fer2013_csv, args.dataset)) > 1:
        parser.error('Give at most one of --data_dir, --fer2013_csv/--ferplus_csv and --dataset.')
    if (args.fer2013_csv is None) != (args.ferplus_csv is None):
        parser.error('--fer2013_csv and --ferplus_csv go together.')
    if args.checkpointing_steps != 'epoch' and not args.checkpointing_steps.isdigit():
        parser.error(f"--checkpointing_steps must be 'epoch' or a positive integer, got {args.checkpointing_steps!r}.")
    return args


def load_splits(args):
    """Load the train and validation splits as ``datasets.Dataset`` objects."""
    from transfer_timm.data import load_ferplus
    caps = {args.train_split: args.max_train_samples, args.eval_split: args.max_eval_samples}
    if args.fer2013_csv is not None or args.dataset is not None:
        from transfer_timm.data import load_fer_dataset
        if args.fer2013_csv is not None:
            source = dict(fer2013_csv=args.fer2013_csv, ferplus_csv=args.ferplus_csv)
        else:
            source = dict(source=args.dataset, image_column=args.image_column, label_column=args.label_column)

        def load(mode):
            return load_fer_dataset(label_mode=mode, skip_bad=args.skip_bad_images, **source)
        description = args.dataset or f'{args.fer2013_csv} + {args.ferplus_csv}'
    else:
        data_dir = args.data_dir or SAMPLE_DIR

        def load(mode):
            return load_ferplus(data_dir, mode, splits=['train', 'validation'], skip_bad=args.skip_bad_images)
        description = f'FER+ at {data_dir}' + (' (bundled sample)' if args.data_dir is None else '')
    splits = load(args.label_mode)
    eval_splits = splits if args.eval_label_mode == args.label_mode else load(args.eval_label_mode)
    for name, available in ((args.train_split, splits), (args.eval_split, eval_splits)):
        if name not in available:
            raise KeyError(f'Split {name!r} not found in {description}; available splits: {list(available)}.')
    train, valid = splits[args.train_split], eval_splits[args.eval_split]
    if caps[args.train_split] is not None:
        train = train.select(range(min(len(train), caps[args.train_split])))
    if caps[args.eval_split] is not None:
        valid = valid.select(range(min(len(valid), caps[args.eval_split])))
    return train, valid, description


def make_lr_lambda(args, steps_per_epoch: int, total_steps: int):
    warmup = int(args.warmup_epochs * steps_per_epoch)
    milestones = sorted(int(m * steps_per_epoch) for m in args.lr_milestones)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if args.lr_schedule == 'constant':
            return 1.0
        if args.lr_schedule == 'step':
            return args.lr_gamma ** sum(step >= m for m in milestones)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return lr_lambda


def compute_loss(logits, labels, soft, args):
    if args.label_mode == 'majority':
        return F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
    if args.label_mode == 'crossentropy':
        return F.cross_entropy(logits, soft)
    if args.label_mode == 'probability':
        # A new one-hot target is drawn from the vote distribution at every visit.
        return F.cross_entropy(logits, torch.multinomial(soft, 1).squeeze(1))
    # multi_target: any emotion that the annotators accepted counts as correct.
    probs = logits.float().softmax(dim=1)
    return -torch.log((probs * (soft > 0).float()).amax(dim=1).clamp_min(1e-8)).mean()


@torch.no_grad()
def evaluate(model, loader, accelerator, data_config, num_classes):
    """Return the confusion matrix over every validation sample, counted once."""
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for images, labels, _ in tqdm(loader, desc='Validating', leave=False, disable=not accelerator.is_main_process):
        with accelerator.autocast():
            logits = model(normalize(images, data_config['mean'], data_config['std']))
        preds, labels = accelerator.gather_for_metrics((logits.argmax(dim=1), labels))
        matrix += confusion_matrix(preds, labels, num_classes)
    model.train()
    return matrix


def save_checkpoint(accelerator, args, name: str, state: dict):
    """Save a resumable checkpoint; the folder appears under its final name only when complete."""
    ckpt_root = Path(args.output_dir) / 'checkpoints'
    tmp_dir = ckpt_root / f'.tmp-{name}'
    if accelerator.is_main_process:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        tmp_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp_dir))
    if accelerator.is_main_process:
        atomic_write_json(tmp_dir / 'training_state.json', state)
        atomic_replace_dir(tmp_dir, ckpt_root / name)
        existing = sorted(
            (p for p in ckpt_root.iterdir() if p.is_dir() and re.fullmatch(r'step_\d+', p.name)),
            key=lambda p: int(p.name.split('_')[1]),
        )
        for old in existing[:-args.checkpoints_total_limit]:
            shutil.rmtree(old)
        logger.info('Saved checkpoint %s', ckpt_root / name)
    accelerator.wait_for_everyone()


def find_checkpoint(args) -> Path:
    if args.resume_from_checkpoint != 'latest':
        path = Path(args.resume_from_checkpoint)
        if not (path / 'training_state.json').is_file():
            raise FileNotFoundError(f'{path} is not a complete checkpoint folder (no training_state.json).')
        return path
    ckpt_root = Path(args.output_dir) / 'checkpoints'
    found = sorted(
        (p for p in ckpt_root.glob('step_*') if (p / 'training_state.json').is_file()),
        key=lambda p: int(p.name.split('_')[1]),
    )
    if not found:
        raise FileNotFoundError(f'No complete checkpoint in {ckpt_root} to resume from.')
    return found[-1]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text}')
    return value


def default_cpu_threads(num_processes: int) -> int:
    """Return the torch threads per process: OMP_NUM_THREADS if the user set it, else cores per local process.

    accelerate launch sets OMP_NUM_THREADS=1 whenever --num_cpu_threads_per_process is not
    given, so under accelerate launch (which sets ACCELERATE_DYNAMO_BACKEND) a value of 1
    is treated as unset.
    """
    requested = os.environ.get('OMP_NUM_THREADS', '')
    launched_by_accelerate = 'ACCELERATE_DYNAMO_BACKEND' in os.environ
    if requested.isdigit() and int(requested) > 0 and not (launched_by_accelerate and requested == '1'):
        return int(requested)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    local_processes = int(os.environ.get('LOCAL_WORLD_SIZE', num_processes))
    return max(1, cores // max(1, local_processes))


def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    # Accelerate forms a multi-process CPU group only when it is set to use the CPU.
    use_cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=use_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    import logging
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s', level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.device.type == 'cpu':
        torch.set_num_threads(args.cpu_threads or default_cpu_threads(accelerator.num_processes))
        logger.info('Using %d torch thread(s) per process on the CPU.', torch.get_num_threads())
    set_seed(args.seed)

    # Model and its preprocessing.
    model_kwargs = dict(num_classes=len(FERPLUS_CLASSES), drop_path_rate=args.drop_path_rate)
    if args.in_chans is not None:
        model_kwargs['in_chans'] = args.in_chans
    if args.mad_p is not None:
        model_kwargs['mad_p'] = args.mad_p
    if args.msad_p is not None:
        model_kwargs['msad_p'] = args.msad_p
    model = timm.create_model(args.model, pretrained=args.pretrained, **model_kwargs)
    if args.ir_stem_checkpoint:
        from timm.models import load_state_dict
        from transfer_timm.models import load_ir_stem
        loaded = load_ir_stem(model, load_state_dict(args.ir_stem_checkpoint))
        logger.info('Loaded %d stem tensors from %s.', len(loaded), args.ir_stem_checkpoint)
    data_config = resolve_data_config(model=model)
    if args.in_chans is not None and data_config['input_size'][0] != args.in_chans:
        data_config['input_size'] = (args.in_chans, *data_config['input_size'][1:])
        repeat = args.in_chans if len(data_config['mean']) == 1 else 1
        data_config['mean'] = tuple(data_config['mean'][:args.in_chans]) * repeat
        data_config['std'] = tuple(data_config['std'][:args.in_chans]) * repeat
    model.pretrained_cfg = dict(model.pretrained_cfg, label_names=list(FERPLUS_CLASSES),
                                input_size=tuple(data_config['input_size']),
                                mean=tuple(data_config['mean']), std=tuple(data_config['std']))
    n_params = sum(p.numel() for p in model.parameters())

    # Data: decoded once at the model's input size.
    train_ds, valid_ds, description = load_splits(args)
    transform = create_eval_transform(data_config)
    with accelerator.main_process_first():
        train_images, train_labels, train_soft = decode_to_tensors(
            train_ds, transform, show_progress=accelerator.is_local_main_process)
        valid_images, valid_labels, valid_soft = decode_to_tensors(
            valid_ds, transform, show_progress=accelerator.is_local_main_process)
    logger.info('Training %s (%.2f M parameters, input %s) on %s: %d train and %d validation images, '
                'label modes %s (train) and %s (validation).', args.model, n_params / 1e6,
                tuple(data_config['input_size']), description, len(train_images), len(valid_images),
                args.label_mode, args.eval_label_mode)
    train_set = TensorDataset(train_images, train_labels, train_soft)
    valid_set = TensorDataset(valid_images, valid_labels, valid_soft)
    # A one-sample last batch would break BatchNorm in training, so that batch is dropped
    # (a different sample each epoch, since the order is reshuffled).
    drop_last = len(train_set) % args.batch_size == 1
    # Loaders draw from their own generators, so that starting an iterator (also when a
    # resumed run skips batches) leaves the global RNG of augmentation and dropout untouched.
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=drop_last,
                              generator=torch.Generator().manual_seed(args.seed))
    valid_loader = DataLoader(valid_set, batch_size=args.eval_batch_size, shuffle=False,
                              generator=torch.Generator().manual_seed(args.seed))

    optimizer = create_optimizer_v2(
        model, opt=args.optimizer, lr=args.learning_rate, weight_decay=args.weight_decay,
        momentum=args.momentum, layer_decay=args.layer_decay,
    )
    if args.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, valid_loader = accelerator.prepare(model, optimizer, train_loader, valid_loader)

    if args.eval_only:
        matrix = evaluate(model, valid_loader, accelerator, data_config, len(FERPLUS_CLASSES))
        metrics = metrics_from_confusion(matrix, FERPLUS_CLASSES)
        logger.info('Validation accuracy %.2f%%, mean class accuracy %.2f%% over %d images (%d processes).',
                    100 * metrics['accuracy'], 100 * metrics['mean_class_accuracy'], metrics['n'],
                    accelerator.num_processes)
        if accelerator.is_main_process:
            atomic_write_json(Path(args.output_dir) / 'eval_results.json',
                              dict(metrics, num_processes=accelerator.num_processes, model=args.model))
        accelerator.end_training()
        return

    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(args, steps_per_epoch, total_steps))
    accelerator.register_for_checkpointing(scheduler)
    augment = BatchAugment(
        data_config['mean'], data_config['std'], scale=tuple(args.crop_scale), hflip=args.hflip,
        rotate=args.rotate, ra_num_ops=int(args.randaugment[0]), ra_magnitude=args.randaugment[1],
        erase_prob=args.random_erasing,
    )
    if args.with_tracking:
        accelerator.init_trackers('finetune_ferplus', {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                       for k, v in vars(args).items()})

    # Resume.
    global_step, start_epoch, skip_batches = 0, 0, 0
    best = {'accuracy': -1.0, 'epoch': None}
    history = []
    if args.resume_from_checkpoint:
        ckpt = find_checkpoint(args)
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / 'training_state.json').read_text())
        global_step, start_epoch, skip_batches = state['global_step'], state['epoch'], state['batches_done']
        best, history = state['best'], state.get('history', [])
        logger.info('Resumed from %s at epoch %d, optimizer step %d.', ckpt, start_epoch, global_step)

    checkpoint_every = None if args.checkpointing_steps == 'epoch' else int(args.checkpointing_steps)
    best_dir = Path(args.output_dir) / 'best'
    progress = tqdm(total=total_steps, initial=global_step, desc='Training', unit='step',
                    disable=not accelerator.is_local_main_process)
    num_classes = len(FERPLUS_CLASSES)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        train_loader.set_epoch(epoch)
        loader = train_loader
        batches_done = 0
        if skip_batches:
            loader = accelerator.skip_first_batches(train_loader, skip_batches)
            batches_done, skip_batches = skip_batches, 0
        running_loss = torch.zeros((), device=accelerator.device)
        running_count = 0
        for images, labels, soft in loader:
            with accelerator.accumulate(model):
                inputs = augment(images)
                with accelerator.autocast():
                    logits = model(inputs)
                loss = compute_loss(logits, labels, soft, args)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.clip_grad is not None:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batches_done += 1
            running_loss += loss.detach()
            running_count += 1
            if accelerator.sync_gradients:
                scheduler.step()
                global_step += 1
                progress.update(1)
                if global_step % args.log_every == 0:
                    mean_loss = (running_loss / running_count).item()  # one sync per log interval
                    progress.set_postfix(loss=f'{mean_loss:.4f}', lr=f'{scheduler.get_last_lr()[0]:.2e}')
                    if args.with_tracking:
                        accelerator.log({'train_loss': mean_loss, 'lr': scheduler.get_last_lr()[0]}, step=global_step)
                    running_loss.zero_()
                    running_count = 0
                if checkpoint_every and global_step % checkpoint_every == 0:
                    save_checkpoint(accelerator, args, f'step_{global_step}', dict(
                        global_step=global_step, epoch=epoch, batches_done=batches_done, best=best, history=history))

        matrix = evaluate(model, valid_loader, accelerator, data_config, num_classes)
        metrics = metrics_from_confusion(matrix, FERPLUS_CLASSES)
        history.append({'epoch': epoch + 1, 'step': global_step, 'accuracy': metrics['accuracy'],
                        'mean_class_accuracy': metrics['mean_class_accuracy']})
        logger.info('Epoch %d/%d: validation accuracy %.2f%%, mean class accuracy %.2f%% over %d images.',
                    epoch + 1, args.epochs, 100 * metrics['accuracy'], 100 * metrics['mean_class_accuracy'],
                    metrics['n'])
        if args.with_tracking:
            accelerator.log({'val_accuracy': metrics['accuracy'],
                             'val_mean_class_accuracy': metrics['mean_class_accuracy']}, step=global_step)
        if metrics['accuracy'] > best['accuracy']:
            best = {'accuracy': metrics['accuracy'], 'epoch': epoch + 1, 'metrics': metrics}
            if accelerator.is_main_process:
                best_dir.mkdir(parents=True, exist_ok=True)
                atomic_save_safetensors(best_dir / 'model.safetensors',
                                        accelerator.unwrap_model(model).state_dict())
                atomic_write_json(best_dir / 'metrics.json', best)
        save_checkpoint(accelerator, args, f'step_{global_step}', dict(
            global_step=global_step, epoch=epoch + 1, batches_done=0, best=best, history=history))
    progress.close()

    # Export the best model.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from safetensors.torch import load_file
        final = accelerator.unwrap_model(model)
        final = getattr(final, '_orig_mod', final)
        final.load_state_dict(load_file(best_dir / 'model.safetensors'))
        wall = time.time() - start_time
        command = 'accelerate launch examples/finetune_ferplus.py ' + ' '.join(shlex.quote(a) for a in (
            sys.argv[1:] if argv is None else argv))
        hardware = (f'{accelerator.num_processes} process(es) on {accelerator.device.type}, '
                    f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, '
                    f'{torch.get_num_threads()} torch threads per process, '
                    f'torch {torch.__version__}, timm {timm.__version__}')
        history_lines = '\n'.join(
            f"| {h['epoch']} | {100 * h['accuracy']:.2f}% | {100 * h['mean_class_accuracy']:.2f}% |" for h in history)
        extra = {
            'Validation history': '| epoch | accuracy | mean class accuracy |\n| --- | --- | --- |\n' + history_lines,
            'Data': f'{description}; {len(train_images)} training images, {len(valid_images)} validation images, '
                    f'label mode {args.label_mode} for training and {args.eval_label_mode} for validation. The best epoch ({best["epoch"]}) was selected on validation '
                    f'accuracy.',
        }
        out = export_model(
            final, Path(args.output_dir) / 'export', FERPLUS_CLASSES, metrics=best['metrics'],
            model_name=f'{args.model} fine-tuned on FER+', eval_split=args.eval_split, command=command,
            hardware=hardware, wall_time_s=wall, extra_sections=extra,
        )
        atomic_write_json(Path(args.output_dir) / 'results.json', {
            'best_epoch': best['epoch'], 'validation': best['metrics'], 'history': history, 'wall_time_s': wall,
            'train_images': len(train_images), 'validation_images': len(valid_images),
        })
        logger.info('Best validation accuracy %.2f%% at epoch %s; exported to %s (load it with '
                    "timm.create_model('local-dir:%s', pretrained=True) after import transfer_timm).",
                    100 * best['accuracy'], best['epoch'], out, out)
    accelerator.end_training()


if __name__ == '__main__':
    from transfer_timm.data import DataError
    try:
        main()
    except DataError as e:
        # Bad rows and images can be skipped; a missing folder cannot.
        skippable = ', line ' in str(e) or 'image' in str(e)
        hint = ' Pass --skip_bad_images to skip unreadable images and malformed rows.' if skippable else ''
        logger.error('%s%s', e, hint)
        sys.exit(1)
    except (FileNotFoundError, KeyError) as e:
        logger.error('%s', e)
        sys.exit(1)
