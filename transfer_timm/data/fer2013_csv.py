"""FER+ from the original CSV pair: Kaggle's ``fer2013.csv`` and Microsoft's ``fer2013new.csv``.

``fer2013.csv`` (columns ``emotion,pixels,Usage``) contains every 48x48 grayscale face as
2304 space-separated pixel values. ``fer2013new.csv`` (columns ``Usage,Image name`` and
the 10 vote counts) contains the FER+ votes for the same faces, row for row. A row with an
empty image name is a face that FER+ left out. ``Usage`` names the split: Training,
PublicTest and PrivateTest become train, validation and test, the same splits as
Microsoft's FER2013Train, FER2013Valid and FER2013Test folders.
"""
import csv
import io
import re
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np
from PIL import Image

import datasets

from .ferplus import (
    FERPLUS_VOTE_NAMES, LABEL_MODES, SPLIT_FOLDERS, DataError, SkippedRecords, _parse_votes, build_dataset,
    votes_to_target,
)

_logger = logging.getLogger(__name__)

__all__ = ['FER2013_IMAGE_SIZE', 'USAGE_SPLITS', 'csv_pair_roles', 'load_fer2013_csv', 'parse_pixels']

FER2013_IMAGE_SIZE = 48
USAGE_SPLITS = {'Training': 'train', 'PublicTest': 'validation', 'PrivateTest': 'test'}
_PIXELS_COLUMNS = ('pixels', 'Usage')
_VOTES_COLUMNS = ('Usage', 'Image name') + FERPLUS_VOTE_NAMES
_UNSIGNED_INTEGERS = re.compile(r'[0-9\s]*')


def parse_pixels(text: str, where: str) -> np.ndarray:
    """Parse one ``pixels`` field into a 48x48 uint8 array; raise :class:`DataError` naming ``where``."""
    expected = FER2013_IMAGE_SIZE * FER2013_IMAGE_SIZE
    # np.fromstring is about 4x faster than converting split tokens, and the pattern
    # ensures that it only parses unsigned decimal integers. It reads a blank string as [0],
    # so blank strings take the slow path.
    fast = text.strip() and _UNSIGNED_INTEGERS.fullmatch(text)
    values = np.fromstring(text, dtype=np.int64, sep=' ') if fast else None
    tokens = None if values is not None else text.split()
    count = len(values) if values is not None else len(tokens)
    if count != expected:
        raise DataError(
            f'{where}: pixel string has {count} values, expected {expected} '
            f'({FER2013_IMAGE_SIZE}x{FER2013_IMAGE_SIZE} grayscale).'
        )
    if values is None:
        bad = next(t for t in tokens if not (t.isascii() and t.isdigit()))
        if not (bad.lstrip('+-').isascii() and bad.lstrip('+-').isdigit()):
            raise DataError(f'{where}: pixel value {bad!r} is not an integer.')
        raise DataError(f'{where}: pixel value {bad} is outside 0..255.')
    if values.max() > 255:
        raise DataError(f'{where}: pixel value {values.max()} is outside 0..255.')
    return values.astype(np.uint8).reshape(FER2013_IMAGE_SIZE, FER2013_IMAGE_SIZE)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode='L').save(buffer, format='PNG')
    return buffer.getvalue()


def _open_csv(path: Path, required: Sequence[str]) -> Tuple[TextIO, Any, Dict[str, int], int]:
    """Open a CSV file; return the file, its row reader, the index of each required column
    and the number of header fields."""
    if not path.is_file():
        raise DataError(f'{path}: file not found.')
    f = path.open(newline='', encoding='utf-8')
    reader = csv.reader(f)
    try:
        header = [name.strip() for name in next(reader, [])]
    except (csv.Error, UnicodeDecodeError) as e:
        f.close()
        raise DataError(f'{path}, line 1: header could not be read ({e}).') from None
    missing = [name for name in required if name not in header]
    if missing:
        f.close()
        raise DataError(f'{path}: missing columns {missing}; the header has {header}.')
    return f, reader, {name: header.index(name) for name in required}, len(header)


def _read_header(path: Path) -> List[str]:
    try:
        with path.open(newline='', encoding='utf-8') as f:
            return [name.strip() for name in next(csv.reader(f), [])]
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f'{path}: header could not be read ({e}).') from None


def csv_pair_roles(
        first: Union[str, os.PathLike], second: Union[str, os.PathLike],
) -> Optional[Tuple[Path, Path]]:
    """Return ``(fer2013_csv, ferplus_csv)`` if the two files are the CSV pair in either order, else None.

    The roles come from the headers: the ``pixels`` column marks ``fer2013.csv`` and the
    ``Image name`` column marks ``fer2013new.csv``.
    """
    paths = [Path(first), Path(second)]
    if not all(p.is_file() and p.suffix.lower() == '.csv' for p in paths):
        return None
    headers = [_read_header(p) for p in paths]
    is_pixels = ['pixels' in h for h in headers]
    is_votes = ['Image name' in h for h in headers]
    if is_pixels[0] and is_votes[1]:
        return paths[0], paths[1]
    if is_pixels[1] and is_votes[0]:
        return paths[1], paths[0]
    return None


def load_fer2013_csv(
        fer2013_csv: Union[str, os.PathLike],
        ferplus_csv: Union[str, os.PathLike],
        label_mode: str = 'majority',
        splits: Optional[Sequence[str]] = None,
        skip_bad: bool = False,
        max_samples: Optional[Dict[str, int]] = None,
) -> datasets.DatasetDict:
    """Load FER+ from ``fer2013.csv`` and ``fer2013new.csv`` into a ``DatasetDict``.

    The files must have the same number of rows, and each row pair must agree on
    ``Usage``, because the files are matched by row order alone. Either mismatch raises
    :class:`DataError`, even with ``skip_bad=True``. Faces with an empty image name are
    not part of FER+ and are left out.

    Args:
        fer2013_csv: Kaggle's ``fer2013.csv``.
        ferplus_csv: Microsoft's ``fer2013new.csv``.
        label_mode: One of :data:`LABEL_MODES`; images without a valid target are dropped.
        splits: Keys to load among train, validation and test; by default every split
            that has rows in the files.
        skip_bad: Skip rows with a malformed pixel string or vote count and count them
            in the log, instead of raising :class:`DataError`.
        max_samples: Map from split name to the number of usable images kept.

    Images are stored as PNG bytes under the FER+ image name (``fer0000000.png``).
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f'Unknown label mode {label_mode!r}; use one of {LABEL_MODES}.')
    wanted = list(splits) if splits is not None else list(SPLIT_FOLDERS)
    for split in wanted:
        if split not in SPLIT_FOLDERS:
            raise ValueError(f'Unknown split {split!r}; use one of {sorted(SPLIT_FOLDERS)}.')
    caps = dict(max_samples or {})
    pixels_path, votes_path = Path(fer2013_csv), Path(ferplus_csv)
    skipped = SkippedRecords(f'{pixels_path} + {votes_path}')
    records: Dict[str, List[Dict]] = {split: [] for split in wanted}
    n_dropped = {split: 0 for split in wanted}
    n_not_ferplus = 0
    present = set()

    pixels_file, pixels_rows, pixels_cols, pixels_width = _open_csv(pixels_path, _PIXELS_COLUMNS)
    with pixels_file:
        votes_file, votes_rows, votes_cols, votes_width = _open_csv(votes_path, _VOTES_COLUMNS)
        with votes_file:
            n_rows = 0
            for pixels_row, votes_row in _zip_rows(pixels_path, pixels_rows, votes_path, votes_rows):
                n_rows += 1
                pixels_where = f'{pixels_path}, line {pixels_rows.line_num}'
                votes_where = f'{votes_path}, line {votes_rows.line_num}'
                try:
                    _check_width(pixels_row, pixels_width, pixels_where)
                    _check_width(votes_row, votes_width, votes_where)
                except DataError as e:
                    if not skip_bad:
                        raise
                    skipped.skip(e)
                    continue

                usage = votes_row[votes_cols['Usage']].strip()
                pixels_usage = pixels_row[pixels_cols['Usage']].strip()
                if usage != pixels_usage:
                    raise DataError(
                        f'{votes_where}: Usage {usage!r} differs from {pixels_usage!r} at {pixels_where}. '
                        f'The files are matched by row order, so they must list the same faces in the same '
                        f'order; use the unmodified fer2013.csv and fer2013new.csv.'
                    )
                if usage not in USAGE_SPLITS:
                    raise DataError(f'{votes_where}: unknown Usage {usage!r}; expected one of {sorted(USAGE_SPLITS)}.')
                split = USAGE_SPLITS[usage]
                present.add(split)
                name = votes_row[votes_cols['Image name']].strip()
                if not name:
                    n_not_ferplus += 1
                    continue
                if split not in records or (split in caps and len(records[split]) >= caps[split]):
                    continue

                try:
                    votes = _parse_votes([votes_row[votes_cols[v]] for v in FERPLUS_VOTE_NAMES], votes_where)
                    target = votes_to_target(votes, label_mode)
                    if target is None:
                        n_dropped[split] += 1
                        continue
                    pixels = parse_pixels(pixels_row[pixels_cols['pixels']], pixels_where)
                except DataError as e:
                    if not skip_bad:
                        raise
                    skipped.skip(e)
                    continue
                records[split].append({
                    'image': {'bytes': _png_bytes(pixels), 'path': name},
                    'votes': votes,
                    'label': int(np.argmax(target)),
                    'soft_label': target.tolist(),
                    'file_name': name,
                })

    skipped.log_summary()
    _logger.info('%s: %d rows, %d faces not in FER+.', votes_path, n_rows, n_not_ferplus)
    if splits is None:
        wanted = [split for split in wanted if split in present]
    out = {}
    for split in wanted:
        _logger.info(
            '%s: %d images kept, %d without a %s label.', split, len(records[split]), n_dropped[split], label_mode,
        )
        description = f'FER+ {split} from {pixels_path.name} and {votes_path.name}, label mode {label_mode}'
        out[split] = build_dataset(records[split], description)
    return datasets.DatasetDict(out)


def _zip_rows(
        pixels_path: Path, pixels_rows: Iterator[List[str]], votes_path: Path, votes_rows: Iterator[List[str]],
) -> Iterator[Tuple[List[str], List[str]]]:
    """Yield the data rows of both files in step; raise :class:`DataError` if their counts differ."""
    n_rows = 0
    while True:
        pixels_row = _next_row(pixels_path, pixels_rows)
        votes_row = _next_row(votes_path, votes_rows)
        if pixels_row is None and votes_row is None:
            return
        if pixels_row is None or votes_row is None:
            longer, shorter = (votes_path, pixels_path) if pixels_row is None else (pixels_path, votes_path)
            raise DataError(
                f'{shorter} ends after {n_rows} data rows but {longer} has more. fer2013.csv and fer2013new.csv '
                f'are matched by row order and must have the same number of rows.'
            )
        n_rows += 1
        yield pixels_row, votes_row


def _next_row(path: Path, rows: Any) -> Optional[List[str]]:
    """Return the next non-blank row of a csv reader, or None at the end of the file."""
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return None
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f'{path}, line {rows.line_num}: invalid CSV ({e}).') from None
        if any(field.strip() for field in row):
            return row


def _check_width(row: Sequence[str], width: int, where: str) -> None:
    if len(row) != width:
        raise DataError(f'{where}: expected {width} fields like the header, found {len(row)}.')
