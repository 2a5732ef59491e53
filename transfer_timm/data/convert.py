"""Convert FER+ to parquet files that ``datasets.load_dataset`` reads back, and push them to the Hub.

The output folder gets one parquet file per split under ``data/`` and a dataset card
(``README.md``) whose YAML header lists the files per split. Both
``load_dataset(output_dir)`` and ``load_dataset('parquet', data_files=...)`` return the
features of :func:`~transfer_timm.data.ferplus.ferplus_features`, since ``to_parquet``
stores them in the parquet schema.
"""
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import yaml

import datasets

from .ferplus import FERPLUS_VOTE_NAMES, LABEL_MODES
from .sources import load_fer_dataset

_logger = logging.getLogger(__name__)

__all__ = [
    'convert_ferplus', 'dataset_card', 'push_to_hub', 'write_parquet',
]

_DATA_DIR = 'data'
_CARD_NAME = 'README.md'
_LABEL_MODE_TEXT = {
    'majority': 'one-hot on the emotion that has more than half of the votes',
    'probability': (
        'the vote shares of the top emotions that together cover 75% of the votes (at most 3); '
        'training draws a one-hot target from them'
    ),
    'crossentropy': 'the vote shares of the top emotions that together cover 75% of the votes (at most 3)',
    'multi_target': 'the vote shares of every emotion with at least 30% of the votes',
}

PathLike = Union[str, os.PathLike]


def _parquet_name(split: str) -> str:
    # The "<split>-00000-of-00001" pattern is the one that datasets recognises without a card.
    return f'{_DATA_DIR}/{split}-00000-of-00001.parquet'


def dataset_card(
        dataset_dict: datasets.DatasetDict, label_mode: str, source_description: str, list_files: bool = True,
) -> str:
    """Return the text of a dataset card (``README.md``) for converted FER+ data.

    With ``list_files`` the YAML header maps each split to its parquet file. Leave it off
    for a Hub push, where ``push_to_hub`` writes its own file list into the card.
    """
    metadata: Dict = {
        'pretty_name': f'FER+ ({label_mode} labels)',
        'task_categories': ['image-classification'],
        'tags': ['facial-expression-recognition', 'ferplus'],
    }
    if list_files:
        metadata['configs'] = [{
            'config_name': 'default',
            'data_files': [{'split': split, 'path': _parquet_name(split)} for split in dataset_dict],
        }]
    class_names = dataset_dict[next(iter(dataset_dict))].features['label'].names
    rows = '\n'.join(f'| {split} | {len(ds):,} |' for split, ds in dataset_dict.items())
    return f'''---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# FER+ ({label_mode} labels)

Faces with labels in the format of FER+, converted with `transfer-fer convert` from
{source_description}. FER+ itself is the FER2013 faces (48x48 grayscale) with the
crowd-sourced labels of Barsoum et al., "Training Deep Networks for Facial Expression
Recognition with Crowd-Sourced Label Distribution" (ICMI 2016, arXiv:1608.01041).

| split | images |
|---|---|
{rows}

## Columns

- `image`: the face image (PNG for FER+).
- `votes`: the 10 annotator vote counts, in the order {", ".join(FERPLUS_VOTE_NAMES)} (NF: not a face).
  A source without votes gets 10 votes for its label.
- `label`: class index into {class_names}.
- `soft_label`: target distribution over the same classes.
- `file_name`: the image's file name in the source.

## Labels

`label` and `soft_label` follow the `{label_mode}` label mode: {_LABEL_MODE_TEXT[label_mode]}.
Emotions with a single vote count as outliers and are removed first. An image is left
out when its top result is "unknown" or "not a face", or when the emotions that the mode
keeps hold half of the votes or less. The `votes` column allows other label modes to be
computed again, but only for the images kept here.

## Loading

```python
from datasets import load_dataset
ds = load_dataset("path/to/this/folder/or/hub/id")
```

## Terms

The images come from the FER2013 data set of the ICML 2013 "Challenges in Representation
Learning" facial expression recognition challenge, and the votes from Microsoft's FER+
label files. Check the terms of both before you publish a copy.
'''


def write_parquet(
        dataset_dict: datasets.DatasetDict,
        output_dir: PathLike,
        label_mode: str,
        source_description: str,
        overwrite: bool = False,
) -> Dict[str, Path]:
    """Write each split to ``output_dir/data/<split>-00000-of-00001.parquet`` plus a dataset card.

    Existing parquet files under ``output_dir/data`` or an existing card raise
    ``FileExistsError`` unless ``overwrite`` is set, in which case they are deleted
    first, so that no split of an earlier run is mixed in. Returns the path of each split's file.
    """
    output_dir = Path(output_dir)
    card_path = output_dir / _CARD_NAME
    stale = sorted((output_dir / _DATA_DIR).glob('*.parquet')) + ([card_path] if card_path.exists() else [])
    if stale and not overwrite:
        raise FileExistsError(
            f'{output_dir} already contains converted data ({", ".join(str(p) for p in stale)}); '
            f'choose an empty folder or pass overwrite=True (--overwrite).'
        )
    for path in stale:
        path.unlink()
    (output_dir / _DATA_DIR).mkdir(parents=True, exist_ok=True)

    paths = {}
    for split, ds in dataset_dict.items():
        path = output_dir / _parquet_name(split)
        ds.to_parquet(str(path))
        paths[split] = path
        _logger.info('Wrote %d %s images to %s.', len(ds), split, path)
    card_path.write_text(dataset_card(dataset_dict, label_mode, source_description), encoding='utf-8')
    return paths


def push_to_hub(
        dataset_dict: datasets.DatasetDict,
        repo_id: str,
        token: Optional[str] = None,
        private: Optional[bool] = None,
        card_text: Optional[str] = None,
) -> None:
    """Upload converted FER+ to the Hub dataset repository ``repo_id``.

    With ``card_text``, the repository is created if needed and the card is uploaded
    first. ``DatasetDict.push_to_hub`` then adds its file list and features to that card
    and keeps its text. ``token`` falls back to ``HF_TOKEN`` or the saved login.
    """
    if card_text is not None:
        from huggingface_hub import HfApi
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type='dataset', private=private, exist_ok=True)
        api.upload_file(
            path_or_fileobj=card_text.encode('utf-8'), path_in_repo=_CARD_NAME, repo_id=repo_id,
            repo_type='dataset', commit_message='Add dataset card',
        )
    dataset_dict.push_to_hub(repo_id, token=token, private=private, commit_message='Upload FER+')
    _logger.info('Pushed splits %s to the Hub dataset %s.', list(dataset_dict), repo_id)


def convert_ferplus(
        source: Union[PathLike, Sequence[PathLike], None] = None,
        output_dir: Optional[PathLike] = None,
        *,
        fer2013_csv: Optional[PathLike] = None,
        ferplus_csv: Optional[PathLike] = None,
        label_mode: str = 'majority',
        splits: Optional[Sequence[str]] = None,
        skip_bad: bool = False,
        max_samples: Optional[int] = None,
        overwrite: bool = False,
        repo_id: Optional[str] = None,
        token: Optional[str] = None,
        private: Optional[bool] = None,
        **dataset_kwargs,
) -> datasets.DatasetDict:
    """Load FER+ from any source that :func:`~transfer_timm.data.sources.load_fer_dataset`
    reads, write it to ``output_dir`` as parquet, and push it to ``repo_id`` if given.

    The label mode decides which images are kept and their ``label`` and
    ``soft_label``. The ``votes`` are stored too, so that other modes can be
    recomputed for the kept images. ``splits`` restricts the splits; by default every
    split of the source is converted. Returns the converted ``DatasetDict``.
    """
    if output_dir is None and repo_id is None:
        raise ValueError('Nothing to do: give output_dir, repo_id or both.')
    if label_mode not in LABEL_MODES:
        raise ValueError(f'Unknown label mode {label_mode!r}; use one of {LABEL_MODES}.')
    load_args = dict(
        fer2013_csv=fer2013_csv, ferplus_csv=ferplus_csv, label_mode=label_mode, skip_bad=skip_bad,
        max_samples=max_samples, **dataset_kwargs,
    )
    if splits is None:
        dataset_dict = load_fer_dataset(source, **load_args)
    else:
        dataset_dict = datasets.DatasetDict({
            split: load_fer_dataset(source, split=split, **load_args) for split in splits
        })
    source_description = _describe_source(source, fer2013_csv, ferplus_csv)

    if output_dir is not None:
        write_parquet(dataset_dict, output_dir, label_mode, source_description, overwrite=overwrite)
    if repo_id is not None:
        card = dataset_card(dataset_dict, label_mode, source_description, list_files=False)
        push_to_hub(dataset_dict, repo_id, token=token, private=private, card_text=card)
    return dataset_dict


def _describe_source(source, fer2013_csv, ferplus_csv) -> str:
    if fer2013_csv is not None:
        return f'`{Path(fer2013_csv).name}` and `{Path(ferplus_csv).name}`'
    if isinstance(source, (list, tuple)):
        return ' and '.join(f'`{Path(p).name}`' for p in source)
    path = Path(source)
    return f'`{path.name}`' if path.exists() else f'`{source}`'
