"""Engine tests: the lorp library on tiny models built from configs, and on the real demo model."""
