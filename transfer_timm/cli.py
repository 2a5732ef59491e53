"""The ``transfer-fer`` command line.

Each subcommand is one ``add_<name>_parser(subparsers)`` function, which registers
its argument parser and sets ``handler`` to a ``run_<name>(args) -> int`` function
that returns the exit status. The handlers only translate arguments into calls of
package functions. To add a subcommand, write both functions and list the first in
:data:`SUBCOMMANDS`.
"""
import argparse
import logging
import sys
from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence

__all__ = ['DEFAULT_MODEL', 'SUBCOMMANDS', 'build_parser', 'main']

# Pretrained FER+ weights of the compact model.
DEFAULT_MODEL = 'transfer_tiny.ferplus'

_logger = logging.getLogger('transfer_timm.cli')

# FER+ label modes, repeated here so that building the parser imports no data code.
_LABEL_MODES = ('majority', 'probability', 'crossentropy', 'multi_target')


# predict

def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'predict',
        help='Predict the expression of every face in images, folders and videos.',
        description=(
            'Detect faces in images and videos and classify the expression of each. Folders are searched '
            'recursively for image and video files, and files with a video extension are read frame by frame. '
            'Writes one JSON record per line for every image file or sampled video frame, or one CSV row per '
            'face. A file that cannot be read gets a record with an "error" field. The exit status is non-zero '
            'only when no input could be processed.'
        ),
    )
    parser.add_argument('paths', nargs='+', metavar='PATH', help='Image files, video files or folders.')
    parser.add_argument(
        '--model', default=DEFAULT_MODEL, metavar='SPEC',
        help=f'Model to load: a timm name with pretrained tag, local-dir:PATH or hf-hub:ID. Default: {DEFAULT_MODEL}.',
    )

    parser.add_argument(
        '--format', choices=('json', 'csv'), default='json',
        help='Output format: JSON Lines with one record per image or frame, or CSV with one row per face. '
             'Default: json.',
    )
    parser.add_argument('--output', metavar='FILE', help='File to write the records to. Default: standard output.')

    parser.add_argument(
        '--no-detect', action='store_true',
        help='Skip face detection and classify each whole image as one face crop.',
    )
    parser.add_argument(
        '--detector', choices=('haar', 'yunet'), default='haar',
        help='Face detector: the OpenCV Haar cascade, or YuNet (needs --detector-model). Default: haar.',
    )
    parser.add_argument(
        '--detector-model', metavar='FILE',
        help='YuNet ONNX file for --detector yunet, or another Haar cascade XML file for --detector haar.',
    )
    parser.add_argument(
        '--margin', type=float, default=0.1,
        help='Context added on each side of a detected face, as a fraction of its width and height. Default: 0.1.',
    )
    parser.add_argument(
        '--max-faces', type=int, metavar='N',
        help='Classify only the N largest faces of each image or frame. Default: all faces.',
    )

    parser.add_argument(
        '--device', metavar='D',
        help='Torch device for the model, for example cpu or cuda:0. Default: cuda if available, else cpu.',
    )
    parser.add_argument(
        '--batch-size', type=int, default=32, metavar='N',
        help='Faces classified per forward pass. Default: 32.',
    )
    parser.add_argument(
        '--frame-stride', type=int, default=1, metavar='N',
        help='Predict every N-th frame of videos. Default: 1 (every frame).',
    )
    parser.add_argument('--no-progress', action='store_true', help='Hide the progress bar on standard error.')
    parser.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from transfer_timm.inference import FacePredictor, create_record_writer, predict_paths

    if args.frame_stride < 1:
        return _fail(f'--frame-stride must be at least 1, got {args.frame_stride}.')
    try:
        predictor = FacePredictor(
            args.model,
            detector='none' if args.no_detect else args.detector,
            detector_model=args.detector_model,
            device=args.device,
            batch_size=args.batch_size,
            margin=args.margin,
            max_faces=args.max_faces,
        )
    except (RuntimeError, ValueError, OSError) as e:
        return _fail(f'Failed to create the predictor for model {args.model!r}: {e}')

    output = open(args.output, 'w', encoding='utf-8', newline='') if args.output else nullcontext(sys.stdout)
    with output as stream:
        writer = create_record_writer(args.format, stream, predictor.label_names)
        summary = predict_paths(
            predictor, args.paths, writer, frame_stride=args.frame_stride, progress=not args.no_progress,
        )
    if summary.succeeded == 0:
        if summary.total == 0:
            return _fail('No image or video files found in the given paths.')
        return _fail(f'No input could be processed: all {summary.total} records are errors.')
    if summary.failed:
        _logger.warning('%d of %d inputs could not be processed.', summary.failed, summary.total)
    return 0


# export-onnx

def add_export_onnx_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'export-onnx',
        help='Export a model to ONNX with a dynamic batch size.',
        description=(
            'Export a model to ONNX. The graph maps the normalised input (batch, C, H, W) to logits, and '
            'the preprocessing settings and class names are stored as metadata properties.'
        ),
    )

    parser.add_argument('model', metavar='MODEL', help='Model to export: a timm name, local-dir:PATH or hf-hub:ID.')
    parser.add_argument('output', metavar='OUT.onnx', help='ONNX file to write.')
    parser.add_argument('--opset', type=int, default=18, help='ONNX opset version. Default: 18.')
    parser.add_argument(
        '--check', action='store_true',
        help='Validate the file with the ONNX checker and compare onnxruntime logits with PyTorch '
             'at batch sizes 1 and 3 (tolerance 1e-4).',
    )
    parser.add_argument(
        '--legacy-exporter', action='store_true',
        help='Use the deprecated TorchScript exporter instead of the torch.export-based one.',
    )
    parser.set_defaults(handler=run_export_onnx)


def run_export_onnx(args: argparse.Namespace) -> int:
    from transfer_timm.inference import load_model
    from transfer_timm.inference.onnx_export import OnnxCheckError, export_onnx, verify_onnx

    try:
        model = load_model(args.model)
    except (RuntimeError, ValueError, OSError) as e:
        return _fail(f'Failed to load model {args.model!r}: {e}')
    path = export_onnx(model, args.output, opset=args.opset, dynamo=not args.legacy_exporter)
    print(f'Wrote {path}', file=sys.stderr)
    if args.check:
        try:
            max_diff = verify_onnx(model, path)
        except OnnxCheckError as e:
            return _fail(str(e))
        print(f'Check passed: onnxruntime matches PyTorch within {max_diff:.2g} at batch sizes 1 and 3.',
              file=sys.stderr)
    return 0


# evaluate

def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'evaluate',
        help='Measure the accuracy of a FER+ model on one split folder.',
        description=(
            "Evaluate a FER+ model on a split folder in Microsoft's layout (label.csv plus PNGs) and print "
            'accuracy, mean class accuracy, per-class recall, the number of images and the confusion matrix '
            'as JSON.'
        ),
    )
    parser.add_argument('model', metavar='MODEL',
                        help='Model to evaluate: a timm name with pretrained tag, local-dir:PATH or hf-hub:ID.')
    parser.add_argument('data_dir', metavar='DATA_DIR',
                        help='FER+ split folder such as FER2013Valid, containing label.csv and the PNGs.')
    parser.add_argument('--label-mode', default='majority', choices=_LABEL_MODES,
                        help='FER+ label mode that selects the images and gives each its label. Default: majority.')
    parser.add_argument('--batch-size', type=int, default=256, metavar='N',
                        help='Images per forward pass. Default: 256.')
    parser.add_argument('--device', default=None,
                        help='Torch device for the model, for example cpu or cuda:0. Default: cuda if available, '
                             'else cpu.')
    parser.add_argument('--skip-bad', action='store_true',
                        help='Skip malformed label rows and unreadable images instead of stopping with an error.')
    parser.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import json
    from transfer_timm.data import DataError
    from transfer_timm.training.evaluate import evaluate_split
    import torch
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        metrics = evaluate_split(args.model, args.data_dir, label_mode=args.label_mode, batch_size=args.batch_size,
                                 device=device, skip_bad=args.skip_bad)
    except DataError as e:
        # Bad rows and images can be skipped; a missing folder cannot.
        skippable = ', line ' in str(e) or 'image' in str(e)
        return _fail(f'{e} Pass --skip-bad to skip unreadable images and malformed rows.' if skippable else str(e))
    except (ValueError, RuntimeError, OSError) as e:
        return _fail(str(e))
    print(json.dumps(metrics, indent=2))
    return 0


# convert

def add_convert_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``convert`` subcommand, with :func:`run_convert` as its ``handler``."""
    parser = subparsers.add_parser(
        'convert',
        help='Convert FER+ to parquet files and optionally push them to the Hub.',
        description=(
            'Read FER+ from Microsoft\'s folders (FER2013Train/label.csv ...), from fer2013.csv with '
            'fer2013new.csv, or from any datasets source, and write one parquet file per split with a '
            'dataset card.'
        ),
    )
    parser.add_argument(
        'source', nargs='+', metavar='SOURCE',
        help='FER+ folder, a split folder with label.csv, fer2013.csv and fer2013new.csv (in either order), '
             'parquet files, an imagefolder tree or a Hub dataset id.',
    )
    parser.add_argument('-o', '--output-dir', metavar='DIR',
                        help='Folder to write data/<split>-00000-of-00001.parquet and README.md to.')
    parser.add_argument('--overwrite', action='store_true',
                        help='Replace parquet files and README.md already in --output-dir.')

    parser.add_argument('--label-mode', default='majority', choices=_LABEL_MODES,
                        help='FER+ label mode that selects the images and sets label and soft_label. '
                             'Default: majority.')
    parser.add_argument('--splits', nargs='+', choices=('test', 'train', 'validation'),
                        help='Splits to convert. Default: every split of the source.')
    parser.add_argument('--skip-bad', action='store_true',
                        help='Skip malformed rows and unreadable images and count them, instead of stopping.')
    parser.add_argument('--max-samples', type=int, metavar='N', help='Keep only the first N images of each split.')

    parser.add_argument('--image-column', default='image', help='Image column of a datasets source. Default: image.')
    parser.add_argument('--label-column', default='label', help='Label column of a datasets source. Default: label.')

    parser.add_argument('--push-to-hub', metavar='REPO_ID', help='Also upload the splits to this Hub dataset repository.')
    parser.add_argument('--private', action='store_true', help='Create the Hub repository as private.')
    parser.add_argument('--token',
                        help='Hub token for --push-to-hub. Default: the HF_TOKEN variable or the saved login; '
                             'prefer those, since a command-line token shows in the process list.')

    parser.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Run the ``convert`` subcommand and return the exit status (1 on a data or file error)."""
    if args.output_dir is None and args.push_to_hub is None:
        return _fail('give --output-dir, --push-to-hub or both.')
    sources: List[str] = list(args.source)
    source = sources[0] if len(sources) == 1 else sources
    dataset_kwargs = {}
    if args.image_column != 'image':
        dataset_kwargs['image_column'] = args.image_column
    if args.label_column != 'label':
        dataset_kwargs['label_column'] = args.label_column
    from transfer_timm.data import DataError
    from transfer_timm.data.convert import convert_ferplus
    try:
        dataset_dict = convert_ferplus(
            source, args.output_dir, label_mode=args.label_mode, splits=args.splits, skip_bad=args.skip_bad,
            max_samples=args.max_samples, overwrite=args.overwrite, repo_id=args.push_to_hub,
            token=args.token, private=True if args.private else None, **dataset_kwargs,
        )
    except (DataError, FileExistsError) as e:
        return _fail(str(e))
    for split, ds in dataset_dict.items():
        print(f'{split}: {len(ds)} images')
    if args.output_dir is not None:
        print(f'Wrote {args.output_dir}. Load it with datasets.load_dataset({str(args.output_dir)!r}).')
    if args.push_to_hub is not None:
        print(f'Pushed to the Hub dataset {args.push_to_hub}.')
    return 0


SUBCOMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [
    add_predict_parser,
    add_export_onnx_parser,
    add_evaluate_parser,
    add_convert_parser,
]


def _fail(message: str) -> int:
    print(f'transfer-fer: error: {message}', file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    """Build the ``transfer-fer`` parser with every subcommand in :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog='transfer-fer',
        description='TransFER facial expression recognition: prediction, evaluation, conversion and export.',
    )
    parser.add_argument('-v', '--verbose', action='store_true', help='Log progress messages, not only warnings.')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``transfer-fer`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='%(levelname)s: %(message)s')
    return args.handler(args)


if __name__ == '__main__':
    sys.exit(main())
