"""Model families registered with timm: IR face backbones and TransFER."""
from .irnet import IRNet, IRUnit, IRStem
from .loading import check_local_dir, create_pretrained
from .layers import LANet, MSADAttention, MultiAttentionDropping, drop_one_per_sample
from .transfer import FERPLUS_LABEL_NAMES, TransFER, TransFERBlock, load_ir_stem
