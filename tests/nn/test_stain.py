"""Stain normalization (genselfdiff.nn.stain): fitted per image, applied pixel by pixel."""

import numpy as np

from genselfdiff.nn import stain as stains

# A bluer haematoxylin and a paler eosin than the reference: another lab's staining.
OTHER = np.array([[0.65, 0.18], [0.70, 0.85], [0.30, 0.52]])
OTHER /= np.linalg.norm(OTHER, axis=0, keepdims=True)


def stained(amounts: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """uint8 RGB of per-pixel stain amounts (H, W, 2) drawn with stain ``vectors`` (3x2)."""
    od = amounts @ vectors.T
    return np.clip(np.rint(stains.LIGHT * np.exp(-od)), 0, 255).astype(np.uint8)


def tissue(seed: int = 0, side: int = 96) -> np.ndarray:
    """Stain amounts of a tissue-like field: eosin everywhere, haematoxylin in round nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    h = np.zeros((side, side))
    for cy, cx in rng.integers(8, side - 8, (12, 2)):
        h[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = rng.uniform(0.8, 1.6)
    e = rng.uniform(0.9, 1.5, (side, side)) * np.where(h > 0, 0.1, 1.0)  # little eosin inside nuclei
    return np.stack([h, e], -1)


def test_fit_finds_the_two_stains_of_an_image():
    found = stains.fit(stained(tissue(), OTHER))
    assert found is not None
    got = np.asarray(found.stains)
    cosines = (got * OTHER).sum(0)
    assert cosines.min() > 0.98, cosines  # H first, then E, each near the stain that made the image


def test_images_of_two_stainings_come_out_alike():
    amounts = tissue(1)
    ours, theirs = stained(amounts, stains.REFERENCE_STAINS), stained(amounts * 1.4, OTHER)
    before = np.abs(ours.astype(int) - theirs).mean()
    a, b = (stains.fit(x).apply(x) for x in (ours, theirs))
    after = np.abs(a.astype(int) - b).mean()
    assert after < before / 3, (before, after)


def test_apply_is_pixelwise_so_tiles_are_seamless():
    rgb = stained(tissue(2), OTHER)
    s = stains.fit(rgb)
    whole = s.apply(rgb)
    assert whole.dtype == np.uint8 and whole.shape == rgb.shape
    assert np.array_equal(whole[17:61, 5:90], s.apply(rgb[17:61, 5:90]))
    assert np.array_equal(whole[None], s.apply(rgb[None]))  # a batch of tiles, as a model predicts


def test_glass_and_grey_images_are_left_alone():
    assert stains.fit(np.full((64, 64, 3), 245, np.uint8)) is None  # glass: nothing stained
    grey = np.repeat(np.random.default_rng(0).integers(40, 200, (64, 64, 1)), 3, 2).astype(np.uint8)
    assert stains.fit(grey) is None  # one colour, not two stains


def test_fit_image_is_the_same_every_time_and_skips_glass():
    side = stains.FIT_SIDE * 6
    rgb = np.full((side, side, 3), 245, np.uint8)  # mostly glass
    rgb[: stains.FIT_SIDE * 2, : stains.FIT_SIDE * 3] = np.tile(stained(tissue(3, 128), OTHER), (4, 6, 1))
    calls = []

    def read(y, x, h, w):
        calls.append((y, x))
        return rgb[y : y + h, x : x + w]

    first = stains.fit_image(read, rgb.shape[:2])
    assert first is not None and first == stains.fit_image(read, rgb.shape[:2])
    assert (np.asarray(first.stains) * OTHER).sum(0).min() > 0.98
    assert len(calls) <= 2 * 4 * stains.FIT_TILES  # a bounded number of windows, tissue or not


def test_a_model_that_expects_it_predicts_and_segments_normalised_pixels(local_model):
    from genselfdiff import segment

    rgb = stained(tissue(5, 128), OTHER)
    normalised = stains.fit(rgb).apply(rgb)
    plain, expecting = local_model(), local_model()
    expecting.stain = stains.METHOD
    assert np.array_equal(expecting.predict(rgb[None]), plain.predict(normalised[None]))
    want = np.asarray(segment(plain, normalised, skip_background=False).labels)
    got = np.asarray(segment(expecting, rgb, skip_background=False).labels)
    tiled = np.asarray(segment(expecting, rgb, skip_background=False, tile=64, overlap=16).labels)
    assert np.array_equal(got, want) and np.array_equal(tiled, want)
    assert not np.array_equal(np.asarray(segment(plain, rgb, skip_background=False).labels), want)
