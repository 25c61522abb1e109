"""dff3d: monocular 3D face reconstruction and dense face alignment in JAX/Flax."""

__version__ = "0.1.0"
