"""Model folders: diffusers-layout folders load into ours and agree with diffusers; save/load round trips; bad folders fail clearly."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vqdiff.model.io.folder import ModelFolderError, load_model, random_model, read_config, save_model
from vqdiff.model.net.tokenizer import load_tokenizer

TOL = 1e-4
PROMPTS = ["a red circle above a blue square", "Green triangle", ""]


def _tokens(c, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, c.num_embed, (b, c.num_tokens), generator=g)  # (B, N)


@pytest.fixture(scope="module")
def ours(diffusers_folder):
    return load_model(diffusers_folder)


def test_reads_the_config_diffusers_wrote(diffusers_folder, tiny_config):
    cfg = read_config(diffusers_folder)
    assert cfg.transformer == tiny_config.transformer
    assert cfg.vqvae == tiny_config.vqvae
    assert cfg.text_encoder == tiny_config.text_encoder
    assert cfg.diffusion == tiny_config.diffusion
    assert cfg.learnable_null


def test_transformer_log_probs_match_diffusers(ours, diffusers_pipeline, tiny_config):
    c = tiny_config.transformer
    x_t = _tokens(c, 2)
    x_t[:, ::3] = c.mask_id
    text = ours.encode_text(PROMPTS[:2])
    for t in (0, 42, 99):
        want = diffusers_pipeline.transformer(x_t, encoder_hidden_states=text, timestep=torch.tensor(t)).sample
        got = ours.transformer.log_probs(x_t, torch.full((2,), t), text).transpose(1, 2)  # (B, K, N)
        assert (want - got).abs().max() <= TOL


def test_vqvae_decode_matches_diffusers(ours, diffusers_pipeline, tiny_config):
    c = tiny_config.transformer
    tokens = _tokens(c, 3)
    vq = diffusers_pipeline.vqvae
    with torch.no_grad():
        latents = vq.quantize.get_codebook_entry(tokens, (3, c.height, c.width, vq.config.vq_embed_dim))
        want = (vq.decode(latents, force_not_quantize=True).sample / 2 + 0.5).clamp(0, 1)
    got = ours.decode(tokens)
    assert got.shape == want.shape == (3, 3, 16, 16)
    assert (want - got).abs().max() <= TOL


def test_text_and_null_embeddings_match_diffusers(ours, diffusers_pipeline):
    with torch.no_grad():
        # diffusers returns [null; text] for classifier-free guidance with the learned null
        both = diffusers_pipeline._encode_prompt(PROMPTS, 1, True)
    n = len(PROMPTS)
    assert (both[n:] - ours.encode_text(PROMPTS)).abs().max() <= TOL
    assert (both[:n] - ours.null_text(n)).abs().max() <= TOL
    assert ours.null_text(n).abs().sum() > 0  # the fixture's null is not all zeros


def test_overlong_prompt_keeps_end_of_text(ours):
    te = ours.text_encoder
    ids = te.tokenize(["red " * 200, "A RED circle"])
    assert ids.shape == (2, 77)
    assert ids[0, -1] == te.tokenizer.eos_token_id  # diffusers would cut it off
    assert torch.equal(ids[1], te.tokenize(["a red circle"])[0])  # lowercased
    emb = te(ids)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2, 77), atol=1e-5)


def test_tokenizer_reads_vocab_and_merges(diffusers_folder, tmp_path):
    """ITHQ ships vocab.json + merges.txt rather than tokenizer.json: both read the same."""
    full = load_tokenizer(diffusers_folder / "tokenizer")
    d = tmp_path / "tok"
    d.mkdir()
    vocab = json.loads((diffusers_folder / "tokenizer" / "tokenizer.json").read_text())["model"]
    (d / "vocab.json").write_text(json.dumps(vocab["vocab"]))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in vocab["merges"]))
    legacy = load_tokenizer(d)
    for p in PROMPTS + ["triangle left of the square!"]:
        assert full(p)["input_ids"] == legacy(p)["input_ids"]


def test_round_trip_identical_outputs(tokenizer, tiny_config, tmp_path):
    model = random_model(tiny_config, tokenizer, seed=1).eval()
    with torch.no_grad():
        model.null_cond.embeddings.normal_()
    folder = save_model(model, tmp_path / "m")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    again = load_model(folder)
    c = tiny_config.transformer
    x_t, t = _tokens(c, 2), torch.tensor([3, 80])
    with torch.no_grad():
        text = model.encode_text(PROMPTS[:2])
        assert torch.equal(text, again.encode_text(PROMPTS[:2]))
        assert torch.equal(model.null_text(2), again.null_text(2))
        assert torch.equal(model.transformer(x_t, t, text), again.transformer(x_t, t, text))
        assert torch.equal(model.decode(x_t), again.decode(x_t))
    with pytest.raises(FileExistsError):
        save_model(model, folder)


def test_diffusers_reads_our_folder(tokenizer, tiny_config, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextModel

    model = random_model(tiny_config, tokenizer, seed=2).eval()
    folder = save_model(model, tmp_path / "m")
    tr = diffusers.Transformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    vq = diffusers.VQModel.from_pretrained(folder, subfolder="vqvae").eval()
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    c = tiny_config.transformer
    x_t = _tokens(c, 2)
    with torch.no_grad():
        text = model.encode_text(PROMPTS[:2])
        want = model.transformer.log_probs(x_t, torch.full((2,), 9), text).transpose(1, 2)
        assert (tr(x_t, encoder_hidden_states=text, timestep=torch.tensor(9)).sample - want).abs().max() <= TOL
        ids = model.text_encoder.tokenize(PROMPTS[:2])
        assert (clip(ids).last_hidden_state - model.text_encoder.clip(ids).last_hidden_state).abs().max() <= TOL
        assert torch.equal(vq.quantize.embedding.weight, model.vqvae.codebook)


def test_bin_weights_load_through_weights_only(diffusers_folder, tmp_path, ours, tiny_config):
    folder = shutil.copytree(diffusers_folder, tmp_path / "bin")
    st = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), folder / "transformer" / "diffusion_pytorch_model.bin")
    st.unlink()
    loaded = load_model(folder)
    # the same stored tensors, bit for bit, whichever file format held them
    want = ours.transformer.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.transformer.state_dict().items())
    # and the same outputs bit for bit: the loader copies every tensor into an allocation of its own
    # (torch's CPU allocator aligns each to 64 bytes), so the kernels see the same weights at the
    # same alignment, with the same inputs and shapes in one process
    assert all(v.data_ptr() % 64 == 0 for m in (loaded, ours) for v in m.transformer.state_dict().values())
    x_t = _tokens(tiny_config.transformer, 1)
    t, text = torch.tensor([5]), ours.encode_text(["a"])
    with torch.no_grad():
        assert torch.equal(loaded.transformer(x_t, t, text), ours.transformer(x_t, t, text))
    # a pickle that is more than tensors is refused
    torch.save({"w": torch.zeros(1), "evil": object()}, folder / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFolderError, match=r"diffusion_pytorch_model\.bin.*tensor-only"):
        load_model(folder)


def test_sharded_weights_load(diffusers_folder, tmp_path, ours, tiny_config):
    folder = shutil.copytree(diffusers_folder, tmp_path / "sharded")
    vq = folder / "vqvae"
    state = load_file(vq / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2 :]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, vq / name)
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (vq / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (vq / "diffusion_pytorch_model.safetensors").unlink()
    tokens = _tokens(tiny_config.transformer, 1)
    assert torch.equal(load_model(folder).decode(tokens), ours.decode(tokens))


def _broken(diffusers_folder, tmp_path) -> Path:
    return shutil.copytree(diffusers_folder, tmp_path / "broken")


def test_missing_weights_file_is_named(diffusers_folder, tmp_path):
    folder = _broken(diffusers_folder, tmp_path)
    (folder / "vqvae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"vqvae: no weights found.*diffusion_pytorch_model\.safetensors"):
        load_model(folder)


def test_missing_config_and_folder_are_named(diffusers_folder, tmp_path):
    with pytest.raises(ModelFolderError, match="model folder not found"):
        load_model(tmp_path / "nope")
    folder = _broken(diffusers_folder, tmp_path)
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelFolderError, match=r"scheduler_config\.json: file not found"):
        load_model(folder)


def test_wrong_shape_names_file_key_expected_found(diffusers_folder, tmp_path):
    folder = _broken(diffusers_folder, tmp_path)
    f = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    state["out.weight"] = torch.zeros(5, 16)
    save_file(state, f)
    with pytest.raises(ModelFolderError) as e:
        load_model(folder)
    msg = str(e.value)
    assert "transformer/diffusion_pytorch_model.safetensors" in msg and "'out.weight'" in msg
    assert "expected shape (37, 16), found (5, 16)" in msg


def test_unknown_and_missing_keys_are_named(diffusers_folder, tmp_path):
    folder = _broken(diffusers_folder, tmp_path)
    f = folder / "learned_classifier_free_sampling_embeddings" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    state["surprise"] = torch.zeros(2)
    save_file(state, f)
    with pytest.raises(ModelFolderError, match=r"'surprise': unexpected"):
        load_model(folder)
    save_file({"surprise": torch.zeros(2)}, f)
    with pytest.raises(ModelFolderError, match=r"'embeddings': expected shape \(77, 32\), found nothing"):
        load_model(folder)


def test_unsupported_config_value_is_named(diffusers_folder, tmp_path):
    folder = _broken(diffusers_folder, tmp_path)
    p = folder / "transformer" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["activation_fn"] = "gelu"
    p.write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match=r"transformer/config\.json: key 'activation_fn' is 'gelu'"):
        read_config(folder)
    cfg["activation_fn"], cfg["num_vector_embeds"] = "geglu-approximate", 99
    p.write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="transformer.num_embed = 98 but vqvae.num_vq_embeddings = 37"):
        read_config(folder)


def test_ithq_folder_configs_read_as_the_ithq_preset():
    """ITHQ's JSON files (no weights) parse into exactly the ``ithq`` preset."""
    from vqdiff.model.config import ithq

    cfg = read_config(Path(__file__).parents[1] / "fixtures" / "ithq")
    want = ithq()
    assert (cfg.transformer, cfg.vqvae.block_out_channels, cfg.vqvae.attention) == (
        want.transformer, want.vqvae.block_out_channels, want.vqvae.attention)
    assert cfg.vqvae == replace(want.vqvae, sample_size=32)  # diffusers' stored default
    assert cfg.text_encoder == want.text_encoder and cfg.diffusion == want.diffusion and cfg.learnable_null


def test_variant_weights_are_chosen(diffusers_folder, tmp_path, ours, tiny_config):
    folder = shutil.copytree(diffusers_folder, tmp_path / "variant")
    f = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    f.rename(f.with_name("diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(ModelFolderError, match="no weights found"):
        load_model(folder)
    for comp in ("vqvae", "learned_classifier_free_sampling_embeddings"):
        g = folder / comp / "diffusion_pytorch_model.safetensors"
        g.rename(g.with_name("diffusion_pytorch_model.fp16.safetensors"))
    g = folder / "text_encoder" / "model.safetensors"
    g.rename(g.with_name("model.fp16.safetensors"))
    loaded = load_model(folder, variant="fp16")
    x_t = _tokens(tiny_config.transformer, 1)
    t, text = torch.tensor([5]), ours.encode_text(["a"])
    with torch.no_grad():
        assert torch.equal(loaded.transformer(x_t, t, text), ours.transformer(x_t, t, text))


def test_half_precision_folder_with_provenance(tokenizer, tiny_config, tmp_path):
    model = random_model(tiny_config, tokenizer, seed=4).eval()
    model.generation_defaults = {"steps": 16, "guidance_scale": 3.0}
    folder = save_model(model, tmp_path / "m", dtype=torch.float16, extra={"trained": {"command": "vqdiff train ..."}})
    weights = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}
    again = load_model(folder)
    assert again.transformer.out.weight.dtype == torch.float32
    assert torch.equal(again.transformer.out.weight, model.transformer.out.weight.half().float())
    assert again.generation_defaults == {"steps": 16, "guidance_scale": 3.0}
    assert json.loads((folder / "vqdiff.json").read_text())["trained"]["command"] == "vqdiff train ..."


def test_load_casts_each_weight_once_to_the_requested_dtype(diffusers_folder, ours):
    """dtype is the transformer's alone; every other part stays fp32, and the cast is the one a
    loaded fp32 model's .to(dtype) gives (the weights go file -> final dtype in one copy)."""
    half = load_model(diffusers_folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.transformer.parameters()} == {torch.bfloat16}
    for part in (half.vqvae, half.text_encoder):
        assert {p.dtype for p in part.parameters()} == {torch.float32}
    want = {k: v.to(torch.bfloat16) for k, v in ours.transformer.state_dict().items()}
    assert all(torch.equal(v, want[k]) for k, v in half.transformer.state_dict().items())
    assert not any(t.is_meta for t in list(half.parameters()) + list(half.buffers()))


def test_bad_generation_defaults_are_named(tokenizer, tiny_config, tmp_path):
    model = random_model(tiny_config, tokenizer, seed=4)
    folder = save_model(model, tmp_path / "m")
    (folder / "vqdiff.json").write_text(json.dumps({"generation_defaults": {"guidance_scale": 0.1}}))
    with pytest.raises(ModelFolderError, match=r"vqdiff\.json: generation_defaults: guidance_scale: 0.1"):
        load_model(folder)
    (folder / "vqdiff.json").write_text(json.dumps({"generation_defaults": {"few_steps": {"max_steps": 0}}}))
    with pytest.raises(ModelFolderError, match=r"generation_defaults: few_steps"):
        load_model(folder)


def test_a_shorter_text_length_round_trips(tokenizer, tiny_config, tmp_path):
    """Small models may use fewer than CLIP's 77 text positions; the tokenizer, the text encoder
    and the null condition all follow the text encoder's max_length."""
    cfg = replace(tiny_config, text_encoder=replace(tiny_config.text_encoder, max_length=16))
    model = random_model(cfg, tokenizer, seed=5)
    assert model.text_encoder.tokenize(["a red circle", "red " * 40]).shape == (2, 16)
    assert model.null_text(3).shape == (3, 16, 32)
    again = load_model(save_model(model, tmp_path / "m"))
    ids = again.text_encoder.tokenize(["red " * 40])
    assert ids.shape == (1, 16) and ids[0, -1] == again.text_encoder.tokenizer.eos_token_id
    assert again.null_cond.embeddings.shape == (16, 32)


def test_cli_convert(diffusers_folder, tmp_path, capsys):
    # vqdiff.cli's main in this process: a subprocess would spend seconds importing torch for each
    # call (tests/unit/test_sampler.py runs the real command line once)
    from vqdiff.cli import main

    out = tmp_path / "half"
    code = main(["convert", str(diffusers_folder), str(out), "--dtype", "fp16", "--defaults", '{"steps": 16}',
                 "--provenance", '{"by": "test"}'])
    assert code == 0, capsys.readouterr().err
    m = load_model(out)
    assert m.generation_defaults == {"steps": 16}
    assert {v.dtype for v in load_file(out / "transformer" / "diffusion_pytorch_model.safetensors").values()} == {
        torch.float16}
    assert json.loads((out / "vqdiff.json").read_text())["provenance"] == {"by": "test"}
    capsys.readouterr()
    code = main(["convert", str(diffusers_folder), str(tmp_path / "x"), "--defaults", '{"steps": 0}'])
    assert code == 2 and "steps: 0" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_saved_tokenizer_records_the_text_length(tokenizer, tiny_config, tmp_path):
    cfg = replace(tiny_config, text_encoder=replace(tiny_config.text_encoder, max_length=16))
    before = tokenizer.model_max_length
    folder = save_model(random_model(cfg, tokenizer, seed=5), tmp_path / "m")
    assert tokenizer.model_max_length == before  # the caller's tokenizer is left alone
    assert load_tokenizer(folder / "tokenizer").model_max_length == 16  # what diffusers' pipeline pads to


def test_saved_folders_are_readable_by_other_users(tiny_config, tokenizer, tmp_path):
    import stat

    from vqdiff.model.io.folder import random_model, save_model

    folder = save_model(random_model(tiny_config, tokenizer), tmp_path / "m")
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o004, f"{path}: mode {oct(mode)} is not world-readable"


def test_cli_convert_mix_interpolates_every_weight(tokenizer, tiny_config, tmp_path, capsys):
    from vqdiff.cli import main

    a = save_model(random_model(tiny_config, tokenizer, seed=5), tmp_path / "a")
    b = save_model(random_model(tiny_config, tokenizer, seed=6), tmp_path / "b")
    code = main(["convert", str(a), str(tmp_path / "mix"), "--mix", str(b), "--alpha", "0.25"])
    assert code == 0, capsys.readouterr().err
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    mixed = load_model(tmp_path / "mix").state_dict()
    moved = 0
    for k, v in mixed.items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.75 * sa[k] + 0.25 * sb[k], atol=1e-6), k
            moved += not torch.equal(sa[k], sb[k])
        else:
            assert torch.equal(v, sa[k]), k
    assert moved > 10
    capsys.readouterr()
    for bad, err in ((["--alpha", "1.5", "--mix", str(b)], "alpha"), (["--mix", str(b)], "--mix and --alpha")):
        code = main(["convert", str(a), str(tmp_path / "x"), *bad])
        assert code == 2 and err in capsys.readouterr().err and not (tmp_path / "x").exists()
    wider = save_model(random_model(replace(tiny_config, transformer=replace(tiny_config.transformer, num_layers=1)),
                                    tokenizer, seed=5), tmp_path / "w")
    code = main(["convert", str(a), str(tmp_path / "x"), "--mix", str(wider), "--alpha", "0.5"])
    assert code == 2 and "architecture" in capsys.readouterr().err


def test_cli_convert_average_is_the_mean_of_every_weight(tokenizer, tiny_config, tmp_path, capsys):
    from vqdiff.cli import main

    folders = [save_model(random_model(tiny_config, tokenizer, seed=s), tmp_path / f"m{s}") for s in (5, 6, 7)]
    code = main(["convert", str(folders[0]), str(tmp_path / "avg"), "--average", *map(str, folders[1:])])
    assert code == 0, capsys.readouterr().err
    states = [load_model(f).state_dict() for f in folders]
    mean = load_model(tmp_path / "avg").state_dict()
    moved = 0
    for k, v in mean.items():
        if v.is_floating_point():  # the bits are ours: a float64 sum over the three, divided, rounded once
            assert torch.equal(v, (sum(s[k].double() for s in states) / 3).float()), k
            moved += not torch.equal(v, states[0][k])
        else:
            assert torch.equal(v, states[0][k]), k
    assert moved > 10
    code = main(["convert", str(folders[0]), str(tmp_path / "self"), "--average", str(folders[0])])
    assert code == 0
    for k, v in load_model(tmp_path / "self").state_dict().items():
        assert torch.equal(v, states[0][k]), k  # a model averaged with itself is itself, bit for bit
    capsys.readouterr()
    wider = save_model(random_model(replace(tiny_config, transformer=replace(tiny_config.transformer, num_layers=1)),
                                    tokenizer, seed=5), tmp_path / "w")
    for bad, err in ((["--average", str(folders[1]), str(wider)], "architecture"),
                     (["--average", str(folders[1]), "--mix", str(folders[2]), "--alpha", "0.5"], "give one")):
        code = main(["convert", str(folders[0]), str(tmp_path / "x"), *bad])
        assert code == 2 and err in capsys.readouterr().err and not (tmp_path / "x").exists()
