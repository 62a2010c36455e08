"""The parts of ``kandinsky5_generate_video.py`` (the script itself only runs them), one job each:

- ``args``: the command line — parser, §12.6 aliases, checks that need no model (``setup_parser``, ``parse_args``);
- ``plan``: one job's resolved settings (``JobPlan``, ``plan_job``, ``validate_job``);
- ``generator``: ``K5Generator`` — text encoders, VAE, DiT, sampling and decoding of one run;
- ``outputs``: writing files (``write_outputs``) and ``--decode_from_latent`` (``decode_saved_latents``).
"""
