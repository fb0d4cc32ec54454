"""The quality experiment: a small class-conditional DiT trained on drawn shapes, sampled with every acceleration."""
