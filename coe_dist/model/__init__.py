"""Model code: no torch.distributed or DeepSpeed here except through the dispatcher interface."""

from coe_dist.model.coe import CoELayer
from coe_dist.model.transformer import CoETransformer, LMOutput

__all__ = ["CoELayer", "CoETransformer", "LMOutput"]
