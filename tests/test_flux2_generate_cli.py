"""flux_2_generate_image.py end to end on the tiny bundle: klein distilled with references + LoRA, klein base with
true CFG, dev with embedded guidance, --from_file with wildcards, PNG metadata, latent output, bad inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from blissful_tuner.metadata import read_metadata
from musubi_tuner.flux_2_generate_image import main

REPO = Path(__file__).resolve().parents[1]


def base_argv(bundle, out: Path, version: str = "klein-4b", *extra: str) -> list[str]:
    dit = bundle.dit_dev if version == "dev" else bundle.dit_klein  # a later --dit in ``extra`` wins
    te = bundle.text_encoder_mistral3 if version == "dev" else bundle.text_encoder_qwen3
    return [
        "--model_version", version, "--dit", str(dit), "--vae", str(bundle.vae), "--text_encoder", str(te),
        "--image_size", "32", "48", "--save_path", str(out), "--seed", "7", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ref_image(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("refs") / "ref.png"
    Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy()).save(p)
    return p


@pytest.fixture(scope="module")
def lora_file(flux2_bundle, tmp_path_factory) -> Path:
    from musubi_tuner.flux_2.configs import get_model_version
    from musubi_tuner.flux_2.models.loading import load_dit
    from musubi_tuner.networks import lora_flux_2
    from musubi_tuner.training.saving import save_network_atomic

    dit = load_dit(get_model_version("klein-4b"), flux2_bundle.dit_klein, dtype=torch.float32)
    net = lora_flux_2.create_arch_network(1.0, 4, 4, None, None, dit)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    save_network_atomic(net, path, torch.float32, {"ss_base_model_version": "flux_2", "ss_network_module": "networks.lora_flux_2"})
    return path


def _png(out: Path) -> list[Path]:
    return sorted(out.glob("*.png"))


def test_klein_distilled_with_references_and_lora(flux2_bundle, ref_image, lora_file, tmp_path):
    main(
        base_argv(
            flux2_bundle,
            tmp_path / "plain",
            "klein-4b",
            "--prompt",
            "a red cube",
            "--control_image_path",
            str(ref_image),
            str(ref_image),
        )
    )
    main(base_argv(flux2_bundle, tmp_path / "lora", "klein-4b", "--prompt", "a red cube", "--control_image_path", str(ref_image), str(ref_image),
                   "--lora_weight", str(lora_file), "--lora_multiplier", "0.8"))  # fmt: skip
    (plain,), (with_lora,) = _png(tmp_path / "plain"), _png(tmp_path / "lora")
    a, b = Image.open(plain), Image.open(with_lora)
    assert a.size == (48, 32)  # --image_size is height width
    assert a.tobytes() != b.tobytes()  # the LoRA is applied
    md = read_metadata(with_lora)
    assert md["bt_model_type"] == "FLUX.2 klein-4b" and md["bt_infer_steps"] == "4" and md["bt_seeds"] == "7"
    assert md["bt_control_images"] == "ref.png, ref.png" and md["bt_lora_0"] == "lora.safetensors: 0.8"


def _as_version(path: Path, version: str, out: Path) -> Path:
    """A copy of a tiny DiT that declares another variant of the same architecture (klein-4b → klein-base-4b)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        md = dict(f.metadata())
    save_file(load_file(str(path)), str(out), {**md, "flux2_model_version": version})
    return out


def test_klein_base_true_cfg_and_schedule(flux2_bundle, tmp_path):
    base_dit = _as_version(flux2_bundle.dit_klein, "klein-base-4b", tmp_path / "base.safetensors")
    argv = base_argv(flux2_bundle, tmp_path, "klein-base-4b", "--dit", str(base_dit), "--prompt", "a cat", "--negative_prompt", "blurry",
                     "--infer_steps", "3", "--cfg_schedule", "1-2", "--cfgzerostar_scaling", "--output_type", "latent_images",
                     "--preview_latent_every", "2")  # fmt: skip
    main(argv)
    assert (tmp_path / "latent_preview.png").is_file()  # written at step 2, decoded with the FLUX.2 VAE
    (png,) = [p for p in _png(tmp_path) if p.name != "latent_preview.png"]
    md = read_metadata(png)
    assert md["bt_guidance_scale"] == "4.0" and md["bt_negative_prompt"] == "blurry" and md["bt_cfg_schedule"] == "1-2"
    (lat,) = tmp_path.glob("*_latent.safetensors")
    from blissful_tuner.media_output import load_latent_file

    latent, _ = load_latent_file(lat)
    assert latent.shape == (128, 2, 3)
    # decoding the saved latent reproduces the image
    main(["--latent_path", str(lat), "--vae", str(flux2_bundle.vae), "--save_path", str(tmp_path / "dec"), "--device", "cpu"])
    (dec,) = _png(tmp_path / "dec")
    assert Image.open(dec).tobytes() == Image.open(png).tobytes()


def test_dev_embedded_guidance_batch_file_with_wildcards(flux2_bundle, tmp_path):
    wild = tmp_path / "wild"
    wild.mkdir()
    (wild / "color.txt").write_text("red\nblue\n", encoding="utf-8")
    batch = tmp_path / "prompts.txt"
    batch.write_text("a __color__ ball --s 2 --w 32 --h 32\na green cone --d 5\n", encoding="utf-8")
    out = tmp_path / "out"
    main(
        base_argv(
            flux2_bundle,
            out,
            "dev",
            "--from_file",
            str(batch),
            "--prompt_wildcards",
            str(wild),
            "--embedded_cfg_scale",
            "3.0",
            "--infer_steps",
            "2",
        )
    )
    pngs = _png(out)
    assert len(pngs) == 2
    mds = [read_metadata(p) for p in pngs]
    assert {m["bt_embedded_cfg_scale"] for m in mds} == {"3.0"} and "bt_guidance_scale" not in mds[0]
    prompts = {m["bt_prompt"] for m in mds}
    assert "a green cone" in prompts and ({"a red ball", "a blue ball"} & prompts)
    sizes = sorted(Image.open(p).size for p in pngs)
    assert sizes == [(32, 32), (48, 32)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--image_size", "40", "48"), "width 48 and height 40 must be positive multiples of 16"),
        (("--control_image_path", "MISSING.png"), "file not found: MISSING.png"),
        (("--negative_prompt", "x"), "--negative_prompt: --model_version klein-4b uses no CFG"),
        (("--save_merged_model", "m.safetensors"), "--save_merged_model is not supported"),
    ],
)
def test_bad_command_lines_exit_2(flux2_bundle, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(base_argv(flux2_bundle, tmp_path / "o", "klein-4b", "--prompt", "x", *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_wrong_checkpoint_encoder_or_lora_exit_2(flux2_bundle, ref_image, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    k5_lora = tmp_path / "k5_lora.safetensors"
    save_file(
        {"lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_down.weight": torch.zeros(4, 64),
         "lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_up.weight": torch.zeros(64, 4)},
        str(k5_lora), {"ss_base_model_version": "kandinsky5", "ss_network_module": "networks.lora_kandinsky"},
    )  # fmt: skip
    cases = [
        (base_argv(flux2_bundle, tmp_path / "o1", "dev", "--prompt", "x") + ["--dit", str(flux2_bundle.dit_klein)], "--model_version is dev"),
        (base_argv(flux2_bundle, tmp_path / "o2", "dev", "--prompt", "x") + ["--text_encoder", str(flux2_bundle.text_encoder_qwen3)], "needs a Mistral 3"),
        (base_argv(flux2_bundle, tmp_path / "o3", "klein-4b", "--prompt", "x", "--control_image_path", str(bad)), "bad.png: cannot read the image"),
        (base_argv(flux2_bundle, tmp_path / "o4", "klein-4b", "--prompt", "x", "--lora_weight", str(k5_lora)), "kandinsky5"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, (argv, err)
    assert not any(p.is_file() for p in tmp_path.rglob("*.png") if p.name != "bad.png")


def test_root_wrapper_runs(flux2_bundle, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "flux_2_generate_image.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--control_image_path" in r.stdout and "--embedded_cfg_scale" in r.stdout


def test_interactive_session_keeps_models_and_writes_each_job(flux2_bundle, tmp_path):
    from musubi_tuner.flux_2_generate_image import parse_args, run

    lines = iter(["a red cube --d 1", "a blue cube --d 2 --w 32"])

    def read_line(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    args = parse_args(base_argv(flux2_bundle, tmp_path, "klein-4b", "--interactive", "--infer_steps", "2"))
    files = run(args, read_line=read_line)
    assert len(files) == 2 and sorted(Image.open(f).size for f in files) == [(32, 32), (48, 32)]
    assert {read_metadata(f)["bt_seeds"] for f in files} == {"1", "2"}
