"""The server-memory sampler's peak per window."""

from littlebig.serving.memory import MemorySampler, Sample


def test_peak_of_a_window_between_two_samples_is_bounded_by_them():
    import os

    sampler = MemorySampler(os.getpid())
    sampler.samples = [Sample(1.0, 100), Sample(2.0, 300), Sample(3.0, 200), Sample(4.0, 50)]
    assert sampler.peak(1.5, 3.5) == 300  # samples inside, and the ones bracketing it
    assert sampler.peak(2.2, 2.4) == 300  # no sample inside: the two around it (a pass shorter than the interval)
    assert sampler.peak(3.1, 3.2) == 200
    assert sampler.peak(5.0, 6.0) == 50  # after the last sample: the last one
    assert sampler.peak() == 300
    assert MemorySampler(os.getpid()).peak(0.0, 1.0) == 0  # nothing sampled
