"""The paper's setting (Sec. 4.1): VGG-16 on 224 px crops, batch 16, Adam 1e-5 -> 1e-6 after
5 epochs, the paper's loss weights and augmentations, frozen DFF."""

from dff3d import train


def get_config():
  return train.TrainConfig(name="paper", backbone="vgg16", width=1.0, fc_width=4096,
                           image_size=224, batch_size=16, learning_rate=1e-5,
                           decayed_learning_rate=1e-6, decay_epoch=5, num_epochs=10,
                           synthetic_train=20000, synthetic_val=256)
