"""Tests of the FER+ label modes and the readers of Microsoft's folders and the CSV pair.

Tests marked ``requires_shared`` read the real FER+ splits from the folder in the
``FERPLUS_DIR`` environment variable (default: the machine's shared FER+ copy) and are
skipped where it is missing. The small test layouts are built from real FER+ PNGs of
its validation split.
"""
import csv
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets

from transfer_timm.data import (
    FERPLUS_CLASSES, LABEL_MODES, DataError, ferplus_features, load_fer2013_csv, load_fer_dataset, load_ferplus,
    load_ferplus_split, read_label_csv, votes_to_target,
)
from transfer_timm.data.fer2013_csv import parse_pixels

SHARED_FERPLUS = Path(os.environ.get('FERPLUS_DIR', '/work/shared/ferplus'))
SHARED_VALID = SHARED_FERPLUS / 'FER2013Valid'

requires_shared = pytest.mark.skipif(
    not (SHARED_VALID / 'label.csv').is_file(), reason=f'FER+ data not found under {SHARED_FERPLUS}',
)

# Rows of FER2013Valid/label.csv used for the small layouts, and their split in those layouts.
SAMPLE_SPLITS = {'train': range(0, 16), 'validation': range(16, 26), 'test': range(26, 32)}
SPLIT_FOLDER = {'train': 'FER2013Train', 'validation': 'FER2013Valid', 'test': 'FER2013Test'}
USAGE = {'train': 'Training', 'validation': 'PublicTest', 'test': 'PrivateTest'}


def sample_rows():
    """Return the first label.csv rows of the shared validation split as lists of fields."""
    with (SHARED_VALID / 'label.csv').open(newline='') as f:
        rows = list(csv.reader(f))
    return rows[:max(r.stop for r in SAMPLE_SPLITS.values())]


def make_microsoft_layout(root: Path) -> Path:
    """Copy real FER+ PNGs and their label.csv rows into FER2013Train/Valid/Test under ``root``."""
    rows = sample_rows()
    for split, indices in SAMPLE_SPLITS.items():
        folder = root / SPLIT_FOLDER[split]
        folder.mkdir(parents=True)
        with (folder / 'label.csv').open('w', newline='') as f:
            writer = csv.writer(f)
            for i in indices:
                writer.writerow(rows[i])
                shutil.copy(SHARED_VALID / rows[i][0], folder / rows[i][0])
    return root


def pixel_string(png: Path) -> str:
    return ' '.join(str(v) for v in np.asarray(Image.open(png)).reshape(-1))


def make_csv_pair(root: Path):
    """Write fer2013.csv and fer2013new.csv for the sample rows, plus two faces that FER+ left out."""
    rows = sample_rows()
    pixels_path, votes_path = root / 'fer2013.csv', root / 'fer2013new.csv'
    with pixels_path.open('w', newline='') as fp, votes_path.open('w', newline='') as fv:
        pixels_writer, votes_writer = csv.writer(fp), csv.writer(fv)
        pixels_writer.writerow(['emotion', 'pixels', 'Usage'])
        votes_writer.writerow(['Usage', 'Image name', 'neutral', 'happiness', 'surprise', 'sadness', 'anger',
                               'disgust', 'fear', 'contempt', 'unknown', 'NF'])
        for split, indices in SAMPLE_SPLITS.items():
            for i in indices:
                name, votes = rows[i][0], rows[i][2:]
                pixels_writer.writerow([3, pixel_string(SHARED_VALID / name), USAGE[split]])
                votes_writer.writerow([USAGE[split], name] + votes)
            # A face without an image name is not part of FER+.
            pixels_writer.writerow([0, pixel_string(SHARED_VALID / rows[indices[0]][0]), USAGE[split]])
            votes_writer.writerow([USAGE[split], ''] + ['0'] * 10)
    return pixels_path, votes_path


def decoded(ds: datasets.Dataset) -> list:
    return [np.asarray(image) for image in ds['image']]


def rewrite_line(path: Path, line_no: int, new_line: str) -> None:
    lines = path.read_text().splitlines()
    lines[line_no - 1] = new_line
    path.write_text('\n'.join(lines) + '\n')


# Label modes on hand-worked vote vectors. Vote order: neutral, happiness, surprise,
# sadness, anger, disgust, fear, contempt, unknown, NF. Expected targets are over the
# 8 emotions; None means the image is dropped.

def one_hot(index):
    target = np.zeros(len(FERPLUS_CLASSES), dtype=np.float32)
    target[index] = 1.0
    return target


def target(**shares):
    out = np.zeros(len(FERPLUS_CLASSES), dtype=np.float32)
    for name, share in shares.items():
        out[FERPLUS_CLASSES.index(name)] = share
    return out


VOTE_CASES = [
    # The single sadness vote is removed, leaving 4 of 9 votes for neutral: no majority.
    ('single votes removed, no majority', [4, 0, 0, 1, 3, 2, 0, 0, 0, 0], {
        'majority': None,
        'crossentropy': target(neutral=4 / 7, anger=3 / 7),
        'multi_target': target(neutral=4 / 7, anger=3 / 7),
    }),
    # 5 of 10 votes is not a majority, but after the single surprise vote is removed it is 5 of 9.
    ('single vote removal makes a majority', [5, 4, 1, 0, 0, 0, 0, 0, 0, 0], {
        'majority': one_hot(0),
        'crossentropy': target(neutral=5 / 9, happiness=4 / 9),
        'multi_target': target(neutral=5 / 9, happiness=4 / 9),
    }),
    # Exactly half is not more than half.
    ('exact half is no majority', [5, 5, 0, 0, 0, 0, 0, 0, 0, 0], {
        'majority': None,
        'crossentropy': target(neutral=0.5, happiness=0.5),
        'multi_target': target(neutral=0.5, happiness=0.5),
    }),
    ('unanimous', [0, 10, 0, 0, 0, 0, 0, 0, 0, 0], {
        'majority': one_hot(1), 'crossentropy': one_hot(1), 'multi_target': one_hot(1),
    }),
    # Only single votes: nothing is left after outlier removal.
    ('only single votes', [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], {
        'majority': None, 'crossentropy': None, 'multi_target': None,
    }),
    # "unknown" has the majority.
    ('unknown majority', [0, 0, 0, 0, 0, 0, 0, 0, 7, 3], {
        'majority': None, 'crossentropy': None, 'multi_target': None,
    }),
    # "unknown" ties with the top emotion. crossentropy stops there and keeps only 4 of 10
    # votes. multi_target keeps both, and the first maximum (neutral) wins the argmax.
    ('unknown ties with top emotion', [4, 0, 0, 0, 0, 0, 0, 0, 4, 2], {
        'majority': None,
        'crossentropy': None,
        'multi_target': one_hot(0),
    }),
    # "unknown" ties at the second level: crossentropy drops it and keeps neutral.
    ('unknown ties at second level', [6, 0, 0, 0, 0, 0, 0, 0, 2, 2], {
        'majority': one_hot(0), 'crossentropy': one_hot(0), 'multi_target': one_hot(0),
    }),
    # Three emotions tie at the second level, so crossentropy would need 4 emotions.
    ('more than three emotions', [7, 0, 2, 2, 2, 0, 0, 0, 0, 0], {
        'majority': one_hot(0),
        'crossentropy': None,
        'multi_target': one_hot(0),
    }),
    # multi_target keeps emotions with at least 30% (3 of 10 here).
    ('thirty percent rule', [4, 0, 0, 0, 3, 3, 0, 0, 0, 0], {
        'majority': None,
        'crossentropy': target(neutral=0.4, anger=0.3, disgust=0.3),
        'multi_target': target(neutral=0.4, anger=0.3, disgust=0.3),
    }),
    # Only neutral reaches 30% (2.7 of 9 votes), and 3 of 9 is not more than half. In
    # crossentropy, NF ties at the second level and is dropped, leaving 7 of 9 votes.
    ('multi_target below half', [3, 2, 2, 0, 0, 0, 0, 0, 0, 2], {
        'majority': None,
        'crossentropy': target(neutral=3 / 7, happiness=2 / 7, surprise=2 / 7),
        'multi_target': None,
    }),
    # The crossentropy loop stops once 75% of the votes are covered: 6 of 8.
    ('stop at seventy-five percent', [6, 0, 1, 1, 0, 0, 0, 0, 2, 0], {
        'majority': one_hot(0), 'crossentropy': one_hot(0), 'multi_target': one_hot(0),
    }),
]


@pytest.mark.parametrize('name, votes, expected', VOTE_CASES, ids=[case[0] for case in VOTE_CASES])
@pytest.mark.parametrize('mode', LABEL_MODES)
def test_votes_to_target_modes(mode, name, votes, expected):
    want = expected['crossentropy' if mode == 'probability' else mode]
    got = votes_to_target(votes, mode)
    if want is None:
        assert got is None
    else:
        assert got is not None
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_votes_to_target_rejects_bad_input():
    with pytest.raises(ValueError, match='label mode'):
        votes_to_target([0] * 10, 'vote')
    with pytest.raises(ValueError, match='10 vote counts'):
        votes_to_target([1] * 8)


# Counts on the real FER+ splits.

EXPECTED_COUNTS = {
    'majority': {'train': 25045, 'validation': 3191},
    'probability': {'train': 27947, 'validation': 3508},
    'crossentropy': {'train': 27947, 'validation': 3508},
    'multi_target': {'train': 27667, 'validation': 3472},
}


@pytest.fixture(scope='module')
def shared_train_majority():
    if not (SHARED_FERPLUS / 'FER2013Train' / 'label.csv').is_file():
        pytest.skip(f'FER+ train split not found under {SHARED_FERPLUS}')
    return load_ferplus_split(SHARED_FERPLUS / 'FER2013Train', 'majority')


@requires_shared
def test_shared_train_majority_count(shared_train_majority):
    assert len(shared_train_majority) == EXPECTED_COUNTS['majority']['train']
    assert shared_train_majority.features == ferplus_features()
    assert set(shared_train_majority['label']) == set(range(len(FERPLUS_CLASSES)))


@requires_shared
@pytest.mark.parametrize('mode', ['majority', 'crossentropy'])
def test_shared_validation_loaded_counts(mode):
    ds = load_ferplus(SHARED_FERPLUS, mode, splits=['validation'])['validation']
    assert len(ds) == EXPECTED_COUNTS[mode]['validation']


@pytest.fixture(scope='module')
def shared_targets():
    """Return a function from label mode to the targets of every train and validation row, computed once per mode."""
    votes = {
        split: [v for _, v in read_label_csv(SHARED_FERPLUS / folder / 'label.csv')]
        for split, folder in (('train', 'FER2013Train'), ('validation', 'FER2013Valid'))
    }
    cache = {}

    def targets(mode):
        if mode not in cache:
            cache[mode] = {split: [votes_to_target(v, mode) for v in rows] for split, rows in votes.items()}
        return cache[mode]

    return targets


@requires_shared
@pytest.mark.parametrize('mode', LABEL_MODES)
def test_shared_label_counts_per_mode(shared_targets, mode):
    # Counted from label.csv alone; the loaded tests above show that every image is readable.
    for split, targets in shared_targets(mode).items():
        kept = sum(t is not None for t in targets)
        assert kept == EXPECTED_COUNTS[mode][split], split


@requires_shared
def test_shared_probability_equals_crossentropy(shared_targets):
    probability = shared_targets('probability')
    crossentropy = shared_targets('crossentropy')
    for split in probability:
        for p, c in zip(probability[split], crossentropy[split]):
            assert (p is None) == (c is None)
            if p is not None:
                np.testing.assert_array_equal(p, c)


# Microsoft's layout on a small copy of real data.

@requires_shared
def test_microsoft_layout_splits_and_features(tmp_path):
    root = make_microsoft_layout(tmp_path)
    dd = load_ferplus(root, 'crossentropy')
    assert list(dd) == ['train', 'validation', 'test']
    for split, indices in SAMPLE_SPLITS.items():
        ds = dd[split]
        assert ds.features == ferplus_features()
        rows = [sample_rows()[i] for i in indices]
        expected = [r for r in rows if votes_to_target([int(v) for v in r[2:]], 'crossentropy') is not None]
        assert ds['file_name'] == [r[0] for r in expected]
        assert ds['votes'] == [[int(v) for v in r[2:]] for r in expected]
        for image in ds['image']:
            assert image.size == (48, 48)


@requires_shared
def test_microsoft_layout_max_samples(tmp_path):
    root = make_microsoft_layout(tmp_path)
    dd = load_ferplus(root, 'majority', splits=['train'], max_samples={'train': 3})
    assert list(dd) == ['train']
    assert len(dd['train']) == 3


def test_microsoft_layout_missing_split(tmp_path):
    (tmp_path / 'FER2013Train').mkdir()
    with pytest.raises(DataError, match='FER2013Valid'):
        load_ferplus(tmp_path, splits=['validation'])


@requires_shared
@pytest.mark.parametrize('defect, message', [
    ('truncated', 'not a readable image'),
    ('empty', 'empty file (0 bytes)'),
    ('missing', 'not found'),
    ('field_count', 'line 3: expected 12 fields'),
    ('non_integer', "line 3: vote count for 'happiness' is 'x'"),
])
def test_microsoft_layout_bad_data_raises(tmp_path, defect, message):
    root = make_microsoft_layout(tmp_path)
    folder = root / 'FER2013Train'
    label_csv = folder / 'label.csv'
    rows = sample_rows()
    name = rows[2][0]
    if defect == 'truncated':
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
    elif defect == 'empty':
        (folder / name).write_bytes(b'')
    elif defect == 'missing':
        (folder / name).unlink()
    elif defect == 'field_count':
        rewrite_line(label_csv, 3, ','.join([name, '"(0, 0, 48, 48)"'] + ['1'] * 9))
    else:
        rewrite_line(label_csv, 3, ','.join([name, '"(0, 0, 48, 48)"', '5', 'x'] + ['0'] * 8))

    with pytest.raises(DataError) as info:
        load_ferplus_split(folder, 'multi_target')
    assert message in str(info.value)
    if defect in ('field_count', 'non_integer'):
        assert f'{label_csv}, line 3' in str(info.value)
    else:
        assert str(folder / name) in str(info.value)


@requires_shared
def test_microsoft_layout_skip_bad_counts(tmp_path, caplog):
    root = make_microsoft_layout(tmp_path)
    folder = root / 'FER2013Train'
    rows = sample_rows()
    clean = load_ferplus_split(folder, 'multi_target')

    data = (folder / rows[1][0]).read_bytes()
    (folder / rows[1][0]).write_bytes(data[:100])
    (folder / rows[2][0]).unlink()
    rewrite_line(folder / 'label.csv', 4, ','.join([rows[3][0], '"(0, 0, 48, 48)"'] + ['1'] * 9))
    rewrite_line(folder / 'label.csv', 5, ','.join([rows[4][0], '"(0, 0, 48, 48)"', '5', '2.5'] + ['0'] * 8))
    bad_names = {rows[i][0] for i in range(1, 5)}

    with caplog.at_level(logging.WARNING, logger='transfer_timm.data'):
        ds = load_ferplus_split(folder, 'multi_target', skip_bad=True)
    assert ds['file_name'] == [name for name in clean['file_name'] if name not in bad_names]
    assert 'skipped 4 bad records' in caplog.text
    assert rows[2][0] in caplog.text


def test_read_label_csv_skip_bad(tmp_path, caplog):
    path = tmp_path / 'label.csv'
    path.write_text(
        'a.png,"(0, 0, 48, 48)",10,0,0,0,0,0,0,0,0,0\n'
        'b.png,"(0, 0, 48, 48)",10,0,0\n'
        '\n'
        'c.png,"(0, 0, 48, 48)",0,-2,0,0,0,0,0,0,0,0\n'
        'd.png,"(0, 0, 48, 48)",0,9,1,0,0,0,0,0,0,0\n'
    )
    with pytest.raises(DataError, match='line 2: expected 12 fields'):
        read_label_csv(path)
    with caplog.at_level(logging.WARNING, logger='transfer_timm.data'):
        rows = read_label_csv(path, skip_bad=True)
    assert rows == [('a.png', [10] + [0] * 9), ('d.png', [0, 9, 1] + [0] * 7)]
    assert 'line 4' in caplog.text
    assert 'negative' in caplog.text
    assert 'skipped 2 bad records' in caplog.text


# The CSV pair.

@requires_shared
@pytest.mark.parametrize('mode', ['majority', 'crossentropy', 'multi_target'])
def test_csv_pair_matches_microsoft_layout(tmp_path, mode):
    folders = load_ferplus(make_microsoft_layout(tmp_path / 'ms'), mode)
    (tmp_path / 'csv').mkdir()
    pixels_path, votes_path = make_csv_pair(tmp_path / 'csv')
    pair = load_fer2013_csv(pixels_path, votes_path, mode)
    assert list(pair) == ['train', 'validation', 'test']
    for split in pair:
        assert pair[split].features == ferplus_features()
        for column in ('file_name', 'votes', 'label', 'soft_label'):
            assert pair[split][column] == folders[split][column], (split, column)
        for a, b in zip(decoded(pair[split]), decoded(folders[split])):
            np.testing.assert_array_equal(a, b)


@requires_shared
def test_csv_pair_splits_and_caps(tmp_path):
    pixels_path, votes_path = make_csv_pair(tmp_path)
    dd = load_fer2013_csv(pixels_path, votes_path, 'majority', splits=['validation'], max_samples={'validation': 2})
    assert list(dd) == ['validation']
    assert len(dd['validation']) == 2
    rows = sample_rows()
    assert dd['validation']['file_name'][0] in {rows[i][0] for i in SAMPLE_SPLITS['validation']}


@requires_shared
@pytest.mark.parametrize('defect, match', [
    ('short_pixels', r'fer2013.csv, line 3: pixel string has 2303 values, expected 2304'),
    ('non_integer_pixel', r"fer2013.csv, line 3: pixel value '12a' is not an integer"),
    ('pixel_range', r'fer2013.csv, line 3: pixel value 256 is outside 0..255'),
    ('non_integer_vote', r"fer2013new.csv, line 3: vote count for 'neutral' is 'five'"),
    ('field_count', r'fer2013new.csv, line 3: expected 12 fields'),
])
def test_csv_pair_bad_rows(tmp_path, defect, match):
    pixels_path, votes_path = make_csv_pair(tmp_path)
    pixel_lines = pixels_path.read_text().splitlines()
    vote_lines = votes_path.read_text().splitlines()
    emotion, pixels, usage = next(csv.reader([pixel_lines[2]]))
    values = pixels.split()
    if defect == 'short_pixels':
        rewrite_line(pixels_path, 3, f'{emotion},{" ".join(values[:-1])},{usage}')
    elif defect == 'non_integer_pixel':
        rewrite_line(pixels_path, 3, f'{emotion},{" ".join(values[:-1] + ["12a"])},{usage}')
    elif defect == 'pixel_range':
        rewrite_line(pixels_path, 3, f'{emotion},{" ".join(values[:-1] + ["256"])},{usage}')
    elif defect == 'non_integer_vote':
        fields = vote_lines[2].split(',')
        rewrite_line(votes_path, 3, ','.join(fields[:2] + ['five'] + fields[3:]))
    else:
        rewrite_line(votes_path, 3, ','.join(vote_lines[2].split(',')[:-1]))

    # The sample row on line 3 has a multi_target label, so its pixels are parsed.
    with pytest.raises(DataError, match=match):
        load_fer2013_csv(pixels_path, votes_path, 'multi_target')


@requires_shared
def test_csv_pair_skip_bad_counts(tmp_path, caplog):
    pixels_path, votes_path = make_csv_pair(tmp_path)
    clean = load_fer2013_csv(pixels_path, votes_path, 'multi_target')
    lines = pixels_path.read_text().splitlines()
    emotion, pixels, usage = next(csv.reader([lines[2]]))
    rewrite_line(pixels_path, 3, f'{emotion},{" ".join(pixels.split()[:100])},{usage}')
    fields = votes_path.read_text().splitlines()[4].split(',')
    rewrite_line(votes_path, 5, ','.join(fields[:2] + ['x'] + fields[3:]))

    with caplog.at_level(logging.WARNING, logger='transfer_timm.data'):
        dd = load_fer2013_csv(pixels_path, votes_path, 'multi_target', skip_bad=True)
    rows = sample_rows()
    bad = {rows[1][0], rows[3][0]}
    assert dd['train']['file_name'] == [n for n in clean['train']['file_name'] if n not in bad]
    assert dd['validation']['file_name'] == clean['validation']['file_name']
    assert 'skipped 2 bad records' in caplog.text


@requires_shared
def test_csv_pair_row_count_mismatch(tmp_path):
    pixels_path, votes_path = make_csv_pair(tmp_path)
    lines = votes_path.read_text().splitlines()
    votes_path.write_text('\n'.join(lines[:-1]) + '\n')
    with pytest.raises(DataError, match='same number of rows'):
        load_fer2013_csv(pixels_path, votes_path)
    # skip_bad cannot repair files that are out of step.
    with pytest.raises(DataError, match='same number of rows'):
        load_fer2013_csv(pixels_path, votes_path, skip_bad=True)


@requires_shared
def test_csv_pair_usage_mismatch(tmp_path):
    pixels_path, votes_path = make_csv_pair(tmp_path)
    fields = votes_path.read_text().splitlines()[1].split(',')
    rewrite_line(votes_path, 2, ','.join(['PublicTest'] + fields[1:]))
    with pytest.raises(DataError, match="line 2: Usage 'PublicTest' differs from 'Training'"):
        load_fer2013_csv(pixels_path, votes_path, skip_bad=True)


def test_csv_pair_missing_column(tmp_path):
    pixels_path = tmp_path / 'fer2013.csv'
    votes_path = tmp_path / 'fer2013new.csv'
    pixels_path.write_text('emotion,pixel,Usage\n')
    votes_path.write_text('Usage,Image name\n')
    with pytest.raises(DataError, match=r"missing columns \['pixels'\]"):
        load_fer2013_csv(pixels_path, votes_path)


def test_parse_pixels_shape():
    values = np.arange(48 * 48) % 256
    image = parse_pixels(' '.join(str(v) for v in values), 'here')
    assert image.shape == (48, 48)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image.reshape(-1), values)


@requires_shared
def test_csv_pair_through_load_fer_dataset(tmp_path):
    pixels_path, votes_path = make_csv_pair(tmp_path)
    direct = load_fer2013_csv(pixels_path, votes_path, 'crossentropy')
    by_keywords = load_fer_dataset(fer2013_csv=pixels_path, ferplus_csv=votes_path, label_mode='crossentropy')
    by_list = load_fer_dataset([votes_path, pixels_path], label_mode='crossentropy')
    by_folder = load_fer_dataset(tmp_path, label_mode='crossentropy', split='test')
    for dd in (by_keywords, by_list):
        assert list(dd) == list(direct)
        for split in direct:
            assert dd[split]['soft_label'] == direct[split]['soft_label']
    assert isinstance(by_folder, datasets.Dataset)
    assert by_folder['file_name'] == direct['test']['file_name']


@pytest.mark.parametrize('text, match', [
    ('', 'has 0 values'),
    ('   ', 'has 0 values'),
    (' '.join(['7'] * 2303) + ' ', 'has 2303 values'),
    (' '.join(['7'] * 2303 + ['-1']), 'pixel value -1 is outside'),
    (' '.join(['7'] * 2303 + ['1000']), 'pixel value 1000 is outside'),
    (' '.join(['7'] * 2303 + ['7.5']), "pixel value '7.5' is not an integer"),
])
def test_parse_pixels_invalid(text, match):
    with pytest.raises(DataError, match=match):
        parse_pixels(text, 'fer2013.csv, line 9')
