"""The noise source: per-image random streams (the same noise for image i whatever the batch split, the session or
the runtime), seeded where they are first drawn, filled by several threads for large draws, each stream NumPy's own
default_rng([seed, i])."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffit_port.samplers import NoiseSource


def test_noise_source():
    """Rows are per-image streams: reproducible, equal under split and under a different batch size/offset."""
    full = NoiseSource(7, 6).standard_normal((6, 2, 3))
    assert full.dtype == np.float64
    np.testing.assert_array_equal(full, NoiseSource(7, 6).standard_normal((6, 2, 3)))
    np.testing.assert_array_equal(full[3], np.random.default_rng([7, 3]).standard_normal((2, 3)))
    np.testing.assert_array_equal(full[:3], NoiseSource(7, 3).standard_normal((3, 2, 3)))
    np.testing.assert_array_equal(full[4:], NoiseSource(7, 2, first=4).standard_normal((2, 2, 3)))
    assert not np.array_equal(full, NoiseSource(8, 6).standard_normal((6, 2, 3)))

    ref = NoiseSource(7, 6)
    ref_draws = [ref.standard_normal((6, 2, 3)) for _ in range(2)]
    sub = NoiseSource(7, 6).split(2, 5)
    assert sub.num_images == 3
    for draw in ref_draws:  # successive draws continue each image's own stream
        np.testing.assert_array_equal(sub.standard_normal((3, 2, 3)), draw[2:5])
    with pytest.raises(ValueError):
        NoiseSource(7, 6).standard_normal((5, 2, 3))


def test_noise_source_seeds_each_stream_once_where_it_is_drawn(monkeypatch):
    """A source seeds no stream until it is drawn, each split seeds only its own images, and a stream seeded and
    drawn through one view is continued, never seeded again, when another view draws it (in any order)."""
    from diffit_port.samplers import noise as noise_mod

    seeded = []
    make = noise_mod.stream_generators
    monkeypatch.setattr(noise_mod, "stream_generators", lambda s, a, n: (seeded.append((a, n)), make(s, a, n))[1])
    src = NoiseSource(7, 1024, first=8)
    assert seeded == []
    late, early = src.split(512, 768), src.split(0, 256)
    b = late.standard_normal((256, 2))
    assert seeded == [(520, 256)]
    a = early.standard_normal((256, 2))
    whole = src.standard_normal((1024, 2))       # 256..511 and 768.. seeded now (one pass), the others continued
    assert seeded == [(520, 256), (8, 256), (264, 768)]
    ref = NoiseSource(7, 1024, first=8)
    first, second = (ref.standard_normal((1024, 2)) for _ in range(2))
    np.testing.assert_array_equal(b, first[512:768])
    np.testing.assert_array_equal(a, first[:256])
    drawn = np.zeros(1024, bool)
    drawn[:256] = drawn[512:768] = True
    np.testing.assert_array_equal(whole, np.where(drawn[:, None], second, first))


def test_noise_source_large_draws_are_the_per_image_streams(monkeypatch):
    """Draws of PARALLEL_VALUES or more are filled by several threads: the same values as each image's own
    stream drawn alone, also for successive draws and for a split source."""
    from diffit_port.samplers import noise as noise_mod

    monkeypatch.setattr(noise_mod, "WORKERS", 3)   # three row ranges whatever this machine's core count
    shape = (37, 3, 48, 40)                     # 213k values: >= 3 x PARALLEL_VALUES, uneven rows per range
    assert np.prod(shape) >= 3 * noise_mod.PARALLEL_VALUES
    ranges = []
    fill = NoiseSource._fill
    monkeypatch.setattr(NoiseSource, "_fill", staticmethod(lambda gens, out, a, b: (ranges.append((a, b)),
                                                                                    fill(gens, out, a, b))))
    src = NoiseSource(5, 40).split(3, 40)
    draws = [src.standard_normal(shape) for _ in range(2)]
    assert sorted(ranges) == [(0, 12), (0, 12), (12, 24), (12, 24), (24, 37), (24, 37)]
    src.standard_normal((37, 3, 24, 25))       # 66.6k values: two threads would get under PARALLEL_VALUES each
    assert len(ranges) == 7
    for i in (0, 17, 36):
        g = np.random.default_rng([5, 3 + i])
        for d in draws:
            np.testing.assert_array_equal(d[i], g.standard_normal(shape[1:]))


@settings(max_examples=60, deadline=None)
@given(seed=st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32, 2**70)),
       first=st.one_of(st.integers(0, 1000), st.integers(2**32 - 40, 2**32 + 5)), n=st.integers(0, 40))
def test_stream_generators_are_numpys_default_rng(seed, first, n):
    """The vectorised seeding gives the very streams of np.random.default_rng([seed, first + i]): the same
    PCG64 state, also past 2**32 (where it falls back to NumPy's own seeding)."""
    from diffit_port.samplers.noise import stream_generators

    gens = stream_generators(seed, first, n)
    assert len(gens) == n
    for i, g in enumerate(gens):
        ref = np.random.default_rng([seed, first + i])
        assert g.bit_generator.state == ref.bit_generator.state
        np.testing.assert_array_equal(g.standard_normal(3), ref.standard_normal(3))
