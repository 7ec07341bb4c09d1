import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import UnusableImage, load_rgb, resolve_image_path


def _save(path, image, **kw):
    image.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L", "I;16"])
def test_odd_modes_are_converted_not_rejected(tmp_path, mode):
    if mode == "I;16":
        image = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 7).astype(np.uint16))
        path = _save(tmp_path / "x.png", image)
    else:
        image = Image.new("RGB", (32, 32), (200, 10, 10)).convert(mode)
        path = _save(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"), image)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == image.size


@pytest.mark.parametrize("content, reason", [(b"", "empty_file"), (b"not an image", "not_an_image"),
                                             (None, "missing_file")])
def test_unusable_files_get_reasons(tmp_path, content, reason):
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UnusableImage) as info:
        load_rgb(path)
    assert info.value.reason == reason


def test_truncated_file_is_unreadable(tmp_path):
    path = _save(tmp_path / "x.png", Image.new("RGB", (256, 256), (1, 2, 3)))
    path.write_bytes(path.read_bytes()[:80])
    with pytest.raises(UnusableImage) as info:
        load_rgb(path)
    assert info.value.reason == "unreadable"


def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    path = _save(tmp_path / "x.png", Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UnusableImage) as info:
        load_rgb(path)
    assert info.value.reason == "oversized"


def test_paths_must_stay_inside_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    for bad in ("../secret.png", "/etc/passwd", "link.png"):
        with pytest.raises(UnusableImage) as info:
            resolve_image_path(root, bad)
        assert info.value.reason == "path_escapes_root"
    assert resolve_image_path(root, "sub/ok.png") == (root / "sub" / "ok.png").resolve()


def test_paths_that_are_not_paths_are_quarantined_not_a_traceback(tmp_path):
    from pipeline.runs import image_root_digest

    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # a symbolic-link loop
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")  # dangling, named by no catalog row
    with pytest.raises(UnusableImage) as nul:
        resolve_image_path(tmp_path, "a\x00b.png")
    assert nul.value.reason == "bad_path"
    with pytest.raises(UnusableImage) as loop:
        load_rgb(resolve_image_path(tmp_path, "loop"))
    assert loop.value.reason in {"bad_path", "unreadable"}
    assert len(image_root_digest(tmp_path)) == 64  # walking the root stats links, never their targets
