"""A configuration sized for a 2-core CPU: the light ResNet-18 backbone at half width on
96 px crops, trained from scratch (so a larger learning rate than the paper's fine-tuning of
an ImageNet VGG), with the paper's losses, weights and augmentations. 8 epochs of 2048
synthetic faces (1024 steps) fit in 20 minutes on a 2-core CPU, with the paper's schedule
(learning-rate decay after epoch 5, L_land_error from epoch 6)."""

from dff3d import losses, train


def get_config():
  return train.TrainConfig(name="cpu", backbone="light", width=0.5, image_size=96,
                           batch_size=16, learning_rate=3e-4, decayed_learning_rate=3e-5,
                           decay_epoch=5, num_epochs=8, synthetic_train=2048,
                           synthetic_val=128, eval_every_steps=200, log_every_steps=20,
                           weights=losses.LossWeights())
