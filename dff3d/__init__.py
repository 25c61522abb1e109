"""dff3d: monocular 3D face reconstruction and dense face alignment in JAX/Flax.

    import dff3d
    faces = dff3d.reconstruct("photo.jpg")   # or an (H, W, 3) array; see dff3d.reconstructor

`reconstruct`, `Reconstructor` and `Face` are loaded on first use, so `import dff3d.camera`
and friends stay light.
"""

__version__ = "0.1.0"

_LAZY = {"reconstruct": "reconstruct", "Reconstructor": "Reconstructor", "Face": "Face"}


def __getattr__(name):
  if name in _LAZY:
    from dff3d import reconstructor  # pylint: disable=import-outside-toplevel
    return getattr(reconstructor, _LAZY[name])
  raise AttributeError(f"module 'dff3d' has no attribute {name!r}")
