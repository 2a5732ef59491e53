"""FER+ readers and face transforms; this package imports no model code."""
from .fer2013_csv import USAGE_SPLITS, load_fer2013_csv
from .ferplus import (
    FERPLUS_CLASSES, FERPLUS_VOTE_NAMES, LABEL_MODES, SPLIT_FOLDERS, DataError, ferplus_features, load_ferplus,
    load_ferplus_split, read_label_csv, votes_to_target,
)
from .sources import LABEL_ALIASES, canonical_label_name, load_fer_dataset, load_image_dataset, reorder_labels
from .transforms import BatchAugment, FaceEvalTransform, create_eval_transform, image_mode_for, normalize, to_model_mode
