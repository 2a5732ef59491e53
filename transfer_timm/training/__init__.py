"""Training, evaluation and export helpers; they use both the models and the data packages."""
from .checkpoint import atomic_replace_dir, atomic_save_safetensors, atomic_write_json
from .export import export_model, render_confusion_matrix, render_model_card
from .metrics import confusion_matrix, metrics_from_confusion
from .evaluate import evaluate_split
