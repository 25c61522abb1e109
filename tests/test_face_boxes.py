"""reconstruct.box_from_rectangle: a detector rectangle -> a face_box-like crop box."""

import numpy as np

from dff3d import reconstruct


def test_box_from_rectangle_hand_numbers():
  # side 100, centre (150, 100) + (0.1, -0.2) * 100 = (160, 80); half side 1.5 * 100 / 2
  np.testing.assert_allclose(
      reconstruct.box_from_rectangle([100, 50, 200, 150], scale=1.5, offset=(0.1, -0.2)),
      [85, 5, 235, 155])
  # width 100, height 80: side 90; centre (50, 40) + (9, 4.5); half side 90
  np.testing.assert_allclose(
      reconstruct.box_from_rectangle([0, 0, 100, 80], scale=2.0, offset=(0.1, 0.05)),
      [-31, -45.5, 149, 134.5])


def test_box_from_rectangle_defaults_and_batches():
  rects = np.array([[0, 0, 100, 100], [10, 20, 60, 70]], np.float32)
  boxes = reconstruct.box_from_rectangle(rects)
  assert boxes.shape == (2, 4) and boxes.dtype == np.float32
  # the calibrated constants: side 1.52 rectangle sides, centre moved (0.034, 0.016) sides
  np.testing.assert_allclose(boxes[0], [50 + 3.4 - 76, 50 + 1.6 - 76, 50 + 3.4 + 76,
                                        50 + 1.6 + 76], atol=1e-4)
  np.testing.assert_allclose(boxes[1], [35 + 1.7 - 38, 45 + 0.8 - 38, 35 + 1.7 + 38,
                                        45 + 0.8 + 38], atol=1e-4)
