"""Client side: images to the wire format, gated inference, calibration and benchmarks."""
