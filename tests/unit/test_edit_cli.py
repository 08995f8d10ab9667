"""``iap-rt generate --image/--mask`` on the embedded model: inputs decoded as PIL-based tools
do (EXIF orientation, alpha, greyscale, 16 bits), sizes kept or resized, every bad input a
one-line error before anything is written."""

import numpy as np
import pytest
from PIL import Image

from iap_rt.image_input import load_image, load_mask, mask_from_alpha, open_image
from iap_rt.images import read_params

SMALL = ("--steps", "4", "--no-progress")


def _scene(path, size=(32, 32)):
    a = np.full((size[1], size[0], 3), 200, np.uint8)
    a[8:20, 2:14] = (220, 30, 30)
    Image.fromarray(a).save(path)
    return a


def _fails(r, words, code=2):
    lines = [x for x in r.err.splitlines() if x.strip() and not x.startswith("note: ")]
    assert r.code == code and len(lines) == 1 and lines[0].startswith("error:"), r.err
    assert words in lines[0], lines[0]


def test_image_to_image_and_inpainting_write_their_edits(tmp_path, run_cli):
    scene = _scene(tmp_path / "s.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    r = run_cli("generate", "右边有一个蓝色的十字", "--image", str(tmp_path / "s.png"), "--mask",
                str(tmp_path / "m.png"), "--out", str(tmp_path / "e.png"), *SMALL)  # fmt: skip
    assert r.code == 0, r.err
    out = np.asarray(Image.open(tmp_path / "e.png"))
    assert np.array_equal(out[:, :16], scene[:, :16])  # kept: the input's own pixels
    p = read_params(tmp_path / "e.png")
    assert p["inpaint"] is True and p["strength"] == 0.8 and p["mask_blur"] == 4
    r = run_cli("generate", "左边有一个蓝色的方块", "--image", str(tmp_path / "s.png"),
                "--strength", "0.5", "--height", "48", "--width", "64",
                "--out", str(tmp_path / "i.png"), *SMALL)  # fmt: skip
    assert r.code == 0, r.err
    assert Image.open(tmp_path / "i.png").size == (64, 48)  # resized to the asked size
    assert read_params(tmp_path / "i.png")["strength"] == 0.5


def test_bad_edit_inputs_are_one_line_errors(tmp_path, run_cli):
    _scene(tmp_path / "odd.png", size=(40, 30))
    (tmp_path / "text.png").write_text("not an image")
    _scene(tmp_path / "s.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "s.png").read_bytes()[:60])
    out = tmp_path / "o.png"
    cases = [
        (("--image", str(tmp_path / "odd.png")), "needs sides that are multiples of 16"),
        (("--image", str(tmp_path / "text.png")), "is not an image"),
        (("--image", str(tmp_path / "cut.png")), "cannot be decoded"),
        (("--image", str(tmp_path / "nope.png")), "does not exist"),
        (("--mask", str(tmp_path / "s.png")), "--mask needs --image"),
        (("--image", str(tmp_path / "s.png"), "--strength", "1.5"), "strength must be"),
        (("--strength", "0.5"), "no image was given"),
    ]
    for args, words in cases:
        _fails(run_cli("generate", "红圆", *args, "--out", str(out), *SMALL), words)
        assert not out.exists()
    r = run_cli("generate", "红圆", "--image", str(tmp_path / "odd.png"), "--out", str(out), *SMALL)
    assert "32x16 or 48x32" in r.err  # the nearest valid sizes


def test_inputs_decode_as_pil_tools_do(tmp_path):
    base = np.zeros((16, 32, 3), np.uint8)
    base[:, :8] = 255  # a white band on the left
    img = Image.fromarray(base)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    shown = load_image(tmp_path / "rot.jpg")
    assert shown.shape == (32, 16, 3) and shown[:8].mean() > 200  # the band is now on top
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 90, 0  # fully transparent: the colour channels are kept
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert (load_image(tmp_path / "a.png") == 90).all()
    assert (mask_from_alpha(open_image(tmp_path / "a.png")) == 255).all()  # OpenAI: edit here
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "g.png")
    assert (load_image(tmp_path / "g.png") == 77).all()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "16.png")
    assert load_image(tmp_path / "16.png").max() == 128  # scaled, not clipped to white
    m = np.zeros((8, 8, 2), np.uint8)
    m[..., 0], m[:4, :, 1] = 255, 255  # white, opaque in the top half only
    Image.fromarray(m, "LA").save(tmp_path / "m.png")
    got = load_mask(tmp_path / "m.png")
    assert (got[:4] == 255).all() and (got[4:] == 0).all()
    with pytest.raises(Exception, match="pixels; at most 10"):
        load_image(tmp_path / "g.png", max_pixels=10)
