"""Session-wide fixtures: one tiny Kandinsky 5 bundle and one synthetic dataset per test session, shared by all tests.

Both are read-only for tests: a test that writes caches or edits files must use ``fresh_synthetic_dataset`` (its
own copy, function scope) or copy what it needs into ``tmp_path``.
"""

from __future__ import annotations

import logging

import pytest

from musubi_tuner.demo.bundles import K5Bundle, write_k5_bundle
from musubi_tuner.demo.synthetic_data import SyntheticDataset, write_synthetic_video_dataset


@pytest.fixture(scope="session")
def k5_bundle(tmp_path_factory: pytest.TempPathFactory) -> K5Bundle:
    """A tiny random-weight Kandinsky 5 bundle for task ``k5-lite-t2v-5s-sd`` (seed 0), written once per session.

    Attributes (absolute ``Path``s unless noted):
    - ``dit``: official single-file DiT ``.safetensors`` (diffusers ``Kandinsky5Transformer3DModel`` keys; the
      constructor arguments as JSON in the metadata key ``k5_dit_config``). 33 input channels (visual_cond),
      model_dim 64, 4 heads of 16 (axes 4/6/6), ff 128, time 32, 1 text block, 2 visual blocks.
    - ``dit_diffusers``: the same weights as a diffusers directory (``config.json`` + safetensors).
    - ``dit_config`` (dict): those constructor arguments (``in_text_dim`` 32 = Qwen width, ``in_text_dim2`` 24 = CLIP).
    - ``vae``: HunyuanVideo VAE diffusers directory (16 latent channels, ×8 spatial, ×4 temporal, scaling 0.476986);
      ``vae_file``: its single-file form (same keys, config in the ``vae_config`` metadata).
    - ``flux_vae``: FLUX.1 ``AutoencoderKL`` diffusers directory (16 channels, scaling 0.3611, shift 0.1159).
    - ``text_encoder_qwen``: Qwen2.5-VL HF snapshot (width 32, 2 layers, chat special tokens, image processor config).
    - ``text_encoder_clip``: CLIP text HF snapshot (width 24 = pooled size).
    - ``task`` (str), ``seed`` (int), ``root``.
    """
    return write_k5_bundle(tmp_path_factory.mktemp("k5_bundle") / "bundle", task="k5-lite-t2v-5s-sd", seed=0)


@pytest.fixture(scope="session")
def synthetic_video_dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """4 MP4 clips of 17 frames at 64x64 (moving coloured shapes) + 4 PNG stills, with captions, written once.

    Attributes: ``video_dir`` / ``image_dir`` (media + ``.txt`` captions), ``video_toml`` / ``image_toml`` (dataset
    configs: resolution [64, 64], ``.txt`` captions, buckets on, ``target_frames = [17]``, ``frame_extraction =
    "head"``), ``video_cache_dir`` / ``image_cache_dir`` (the TOMLs' cache directories, empty), ``start_image`` /
    ``end_image`` (first / last frame of ``clip_000`` as PNG), ``captions`` (stem → caption), ``frames`` (17),
    ``size`` ((64, 64) as W, H), ``root``. Shared: do not write caches into it; use ``fresh_synthetic_dataset``.
    """
    return write_synthetic_video_dataset(
        tmp_path_factory.mktemp("synthetic") / "data", n_videos=4, frames=17, size=(64, 64), seed=0
    )


@pytest.fixture
def fresh_synthetic_dataset(tmp_path) -> SyntheticDataset:
    """Same content as ``synthetic_video_dataset`` but private to one test (about 0.3 s to write)."""
    return write_synthetic_video_dataset(tmp_path / "data", n_videos=4, frames=17, size=(64, 64), seed=0)


@pytest.fixture(scope="session")
def flux2_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A tiny FLUX.2 bundle (seed 0), written once: klein- and dev-style DiTs (official layout), a BFL-layout
    ``ae.safetensors``, Qwen3 and Mistral 3 HF snapshots (``musubi_tuner.demo.flux2_bundles``). Read-only."""
    from musubi_tuner.demo.flux2_bundles import write_flux2_bundle

    return write_flux2_bundle(tmp_path_factory.mktemp("flux2_bundle") / "bundle", seed=0)


@pytest.fixture(scope="session")
def qwen_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random-weight Qwen-Image bundle (seed 0), written once per session (``demo.qwen_image_bundle``).

    ``dit`` (T2I/Edit layout, config in metadata ``qwen_image_dit_config``: 2 blocks, 4 heads of 16, axes 8/4/4,
    joint_attention_dim 32), ``dit_layered``, ``dit_diffusers``, ``vae`` (diffusers dir), ``vae_file`` (single file),
    ``vae_layered`` (RGBA), ``text_encoder`` (tiny Qwen2.5-VL snapshot with ``preprocessor_config.json``).
    """
    from musubi_tuner.demo.qwen_image_bundle import write_qwen_image_bundle

    return write_qwen_image_bundle(tmp_path_factory.mktemp("qwen_bundle") / "bundle", seed=0)


@pytest.fixture(scope="session")
def wan_t2v_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Wan bundle for task ``t2v-1.3B`` (official files: DiT safetensors, Wan2.1_VAE.pth, UMT5 .pth + tokenizer)."""
    from musubi_tuner.demo.wan_bundle import write_wan_bundle

    return write_wan_bundle(tmp_path_factory.mktemp("wan_t2v") / "bundle", task="t2v-1.3B", seed=0)


@pytest.fixture(scope="session")
def wan_i2v_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Wan bundle for task ``i2v-14B`` (36-channel DiT with CLIP input + the open-clip .pth)."""
    from musubi_tuner.demo.wan_bundle import write_wan_bundle

    return write_wan_bundle(tmp_path_factory.mktemp("wan_i2v") / "bundle", task="i2v-14B", seed=0)


@pytest.fixture(scope="session")
def wan_a14b_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Wan 2.2 two-expert bundle for task ``i2v-A14B`` (high- and low-noise DiT files)."""
    from musubi_tuner.demo.wan_bundle import write_wan_bundle

    return write_wan_bundle(tmp_path_factory.mktemp("wan_a14b") / "bundle", task="i2v-A14B", seed=0)


@pytest.fixture
def project_log(caplog):
    """``caplog`` with the records of the project loggers (they do not propagate to the root logger), INFO and up."""
    logger = logging.getLogger("musubi_tuner")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="musubi_tuner")
    yield caplog
    logger.removeHandler(caplog.handler)
