"""FacePredictor, face detectors and input decoding, on real FER+ faces."""
import io
import warnings

import cv2
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from inference_support import DETECTABLE_FACES, create_test_model, load_face, make_canvas, save_local_export
from transfer_timm.data import create_eval_transform, normalize
from transfer_timm.inference import (
    FaceBox, FaceDetector, FacePredictor, HaarFaceDetector, ImageInput, WholeImageDetector, YuNetFaceDetector,
    array_to_pil, clip_box, create_detector, iter_video_frames, label_names_for, load_model, predict_video,
)
from transfer_timm.models import FERPLUS_LABEL_NAMES

FACE_SIZES = (200, 190, 180, 170, 160, 150)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return save_local_export(create_test_model(seed=0), tmp_path_factory.mktemp('export') / 'transfer_tiny_test')


@pytest.fixture(scope='module')
def predictor(model_dir):
    return FacePredictor(f'local-dir:{model_dir}', device='cpu', batch_size=4)


@pytest.fixture(scope='module')
def canvas():
    return make_canvas(DETECTABLE_FACES, FACE_SIZES)


@pytest.fixture(scope='module')
def single_face():
    """One upscaled face on a grey RGB background: an image that every input kind can encode."""
    image, _ = make_canvas(DETECTABLE_FACES[:1], (180,), gap=40)
    return image


def box_iou(a, b):
    left, top = max(a[0], b[0]), max(a[1], b[1])
    right, bottom = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0, right - left) * max(0, bottom - top)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def probabilities_of(result):
    return np.array([list(face.probabilities.values()) for face in result.faces])


def assert_same_prediction(result, reference, atol=1e-6):
    assert result.error is None, result.error
    assert (result.width, result.height) == (reference.width, reference.height)
    assert [face.box for face in result.faces] == [face.box for face in reference.faces]
    np.testing.assert_allclose(probabilities_of(result), probabilities_of(reference), atol=atol)


# Detectors

def test_haar_finds_upscaled_ferplus_faces(canvas):
    image, pasted = canvas
    boxes = HaarFaceDetector().detect(np.asarray(image))
    assert len(boxes) == len(pasted)
    for face in pasted:
        best = max(box_iou(face, box[:4]) for box in boxes)
        assert best > 0.6, f'no detection overlaps the face pasted at {face}'
    for box in boxes:
        assert 0.0 < box.score <= 1.0


def test_haar_upscales_tiny_image():
    face = load_face(DETECTABLE_FACES[0], 100)
    image = Image.new('RGB', (130, 130), (128, 128, 128))
    image.paste(face.convert('RGB'), (15, 15))
    boxes = HaarFaceDetector().detect(np.asarray(image))
    assert len(boxes) == 1
    assert box_iou((15, 15, 100, 100), boxes[0][:4]) > 0.6


def test_haar_downscales_huge_image(canvas):
    image, pasted = canvas
    scale = 5
    huge = image.resize((image.width * scale, image.height * scale), Image.BILINEAR)
    boxes = HaarFaceDetector().detect(np.asarray(huge))
    assert len(boxes) == len(pasted)
    for x, y, w, h in pasted:
        face = (x * scale, y * scale, w * scale, h * scale)
        assert max(box_iou(face, box[:4]) for box in boxes) > 0.6


def test_detector_rejects_non_rgb_array():
    with pytest.raises(ValueError, match='RGB uint8'):
        HaarFaceDetector().detect(np.zeros((10, 10), np.uint8))


def test_whole_image_detector_returns_full_box():
    assert WholeImageDetector().detect(np.zeros((30, 40, 3), np.uint8)) == [FaceBox(0.0, 0.0, 40.0, 30.0, 1.0)]


def test_yunet_missing_file_error(tmp_path):
    missing = tmp_path / 'face_detection_yunet.onnx'
    with pytest.raises(FileNotFoundError, match='YuNet model file not found') as info:
        YuNetFaceDetector(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError):
        create_detector('yunet', missing)


def test_create_detector_unknown_name():
    with pytest.raises(ValueError, match='haar'):
        create_detector('mtcnn')


def test_clip_box_cases():
    assert clip_box((-10.5, -4, 50, 30), 100, 80) == (0, 0, 40, 26)
    assert clip_box((90, 70, 50, 50), 100, 80) == (90, 70, 10, 10)
    assert clip_box((200, 200, 10, 10), 100, 80) == (99, 79, 1, 1)


# Model loading and labels

def test_load_model_plain_name_warns():
    with pytest.warns(UserWarning, match='randomly initialised'):
        model = load_model('transfer_ir50')
    assert model.num_classes == 8


def test_load_model_unknown_tag_raises():
    with pytest.raises(RuntimeError, match='ferplus_missing'):
        load_model('transfer_tiny.ferplus_missing')


def test_local_dir_loads_weights_and_labels(tmp_path):
    model = create_test_model(seed=3)
    names = [f'expr_{i}' for i in range(8)]
    folder = save_local_export(model, tmp_path / 'custom', label_names=names)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        loaded = load_model(f'local-dir:{folder}')
    for (key, expected), actual in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, actual), key
    assert label_names_for(loaded) == names
    predictor = FacePredictor(loaded, detector='none', device='cpu')
    result = predictor.predict(load_face(DETECTABLE_FACES[0], 48))
    assert list(result.faces[0].probabilities) == names


def test_label_names_fallbacks():
    model = create_test_model()
    model.pretrained_cfg = {}
    assert label_names_for(model) == list(FERPLUS_LABEL_NAMES)
    model.reset_classifier(3)
    assert label_names_for(model) == ['class_0', 'class_1', 'class_2']


# Prediction on a canvas of faces

def test_predictor_finds_all_faces(predictor, canvas):
    image, pasted = canvas
    result = predictor.predict(image)
    assert result.error is None
    assert (result.width, result.height) == image.size
    assert len(result.faces) == len(pasted)
    for face in pasted:
        assert max(box_iou(face, found.box) for found in result.faces) > 0.6


def test_faces_ordered_largest_first(predictor, canvas):
    areas = [face.box[2] * face.box[3] for face in predictor.predict(canvas[0]).faces]
    assert areas == sorted(areas, reverse=True)


def test_face_record_fields(predictor, canvas):
    for face in predictor.predict(canvas[0]).faces:
        assert list(face.probabilities) == list(FERPLUS_LABEL_NAMES)
        assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert face.label == max(face.probabilities, key=face.probabilities.get)
        assert face.score == face.probabilities[face.label]
        x, y, w, h = face.box
        assert x >= 0
        assert y >= 0
        assert x + w <= canvas[0].width
        assert y + h <= canvas[0].height


def test_max_faces_keeps_largest(model_dir, predictor, canvas):
    all_faces = predictor.predict(canvas[0]).faces
    limited = FacePredictor(f'local-dir:{model_dir}', device='cpu', max_faces=2).predict(canvas[0]).faces
    assert [face.box for face in limited] == [face.box for face in all_faces[:2]]


def test_batching_across_images_matches_single(predictor, canvas):
    image = canvas[0]
    images = [image, image.transpose(Image.FLIP_LEFT_RIGHT), image.convert('L')]
    batched = predictor.predict_many(images)
    assert len(batched) == 3
    for source_image, result in zip(images, batched):
        assert_same_prediction(result, predictor.predict(source_image), atol=1e-5)


def test_iter_predict_reads_input_lazily(model_dir, canvas):
    consumed = []

    def images():
        for i in range(10):
            consumed.append(i)
            yield canvas[0]

    predictor = FacePredictor(f'local-dir:{model_dir}', device='cpu', batch_size=2)
    first = next(predictor.iter_predict(images()))
    assert len(first.faces) == len(DETECTABLE_FACES)
    assert len(consumed) == 1


def test_no_face_gives_empty_record(predictor):
    result = predictor.predict(Image.new('RGB', (320, 240), (90, 120, 200)))
    assert result.error is None
    assert result.faces == []


def test_face_cut_by_border_is_clipped(model_dir):
    class FixedDetector:
        def detect(self, image_rgb):
            return [FaceBox(-30.0, -20.0, 100.0, 100.0, 0.9)]

    assert isinstance(FixedDetector(), FaceDetector)
    predictor = FacePredictor(f'local-dir:{model_dir}', detector=FixedDetector(), device='cpu')
    face = load_face(DETECTABLE_FACES[0], 160).crop((30, 20, 160, 160))
    result = predictor.predict(face)
    assert len(result.faces) == 1
    assert result.faces[0].box == (0, 0, 70, 80)
    assert result.faces[0].detection_score == pytest.approx(0.9)


def test_real_face_cut_by_border_is_found(predictor):
    face = load_face(DETECTABLE_FACES[0], 180)
    image = Image.new('RGB', (300, 240), (128, 128, 128))
    image.paste(face.convert('RGB'), (-15, 30))
    result = predictor.predict(image)
    assert len(result.faces) == 1
    x, y, w, h = result.faces[0].box
    assert x >= 0
    assert x + w <= 300
    assert y + h <= 240


# Train/inference parity

def test_no_detect_tensor_matches_eval_transform(model_dir):
    predictor = FacePredictor(f'local-dir:{model_dir}', detector='none', device='cpu')
    crop = load_face(DETECTABLE_FACES[1], 150).convert('RGB')
    boxes = [box for box, _ in predictor.detect(crop)]
    assert boxes == [(0, 0, 150, 150)]
    built = predictor.preprocess(predictor.crop_faces(crop, boxes))

    cfg = timm.data.resolve_data_config(model=predictor.model)
    expected = normalize(create_eval_transform(cfg)(crop).unsqueeze(0), cfg['mean'], cfg['std'])
    assert built.shape == (1, 1, 48, 48)
    assert torch.equal(built, expected)

    with torch.no_grad():
        probs = predictor.model(expected).softmax(-1)[0]
    result = predictor.predict(crop)
    np.testing.assert_allclose(list(result.faces[0].probabilities.values()), probs.numpy(), atol=1e-6)


def test_rgb_model_tensor_matches_eval_transform():
    model = create_test_model(seed=1, in_chans=3)
    with pytest.raises(ValueError, match='3 channels'):
        FacePredictor(model, detector='none', device='cpu')
    data_config = dict(timm.data.resolve_data_config(model=model), input_size=(3, 48, 48), mean=(0.5,) * 3,
                       std=(0.25, 0.5, 0.75))
    predictor = FacePredictor(model, detector='none', device='cpu', data_config=data_config)
    crop = Image.new('RGBA', (64, 80), (200, 40, 10, 128))
    built = predictor.preprocess(predictor.crop_faces(crop, [(0, 0, 64, 80)]))
    cfg = predictor.data_config
    expected = normalize(create_eval_transform(cfg)(crop).unsqueeze(0), cfg['mean'], cfg['std'])
    assert torch.equal(built, expected)


# Input kinds

def test_file_path_with_non_ascii_name(predictor, single_face, tmp_path):
    path = tmp_path / 'visage_été_表情.png'
    single_face.save(path)
    result = predictor.predict(path)
    assert result.source == str(path)
    assert len(result.faces) == 1
    assert_same_prediction(result, predictor.predict(single_face))
    assert_same_prediction(predictor.predict(str(path)), predictor.predict(single_face))


def test_numpy_rgb_and_bgr_orders(predictor, single_face):
    reference = predictor.predict(single_face)
    # A coloured tint makes the two channel orders give different pixels.
    rgb = np.asarray(single_face).copy()
    rgb[:, :, 0] = np.clip(rgb[:, :, 0].astype(int) + 40, 0, 255)
    tinted = predictor.predict(Image.fromarray(rgb))
    assert_same_prediction(predictor.predict(rgb, color_order='RGB'), tinted)
    assert_same_prediction(predictor.predict(np.ascontiguousarray(rgb[:, :, ::-1]), color_order='BGR'), tinted)
    assert len(reference.faces) == 1


def test_numpy_colour_needs_color_order(predictor, single_face):
    with pytest.raises(ValueError, match='color_order'):
        predictor.predict(np.asarray(single_face))


def test_bgra_array_keeps_alpha():
    bgra = np.zeros((4, 5, 4), np.uint8)
    bgra[..., 0] = 255
    bgra[..., 3] = 7
    image = array_to_pil(bgra, 'BGR')
    assert image.mode == 'RGBA'
    assert image.getpixel((0, 0)) == (0, 0, 255, 7)


def test_grayscale_inputs(predictor, single_face):
    gray = single_face.convert('L')
    reference = predictor.predict(gray)
    assert len(reference.faces) == 1
    assert_same_prediction(predictor.predict(np.asarray(gray)), reference)
    assert_same_prediction(predictor.predict(np.asarray(gray)[:, :, None]), reference)
    assert_same_prediction(predictor.predict(single_face), reference)


def test_float_and_bool_arrays(predictor, single_face):
    gray = np.asarray(single_face.convert('L'))
    assert_same_prediction(predictor.predict(gray / 255.0), predictor.predict(gray))
    assert predictor.predict(gray > 128).error is None
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        predictor.predict(gray.astype(np.float32))


def test_sixteen_bit_png_is_scaled_not_clipped(predictor, single_face, tmp_path):
    gray8 = np.asarray(single_face.convert('L'))
    gray16 = gray8.astype(np.uint16) * 257
    path = tmp_path / 'face16.png'
    assert cv2.imwrite(str(path), gray16)
    with Image.open(path) as img:
        assert img.mode.startswith('I')
    reference = predictor.predict(gray8)
    assert_same_prediction(predictor.predict(path), reference)
    assert_same_prediction(predictor.predict(gray16), reference)


def test_sixteen_bit_colour_png(predictor, single_face, tmp_path):
    rgb16 = np.asarray(single_face).astype(np.uint16) * 257
    path = tmp_path / 'face48bit.png'
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb16[:, :, ::-1]))
    result = predictor.predict(path)
    assert_same_prediction(result, predictor.predict(single_face))


def test_transparent_images(predictor, single_face, tmp_path):
    face = single_face.convert('L')
    # Transparent border around an opaque face region. Transparency becomes white.
    alpha = Image.new('L', face.size, 0)
    alpha.paste(255, (20, 20, face.width - 20, face.height - 20))
    rgba = single_face.convert('RGBA')
    rgba.putalpha(alpha)
    la = face.convert('LA')
    la.putalpha(alpha)
    # A grey palette image with even grey levels only, whose top border uses the odd
    # level 1 and marks it transparent.
    bordered = face.point(lambda v: v & ~1)
    bordered.paste(1, (0, 0, face.width, 20))
    palette = bordered.convert('P')
    palette.info['transparency'] = palette.getpixel((0, 0))

    for name, image in (('rgba.png', rgba), ('la.png', la), ('palette.png', palette)):
        path = tmp_path / name
        if image.mode == 'P':
            image.save(path, transparency=image.info['transparency'])
        else:
            image.save(path)
        result = predictor.predict(path)
        assert result.error is None, name
        assert len(result.faces) == 1, name
        with Image.open(path) as reopened:
            assert reopened.mode == image.mode, name
        assert_same_prediction(result, predictor.predict(image))

    whole = (0, 0, palette.width, palette.height)
    assert predictor.crop_faces(palette, [whole])[0].getpixel((0, 0)) == 255
    assert predictor.crop_faces(rgba, [whole])[0].getpixel((0, 0)) == 255


def test_cmyk_jpeg(predictor, single_face, tmp_path):
    path = tmp_path / 'face_cmyk.jpg'
    single_face.convert('CMYK').save(path, quality=95)
    with Image.open(path) as img:
        assert img.mode == 'CMYK'
    result = predictor.predict(path)
    assert result.error is None
    assert len(result.faces) == 1


def test_exif_orientation_is_applied(predictor, single_face, tmp_path):
    wide = Image.new('RGB', (400, 260), (128, 128, 128))
    wide.paste(single_face, (10, 0))
    upright = predictor.predict(wide)
    assert len(upright.faces) == 1

    # Store the image rotated, with EXIF orientation 6 ("rotate 90 degrees clockwise to display").
    stored = wide.transpose(Image.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / 'rotated.jpg'
    stored.save(path, exif=exif, quality=95)
    result = predictor.predict(path)
    assert (result.width, result.height) == (400, 260)
    assert len(result.faces) == 1
    assert box_iou(result.faces[0].box, upright.faces[0].box) > 0.8


def test_tiny_images(predictor, model_dir):
    assert predictor.predict(Image.new('RGB', (1, 1))).error is None
    assert predictor.predict(load_face(DETECTABLE_FACES[0], 48)).error is None
    whole = FacePredictor(f'local-dir:{model_dir}', detector='none', device='cpu')
    result = whole.predict(Image.new('L', (3, 2), 50))
    assert len(result.faces) == 1
    assert result.faces[0].box == (0, 0, 3, 2)


def test_huge_image(predictor, canvas):
    image, pasted = canvas
    huge = image.resize((image.width * 5, image.height * 5), Image.BILINEAR)
    result = predictor.predict(huge)
    assert (result.width, result.height) == huge.size
    assert len(result.faces) == len(pasted)


def test_bad_files_give_error_records(predictor, single_face, tmp_path):
    good = tmp_path / 'good.png'
    single_face.save(good)
    encoded = io.BytesIO()
    single_face.save(encoded, format='PNG')
    truncated = tmp_path / 'truncated.png'
    truncated.write_bytes(encoded.getvalue()[:len(encoded.getvalue()) // 2])
    empty = tmp_path / 'empty.jpg'
    empty.write_bytes(b'')
    text = tmp_path / 'notes.jpg'
    text.write_text('not an image', encoding='utf-8')
    missing = tmp_path / 'missing.png'
    folder = tmp_path / 'folder.png'
    folder.mkdir()

    bad = [truncated, empty, text, missing, folder]
    results = predictor.predict_many([good, *bad, good])
    assert [r.source for r in results] == [str(p) for p in [good, *bad, good]]
    assert len(results[0].faces) == 1
    assert len(results[-1].faces) == 1
    for path, result in zip(bad, results[1:-1]):
        assert result.faces == []
        assert result.error is not None, path
        assert str(path) in result.error
        assert result.to_dict()['error'] == result.error
    assert 'empty (0 bytes)' in results[2].error
    assert 'unknown image format' in results[3].error
    assert f'Image {missing} not found' in results[4].error
    assert 'is a folder, not an image' in results[5].error


def test_image_input_carries_source_and_frame(predictor, single_face):
    result = predictor.predict(ImageInput(np.asarray(single_face), source='camera', color_order='RGB',
                                          frame_index=7, timestamp=0.25))
    record = result.to_dict()
    assert record['source'] == 'camera'
    assert record['frame_index'] == 7
    assert record['timestamp'] == 0.25
    assert len(record['faces']) == 1


# Video

@pytest.fixture(scope='module')
def face_video(tmp_path_factory):
    image, _ = make_canvas(DETECTABLE_FACES[:2], (180, 160), gap=40)
    bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    path = tmp_path_factory.mktemp('video') / 'faces.avi'
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), 10.0, (bgr.shape[1], bgr.shape[0]))
    assert writer.isOpened()
    for i in range(7):
        writer.write(np.roll(bgr, 2 * i, axis=1))
    writer.release()
    return path


def test_video_frames_with_stride(face_video):
    frames = list(iter_video_frames(face_video, frame_stride=3))
    assert [frame.index for frame in frames] == [0, 3, 6]
    assert [frame.timestamp for frame in frames] == pytest.approx([0.0, 0.3, 0.6], abs=1e-3)
    assert frames[0].image.dtype == np.uint8
    assert frames[0].image.ndim == 3


def test_video_max_frames(face_video):
    assert len(list(iter_video_frames(face_video, max_frames=2))) == 2


def test_predict_video_records(predictor, face_video):
    records = list(predict_video(predictor, face_video, frame_stride=2))
    assert [r.frame_index for r in records] == [0, 2, 4, 6]
    assert [r.timestamp for r in records] == pytest.approx([0.0, 0.2, 0.4, 0.6], abs=1e-3)
    for record in records:
        assert record.source == str(face_video)
        assert len(record.faces) == 2


def test_missing_video_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        next(iter_video_frames(tmp_path / 'missing.mp4'))
