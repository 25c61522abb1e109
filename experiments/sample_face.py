r"""Sample random faces of the embedded model and write them as meshes.

  python -m experiments.sample_face --output_dir=out --num=2 --seed=0

Writes out/face_<k>.obj (vertex colours, UVs) and out/face_<k>.ply (vertex colours), shaded
with the default frontal light in a frontal pose.
"""

import os

from absl import app, flags
import jax
import numpy as np

from dff3d import io
from dff3d import morphable_model as mm
from dff3d import shading
from dff3d import synthetic

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "out", "Folder for the meshes.")
_NUM = flags.DEFINE_integer("num", 2, "Number of faces.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")


def random_coefficients(key, model, batch):
  """The synthetic generator's random identity, albedo and expression, in the frontal pose
  and default light of zero_coefficients."""
  c = synthetic.sample_coefficients(key, model, batch)
  return mm.zero_coefficients(model, batch).replace(
      identity=c.identity, albedo=c.albedo, expression=c.expression)


def main(_):
  model = mm.default_model()
  c = random_coefficients(jax.random.PRNGKey(_SEED.value), model, _NUM.value)
  verts, alb = mm.geometry(model, c)
  colours = shading.shade(alb, shading.vertex_normals(verts, model.triangles), c.lighting)
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  for k in range(_NUM.value):
    stem = os.path.join(_OUTPUT_DIR.value, f"face_{k}")
    io.write_obj(stem + ".obj", verts[k], model.triangles, colors=np.clip(colours[k], 0, 1),
                 uv=model.uv, triangle_uv=model.triangle_uv)
    io.write_ply(stem + ".ply", verts[k], model.triangles, colors=np.clip(colours[k], 0, 1))
    print(f"wrote {stem}.obj and {stem}.ply")


if __name__ == "__main__":
  app.run(main)
