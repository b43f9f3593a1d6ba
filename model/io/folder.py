"""Model folders in the diffusers ``VQDiffusionPipeline`` layout, read and written without diffusers.

    model_index.json
    transformer/   config.json + diffusion_pytorch_model.{safetensors,bin}   (Transformer2DModel)
    vqvae/         config.json + diffusion_pytorch_model.{safetensors,bin}   (VQModel)
    text_encoder/  config.json + model.safetensors | pytorch_model.bin         (CLIPTextModel)
    tokenizer/     tokenizer.json | vocab.json + merges.txt                    (CLIPTokenizer)
    scheduler/     scheduler_config.json                                      (VQDiffusionScheduler)
    learned_classifier_free_sampling_embeddings/  config.json + weights       (optional)
    vqdiff.json    generation defaults for this model (ours, optional)

This is how users get ITHQ (docs/DESIGN.md, section 8: the diffusers folder layout). Sharded
weights (``*.index.json``) and variants (``diffusion_pytorch_model.fp16.safetensors``) are read too. ``.bin`` files go through
``torch.load(weights_only=True)`` only. Anything wrong fails with a ``ModelFolderError`` naming
the file, the key, what was expected and what was found.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from vqdiff.model.config import DiffusionConfig, ModelConfig, TransformerConfig, VQVAEConfig
from vqdiff.model.net.null_cond import NullCondition
from vqdiff.model.net.pipeline import VQDiffusion
from vqdiff.model.net.text_encoder import TextEncoder, clip_config, text_encoder_config
from vqdiff.model.net.tokenizer import load_tokenizer, save_tokenizer
from vqdiff.model.net.transformer import VQDiffusionTransformer
from vqdiff.model.net.vqvae import VQVAE

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose layout this writes
NULL = "learned_classifier_free_sampling_embeddings"
EXTRA = "vqdiff.json"  # our own, optional: generation defaults and provenance; diffusers ignores it
REQUIRED = ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler")
CLASSES = {
    "transformer": ["diffusers", "Transformer2DModel"],
    "vqvae": ["diffusers", "VQModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "VQDiffusionScheduler"],
    NULL: ["diffusers", "LearnedClassifierFreeSamplingEmbeddings"],  # as diffusers 0.42 writes it
}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = {"safetensors": "model", "bin": "pytorch_model"}
# Keys some checkpoints carry that hold no weights (older transformers saved CLIP's position ids).
IGNORED_KEYS = ("text_model.embeddings.position_ids",)


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded; the message names the file and what is wrong."""


# ---------------------------------------------------------------- configs


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFolderError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path}: not valid JSON ({e})") from None


def _get(d: dict, key: str, path: Path, default=..., allowed=None):
    if key not in d or d[key] is None:
        if default is ...:
            raise ModelFolderError(f"{path}: key {key!r} is required but missing")
        return default
    v = d[key]
    if allowed is not None and v not in allowed:
        raise ModelFolderError(f"{path}: key {key!r} is {v!r}; expected one of {list(allowed)}")
    return v


def transformer_config_from_diffusers(d: dict, path: Path) -> TransformerConfig:
    """Accepts only the VQ-Diffusion form of ``Transformer2DModel`` (vectorised input, AdaLayerNorm)."""
    _get(d, "activation_fn", path, allowed=["geglu-approximate"])
    norm_type = _get(d, "norm_type", path, default="layer_norm", allowed=["layer_norm", "ada_norm"])
    for key, want in (("only_cross_attention", False), ("double_self_attention", False),
                      ("norm_elementwise_affine", True), ("patch_size", None), ("in_channels", None)):
        if d.get(key, want) != want:
            raise ModelFolderError(f"{path}: key {key!r} is {d[key]!r}; only {want!r} is supported")
    if norm_type == "layer_norm" and d.get("num_embeds_ada_norm") is None:
        raise ModelFolderError(f"{path}: key 'num_embeds_ada_norm' is required (AdaLayerNorm on the timestep)")
    side = _get(d, "sample_size", path)
    return TransformerConfig(
        num_embed=_get(d, "num_vector_embeds", path) - 1,
        height=side,
        width=side,
        num_layers=_get(d, "num_layers", path),
        num_heads=_get(d, "num_attention_heads", path),
        head_dim=_get(d, "attention_head_dim", path),
        text_dim=_get(d, "cross_attention_dim", path),
        num_timesteps=_get(d, "num_embeds_ada_norm", path),
        attention_bias=_get(d, "attention_bias", path, default=False),
        norm_eps=_get(d, "norm_eps", path, default=1e-5),
        dropout=_get(d, "dropout", path, default=0.0),
    )


def transformer_config_to_diffusers(c: TransformerConfig) -> dict:
    if c.height != c.width or c.mlp_ratio != 4:
        raise ValueError("diffusers' Transformer2DModel needs a square token grid and mlp_ratio 4")
    return {
        "_class_name": "Transformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "activation_fn": "geglu-approximate", "attention_bias": c.attention_bias,
        "attention_head_dim": c.head_dim, "cross_attention_dim": c.text_dim, "dropout": c.dropout,
        "norm_eps": c.norm_eps, "norm_type": "ada_norm", "num_attention_heads": c.num_heads,
        "num_embeds_ada_norm": c.num_timesteps, "num_layers": c.num_layers,
        "num_vector_embeds": c.num_embed + 1, "sample_size": c.height,
    }


_DOWN = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
_UP = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def vqvae_config_from_diffusers(d: dict, path: Path) -> VQVAEConfig:
    _get(d, "act_fn", path, default="silu", allowed=["silu"])
    _get(d, "norm_type", path, default="group", allowed=["group"])
    down = [_get({"t": t}, "t", path, allowed=list(_DOWN)) for t in _get(d, "down_block_types", path)]
    up = [_get({"t": t}, "t", path, allowed=list(_UP)) for t in _get(d, "up_block_types", path)]
    attention = tuple(_DOWN[t] for t in down)
    if tuple(_UP[t] for t in reversed(up)) != attention:
        raise ModelFolderError(f"{path}: up_block_types {up} do not mirror down_block_types {down}")
    latent = _get(d, "latent_channels", path)
    return VQVAEConfig(
        block_out_channels=tuple(_get(d, "block_out_channels", path)),
        attention=attention,
        layers_per_block=_get(d, "layers_per_block", path),
        latent_channels=latent,
        num_vq_embeddings=_get(d, "num_vq_embeddings", path),
        vq_embed_dim=_get(d, "vq_embed_dim", path, default=latent),
        in_channels=_get(d, "in_channels", path, default=3),
        out_channels=_get(d, "out_channels", path, default=3),
        norm_num_groups=_get(d, "norm_num_groups", path, default=32),
        sample_size=_get(d, "sample_size", path, default=32),
        mid_block_add_attention=_get(d, "mid_block_add_attention", path, default=True),
    )


def vqvae_config_to_diffusers(c: VQVAEConfig) -> dict:
    return {
        "_class_name": "VQModel", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "block_out_channels": list(c.block_out_channels),
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in c.attention],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(c.attention)],
        "in_channels": c.in_channels, "out_channels": c.out_channels, "latent_channels": c.latent_channels,
        "layers_per_block": c.layers_per_block, "norm_num_groups": c.norm_num_groups, "norm_type": "group",
        "num_vq_embeddings": c.num_vq_embeddings, "vq_embed_dim": c.vq_embed_dim, "sample_size": c.sample_size,
        "mid_block_add_attention": c.mid_block_add_attention, "lookup_from_codebook": False,
        "force_upcast": False, "scaling_factor": 1.0,
    }


def diffusion_config_from_diffusers(d: dict, path: Path) -> DiffusionConfig:
    return DiffusionConfig(
        num_classes=_get(d, "num_vec_classes", path) - 1,
        num_timesteps=_get(d, "num_train_timesteps", path, default=100),
        alpha_cum_start=_get(d, "alpha_cum_start", path, default=0.99999),
        alpha_cum_end=_get(d, "alpha_cum_end", path, default=0.000009),
        gamma_cum_start=_get(d, "gamma_cum_start", path, default=0.000009),
        gamma_cum_end=_get(d, "gamma_cum_end", path, default=0.99999),
    )


def diffusion_config_to_diffusers(c: DiffusionConfig) -> dict:
    return {
        "_class_name": "VQDiffusionScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_vec_classes": c.num_classes + 1, "num_train_timesteps": c.num_timesteps,
        "alpha_cum_start": c.alpha_cum_start, "alpha_cum_end": c.alpha_cum_end,
        "gamma_cum_start": c.gamma_cum_start, "gamma_cum_end": c.gamma_cum_end,
    }


def read_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of a folder, from its JSON files alone (no weights are read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: model folder not found")
    index = _read_json(folder / "model_index.json")
    for name in REQUIRED:
        if not index.get(name) or index[name][0] is None:
            raise ModelFolderError(f"{folder / 'model_index.json'}: component {name!r} is missing")
    clip = _read_json(folder / "text_encoder" / "config.json")
    learnable = False
    if index.get(NULL) and index[NULL][0] is not None:
        path = folder / NULL / "config.json"
        null = _read_json(path)
        learnable = bool(_get(null, "learnable", path))
        if learnable:
            for key, want in (("hidden_size", clip.get("hidden_size")), ("length", clip.get("max_position_embeddings"))):
                if _get(null, key, path) != want:
                    raise ModelFolderError(f"{path}: key {key!r} is {null[key]}; expected {want} (the text encoder's)")
    try:
        return ModelConfig(
            name=folder.name,
            transformer=transformer_config_from_diffusers(_read_json(p := folder / "transformer" / "config.json"), p),
            vqvae=vqvae_config_from_diffusers(_read_json(p := folder / "vqvae" / "config.json"), p),
            text_encoder=text_encoder_config(CLIPTextConfig.from_dict(clip)),
            diffusion=diffusion_config_from_diffusers(
                _read_json(p := folder / "scheduler" / "scheduler_config.json"), p),
            learnable_null=learnable,
        )
    except ModelFolderError:
        raise
    except ValueError as e:  # ModelConfig's cross-component checks
        raise ModelFolderError(f"{folder}: components disagree: {e}") from None


# ---------------------------------------------------------------- weights


def _weight_files(component: Path, stem: str, ext: str, variant: str | None) -> list[Path] | None:
    name = f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"
    if (component / name).is_file():
        return [component / name]
    index = component / f"{name}.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ModelFolderError(f"{index}: no weight_map")
        for s in shards:
            if not (component / s).is_file():
                raise ModelFolderError(f"{index}: names shard {s!r}, which is not in {component}")
        return [component / s for s in shards]
    return None


def read_weights(
    component: Path, stems: dict[str, str], variant: str | None = None, *,
    device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
) -> tuple[dict[str, Tensor], str]:
    """The state dict of one component folder, and a description of the file(s) it came from.
    Every tensor is copied straight to ``device``, floating-point ones cast to ``dtype`` (None: as
    stored) in the same copy, one tensor at a time: loading never holds the weights twice."""
    for ext in ("safetensors", "bin"):
        files = _weight_files(component, stems[ext], ext, variant)
        if files is None:
            continue
        state: dict[str, Tensor] = {}
        for f in files:
            # Each tensor is copied out of the file's memory map into an allocation of its own.
            # A view of the map starts wherever the file put it (safetensors packs tensors end to
            # end, so a float32 one may start at any multiple of 4 bytes), and CPU kernels, matmul
            # among them, take other code paths for operands at other alignments: the same stored
            # weights gave outputs differing in the last bits between a .safetensors file, a .bin
            # file, shards and a model built in memory. A copy is aligned as every torch
            # allocation is, so a loaded model's outputs depend only on its weights.
            for k, v in _tensors(f, ext):
                state[k] = v.to(device, dtype if dtype is not None and v.is_floating_point() else v.dtype, copy=True)
        return state, str(files[0]) if len(files) == 1 else f"{component}/{stems[ext]}.*{ext} ({len(files)} shards)"
    tried = ", ".join(f"{stems[e]}{'.' + variant if variant else ''}.{e}" for e in ("safetensors", "bin"))
    raise ModelFolderError(f"{component}: no weights found (looked for {tried}, and their .index.json)")


def _tensors(path: Path, ext: str):
    """(name, tensor) of one weights file, one tensor read at a time (a .bin's are memory-mapped views)."""
    if ext == "bin":
        yield from _torch_load(path).items()
        return
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            yield k, f.get_tensor(k)


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ModelFolderError(f"{path}: cannot be read as a tensor-only checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelFolderError(f"{path}: expected a dict of tensors")
    return state


def load_into(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Strict load with a precise error; tensors are assigned, so meta-built modules materialise."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items() if k not in IGNORED_KEYS}
    problems = [f"key {k!r}: expected shape {expected[k]}, found {found[k]}"
                for k in expected if k in found and expected[k] != found[k]]
    problems += [f"key {k!r}: expected shape {expected[k]}, found nothing (missing)" for k in expected if k not in found]
    problems += [f"key {k!r}: unexpected (shape {found[k]}); the model has no such parameter"
                 for k in found if k not in expected]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ModelFolderError(f"{source}: " + "; ".join(problems[:5]) + more)
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)


# ---------------------------------------------------------------- whole folders


def load_vqvae(component: str | Path) -> VQVAE:
    """One VQVAE component folder (MODEL/vqvae, or OUT/vqvae of ``vqdiff train vqvae``), fp32, eval."""
    component = Path(component)
    config = vqvae_config_from_diffusers(_read_json(p := component / "config.json"), p)
    with torch.device("meta"):
        vqvae = VQVAE(config)
    load_into(vqvae, *read_weights(component, _diffusers_stems()))
    return vqvae.float().eval()


def load_model(
    folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    variant: str | None = None,
) -> VQDiffusion:
    """Load a model folder offline. ``dtype`` is the transformer's (the hot path); the rest stays fp32.
    Each weight goes from the file to ``device`` in its final dtype in one copy, so the host's peak
    is about one tensor above what it keeps, not a second copy of the model (ITHQ: 5.5 GB in fp32)."""
    folder = Path(folder)
    config = read_config(folder)
    tokenizer = _load_tokenizer(folder / "tokenizer")
    stems = _diffusers_stems()

    with torch.device("meta"):  # no memory for random init: every tensor comes from the file
        transformer = VQDiffusionTransformer(config.transformer)
        vqvae = VQVAE(config.vqvae)
        null_cond = (NullCondition(config.text_encoder.max_length, config.text_encoder.hidden_size)
                     if config.learnable_null else None)
    load_into(transformer, *read_weights(folder / "transformer", stems, variant, device=device, dtype=dtype))
    load_into(vqvae, *read_weights(folder / "vqvae", stems, variant, device=device, dtype=torch.float32))
    if null_cond is not None:
        load_into(null_cond, *read_weights(folder / NULL, stems, variant, device=device, dtype=torch.float32))
    text_encoder = load_text_encoder(folder, variant, tokenizer).to(device)

    model = VQDiffusion(config, transformer, vqvae, text_encoder, null_cond)
    model.generation_defaults = read_generation_defaults(folder)
    return model.to(device).eval()  # moves nothing but module state built outside the files


def read_generation_defaults(folder: Path) -> dict:
    """``vqdiff.json``'s ``generation_defaults`` (our addition to the layout; optional), validated:
    GenerationParams fields and an optional few-steps rule (``params.split_defaults``)."""
    from vqdiff.model.sampling.params import split_defaults

    path = Path(folder) / EXTRA
    if not path.is_file():
        return {}
    defaults = _read_json(path).get("generation_defaults", {})
    try:
        split_defaults(defaults)
    except (TypeError, ValueError) as e:
        raise ModelFolderError(f"{path}: generation_defaults: {e}") from None
    return defaults


def _readable(root: Path) -> None:
    """Folders 0755 and files 0644 (less the umask): mkdtemp makes 0700, and safetensors writes 0600,
    which a server running as another user (the container's) could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o755 if path.is_dir() else 0o644) & ~umask)


def _check_same_weights(a: VQDiffusion, b: VQDiffusion, sa: dict, sb: dict) -> None:
    """Loud unless ``a`` and ``b`` (state dicts ``sa``, ``sb``) can be combined weight by weight: the
    same config, tokenizer and weight names (a model and a fine-tune of it, or snapshots of one run)."""
    if a.config != b.config:
        raise ModelFolderError("the two models differ in architecture (config); only the same one combines")
    if a.text_encoder.tokenizer.get_vocab() != b.text_encoder.tokenizer.get_vocab():
        raise ModelFolderError("the two models' tokenizers differ; their text embeddings do not correspond")
    if sa.keys() != sb.keys():
        raise ModelFolderError(f"the two models hold different weights: {sorted(set(sa) ^ set(sb))[:5]}")


def _equal_integer_buffer(k: str, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if not torch.equal(v, w):
        raise ModelFolderError(f"{k}: an integer buffer that differs between the two models")
    return v


@torch.no_grad()
def interpolate(a: VQDiffusion, b: VQDiffusion, alpha: float) -> VQDiffusion:
    """``a`` with every floating-point weight set to (1 - alpha) a + alpha b (integer buffers must be
    equal). The two must share config and tokenizer: a model and a fine-tune of it, say."""
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha: {alpha} is not allowed; expected a number in [0, 1]")
    sa, sb = a.state_dict(), b.state_dict()
    _check_same_weights(a, b, sa, sb)
    mixed = {k: torch.lerp(v, sb[k].to(v.dtype), alpha) if v.is_floating_point()  # out of place: tied weights once
             else _equal_integer_buffer(k, v, sb[k]) for k, v in sa.items()}
    a.load_state_dict(mixed)
    return a


@torch.no_grad()
def average(first: VQDiffusion, others: Iterable[VQDiffusion]) -> VQDiffusion:
    """``first`` with every floating-point weight set to the mean over ``first`` and ``others`` (stochastic
    weight averaging of one run's snapshots, or a soup of fine-tunes of one model). Sums in float64, so
    the result does not depend on the order beyond the last bit of fp32; ``others`` is read one model at
    a time (an iterator of loads keeps one in memory). Integer buffers must be equal; the config,
    tokenizer and weight names the same, as for ``interpolate``."""
    s0 = first.state_dict()
    sums = {k: v.double() if v.is_floating_point() else v for k, v in s0.items()}
    n = 1
    for other in others:
        so = other.state_dict()
        _check_same_weights(first, other, s0, so)
        for k, w in so.items():
            if sums[k].is_floating_point():
                sums[k] += w.double()
            else:
                _equal_integer_buffer(k, sums[k], w)
        n += 1
    first.load_state_dict({k: (v / n).to(s0[k].dtype) if v.is_floating_point() else v for k, v in sums.items()})
    return first


def save_model(
    model: VQDiffusion, folder: str | Path, *, overwrite: bool = False, dtype: torch.dtype = torch.float32,
    extra: dict | None = None,
) -> Path:
    """Write ``model`` as a diffusers-layout folder of safetensors; atomic (temp folder, then rename).

    ``dtype`` is the on-disk precision of floating-point weights (loading always gives fp32 masters);
    ``extra`` goes into vqdiff.json beside the generation defaults (e.g. how the model was trained)."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
    c = model.config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        index = {"_class_name": "VQDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION}
        index.update({k: CLASSES[k] for k in REQUIRED})
        index[NULL] = CLASSES[NULL] if model.null_cond is not None else [None, None]
        _write_json(tmp / "model_index.json", index)
        save_component(tmp / "transformer", transformer_config_to_diffusers(c.transformer), model.transformer, dtype=dtype)
        save_component(tmp / "vqvae", vqvae_config_to_diffusers(c.vqvae), model.vqvae, dtype=dtype)
        _save_text_encoder(model.text_encoder, tmp, dtype)
        _write_json(tmp / "scheduler" / "scheduler_config.json", diffusion_config_to_diffusers(c.diffusion))
        if model.null_cond is not None:
            length, dim = model.null_cond.embeddings.shape
            null_cfg = {"_class_name": "LearnedClassifierFreeSamplingEmbeddings",
                        "_diffusers_version": DIFFUSERS_VERSION, "learnable": True, "hidden_size": dim, "length": length}
            save_component(tmp / NULL, null_cfg, model.null_cond, dtype=dtype)
        if model.generation_defaults or extra:
            _write_json(tmp / EXTRA, {**(extra or {}), "generation_defaults": model.generation_defaults})
        _readable(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _save_text_encoder(text_encoder: TextEncoder, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    clip = text_encoder.clip
    save_component(folder / "text_encoder", clip.config.to_dict(), clip, stem="model", dtype=dtype)
    save_tokenizer(text_encoder.tokenizer, folder / "tokenizer", text_encoder.max_length)


def save_text_encoder(text_encoder: TextEncoder, folder: str | Path) -> Path:
    """FOLDER/text_encoder and FOLDER/tokenizer, as in a model folder (``vqdiff train clip``'s output);
    each component is written to a temp folder and renamed into place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".text.", dir=folder))
    try:
        _save_text_encoder(text_encoder, tmp)
        for name in ("text_encoder", "tokenizer"):
            if (folder / name).exists():
                shutil.rmtree(folder / name)
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_text_encoder(folder: str | Path, variant: str | None = None, tokenizer=None) -> TextEncoder:
    """The text encoder and tokenizer of FOLDER (a model folder, or ``vqdiff train clip``'s output), fp32."""
    folder = Path(folder)
    if not (folder / "text_encoder" / "config.json").is_file():
        raise ModelFolderError(f"{folder}: no text_encoder/config.json (expected a model folder or `vqdiff train clip` output)")
    tokenizer = _load_tokenizer(folder / "tokenizer") if tokenizer is None else tokenizer
    clip = CLIPTextModel(CLIPTextConfig.from_dict(_read_json(folder / "text_encoder" / "config.json")))
    load_into(clip, *read_weights(folder / "text_encoder", TRANSFORMERS_WEIGHTS, variant))
    try:
        return TextEncoder(tokenizer, clip).float()
    except ValueError as e:
        raise ModelFolderError(f"{folder}: {e}") from None


def _diffusers_stems() -> dict[str, str]:
    return {"safetensors": DIFFUSERS_WEIGHTS, "bin": DIFFUSERS_WEIGHTS}


def _load_tokenizer(path: Path):
    try:
        return load_tokenizer(path)
    except FileNotFoundError as e:
        raise ModelFolderError(str(e)) from None


def save_component(
    path: Path, config: dict, module: nn.Module, stem: str = DIFFUSERS_WEIGHTS, dtype: torch.dtype = torch.float32
) -> None:
    _write_json(path / "config.json", config)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in module.state_dict().items()}
    save_file(state, path / f"{stem}.safetensors", metadata={"format": "pt"})


def _write_json(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def random_model(config: ModelConfig, tokenizer, seed: int = 0) -> VQDiffusion:
    """A randomly initialised model (tests, and the start of training)."""
    torch.manual_seed(seed)
    clip = CLIPTextModel(clip_config(config.text_encoder, tokenizer))
    null = NullCondition(config.text_encoder.max_length, config.text_encoder.hidden_size) if config.learnable_null else None
    return VQDiffusion(config, VQDiffusionTransformer(config.transformer), VQVAE(config.vqvae),
                       TextEncoder(tokenizer, clip), null)
