"""FER+ style datasets from any source: Microsoft's folders, the CSV pair, or ``datasets``.

:func:`load_image_dataset` reads a Hub dataset id, parquet or arrow files, or an
imagefolder tree with ``datasets.load_dataset`` and maps its labels to the model's label
names by name. :func:`load_fer_dataset` picks the right reader for a source. Every
reader returns the features of :func:`~transfer_timm.data.ferplus.ferplus_features`.
"""
import logging
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

import datasets
from datasets.fingerprint import Hasher

from .fer2013_csv import csv_pair_roles, load_fer2013_csv
from .ferplus import (
    FERPLUS_CLASSES, FERPLUS_VOTE_NAMES, LABEL_MODES, SPLIT_FOLDERS, DataError, SkippedRecords, check_image_bytes,
    ferplus_features, load_ferplus, load_ferplus_split, read_image_bytes, votes_to_target,
)

_logger = logging.getLogger(__name__)

__all__ = ['LABEL_ALIASES', 'canonical_label_name', 'load_fer_dataset', 'load_image_dataset', 'reorder_labels']

# Other common spellings of the FER+ class names, matched after lower-casing.
LABEL_ALIASES = {
    'happy': 'happiness',
    'angry': 'anger',
    'sad': 'sadness',
    'surprised': 'surprise',
    'disgusted': 'disgust',
    'fearful': 'fear',
    'contemptuous': 'contempt',
}
# datasets.load_dataset builders for single files given by path.
_FILE_BUILDERS = {'.parquet': 'parquet', '.arrow': 'arrow'}
# Column arguments of load_image_dataset and their defaults. load_fer_dataset accepts them
# for the local FER+ layouts only at these values, because those layouts have fixed columns.
_COLUMN_DEFAULTS = {'image_column': 'image', 'label_column': 'label', 'votes_column': 'votes'}
_CONVERT_BATCH_SIZE = 256

PathLike = Union[str, os.PathLike]


def canonical_label_name(name: str) -> str:
    """Return the FER+ spelling of a class name: lower case, with :data:`LABEL_ALIASES` applied."""
    key = str(name).strip().lower()
    return LABEL_ALIASES.get(key, key)


def _ferplus_order(label_names: Sequence[str]) -> np.ndarray:
    """Return the FER+ class index of each of ``label_names``, which must name each FER+ class once."""
    canonical = [canonical_label_name(name) for name in label_names]
    if sorted(canonical) != sorted(FERPLUS_CLASSES):
        raise ValueError(
            f'label_names must name each of the {len(FERPLUS_CLASSES)} FER+ classes {list(FERPLUS_CLASSES)} once, '
            f'in any order; got {list(label_names)}.'
        )
    return np.array([FERPLUS_CLASSES.index(name) for name in canonical])


def _unknown_label_error(where: str, column: str, value, label_names: Sequence[str]) -> DataError:
    aliases = ', '.join(f'{alias!r}' for alias in LABEL_ALIASES)
    return DataError(
        f'{where}: label {value!r} in column {column!r} matches none of the label names {list(label_names)} '
        f'(case-insensitive; aliases {aliases} are accepted). Remove those rows or rename the label first.'
    )


def _label_lookup(
        dataset: datasets.Dataset, column: str, label_names: Sequence[str], where: str,
) -> Callable[[object], Optional[int]]:
    """Return a function from a raw label value to its FER+ class index, or None for a missing label.

    Labels are matched by name: a ClassLabel through its names, strings directly.
    Every name is checked here, so that an unknown name fails before any row is converted.
    """
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        by_id = {}
        for class_id in range(feature.num_classes):
            name = feature.int2str(class_id)
            canonical = canonical_label_name(name)
            if canonical not in FERPLUS_CLASSES:
                raise _unknown_label_error(where, column, name, label_names)
            by_id[class_id] = FERPLUS_CLASSES.index(canonical)
        # ClassLabel stores -1 (or None) for a missing label.
        return lambda value: None if value is None or value < 0 else by_id[value]

    if isinstance(feature, datasets.Value) and feature.dtype in ('string', 'large_string'):
        by_name = {}
        for name in dataset.unique(column):
            if name is None:
                continue
            canonical = canonical_label_name(name)
            if canonical not in FERPLUS_CLASSES:
                raise _unknown_label_error(where, column, name, label_names)
            by_name[name] = FERPLUS_CLASSES.index(canonical)
        return lambda value: None if value is None else by_name[value]

    raise DataError(
        f'{where}: column {column!r} has type {feature}, which carries no class names. Labels are matched by '
        f'name, never by index, so cast the column to datasets.ClassLabel(names=[...]) or store the names as strings.'
    )


def _check_votes(value, where: str) -> List[int]:
    if value is None or len(value) != len(FERPLUS_VOTE_NAMES):
        found = 'none' if value is None else len(value)
        raise DataError(
            f'{where}: expected {len(FERPLUS_VOTE_NAMES)} vote counts ({", ".join(FERPLUS_VOTE_NAMES)}), found {found}.'
        )
    votes = []
    for name, count in zip(FERPLUS_VOTE_NAMES, value):
        try:
            valid = count is not None and int(count) == count and count >= 0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise DataError(f'{where}: vote count for {name!r} is {count!r}, not a non-negative integer.')
        votes.append(int(count))
    return votes


def _image_name(path: Optional[str], root: Optional[Path]) -> str:
    """Return an image path relative to the local source folder when it lies inside it."""
    if not path:
        return ''
    if root is not None:
        try:
            return Path(path).resolve().relative_to(root).as_posix()
        except ValueError:
            pass
    return path


def _load_source(
        source: Union[PathLike, Sequence[PathLike]], split: Optional[str], data_files, load_kwargs: Dict,
) -> Tuple[Union[datasets.Dataset, datasets.DatasetDict], Optional[Path]]:
    """Call ``datasets.load_dataset`` for ``source``; return the result and the local root folder, if any."""
    if data_files is None and isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        suffixes = {p.suffix.lower() for p in paths}
        if len(suffixes) != 1 or next(iter(suffixes)) not in _FILE_BUILDERS:
            raise DataError(
                f'Files {[str(p) for p in paths]} must all be {" or ".join(sorted(_FILE_BUILDERS))} files of one type.'
            )
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f'Data files not found: {missing}.')
        builder = _FILE_BUILDERS[suffixes.pop()]
        return datasets.load_dataset(builder, data_files=[str(p) for p in paths], split=split, **load_kwargs), None

    if data_files is None:
        path = Path(source).expanduser()
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f'{path}: unsupported file type {path.suffix!r}. Pass a parquet or arrow file, a folder that '
                    f'datasets.load_dataset reads (parquet files, imagefolder), or a Hub dataset id.'
                )
            return datasets.load_dataset(builder, data_files=str(path), split=split, **load_kwargs), None
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split, **load_kwargs), path.resolve()
        text = str(source)
        if text.startswith(('/', '.', '~')) or text.count('/') > 1 or os.sep != '/' and os.sep in text:
            raise DataError(f'{source}: file or folder not found (and not a Hub dataset id of the form owner/name).')
    return datasets.load_dataset(str(source), data_files=data_files, split=split, **load_kwargs), None


def load_image_dataset(
        source: Union[PathLike, Sequence[PathLike]],
        image_column: str = 'image',
        label_column: str = 'label',
        label_names: Sequence[str] = FERPLUS_CLASSES,
        split: Optional[str] = None,
        *,
        votes_column: Optional[str] = 'votes',
        label_mode: str = 'majority',
        skip_bad: bool = False,
        max_samples: Optional[int] = None,
        data_files=None,
        **load_kwargs,
) -> Union[datasets.Dataset, datasets.DatasetDict]:
    """Load an image classification dataset with ``datasets.load_dataset`` as FER+ records.

    Args:
        source: Hub dataset id, a local folder that ``load_dataset`` reads (parquet files,
            imagefolder class folders), a parquet or arrow file or a list of them, or a
            builder name such as ``'parquet'`` together with ``data_files``.
        image_column: Column with the images (an Image feature, image bytes or paths).
        label_column: Column with the class of each image, a ClassLabel or a string.
            Labels are matched to ``label_names`` by name (case-insensitive, with
            :data:`LABEL_ALIASES`), never by index, so the alphabetical class order of
            imagefolder does no harm. Integer labels without names raise :class:`DataError`.
        label_names: The model's class names, one for each FER+ class in any order. The
            result's ``label`` and ``soft_label`` follow this order.
        split: Load only this split and return a ``Dataset``; by default all splits
            are returned as a ``DatasetDict``.
        votes_column: Column with the 10 FER+ vote counts, if the source has one. With
            votes, ``label`` and ``soft_label`` are recomputed from them with
            ``label_mode``, as for Microsoft's files, and rows without a target are
            dropped. Without votes, each image gets 10 votes for its label, so its
            target is one-hot in every label mode. Stored ``soft_label`` columns are
            not read.
        label_mode: One of :data:`~transfer_timm.data.ferplus.LABEL_MODES`.
        skip_bad: Skip rows with a missing or unreadable image, a missing label or
            malformed votes and count them in the log, instead of raising :class:`DataError`.
        max_samples: Keep only the first N usable rows of each split.
        data_files: Passed to ``load_dataset`` with a builder name as ``source``.
        **load_kwargs: Further ``load_dataset`` arguments (``revision``, ``token``, ``cache_dir``, ...).

    The error for a bad row names the source, split, row index and image path. When a
    source has both votes and labels, labels that disagree with the votes are counted
    in a warning, and the votes win.
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f'Unknown label mode {label_mode!r}; use one of {LABEL_MODES}.')
    _ferplus_order(label_names)
    loaded, root = _load_source(source, split, data_files, load_kwargs)
    if isinstance(loaded, datasets.DatasetDict):
        return datasets.DatasetDict({
            name: _convert_split(
                ds, f'{source} [{name}]', root, image_column, label_column, votes_column, label_names, label_mode,
                skip_bad, max_samples,
            )
            for name, ds in loaded.items()
        })
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(
            f'{source}: datasets.load_dataset returned {type(loaded).__name__}, but streaming is not supported.'
        )
    return _convert_split(
        loaded, f'{source} [{split}]', root, image_column, label_column, votes_column, label_names, label_mode,
        skip_bad, max_samples,
    )


def _convert_split(
        ds: datasets.Dataset,
        where: str,
        root: Optional[Path],
        image_column: str,
        label_column: str,
        votes_column: Optional[str],
        label_names: Sequence[str],
        label_mode: str,
        skip_bad: bool,
        max_samples: Optional[int],
) -> datasets.Dataset:
    """Convert one split of a ``load_dataset`` result into FER+ records (see :func:`load_image_dataset`)."""
    columns = ds.column_names
    if image_column not in columns:
        raise DataError(f'{where}: image column {image_column!r} not found; available columns: {columns}.')
    has_votes = votes_column is not None and votes_column in columns
    has_label = label_column in columns
    if not has_label and not has_votes:
        raise DataError(
            f'{where}: label column {label_column!r} not found; available columns: {columns}. '
            f'Pass label_column with the name of the class column.'
        )
    order = _ferplus_order(label_names)
    position = np.argsort(order)  # position[k] is where FER+ class k sits in label_names
    lookup = _label_lookup(ds, label_column, label_names, where) if has_label else None
    try:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    except (TypeError, ValueError) as e:
        raise DataError(f'{where}: column {image_column!r} does not hold images ({e}).') from None
    has_file_name = 'file_name' in columns and image_column != 'file_name'

    skipped = SkippedRecords(where)
    counts = {'kept': 0, 'dropped': 0, 'disagree': 0}

    def convert_row(batch: Dict[str, list], offset: int, index: int) -> Optional[Dict]:
        image = batch[image_column][offset]
        path = (image or {}).get('path')
        data = (image or {}).get('bytes')
        row_where = f'{where}, row {index}' + (f' ({path})' if path else '')
        if data is None:
            if not path:
                raise DataError(f'{row_where}: no image.')
            try:
                data = read_image_bytes(Path(path), listed_in=where)
            except DataError as e:
                # The message of e starts with the path.
                raise DataError(f'{where}, row {index}: {e}') from None
        else:
            check_image_bytes(data, row_where)

        source_label = lookup(batch[label_column][offset]) if has_label else None
        if has_votes:
            votes = _check_votes(batch[votes_column][offset], row_where)
        elif source_label is None:
            raise DataError(f'{row_where}: label is missing.')
        else:
            votes = [0] * len(FERPLUS_VOTE_NAMES)
            votes[source_label] = 10

        target = votes_to_target(votes, label_mode)
        if target is None:
            return None
        ferplus_label = int(np.argmax(target))
        if source_label is not None and source_label != ferplus_label:
            counts['disagree'] += 1
        name = batch['file_name'][offset] if has_file_name else _image_name(path, root)
        return {
            'image': {'bytes': data, 'path': Path(path).name if path else None},
            'votes': votes,
            'label': int(position[ferplus_label]),
            'soft_label': target[order].tolist(),
            'file_name': name or '',
        }

    def convert_batch(batch: Dict[str, list], indices: List[int]) -> Dict[str, list]:
        out = {key: [] for key in ('image', 'votes', 'label', 'soft_label', 'file_name')}
        for offset, index in enumerate(indices):
            if max_samples is not None and counts['kept'] >= max_samples:
                break
            try:
                record = convert_row(batch, offset, index)
            except DataError as e:
                if not skip_bad:
                    raise
                skipped.skip(e)
                continue
            if record is None:
                counts['dropped'] += 1
                continue
            counts['kept'] += 1
            for key, value in record.items():
                out[key].append(value)
        return out

    # An explicit fingerprint spares datasets from hashing the closure, and
    # load_from_cache_file=False makes every call run convert_batch, so that errors and counts are real.
    fingerprint = Hasher.hash((
        ds._fingerprint, image_column, label_column, votes_column, list(label_names), label_mode, skip_bad,
        max_samples, 'transfer_timm.data.sources/1',
    ))
    result = ds.map(
        convert_batch,
        batched=True,
        batch_size=_CONVERT_BATCH_SIZE,
        with_indices=True,
        remove_columns=columns,
        features=ferplus_features(label_names),
        load_from_cache_file=False,
        new_fingerprint=fingerprint,
        desc=f'Reading {where}',
    )
    skipped.log_summary()
    if counts['disagree']:
        _logger.warning(
            '%s: %d labels in column %r differ from the %s label of the votes in column %r; the votes were used.',
            where, counts['disagree'], label_column, label_mode, votes_column,
        )
    _logger.info(
        '%s: %d images kept, %d without a %s label, %d bad records skipped.',
        where, counts['kept'], counts['dropped'], label_mode, skipped.count,
    )
    result.info.description = f'{where}, label mode {label_mode}'
    return result


def reorder_labels(dataset: datasets.Dataset, label_names: Sequence[str]) -> datasets.Dataset:
    """Return a FER+ dataset with ``label`` and ``soft_label`` in the order of ``label_names``.

    ``label_names`` must name each FER+ class once; the dataset's own names are matched by name.
    """
    current = dataset.features['label'].names
    if list(current) == list(label_names):
        return dataset
    source_order = _ferplus_order(current)
    target_order = _ferplus_order(label_names)
    # Column j of the result is the source column that contains the same FER+ class.
    take = np.argsort(source_order)[target_order]
    position = np.argsort(take)

    def reorder(batch: Dict[str, list]) -> Dict[str, list]:
        batch['label'] = [int(position[label]) for label in batch['label']]
        batch['soft_label'] = [np.asarray(soft)[take].tolist() for soft in batch['soft_label']]
        return batch

    return dataset.map(
        reorder, batched=True, features=ferplus_features(label_names), load_from_cache_file=False,
        new_fingerprint=Hasher.hash((dataset._fingerprint, list(label_names), 'reorder_labels')),
        desc='Reordering labels',
    )


def _local_layout(source) -> Optional[Tuple[str, object]]:
    """Classify a local FER+ source: ``('split_folder', path)``, ``('folders', path)``,
    ``('csv_pair', (fer2013_csv, ferplus_csv))``, or None for anything else."""
    if isinstance(source, (list, tuple)):
        if not all(Path(p).suffix.lower() == '.csv' for p in source):
            return None
        missing = [str(p) for p in source if not Path(p).is_file()]
        if missing:
            raise DataError(f'CSV files not found: {missing}.')
        pair = csv_pair_roles(*source) if len(source) == 2 else None
        if pair is None:
            raise DataError(
                f'{[str(p) for p in source]} is not the FER+ CSV pair: expected fer2013.csv (with a pixels column) '
                f'and fer2013new.csv (with an Image name column).'
            )
        return 'csv_pair', pair
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    if (path / 'label.csv').is_file():
        return 'split_folder', path
    if any((path / folder / 'label.csv').is_file() for folder in SPLIT_FOLDERS.values()):
        return 'folders', path
    if (path / 'fer2013.csv').is_file() and (path / 'fer2013new.csv').is_file():
        return 'csv_pair', (path / 'fer2013.csv', path / 'fer2013new.csv')
    return None


def load_fer_dataset(
        source: Union[PathLike, Sequence[PathLike], None] = None,
        *,
        fer2013_csv: Optional[PathLike] = None,
        ferplus_csv: Optional[PathLike] = None,
        label_mode: str = 'majority',
        split: Optional[str] = None,
        label_names: Sequence[str] = FERPLUS_CLASSES,
        skip_bad: bool = False,
        max_samples: Optional[int] = None,
        **dataset_kwargs,
) -> Union[datasets.Dataset, datasets.DatasetDict]:
    """Load FER+ style data from any supported source with the same features and label modes.

    The reader is chosen from ``source``:

    * a folder holding ``FER2013Train``, ``FER2013Valid`` or ``FER2013Test`` (each with
      ``label.csv``): Microsoft's layout, :func:`~transfer_timm.data.ferplus.load_ferplus`;
    * a single split folder with ``label.csv``:
      :func:`~transfer_timm.data.ferplus.load_ferplus_split`, keyed by its standard
      split name, or ``train`` for another folder name;
    * ``fer2013_csv`` and ``ferplus_csv``, a list of those two files in either order, or a
      folder holding ``fer2013.csv`` and ``fer2013new.csv``:
      :func:`~transfer_timm.data.fer2013_csv.load_fer2013_csv`;
    * anything else: :func:`load_image_dataset` (Hub id, parquet files, imagefolder),
      which also takes ``dataset_kwargs`` such as ``image_column`` and ``label_column``.

    Args:
        label_mode: One of :data:`~transfer_timm.data.ferplus.LABEL_MODES`, applied to
            the votes of every source that has them.
        split: Load only this split and return a ``Dataset``; by default all splits are
            returned as a ``DatasetDict``.
        label_names: The model's class names, each FER+ class once in any order.
        skip_bad: Skip bad rows and images and count them in the log instead of raising
            :class:`DataError`.
        max_samples: Keep only the first N usable images of each split.
    """
    if (fer2013_csv is None) != (ferplus_csv is None):
        raise ValueError('fer2013_csv and ferplus_csv must be given together.')
    if fer2013_csv is not None:
        if source is not None:
            raise ValueError('Pass either source or fer2013_csv and ferplus_csv, not both.')
        layout = ('csv_pair', (Path(fer2013_csv), Path(ferplus_csv)))
    elif source is None:
        raise ValueError('No data source given: pass source, or fer2013_csv and ferplus_csv.')
    else:
        layout = _local_layout(source)

    if layout is None:
        return load_image_dataset(
            source, label_names=label_names, split=split, label_mode=label_mode, skip_bad=skip_bad,
            max_samples=max_samples, **dataset_kwargs,
        )

    kind, where = layout
    unused = {key: value for key, value in dataset_kwargs.items() if _COLUMN_DEFAULTS.get(key, object()) != value}
    if unused:
        raise ValueError(
            f'{sorted(unused)} only apply to datasets.load_dataset sources, but {where} is a local FER+ {kind}.'
        )
    _ferplus_order(label_names)
    if split is not None and split not in SPLIT_FOLDERS:
        raise ValueError(f'Unknown split {split!r}; use one of {sorted(SPLIT_FOLDERS)}.')
    splits = [split] if split is not None else None
    caps = {name: max_samples for name in SPLIT_FOLDERS} if max_samples is not None else None

    if kind == 'split_folder':
        folder_splits = {folder: name for name, folder in SPLIT_FOLDERS.items()}
        name = folder_splits.get(where.name, 'train')
        if split is not None and split != name:
            raise DataError(f'{where}: this split folder contains the {name!r} split, not {split!r}.')
        loaded = datasets.DatasetDict({
            name: load_ferplus_split(where, label_mode, skip_bad=skip_bad, max_samples=max_samples),
        })
    elif kind == 'folders':
        loaded = load_ferplus(where, label_mode, splits=splits, skip_bad=skip_bad, max_samples=caps)
    else:
        fer2013, ferplus = where
        loaded = load_fer2013_csv(fer2013, ferplus, label_mode, splits=splits, skip_bad=skip_bad, max_samples=caps)

    loaded = datasets.DatasetDict({name: reorder_labels(ds, label_names) for name, ds in loaded.items()})
    return loaded[split] if split is not None else loaded
