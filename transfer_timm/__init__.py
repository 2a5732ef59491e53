"""transfer-timm: TransFER and IR face backbones for timm, trained on FER+.

Importing the package registers its models with timm::

    import timm, transfer_timm
    model = timm.create_model('transfer_ir50', num_classes=8)
"""
from . import models
from .models import FERPLUS_LABEL_NAMES

__version__ = '0.1.0'
