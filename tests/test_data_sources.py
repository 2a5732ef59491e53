"""Tests of the ``datasets`` sources, the single loader entry point and the parquet converter.

Everything runs offline on folders that the tests build from real FER+ PNGs. The Hub is
replaced by stand-ins: ``datasets.load_dataset`` for a dataset id, and the upload calls
for a push.
"""
import argparse
import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets
import huggingface_hub

import transfer_timm.data.sources as sources
from transfer_timm.data import (
    FERPLUS_CLASSES, DataError, ferplus_features, load_fer_dataset, load_ferplus, load_image_dataset, reorder_labels,
)
from transfer_timm.cli import add_convert_parser, run_convert
from transfer_timm.data.convert import convert_ferplus, write_parquet

from test_data_ferplus import SHARED_VALID, make_csv_pair, make_microsoft_layout, requires_shared, sample_rows

pytestmark = requires_shared

# imagefolder sorts class folders by name (upper case first), so these get ids
# Happy 0, angry 1, neutral 2, surprised 3, unlike the FER+ order (neutral 0,
# happiness 1, surprise 2, anger 4).
IMAGEFOLDER_CLASSES = {'angry': 'anger', 'Happy': 'happiness', 'neutral': 'neutral', 'surprised': 'surprise'}


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / 'hf_cache')


def png_bytes(index: int) -> bytes:
    return (SHARED_VALID / sample_rows()[index][0]).read_bytes()


def make_imagefolder(root: Path, per_class: int = 3) -> Path:
    """Write real FER+ PNGs into one folder per class name of IMAGEFOLDER_CLASSES."""
    index = 0
    for class_name in IMAGEFOLDER_CLASSES:
        (root / class_name).mkdir(parents=True)
        for i in range(per_class):
            (root / class_name / f'face{i}.png').write_bytes(png_bytes(index))
            index += 1
    return root


def test_imagefolder_labels_by_name(tmp_path, cache_dir):
    root = make_imagefolder(tmp_path / 'faces')
    raw = datasets.load_dataset('imagefolder', data_dir=str(root), split='train', cache_dir=cache_dir)
    assert raw.features['label'].names == sorted(IMAGEFOLDER_CLASSES)

    ds = load_image_dataset(root, split='train', cache_dir=cache_dir)
    assert ds.features == ferplus_features()
    assert len(ds) == 3 * len(IMAGEFOLDER_CLASSES)
    for file_name, label, soft, votes in zip(ds['file_name'], ds['label'], ds['soft_label'], ds['votes']):
        folder = file_name.split('/')[0]
        expected = FERPLUS_CLASSES.index(IMAGEFOLDER_CLASSES[folder])
        assert label == expected, file_name
        assert soft == [1.0 if k == expected else 0.0 for k in range(len(FERPLUS_CLASSES))]
        assert votes == [10 if k == expected else 0 for k in range(10)]


def test_imagefolder_images_embedded(tmp_path, cache_dir):
    root = make_imagefolder(tmp_path / 'faces', per_class=1)
    ds = load_image_dataset(root, split='train', cache_dir=cache_dir)
    shutil.rmtree(root)
    stored = ds.cast_column('image', datasets.Image(decode=False))['image']
    assert {image['bytes'] for image in stored} == {png_bytes(i) for i in range(len(IMAGEFOLDER_CLASSES))}
    assert ds[0]['image'].size == (48, 48)


def test_imagefolder_unknown_class(tmp_path, cache_dir):
    root = make_imagefolder(tmp_path / 'faces', per_class=1)
    (root / 'pain').mkdir()
    (root / 'pain' / 'x.png').write_bytes(png_bytes(0))
    with pytest.raises(DataError, match="label 'pain' in column 'label'") as info:
        load_image_dataset(root, cache_dir=cache_dir)
    assert "'happiness'" in str(info.value)
    assert "'happy'" in str(info.value)


def test_imagefolder_bad_image(tmp_path, cache_dir, caplog):
    root = make_imagefolder(tmp_path / 'faces')
    bad = root / 'neutral' / 'face1.png'
    bad.write_bytes(png_bytes(0)[:120])
    with pytest.raises(DataError, match='not a readable image') as info:
        load_image_dataset(root, split='train', cache_dir=cache_dir)
    assert str(bad) in str(info.value)
    assert 'row ' in str(info.value)

    with caplog.at_level(logging.WARNING, logger='transfer_timm.data'):
        ds = load_image_dataset(root, split='train', skip_bad=True, cache_dir=cache_dir)
    assert len(ds) == 3 * len(IMAGEFOLDER_CLASSES) - 1
    assert 'neutral/face1.png' not in ds['file_name']
    assert 'skipped 1 bad records' in caplog.text


def write_parquet_table(path: Path, columns: dict, features: datasets.Features) -> Path:
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return path


def test_string_labels_case_and_aliases(tmp_path, cache_dir):
    names = ['Happy', 'SAD', 'fearful', 'Neutral', 'contempt', 'disgusted']
    path = write_parquet_table(
        tmp_path / 'faces.parquet',
        {'picture': [{'bytes': png_bytes(i), 'path': f'{i}.png'} for i in range(len(names))], 'emotion': names},
        datasets.Features({'picture': datasets.Image(), 'emotion': datasets.Value('string')}),
    )
    ds = load_image_dataset(path, image_column='picture', label_column='emotion', split='train', cache_dir=cache_dir)
    assert [FERPLUS_CLASSES[label] for label in ds['label']] == [
        'happiness', 'sadness', 'fear', 'neutral', 'contempt', 'disgust',
    ]
    assert ds['file_name'] == [f'{i}.png' for i in range(len(names))]


def test_integer_labels_rejected(tmp_path, cache_dir):
    path = write_parquet_table(
        tmp_path / 'faces.parquet',
        {'image': [{'bytes': png_bytes(0), 'path': None}], 'label': [3]},
        datasets.Features({'image': datasets.Image(), 'label': datasets.Value('int64')}),
    )
    with pytest.raises(DataError, match='never by index'):
        load_image_dataset(path, cache_dir=cache_dir)


def test_missing_columns_listed(tmp_path, cache_dir):
    path = write_parquet_table(
        tmp_path / 'faces.parquet',
        {'image': [{'bytes': png_bytes(0), 'path': None}], 'label': ['happy']},
        datasets.Features({'image': datasets.Image(), 'label': datasets.Value('string')}),
    )
    columns = r"available columns: \['image', 'label'\]"
    with pytest.raises(DataError, match=r"label column 'expression' not found; " + columns):
        load_image_dataset(path, label_column='expression', cache_dir=cache_dir)
    with pytest.raises(DataError, match=r"image column 'img' not found; " + columns):
        load_image_dataset(path, image_column='img', cache_dir=cache_dir)


def test_missing_label_value(tmp_path, cache_dir, caplog):
    path = write_parquet_table(
        tmp_path / 'faces.parquet',
        {'image': [{'bytes': png_bytes(i), 'path': None} for i in range(3)], 'label': ['happy', None, 'anger']},
        datasets.Features({'image': datasets.Image(), 'label': datasets.Value('string')}),
    )
    with pytest.raises(DataError, match='row 1: label is missing'):
        load_image_dataset(path, cache_dir=cache_dir)
    with caplog.at_level(logging.WARNING, logger='transfer_timm.data'):
        ds = load_image_dataset(path, split='train', skip_bad=True, cache_dir=cache_dir)
    assert [FERPLUS_CLASSES[label] for label in ds['label']] == ['happiness', 'anger']
    assert 'skipped 1 bad records' in caplog.text


def test_votes_column_sets_labels(tmp_path, cache_dir, caplog):
    votes = [
        [0, 10, 0, 0, 0, 0, 0, 0, 0, 0],  # happiness in every mode
        [4, 0, 0, 1, 3, 2, 0, 0, 0, 0],  # no majority; neutral 4/7, anger 3/7 in crossentropy
        [6, 0, 0, 0, 0, 0, 0, 0, 2, 2],  # neutral, but stored as 'sad'
    ]
    path = write_parquet_table(
        tmp_path / 'faces.parquet',
        {'image': [{'bytes': png_bytes(i), 'path': None} for i in range(3)], 'label': ['happy', 'neutral', 'sad'],
         'votes': votes},
        datasets.Features({'image': datasets.Image(), 'label': datasets.Value('string'),
                           'votes': datasets.Sequence(datasets.Value('int64'))}),
    )
    with caplog.at_level(logging.WARNING, logger='transfer_timm.data'):
        majority = load_image_dataset(path, split='train', cache_dir=cache_dir)
    assert majority['votes'] == [votes[0], votes[2]]
    assert [FERPLUS_CLASSES[label] for label in majority['label']] == ['happiness', 'neutral']
    assert '1 labels in column' in caplog.text

    crossentropy = load_image_dataset(path, split='train', label_mode='crossentropy', cache_dir=cache_dir)
    assert len(crossentropy) == 3
    np.testing.assert_allclose(crossentropy['soft_label'][1], [4 / 7, 0, 0, 0, 3 / 7, 0, 0, 0], atol=1e-6)


def test_malformed_votes(tmp_path, cache_dir):
    path = write_parquet_table(
        tmp_path / 'faces.parquet',
        {'image': [{'bytes': png_bytes(i), 'path': None} for i in range(2)], 'votes': [[0, 10] + [0] * 8, [1, 2, 3]]},
        datasets.Features({'image': datasets.Image(), 'votes': datasets.Sequence(datasets.Value('int64'))}),
    )
    with pytest.raises(DataError, match='row 1: expected 10 vote counts'):
        load_image_dataset(path, cache_dir=cache_dir)
    ds = load_image_dataset(path, split='train', skip_bad=True, cache_dir=cache_dir)
    assert ds['label'] == [1]


def test_label_names_order(tmp_path, cache_dir):
    root = make_imagefolder(tmp_path / 'faces', per_class=1)
    names = ['Happy', 'neutral', 'Surprise', 'sadness', 'anger', 'disgust', 'fear', 'contempt']
    ds = load_image_dataset(root, label_names=names, split='train', cache_dir=cache_dir)
    assert ds.features['label'].names == names
    by_file = {name: names[label] for name, label in zip(ds['file_name'], ds['label'])}
    assert by_file == {'angry/face0.png': 'anger', 'Happy/face0.png': 'Happy', 'neutral/face0.png': 'neutral',
                       'surprised/face0.png': 'Surprise'}
    for label, soft in zip(ds['label'], ds['soft_label']):
        assert soft[label] == 1.0

    with pytest.raises(ValueError, match='label_names must name each'):
        load_image_dataset(root, label_names=FERPLUS_CLASSES[:7], cache_dir=cache_dir)


def test_reorder_labels_round_trip(tmp_path):
    ds = load_ferplus(make_microsoft_layout(tmp_path), 'crossentropy', splits=['train'])['train']
    names = list(reversed(FERPLUS_CLASSES))
    reordered = reorder_labels(ds, names)
    assert reordered.features['label'].names == names
    for before, after, soft_before, soft_after in zip(
            ds['label'], reordered['label'], ds['soft_label'], reordered['soft_label']):
        assert names[after] == FERPLUS_CLASSES[before]
        assert soft_after == list(reversed(soft_before))
    back = reorder_labels(reordered, FERPLUS_CLASSES)
    assert back['label'] == ds['label']
    assert back['soft_label'] == ds['soft_label']


# load_fer_dataset dispatch.

def test_dispatch_microsoft_layouts(tmp_path):
    root = make_microsoft_layout(tmp_path)
    direct = load_ferplus(root, 'multi_target')
    whole = load_fer_dataset(root, label_mode='multi_target')
    assert list(whole) == ['train', 'validation', 'test']
    assert whole['validation']['votes'] == direct['validation']['votes']

    single = load_fer_dataset(root / 'FER2013Valid', label_mode='multi_target')
    assert list(single) == ['validation']
    assert single['validation']['file_name'] == direct['validation']['file_name']

    one = load_fer_dataset(root, label_mode='multi_target', split='test', max_samples=2)
    assert isinstance(one, datasets.Dataset)
    assert one['file_name'] == direct['test']['file_name'][:2]

    with pytest.raises(DataError, match="contains the 'validation' split"):
        load_fer_dataset(root / 'FER2013Valid', split='train')
    with pytest.raises(ValueError, match='label_column'):
        load_fer_dataset(root, label_column='emotion')
    # The defaults of the datasets-only arguments are accepted, as a caller may pass them for any source.
    assert len(load_fer_dataset(root, split='test', image_column='image', label_column='label')) > 0


def test_dispatch_label_names_for_layouts(tmp_path):
    root = make_microsoft_layout(tmp_path)
    names = list(reversed(FERPLUS_CLASSES))
    ds = load_fer_dataset(root, split='validation', label_names=names)
    direct = load_ferplus(root, splits=['validation'])['validation']
    assert ds.features['label'].names == names
    assert [names[label] for label in ds['label']] == [FERPLUS_CLASSES[label] for label in direct['label']]


def test_dispatch_hub_id_offline(tmp_path, monkeypatch):
    """A Hub id goes to datasets.load_dataset unchanged; a stand-in returns local data."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    local = datasets.Dataset.from_dict(
        {'image': [{'bytes': png_bytes(i), 'path': None} for i in range(2)], 'label': [1, 0]},
        features=datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=['sad', 'happy'])}),
    )
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.DatasetDict({'train': local}) if kwargs.get('split') is None else local

    monkeypatch.setattr(sources.datasets, 'load_dataset', fake_load_dataset)
    dd = load_fer_dataset('someone/fer-faces', revision='v1', token='hf_test')
    assert calls == [('someone/fer-faces', {'data_files': None, 'split': None, 'revision': 'v1', 'token': 'hf_test'})]
    assert [FERPLUS_CLASSES[label] for label in dd['train']['label']] == ['happiness', 'sadness']


def test_dispatch_missing_local_path(tmp_path):
    with pytest.raises(DataError, match='not found'):
        load_fer_dataset(str(tmp_path / 'no' / 'such' / 'folder'))
    with pytest.raises(DataError, match='CSV files not found'):
        load_fer_dataset([tmp_path / 'fer2013.csv', tmp_path / 'fer2013new.csv'])


def test_dispatch_csv_pair_wrong_headers(tmp_path):
    first, second = tmp_path / 'a.csv', tmp_path / 'b.csv'
    first.write_text('emotion,pixels,Usage\n')
    second.write_text('Usage,name\n')
    with pytest.raises(DataError, match='not the FER\\+ CSV pair'):
        load_fer_dataset([first, second])


# Converter.

def raw_images(ds: datasets.Dataset) -> list:
    return [image['bytes'] for image in ds.cast_column('image', datasets.Image(decode=False))['image']]


def assert_same_records(actual: datasets.Dataset, expected: datasets.Dataset) -> None:
    assert actual.features == expected.features
    for column in ('votes', 'label', 'soft_label', 'file_name'):
        assert actual[column] == expected[column], column
    assert raw_images(actual) == raw_images(expected)


@pytest.mark.parametrize('mode', ['majority', 'crossentropy'])
def test_parquet_round_trip(tmp_path, cache_dir, mode):
    root = make_microsoft_layout(tmp_path / 'ms')
    out = tmp_path / 'out'
    converted = convert_ferplus(root, out, label_mode=mode)
    original = load_ferplus(root, mode)
    files = {split: str(out / 'data' / f'{split}-00000-of-00001.parquet') for split in original}
    assert all(Path(f).is_file() for f in files.values())

    by_files = datasets.load_dataset('parquet', data_files=files, cache_dir=cache_dir)
    by_folder = datasets.load_dataset(str(out), cache_dir=cache_dir)
    by_loader = load_fer_dataset(out, label_mode=mode, cache_dir=cache_dir)
    for split in original:
        assert_same_records(converted[split], original[split])
        assert_same_records(by_files[split], original[split])
        assert_same_records(by_folder[split], original[split])
        assert_same_records(by_loader[split], original[split])

    card = (out / 'README.md').read_text()
    assert 'path: data/validation-00000-of-00001.parquet' in card
    assert f'| validation | {len(original["validation"])} |' in card


def test_convert_csv_pair_selected_splits(tmp_path, cache_dir):
    make_csv_pair(tmp_path)
    out = tmp_path / 'out'
    convert_ferplus(
        fer2013_csv=tmp_path / 'fer2013.csv', ferplus_csv=tmp_path / 'fer2013new.csv', output_dir=out,
        splits=['train', 'test'],
    )
    back = datasets.load_dataset(str(out), cache_dir=cache_dir)
    assert sorted(back) == ['test', 'train']
    assert back['train'].features == ferplus_features()


def test_convert_refuses_to_mix_runs(tmp_path):
    root = make_microsoft_layout(tmp_path / 'ms')
    out = tmp_path / 'out'
    convert_ferplus(root, out)
    with pytest.raises(FileExistsError, match='overwrite'):
        convert_ferplus(root, out, splits=['test'])
    convert_ferplus(root, out, splits=['test'], overwrite=True)
    assert [p.name for p in (out / 'data').iterdir()] == ['test-00000-of-00001.parquet']


def test_push_to_hub_calls(tmp_path, monkeypatch):
    """The push goes to the stand-ins with the repo id, token and converted data."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    calls = []

    def fake_create_repo(self, repo_id, **kwargs):
        calls.append(('create_repo', repo_id, self.token, kwargs))

    def fake_upload_file(self, **kwargs):
        calls.append(('upload_file', kwargs['repo_id'], self.token, kwargs))

    def fake_push(self, repo_id, **kwargs):
        calls.append(('push_to_hub', repo_id, kwargs.get('token'), {'data': self}))

    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_file', fake_upload_file)
    monkeypatch.setattr(datasets.DatasetDict, 'push_to_hub', fake_push)

    root = make_microsoft_layout(tmp_path / 'ms')
    parser = argparse.ArgumentParser(prog='transfer-fer')
    add_convert_parser(parser.add_subparsers(dest='command'))
    args = parser.parse_args(['convert', str(root), '--push-to-hub', 'me/ferplus', '--token', 'hf_test',
                              '--private', '--label-mode', 'crossentropy'])
    assert args.handler(args) == 0

    assert [call[0] for call in calls] == ['create_repo', 'upload_file', 'push_to_hub']
    assert all(call[1] == 'me/ferplus' for call in calls)
    assert all(call[2] == 'hf_test' for call in calls)
    assert calls[0][3]['repo_type'] == 'dataset'
    assert calls[0][3]['private'] is True
    card = calls[1][3]['path_or_fileobj'].decode()
    assert card.startswith('---\n')
    assert 'crossentropy' in card
    assert 'configs' not in card
    pushed = calls[2][3]['data']
    original = load_ferplus(root, 'crossentropy')
    assert list(pushed) == list(original)
    for split in original:
        assert_same_records(pushed[split], original[split])


def test_convert_command_writes_folder(tmp_path, capsys):
    root = make_microsoft_layout(tmp_path / 'ms')
    parser = argparse.ArgumentParser(prog='transfer-fer')
    add_convert_parser(parser.add_subparsers(dest='command'))
    out = tmp_path / 'out'
    args = parser.parse_args(['convert', str(root), '-o', str(out), '--splits', 'validation', '--max-samples', '4'])
    assert run_convert(args) == 0
    assert 'validation: 4 images' in capsys.readouterr().out
    assert (out / 'data' / 'validation-00000-of-00001.parquet').is_file()

    assert run_convert(args) == 1
    assert 'already contains converted data' in capsys.readouterr().err

    args = parser.parse_args(['convert', str(root)])
    assert run_convert(args) == 1
    assert '--output-dir' in capsys.readouterr().err


def test_write_parquet_image_decodes(tmp_path, cache_dir):
    ds = load_ferplus(make_microsoft_layout(tmp_path / 'ms'), splits=['test'])
    paths = write_parquet(ds, tmp_path / 'out', 'majority', 'test data')
    table = datasets.Dataset.from_parquet(str(paths['test']), cache_dir=cache_dir)
    image = Image.open(io.BytesIO(table.cast_column('image', datasets.Image(decode=False))[0]['image']['bytes']))
    assert image.size == (48, 48)
