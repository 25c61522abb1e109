"""From coefficients to an image: composition of geometry, camera, shading and rasterizer.

No new mathematics lives here; every step is a function of another module.
"""

from typing import Optional, Tuple

import flax
import jax.numpy as jnp

from dff3d import camera
from dff3d import coefficients as coeffs_lib
from dff3d import morphable_model as mm
from dff3d import rasterizer
from dff3d import shading


@flax.struct.dataclass
class Rendering:
  """Everything a loss or a writer may need from one render call (batch B, size H x W).

  image: (B, H, W, 3) shaded face over the background, outline antialiased.
  mask: (B, H, W) antialiased face coverage in [0, 1] (outline gradients).
  skin_mask: (B, H, W) mask x the model's face_region: the pixels the photometric loss uses.
  raster: the rasterizer's Raster (triangle ids, barycentrics, depth, hard mask).
  screen_vertices: (B, N, 3) (x_px, y_px, depth).  vertices_cam, normals_cam: (B, N, 3).
  colours: (B, N, 3) shaded vertex colours.  landmarks_2d: (B, 68, 2) pixels.
  """
  image: jnp.ndarray
  mask: jnp.ndarray
  skin_mask: jnp.ndarray
  raster: rasterizer.Raster
  screen_vertices: jnp.ndarray
  vertices_cam: jnp.ndarray
  normals_cam: jnp.ndarray
  colours: jnp.ndarray
  landmarks_2d: jnp.ndarray


def camera_vertices(model: mm.MorphableModel, c: coeffs_lib.Coefficients,
                    image_size: Tuple[int, int]):
  """(vertices_cam (B, N, 3), screen_vertices (B, N, 3), albedo (B, N, 3)) for an H x W crop
  with the default camera (camera.default_camera)."""
  verts, alb = mm.geometry(model, c)
  cam = camera.to_camera(verts, c.rotation, c.translation)
  focal, pp = camera.default_camera(*image_size)
  return cam, camera.project(cam, focal, pp), alb


def render(model: mm.MorphableModel, c: coeffs_lib.Coefficients, image_size: Tuple[int, int],
           background: Optional[jnp.ndarray] = None, cull_backfaces: bool = True,
           antialias: bool = True) -> Rendering:
  """Render faces with Lambertian SH shading (lighting fixed to the camera frame).

  Args:
    model: morphable model; c: Coefficients with batch B.
    image_size: static (H, W).
    background: optional (B, H, W, 3) image behind the face; black when None.
    cull_backfaces: static; draw only front faces (closed-surface assumption does not hold for
      a face mask seen from behind, which then renders empty).
    antialias: static; blend outline pixels analytically so the outline receives gradients.
  Returns:
    Rendering.
  """
  cam, screen, alb = camera_vertices(model, c, image_size)
  normals = shading.vertex_normals(cam, model.triangles)
  colours = shading.shade(alb, normals, c.lighting)
  raster = rasterizer.rasterize(screen, model.triangles, image_size,
                                cull_backfaces=cull_backfaces)
  # One interpolation and one antialiasing pass serve colours, face region and coverage.
  region = jnp.broadcast_to(model.face_region[None, :, None].astype(colours.dtype),
                            colours.shape[:2] + (1,))
  face_and_region = rasterizer.interpolate(jnp.concatenate([colours, region], axis=-1), raster,
                                           model.triangles)
  face, region = face_and_region[..., :3], face_and_region[..., 3]
  hard = raster.mask[..., None]
  image = face if background is None else face * hard + background * (1.0 - hard)
  mask = raster.mask
  if antialias:
    blended = rasterizer.antialias(jnp.concatenate([image, hard], axis=-1), raster, screen,
                                   model.triangles, twins=model.triangle_twins)
    image, mask = blended[..., :3], blended[..., 3]
  return Rendering(image=image, mask=mask, skin_mask=mask * region, raster=raster,
                   screen_vertices=screen, vertices_cam=cam, normals_cam=normals, colours=colours,
                   landmarks_2d=mm.landmark_points(model, screen)[..., :2])
