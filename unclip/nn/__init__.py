"""Networks. They know nothing of noise schedules: ``forward(x_t, t, **conditioning)``."""

from unclip.nn.prior import PriorNetwork
from unclip.nn.unet import UNet

__all__ = ["PriorNetwork", "UNet"]
