"""Real faces on a 2-core CPU: the light ResNet-18 (width 0.5) on 96 px crops of the AFLW
photos (3DDFA layout, ../shared/data/aflw_3ddfa), trained from scratch with all five loss
terms of the paper (L_land, L_photo, L_dff, L_land_error from epoch 6, L_reg), the paper's
step schedule (decay after epoch 5 of 10) and augmentations (flip, +-30 deg rotation, colour).

Labels: the crops' pseudo-68 points (data_prep.aflw_pseudo68: the model fitted to each crop's
visible 21 hand points, as AFLW2000-3D's ground truth was made), which also frame each crop
like a 68-point face; `aflw_labels="pts21"` trains on the 21 hand points instead. Validation:
the held-out AFLW split (21-point NME over visible points) and, every epoch, the AFLW2000-3D
development images (68-point NME, Table-1 layout). Figures and the chosen L_dff weight are in
BUILD_NOTES.md ("Training on real faces")."""

import os

from dff3d import losses, train

_SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


def get_config():
  return train.TrainConfig(
      name="real", backbone="light", width=0.5, image_size=96, batch_size=16,
      learning_rate=3e-4, decayed_learning_rate=3e-5, decay_epoch=5, num_epochs=10,
      land_error_start_epoch=5, data="aflw",
      aflw_dir=os.path.normpath(os.path.join(_SHARED, "aflw_3ddfa")),
      aflw_pseudo68="", aflw_labels="pseudo68",  # "": fitted into the workdir on first use
      dev_dir=os.path.normpath(os.path.join(_SHARED, "aflw2000_3d_dev")),
      eval_every_steps=0, log_every_steps=50, checkpoint_every_steps=500,
      weights=losses.LossWeights(dff=0.1))
