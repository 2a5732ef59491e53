"""Build a release folder (what a Hub model repo holds) from a training run's export.

    python scripts/make_release.py runs/tiny_main releases/transfer_tiny.ferplus \
        --tag transfer_tiny.ferplus --hf-hub-id transfer-timm/transfer_tiny.ferplus \
        --ablation runs/ablation.json

The release folder gets ``model.safetensors``, ``config.json``, ``confusion_matrix.png``,
``metrics.json`` and ``README.md``, a model card with the validation metrics, the
ablation table, the training command, hardware and wall time, licence notes and limits.
"""
import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import timm

import transfer_timm  # noqa: F401  (registers the models)
from transfer_timm.hub import validate_release
from transfer_timm.training.export import render_model_card

_logger = logging.getLogger('make_release')

LICENCE_NOTES = """\
The weights are released under the MIT licence, like the code. They were trained on
FER2013 images with FER+ labels:

- FER2013 (Goodfellow et al., "Challenges in Representation Learning: A report on three
  machine learning contests", ICML 2013 workshop) was collected with Google image search
  for that challenge; the images carry no licence of their own for redistribution, so
  they are not included here and the data set's terms of use apply to anything built
  from them.
- The FER+ labels (Barsoum et al., arXiv 1608.01041) are published by Microsoft under
  the MIT licence."""

INTENDED_USE = """\
Intended use: research on facial expression recognition and demonstrations on frontal,
roughly aligned face crops, the kind of input FER2013 contains (48x48 grayscale, face
filling the frame). `transfer-fer predict` detects and crops faces before classifying.

Limits:

- Trained only on FER2013 faces: low resolution, grayscale, mostly frontal, collected
  from web searches. Expect lower accuracy on profile views, occlusions, strong lighting
  changes, children and elderly faces, and on populations that web image search
  under-represents; FER2013's demographic make-up is not documented.
- Eight expression classes as defined by FER+ annotators; disgust and contempt have few
  training examples (under 1% each), and their recall is correspondingly low.
- An expression label is not a measure of a person's emotional state. Do not use the
  model for decisions about individuals (hiring, policing, credit, health, education).
- Accuracy was selected and measured on FER2013Valid only; the FER+ test split was held
  back for independent scoring."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Build a release folder from a training run of '
                                                 'examples/finetune_ferplus.py.')
    parser.add_argument('run_dir', type=Path, help='Output folder of the training run, containing export/ and results.json.')
    parser.add_argument('release_dir', type=Path, help='Release folder to create; replaced if it exists.')
    parser.add_argument('--tag', required=True, help='Registered name.tag of the release, e.g. transfer_tiny.ferplus.')
    parser.add_argument('--hf-hub-id', required=True, help='Hub model repo that the tag loads from.')
    parser.add_argument('--ablation', type=Path, default=None,
                        help='JSON file with the MAD/MSAD ablation: a list of {"mad_p", "msad_p", "accuracy", '
                             '"mean_class_accuracy", "command"} records.')
    parser.add_argument('--notes', type=Path, default=None, help='Markdown file appended to the card as "Notes".')
    return parser.parse_args(argv)


def ablation_section(records) -> str:
    lines = ['| MAD p | MSAD p | accuracy | mean class accuracy |', '| --- | --- | --- | --- |']
    for r in records:
        lines.append(f"| {r['mad_p']} | {r['msad_p']} | {100 * r['accuracy']:.2f}% | "
                     f"{100 * r['mean_class_accuracy']:.2f}% |")
    commands = sorted({r['command'] for r in records if r.get('command')})
    text = '\n'.join(lines)
    if records and records[0].get('description'):
        text = records[0]['description'] + '\n\n' + text
    if commands:
        text += '\n\nCommands:\n\n```bash\n' + '\n'.join(commands) + '\n```'
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s: %(message)s')
    export = args.run_dir / 'export'
    results = json.loads((args.run_dir / 'results.json').read_text())
    metrics = results['validation']
    config = json.loads((export / 'config.json').read_text())
    architecture = config['architecture']
    card_source = (export / 'README.md').read_text()

    def section(title):
        marker = f'## {title}\n\n'
        if marker not in card_source:
            return None
        rest = card_source.split(marker, 1)[1]
        return rest.split('\n## ', 1)[0].strip()

    extra = {}
    for title in ('Data', 'Validation history'):
        text = section(title)
        if text:
            extra[title] = text
    if args.ablation is not None:
        extra['Ablation: MAD and MSAD'] = ablation_section(json.loads(args.ablation.read_text()))
    extra['Licence'] = LICENCE_NOTES
    extra['Intended use and limits'] = INTENDED_USE
    if args.notes is not None:
        extra['Notes'] = args.notes.read_text().strip()
    run = section('Training run') or ''
    command = run.split('```bash\n', 1)[1].split('\n```', 1)[0] if '```bash\n' in run else None
    hardware = None
    for line in run.splitlines():
        if line.startswith('Hardware: '):
            hardware = line[len('Hardware: '):].rstrip('.')

    card = render_model_card(
        args.tag, metrics, config['pretrained_cfg']['label_names'], eval_split='FER2013Valid (majority vote)',
        command=command, hardware=hardware, wall_time_s=results.get('wall_time_s'), extra_sections=extra,
    )
    load_lines = (
        "model = timm.create_model('local-dir:PATH_TO_THIS_FOLDER', pretrained=True).eval()"
    )
    card = card.replace(load_lines, f"model = timm.create_model('{args.tag}', pretrained=True).eval()\n"
                                    f"# or timm.create_model('hf-hub:{args.hf_hub_id}', pretrained=True)")
    card = card.replace(f'# {args.tag}\n', f'# {args.tag}\n\n`{architecture}` trained on FER+ with the '
                                           f'example script of transfer-timm; Hub repo `{args.hf_hub_id}`.\n', 1)

    if args.release_dir.exists():
        shutil.rmtree(args.release_dir)
    args.release_dir.mkdir(parents=True)
    for name in ('model.safetensors', 'config.json', 'confusion_matrix.png', 'metrics.json'):
        shutil.copyfile(export / name, args.release_dir / name)
    (args.release_dir / 'README.md').write_text(card, encoding='utf-8')
    validate_release(args.release_dir)
    model = timm.create_model(f'local-dir:{args.release_dir}', pretrained=True)
    _logger.info('Release %s written (%s, %.2f M parameters).', args.release_dir, architecture,
                 sum(p.numel() for p in model.parameters()) / 1e6)
    return 0


if __name__ == '__main__':
    sys.exit(main())
