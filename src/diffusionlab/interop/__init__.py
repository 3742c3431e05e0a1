"""Other libraries' models behind diffusionlab's interfaces (optional dependencies, imported lazily).

- :mod:`diffusionlab.interop.diffusers` -- a Hugging Face diffusers ``UNet2DModel`` (a ``save_pretrained``
  folder or a ``DDPMPipeline`` folder) as a :class:`~diffusionlab.parametrization.DiffusionModel`, and the
  export of a diffusionlab U-Net run as a diffusers ``DDPMPipeline`` folder (extra ``diffusers``);
- :mod:`diffusionlab.interop.inception` -- torch-fidelity's FID Inception-v3 as a feature extractor for
  :mod:`diffusionlab.metrics.standard`, weights from a local file (extra ``metrics``);
- :mod:`diffusionlab.interop.optional` -- importing those libraries (and the torchvision clash next to a CPU
  torch).
"""
