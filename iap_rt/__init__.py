"""iap-rt: a Chinese voice for an English Stable Diffusion, served fast.

The runtime (this package proper) needs only numpy, onnxruntime, tokenizers, pillow,
click and tqdm. The stages ``iap_rt.train``, ``iap_rt.export`` (torch) and
``iap_rt.engines`` (TensorRT) are imported only by the commands that need them.
"""

__version__ = "0.1.0"

from iap_rt.errors import IapRtError  # noqa: E402

__all__ = ["IapRtError", "__version__"]
