"""Expression prediction on photos and videos, and ONNX export.

This package imports :mod:`transfer_timm.models` and :mod:`transfer_timm.data` only,
never the training code. :mod:`.onnx_export` needs the optional ``onnx`` extra and is
not imported here.
"""
from .detect import (
    DETECTOR_NAMES, FaceBox, FaceDetector, HaarFaceDetector, WholeImageDetector, YuNetFaceDetector, clip_box,
    create_detector,
)
from .images import COLOR_ORDERS, array_to_pil, load_image, to_pil_image
from .predictor import FacePrediction, FacePredictor, ImageInput, ImagePrediction, label_names_for, load_model
from .runner import (
    OUTPUT_FORMATS, CsvRecordWriter, JsonRecordWriter, PredictSummary, RecordWriter, collect_inputs,
    create_record_writer, predict_paths,
)
from .video import VIDEO_EXTENSIONS, VideoFrame, count_video_frames, is_video_file, iter_video_frames, predict_video
