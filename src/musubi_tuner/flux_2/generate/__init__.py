"""The parts of ``flux_2_generate_image.py`` (the script only runs them):

- ``args``: the command line — upstream musubi-tuner flags, Blissful extras, every check that needs no model;
- ``generator``: ``Flux2Generator`` — text encoder, VAE, DiT, sampling, decoding and saving of one run, and
  ``decode_saved_latents`` (``--latent_path``).
"""
