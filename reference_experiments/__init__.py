"""Reference experiments for the RTI-KD setting (issue 3).

Submodules (import them explicitly; this package import stays light):

- ``reference_experiments.data``: dataset loaders (``load_dataset``) returning
  uint8 ``ImageDataset`` arrays (CIFAR-100, CIFAR-10 JPEG copy, Stanford Cars 64x64,
  scikit-learn digits).
- ``reference_experiments.augment``: batched on-device augmentation and eval
  preprocessing.
- ``reference_experiments.models``: ``create_model`` for the RepDistiller CIFAR
  architectures and the digits CNN/MLP pair.
- ``reference_experiments.teacher``: teacher training, safetensors save/load,
  evaluation.
"""
