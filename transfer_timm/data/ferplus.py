"""FER+ as ``datasets`` objects, with the label modes of Barsoum et al.

FER+ (Barsoum, Zhang, Canton Ferrer and Zhang, "Training Deep Networks for Facial
Expression Recognition with Crowd-Sourced Label Distribution", ICMI 2016, arXiv
1608.01041) gives every FER2013 face the votes of 10 annotators over 8 emotions plus
"unknown" and "not a face". This module turns the votes into targets the way the
paper's reference reader does and returns ``datasets.Dataset`` objects with explicit
features.
"""
import csv
import io
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

import datasets

_logger = logging.getLogger(__name__)

__all__ = [
    'FERPLUS_CLASSES', 'FERPLUS_VOTE_NAMES', 'LABEL_MODES', 'SPLIT_FOLDERS', 'DataError',
    'ferplus_features', 'votes_to_target', 'read_label_csv', 'load_ferplus_split', 'load_ferplus',
]

# Number of skipped records that are logged one by one before only the count is kept.
_MAX_LOGGED_SKIPS = 10

# Vote columns of label.csv and fer2013new.csv, in file order.
FERPLUS_VOTE_NAMES = (
    'neutral', 'happiness', 'surprise', 'sadness', 'anger', 'disgust', 'fear', 'contempt', 'unknown', 'NF',
)
# The 8 emotion classes that models predict, in FER+ order.
FERPLUS_CLASSES = FERPLUS_VOTE_NAMES[:8]
LABEL_MODES = ('majority', 'probability', 'crossentropy', 'multi_target')
# Microsoft's folder names for the three splits.
SPLIT_FOLDERS = {'train': 'FER2013Train', 'validation': 'FER2013Valid', 'test': 'FER2013Test'}


class DataError(ValueError):
    """Invalid or unreadable input data; the message names the file, line and fix."""


class SkippedRecords:
    """Counter of bad records that a loader skips with ``skip_bad=True``.

    The first few skips are logged with their error, later ones only counted, and
    :meth:`log_summary` logs the total.
    """

    def __init__(self, source: str):
        self.source = source
        self.count = 0

    def skip(self, error: Exception) -> None:
        self.count += 1
        if self.count <= _MAX_LOGGED_SKIPS:
            _logger.warning('Skipping bad record: %s', error)
        if self.count == _MAX_LOGGED_SKIPS:
            _logger.warning('%s: further skipped records are only counted.', self.source)

    def log_summary(self) -> None:
        if self.count:
            _logger.warning('%s: skipped %d bad records in all.', self.source, self.count)


def ferplus_features(label_names: Sequence[str] = FERPLUS_CLASSES) -> datasets.Features:
    """Return the features of every FER+ dataset that this package builds.

    ``votes`` always contains the 10 FER+ vote counts in :data:`FERPLUS_VOTE_NAMES` order.
    ``label`` and ``soft_label`` follow ``label_names``, which defaults to
    :data:`FERPLUS_CLASSES`.
    """
    return datasets.Features({
        'image': datasets.Image(),
        'votes': datasets.Sequence(datasets.Value('int32'), length=len(FERPLUS_VOTE_NAMES)),
        'label': datasets.ClassLabel(names=list(label_names)),
        'soft_label': datasets.Sequence(datasets.Value('float32'), length=len(label_names)),
        'file_name': datasets.Value('string'),
    })


def votes_to_target(votes: Sequence[float], mode: str = 'majority') -> Optional[np.ndarray]:
    """Turn the 10 vote counts of one image into an 8-way target distribution.

    Follows the reference reader of the FER+ authors:

    * every emotion with a single vote is discarded as an outlier;
    * ``majority``: the top emotion must hold more than half of the remaining votes,
      and the target is one-hot;
    * ``probability`` and ``crossentropy``: the top emotions, taken in order of votes,
      until they cover 75% of the votes (at most 3), must together hold more than half;
      the target is their normalised vote share;
    * ``multi_target``: every emotion with at least 30% of the votes is kept, and they
      must together hold more than half.

    Returns None when the image is dropped: no valid result, or its top result is
    "unknown" or "not a face".
    """
    if mode not in LABEL_MODES:
        raise ValueError(f'Unknown label mode {mode!r}; use one of {LABEL_MODES}.')
    raw = np.asarray(votes, dtype=np.float64).copy()
    if raw.shape != (len(FERPLUS_VOTE_NAMES),):
        raise ValueError(f'Expected {len(FERPLUS_VOTE_NAMES)} vote counts, got {raw.shape}.')
    size = raw.size
    raw[raw < 1.0 + np.finfo(np.float64).eps] = 0.0
    total = raw.sum()
    if total <= 0:
        return None
    emotion = np.zeros(size)

    if mode == 'majority':
        top = raw.max()
        if top > 0.5 * total:
            emotion[int(np.argmax(raw))] = top
        else:
            return None
    elif mode in ('probability', 'crossentropy'):
        covered = 0.0
        count = 0
        valid = True
        while covered < 0.75 * total and count < 3 and valid:
            top = raw.max()
            for i in range(size):
                if raw[i] == top:
                    emotion[i] = top
                    raw[i] = 0.0
                    covered += emotion[i]
                    count += 1
                    if i >= len(FERPLUS_CLASSES):
                        # "unknown" or "not a face" ties with the current maximum.
                        valid = False
                        if emotion.sum() > top:
                            emotion[i] = 0.0
                            count -= 1
                        break
        if emotion.sum() <= 0.5 * total or count > 3:
            return None
    else:  # multi_target
        keep = raw >= 0.3 * total
        emotion[keep] = raw[keep]
        if emotion.sum() <= 0.5 * total:
            return None

    emotion /= emotion.sum()
    if int(np.argmax(emotion)) >= len(FERPLUS_CLASSES):
        return None
    emotion = emotion[:len(FERPLUS_CLASSES)]
    return (emotion / emotion.sum()).astype(np.float32)


def _parse_votes(fields: Sequence[str], where: str) -> List[int]:
    if len(fields) != len(FERPLUS_VOTE_NAMES):
        raise DataError(
            f'{where}: expected {len(FERPLUS_VOTE_NAMES)} vote counts '
            f'({", ".join(FERPLUS_VOTE_NAMES)}), found {len(fields)}.'
        )
    votes = []
    for name, value in zip(FERPLUS_VOTE_NAMES, fields):
        try:
            count = int(value.strip())
        except ValueError:
            raise DataError(f'{where}: vote count for {name!r} is {value!r}, not an integer.') from None
        if count < 0:
            raise DataError(f'{where}: vote count for {name!r} is negative ({count}).')
        votes.append(count)
    return votes


def read_label_csv(path: Union[str, os.PathLike], skip_bad: bool = False) -> List[Tuple[str, List[int]]]:
    """Read a Microsoft ``label.csv``: ``file name, "(left, top, width, height)", 10 votes``.

    Returns ``(file name, votes)`` per row. A malformed row raises :class:`DataError`
    naming the file and line, or with ``skip_bad=True`` is skipped and counted in the log.
    """
    skipped = SkippedRecords(str(path))
    rows = _read_label_rows(Path(path), skipped if skip_bad else None)
    skipped.log_summary()
    return rows


def _read_label_rows(path: Path, skipped: Optional[SkippedRecords]) -> List[Tuple[str, List[int]]]:
    """Read ``label.csv`` rows; malformed rows raise, or go to ``skipped`` when it is given."""
    if not path.is_file():
        raise DataError(f'{path}: label file not found. A FER+ split folder contains label.csv next to its PNGs.')
    rows = []
    with path.open(newline='', encoding='utf-8') as f:
        reader = csv.reader(f)
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                # The csv module cannot resynchronise after a broken record, so this always raises.
                raise DataError(f'{path}, line {reader.line_num}: invalid CSV ({e}).') from None
            except UnicodeDecodeError as e:
                raise DataError(f'{path}: not a UTF-8 text file ({e}).') from None
            line_no = reader.line_num
            if not fields or all(not x.strip() for x in fields):
                continue
            try:
                rows.append(_parse_label_row(fields, f'{path}, line {line_no}'))
            except DataError as e:
                if skipped is None:
                    raise
                skipped.skip(e)
    return rows


def _parse_label_row(fields: Sequence[str], where: str) -> Tuple[str, List[int]]:
    if len(fields) != 2 + len(FERPLUS_VOTE_NAMES):
        raise DataError(
            f'{where}: expected 12 fields (file name, face box, 10 vote counts), found {len(fields)}.'
        )
    name = fields[0].strip()
    if not name:
        raise DataError(f'{where}: empty file name.')
    return name, _parse_votes(fields[2:], where)


def check_image_bytes(data: bytes, where: str) -> None:
    """Decode ``data`` with PIL and raise :class:`DataError` naming ``where`` if that fails."""
    if not data:
        raise DataError(f'{where}: empty file (0 bytes), not an image.')
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except UnidentifiedImageError:
        raise DataError(f'{where}: not a readable image (unknown image format).') from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f'{where}: not a readable image ({e}).') from None


def read_image_bytes(path: Path, listed_in: str = 'label.csv') -> bytes:
    """Read an image file and check that PIL decodes it; raise :class:`DataError` if not.

    ``listed_in`` names the file that refers to the image, for the not-found message.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f'{path}: image listed in {listed_in} not found.') from None
    except OSError as e:
        raise DataError(f'{path}: image could not be read ({e}).') from None
    check_image_bytes(data, str(path))
    return data


def build_dataset(records: Iterable[Dict], description: str) -> datasets.Dataset:
    """Collect FER+ records (dicts with the keys of :func:`ferplus_features`) into a ``Dataset``."""
    columns = {'image': [], 'votes': [], 'label': [], 'soft_label': [], 'file_name': []}
    for record in records:
        for key in columns:
            columns[key].append(record[key])
    ds = datasets.Dataset.from_dict(columns, features=ferplus_features())
    ds.info.description = description
    return ds


def load_ferplus_split(
        split_dir: Union[str, os.PathLike],
        label_mode: str = 'majority',
        skip_bad: bool = False,
        max_samples: Optional[int] = None,
) -> datasets.Dataset:
    """Load one FER+ split folder in Microsoft's layout (``label.csv`` plus PNGs).

    Args:
        split_dir: Folder such as ``FER2013Train``.
        label_mode: One of :data:`LABEL_MODES`; images without a valid target are dropped.
        skip_bad: Skip malformed ``label.csv`` rows and missing or unreadable images and
            count them in the log, instead of raising :class:`DataError`. A ``label.csv``
            that the csv module cannot parse past a broken record still raises.
        max_samples: Keep only the first N usable images (for quick runs).
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f'Unknown label mode {label_mode!r}; use one of {LABEL_MODES}.')
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f'{split_dir}: FER+ split folder not found.')
    skipped = SkippedRecords(str(split_dir))
    rows = _read_label_rows(split_dir / 'label.csv', skipped if skip_bad else None)

    def records():
        n_kept = n_dropped = 0
        for name, votes in rows:
            if max_samples is not None and n_kept >= max_samples:
                break
            target = votes_to_target(votes, label_mode)
            if target is None:
                n_dropped += 1
                continue
            try:
                data = read_image_bytes(split_dir / name)
            except DataError as e:
                if not skip_bad:
                    raise
                skipped.skip(e)
                continue
            n_kept += 1
            yield {
                'image': {'bytes': data, 'path': name},
                'votes': votes,
                'label': int(np.argmax(target)),
                'soft_label': target.tolist(),
                'file_name': name,
            }
        skipped.log_summary()
        _logger.info(
            '%s: %d images kept, %d without a %s label, %d bad records skipped.',
            split_dir, n_kept, n_dropped, label_mode, skipped.count,
        )

    return build_dataset(records(), f'FER+ {split_dir.name}, label mode {label_mode}')


def load_ferplus(
        data_dir: Union[str, os.PathLike],
        label_mode: str = 'majority',
        splits: Optional[Sequence[str]] = None,
        skip_bad: bool = False,
        max_samples: Optional[Dict[str, int]] = None,
) -> datasets.DatasetDict:
    """Load the FER+ splits found under ``data_dir`` (``FER2013Train``, ``FER2013Valid``,
    ``FER2013Test``) into a ``DatasetDict`` keyed train/validation/test.

    ``splits`` restricts the keys; a requested split that is missing raises
    :class:`DataError`. ``max_samples`` maps split names to a cap.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f'{data_dir}: FER+ data folder not found.')
    requested = list(splits) if splits is not None else [s for s, d in SPLIT_FOLDERS.items() if (data_dir / d).is_dir()]
    if not requested:
        raise DataError(
            f'{data_dir}: no FER+ split folder found; expected one of {sorted(SPLIT_FOLDERS.values())} '
            f'each holding label.csv and the PNGs.'
        )
    out = {}
    for split in requested:
        if split not in SPLIT_FOLDERS:
            raise ValueError(f'Unknown split {split!r}; use one of {sorted(SPLIT_FOLDERS)}.')
        folder = data_dir / SPLIT_FOLDERS[split]
        if not folder.is_dir():
            raise DataError(f'{folder}: split folder for {split!r} not found.')
        cap = (max_samples or {}).get(split)
        out[split] = load_ferplus_split(folder, label_mode, skip_bad=skip_bad, max_samples=cap)
    return datasets.DatasetDict(out)
