"""Export folders that timm loads with ``local-dir:`` and that match a Hub model repo.

An export folder contains ``model.safetensors``, ``config.json`` (timm's format: the
architecture, model arguments and pretrained cfg with ``label_names``), ``README.md``
(a model card with Hub front matter) and ``confusion_matrix.png``.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from PIL import Image, ImageDraw, ImageFont
from timm.models._hub import save_config_for_hf

from .checkpoint import atomic_replace_dir, atomic_save_safetensors

__all__ = ['export_model', 'render_confusion_matrix', 'render_model_card']


def render_confusion_matrix(
        matrix: Sequence[Sequence[int]],
        label_names: Sequence[str],
        path: Union[str, os.PathLike],
        title: str = 'Confusion matrix (rows: true label, columns: prediction)',
) -> None:
    """Draw a row-normalised confusion matrix with counts as a PNG, using PIL only."""
    n = len(label_names)
    cell, left, top = 64, 110, 60
    width, height = left + n * cell + 20, top + n * cell + 100
    img = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((10, 10), title, fill='black', font=font)
    for i in range(n):
        row_total = sum(matrix[i]) or 1
        for j in range(n):
            share = matrix[i][j] / row_total
            shade = int(255 * (1.0 - share))
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(shade, shade, 255), outline='grey')
            text_colour = 'white' if share > 0.5 else 'black'
            draw.text((x0 + 6, y0 + 18), f'{matrix[i][j]}', fill=text_colour, font=font)
            draw.text((x0 + 6, y0 + 36), f'{100 * share:.0f}%', fill=text_colour, font=font)
        draw.text((8, top + i * cell + 26), label_names[i][:14], fill='black', font=font)
    for j in range(n):
        draw.text((left + j * cell + 4, top + n * cell + 8), label_names[j][:9], fill='black', font=font)
    draw.text((left, top + n * cell + 40), 'prediction', fill='black', font=font)
    img.save(path)


def _metrics_table(metrics: Dict, label_names: Sequence[str]) -> List[str]:
    lines = [
        f"| accuracy | {100 * metrics['accuracy']:.2f}% |",
        f"| mean class accuracy | {100 * metrics['mean_class_accuracy']:.2f}% |",
        f"| images | {metrics['n']} |",
    ]
    recall = metrics.get('per_class_recall', {})
    lines += ['', '| class | recall |', '| --- | --- |']
    for name in label_names:
        value = recall.get(name)
        lines.append(f'| {name} | {"n/a" if value is None else f"{100 * value:.2f}%"} |')
    return ['| metric | value |', '| --- | --- |'] + lines


def render_model_card(
        model_name: str,
        metrics: Optional[Dict],
        label_names: Sequence[str],
        eval_split: str = 'FER2013Valid',
        dataset_id: str = 'ferplus',
        command: Optional[str] = None,
        hardware: Optional[str] = None,
        wall_time_s: Optional[float] = None,
        extra_sections: Optional[Dict[str, str]] = None,
) -> str:
    """Return a Markdown model card with Hub front matter for an exported model."""
    front = [
        '---',
        'library_name: timm',
        'license: mit',
        'pipeline_tag: image-classification',
        'tags:',
        '- image-classification',
        '- timm',
        '- transfer_timm',
        '- facial-expression-recognition',
        'datasets:',
        f'- {dataset_id}',
        'metrics:',
        '- accuracy',
        '---',
    ]
    body = [
        f'# {model_name}',
        '',
        'Facial expression recognition model from transfer-timm, '
        'a TransFER implementation (Xue, Wang and Guo, ICCV 2021, arXiv 2108.11116) for timm.',
        '',
        f'Classes, in output order: {", ".join(label_names)}.',
        '',
        '## How to load',
        '',
        '```python',
        'import timm',
        'import transfer_timm  # registers the architecture with timm; import it first',
        '',
        "model = timm.create_model('local-dir:PATH_TO_THIS_FOLDER', pretrained=True).eval()",
        'data_config = timm.data.resolve_data_config(model=model)',
        '```',
        '',
    ]
    if metrics is not None:
        body += [f'## Metrics on {eval_split}', ''] + _metrics_table(metrics, label_names) + [
            '', '![Confusion matrix](confusion_matrix.png)', '',
        ]
    run = []
    if command:
        run += ['Command:', '', '```bash', command, '```', '']
    if hardware:
        run.append(f'Hardware: {hardware}.')
    if wall_time_s is not None:
        run.append(f'Wall time: {wall_time_s / 60:.1f} min.')
    if run:
        body += ['## Training run', ''] + run + ['']
    for title, text in (extra_sections or {}).items():
        body += [f'## {title}', '', text.rstrip(), '']
    return '\n'.join(front + [''] + body)


def export_model(
        model: torch.nn.Module,
        out_dir: Union[str, os.PathLike],
        label_names: Sequence[str],
        metrics: Optional[Dict] = None,
        card: Optional[str] = None,
        extra_files: Optional[Dict[str, Union[str, os.PathLike]]] = None,
        **card_kwargs,
) -> Path:
    """Write an export folder for ``model`` atomically and return its path.

    Args:
        model: A timm model created by ``timm.create_model``.
        out_dir: Destination; an existing folder is replaced only once the new one is complete.
        label_names: Class names in output order, stored in the pretrained cfg.
        metrics: Output of :func:`~transfer_timm.training.metrics.metrics_from_confusion`;
            adds the metrics table and the confusion-matrix PNG.
        card: A ready model card; if None one is rendered from ``card_kwargs``.
        extra_files: Files copied into the folder under the given names.
    """
    out_dir = Path(out_dir)
    if len(label_names) != getattr(model, 'num_classes', len(label_names)):
        raise ValueError(f'{len(label_names)} label names for a model with {model.num_classes} classes.')
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp creates 0700
    try:
        atomic_save_safetensors(tmp_dir / 'model.safetensors', model.state_dict())
        model_config = {'pretrained_cfg': {'label_names': list(label_names)}}
        save_config_for_hf(model, str(tmp_dir / 'config.json'), model_config=model_config)
        if metrics is not None:
            render_confusion_matrix(metrics['confusion_matrix'], label_names, tmp_dir / 'confusion_matrix.png')
            (tmp_dir / 'metrics.json').write_text(json.dumps(metrics, indent=2) + '\n', encoding='utf-8')
        if card is None:
            model_name = card_kwargs.pop('model_name', model.pretrained_cfg.get('architecture', type(model).__name__))
            card = render_model_card(model_name, metrics, label_names, **card_kwargs)
        (tmp_dir / 'README.md').write_text(card, encoding='utf-8')
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp_dir / name)
        atomic_replace_dir(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    return out_dir
