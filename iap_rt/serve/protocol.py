"""The contract of the Triton model ``iap_rt``: its tensors, and one row = one image.

The gateway sends each image of a request as its own one-row inference, so Triton's dynamic
batcher can put any images of any requests together (up to ``--max-batch`` rows). A row's
inputs: ``prompt``, ``negative_prompt``, ``scheduler`` (UTF-8 bytes; ``""`` = the model's
default scheduler), ``seed`` (int64), ``steps`` (0 = the default), ``height``, ``width``
(int32; 0 = the model's size), ``guidance`` (fp64, so the parameters recorded in the PNG are
the float the client sent; NaN = the model's default guidance) and ``model_key`` (the
fingerprint of the model the gateway resolved the row against, or ``""``: the Triton model
trusts a row resolved against its own model and resolves any other,
:func:`iap_rt.requests.trusted`). Edits add ``image_png`` and ``mask_png`` (PNG bytes, lossless;
``b""`` = none), ``strength`` (fp64, NaN = none) and ``mask_blur`` (int32, -1 = the default):
every input is one element per row, so edits and generations batch together. Outputs per row: ``image`` (H, W, 3 uint8),
``params`` (the JSON the PNG records), ``batch`` (how many images shared the UNet batch) and
``error`` (``""`` or a JSON object with ``status``, ``type`` and ``message``: one bad row never
fails the rows batched with it).
This module is plain numpy, shared by the Triton side and the clients.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from iap_rt.requests import PromptRequest, ResolvedRequest

MODEL_NAME = "iap_rt"
MODEL_GUIDANCE = float("nan")  # a row's guidance that means "the model's default"

# name -> (numpy dtype, Triton dtype); every input is one value per row
INPUTS = {
    "prompt": (np.object_, "BYTES"),
    "negative_prompt": (np.object_, "BYTES"),
    "scheduler": (np.object_, "BYTES"),
    "seed": (np.int64, "INT64"),
    "steps": (np.int32, "INT32"),
    "height": (np.int32, "INT32"),
    "width": (np.int32, "INT32"),
    "guidance": (np.float64, "FP64"),
    "model_key": (np.object_, "BYTES"),
    "image_png": (np.object_, "BYTES"),
    "mask_png": (np.object_, "BYTES"),
    "strength": (np.float64, "FP64"),
    "mask_blur": (np.int32, "INT32"),
}
BINARY = ("image_png", "mask_png")  # BYTES inputs that are not UTF-8 text
# name -> (numpy dtype, Triton dtype, per-row shape)
OUTPUTS = {
    "image": (np.uint8, "UINT8", (-1, -1, 3)),
    "params": (np.object_, "BYTES", (1,)),
    "batch": (np.int32, "INT32", (1,)),
    "error": (np.object_, "BYTES", (1,)),
}


@dataclass(frozen=True)
class Row:
    """One image to generate."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 0  # 0: the default
    guidance: float = MODEL_GUIDANCE  # NaN: the model's default
    height: int = 0  # 0: the model's size
    width: int = 0
    scheduler: str = ""  # "": the model's default
    model_key: str = ""  # the model it was resolved against; "": not resolved
    image_png: bytes = b""  # edits: the image (PNG), b"": a generation
    mask_png: bytes = b""  # inpainting: the mask (PNG, 255 = repaint)
    strength: float = float("nan")  # NaN: none (the default for an edit)
    mask_blur: int = -1  # -1: the default

    @classmethod
    def of(cls, request: ResolvedRequest) -> list[Row]:
        """One row per image of a resolved request (image i: seed + i)."""
        edit = {}
        if request.is_edit:
            edit = {"image_png": _png(request.image), "strength": float(request.strength),
                    "mask_blur": request.mask_blur}  # fmt: skip
            if request.mask is not None:
                edit["mask_png"] = _png((request.mask * 255).astype(np.uint8))
        return [
            cls(request.prompt, request.negative_prompt, request.seed + i, request.steps,
                request.guidance, request.height, request.width, request.scheduler,
                request.model_key, **edit)
            for i in range(request.batch_size)
        ]  # fmt: skip

    def edit(self) -> dict:
        """The row's edit fields as arrays (empty for a generation)."""
        if not self.image_png:
            return {}
        from iap_rt.image_input import load_image, load_mask

        out = {"image": load_image(self.image_png),
               "strength": None if math.isnan(self.strength) else self.strength,
               "mask_blur": None if self.mask_blur < 0 else self.mask_blur}  # fmt: skip
        if self.mask_png:
            out["mask"] = load_mask(self.mask_png)
        return out

    def request(self) -> PromptRequest:
        """The row as a request to resolve (its "unset" values back to None)."""
        return PromptRequest(
            self.prompt, self.negative_prompt, self.seed,
            None if math.isnan(self.guidance) else self.guidance, 1, None,
            self.steps or None, self.height or None, self.width or None, self.scheduler or None,
            **self.edit(),
        )  # fmt: skip

    def fields(self) -> dict:
        """The row as the fields of a one-image :class:`ResolvedRequest` (when trusted)."""
        edit = self.edit()
        if "mask" in edit:
            edit["mask"] = (edit["mask"] >= 128).astype(np.float32)
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "seed": self.seed, "guidance": self.guidance, "batch_size": 1,
                "steps": self.steps, "height": self.height, "width": self.width,
                "scheduler": self.scheduler, **edit}  # fmt: skip

    def to_inputs(self) -> dict[str, np.ndarray]:
        """The row as Triton inputs, each of shape (1, 1)."""
        out = {}
        for name, (dtype, _) in INPUTS.items():
            v = getattr(self, name)
            v = v.encode("utf-8") if isinstance(v, str) else v
            out[name] = np.array([[v]], dtype=dtype)
        return out


def rows_from_inputs(data: dict[str, np.ndarray]) -> list[Row | str]:
    """The rows of one Triton request (arrays of shape (rows, 1)); a row that cannot be
    decoded (bytes that are not UTF-8, a missing input) becomes the reason as a string."""
    n = len(next(iter(data.values()))) if data else 0
    rows: list[Row | str] = []
    for i in range(n):
        try:
            values = {}
            for name, (dtype, _) in INPUTS.items():
                v = np.asarray(data[name]).reshape(n, -1)[i, 0]
                if name in BINARY:
                    v = bytes(v)
                elif dtype is np.object_:
                    v = bytes(v).decode("utf-8")
                elif dtype is np.float64:
                    v = float(v)
                else:
                    v = int(v)
                values[name] = v
            rows.append(Row(**values))
        except KeyError as e:
            rows.append(f"input {e.args[0]!r} is missing")
        except UnicodeDecodeError as e:
            rows.append(f"text input is not UTF-8 (byte {e.start})")
    return rows


def _png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of an (H, W, 3) or (H, W) uint8 array (fast compression)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def error_json(status: int, message: str, kind: str) -> bytes:
    """The ``error`` output of a failed row."""
    return json.dumps({"status": status, "type": kind, "message": message}).encode("utf-8")
