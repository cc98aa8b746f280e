"""The digits model: a FLUX transformer in a small configuration, its pipeline, and its weight files.

Images are scikit-learn's 8x8 digits scaled to [-1, 1]. As in FLUX, the latent is packed into 2x2 patches, so a
sample is ``(B, 16, 4)``: 16 tokens of 4 values. The class (0-9, or :data:`NULL_CLASS` for the unconditional
branch of classifier-free guidance) is a learned embedding that enters as the single text token and as the pooled
projection. Sampling is diffusers' ``FlowMatchEulerDiscreteScheduler`` with batched guidance (one transformer call
per step with the conditional and unconditional halves stacked), the layout of SD3 and Z-Image.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = [
    "IMAGE_SIZE",
    "NULL_CLASS",
    "WEIGHTS_PATH",
    "ClassEmbedding",
    "DigitsPipeline",
    "DigitsPipelineOutput",
    "build_pipeline",
    "load_pipeline",
    "pack",
    "guided_velocity_fn",
    "sample_noise",
    "sigma_grid",
    "save_weights",
    "unpack",
]

IMAGE_SIZE = 8
PATCH = 2
TOKENS = (IMAGE_SIZE // PATCH) ** 2
CHANNELS = PATCH * PATCH
NUM_CLASSES = 10
#: Label of the unconditional branch (classifier-free guidance); training drops labels to it.
NULL_CLASS = NUM_CLASSES
COND_DIM = 64
#: Guidance scale the packaged weights were tuned for (class accuracy of 50-step samples, see bench/RESULTS.md).
DEFAULT_GUIDANCE = 3.0
#: The packaged weights.
WEIGHTS_PATH = Path(__file__).with_name("weights") / "digits.safetensors"
WEIGHTS_FORMAT = "meancache-digits"
WEIGHTS_VERSION = "1"

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=CHANNELS,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=3,
    joint_attention_dim=COND_DIM,
    pooled_projection_dim=COND_DIM,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)


def pack(images: torch.Tensor) -> torch.Tensor:
    """``(B, 8, 8)`` images to ``(B, 16, 4)`` latents: 2x2 patches in row-major order, any dtype.

    >>> pack(torch.arange(64.0).view(1, 8, 8))[0, :2].tolist()
    [[0.0, 1.0, 8.0, 9.0], [2.0, 3.0, 10.0, 11.0]]
    """
    b = images.shape[0]
    g = IMAGE_SIZE // PATCH
    return images.reshape(b, g, PATCH, g, PATCH).permute(0, 1, 3, 2, 4).reshape(b, TOKENS, CHANNELS)


def unpack(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(B, 16, 4)`` latents to ``(B, 8, 8)`` images.

    >>> x = torch.randn(3, 8, 8)
    >>> torch.equal(unpack(pack(x)), x)
    True
    """
    b = latents.shape[0]
    g = IMAGE_SIZE // PATCH
    return latents.reshape(b, g, g, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(b, IMAGE_SIZE, IMAGE_SIZE)


def sample_noise(seeds) -> torch.Tensor:
    """Start latents ``(len(seeds), 16, 4)`` float32: sample j is drawn from its own generator seeded ``seeds[j]``,
    so a seed gives the same noise in any batch.

    >>> torch.equal(sample_noise([5, 6])[1], sample_noise([6])[0])
    True
    """
    return torch.stack([torch.randn(TOKENS, CHANNELS, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def position_ids(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's rotary position ids: image tokens ``(16, 3)`` as ``(0, row, col)``, the class token ``(1, 3)`` zero,
    float32.

    >>> img, txt = position_ids()
    >>> img[5].tolist(), tuple(txt.shape)
    ([0.0, 1.0, 1.0], (1, 3))
    """
    g = IMAGE_SIZE // PATCH
    idx = torch.arange(TOKENS, device=device)
    img = torch.stack([torch.zeros_like(idx), idx // g, idx % g], dim=1).float()
    return img, torch.zeros(1, 3, device=device)


class ClassEmbedding(ModelMixin, ConfigMixin):
    """Learned class vectors: labels ``(B,)`` int64 to the text token ``(B, 1, 64)`` and pooled vector ``(B, 64)``.

    >>> tok, pooled = ClassEmbedding()(torch.tensor([3, NULL_CLASS]))
    >>> tuple(tok.shape), tuple(pooled.shape)
    ((2, 1, 64), (2, 64))
    """

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, dim: int = COND_DIM):
        super().__init__()
        # one extra row: the unconditional (null) class
        self.table = torch.nn.Embedding(num_classes + 1, dim)
        torch.nn.init.normal_(self.table.weight, std=0.5)

    def forward(self, labels: torch.Tensor):
        e = self.table(labels)
        return e[:, None, :], e


def velocity(transformer, class_embedding, latents: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor):
    """The model's velocity ``(B, 16, 4)`` (noise minus data) at noise levels ``sigma`` ``(B,)`` for ``labels``.

    The transformer is called exactly as FluxPipeline calls it: the timestep is sigma (it scales by 1000 itself).
    ``latents`` set the dtype; ``labels`` are int64 ``(B,)``, digits or :data:`NULL_CLASS`.

    >>> pipe = build_pipeline()
    >>> v = velocity(pipe.transformer, pipe.class_embedding, torch.zeros(2, 16, 4), torch.tensor([1.0, 0.5]),
    ...              torch.tensor([3, NULL_CLASS]))
    >>> tuple(v.shape), v.dtype
    ((2, 16, 4), torch.float32)
    """
    tokens, pooled = class_embedding(labels)
    img_ids, txt_ids = position_ids(latents.device)
    return transformer(
        hidden_states=latents,
        encoder_hidden_states=tokens.to(latents.dtype),
        pooled_projections=pooled.to(latents.dtype),
        timestep=sigma.to(latents.dtype),
        img_ids=img_ids,
        txt_ids=txt_ids,
        return_dict=False,
    )[0]


@dataclass
class DigitsPipelineOutput(BaseOutput):
    """``images``: ``(B, 8, 8)`` in [0, 1] (numpy float32 or torch), or ``(B, 16, 4)`` latents."""

    images: np.ndarray | torch.Tensor


def _check_labels(class_labels, device) -> torch.Tensor:
    labels = torch.as_tensor(class_labels)
    if labels.ndim != 1 or labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"class_labels={class_labels!r}: must be a non-empty 1-D list or tensor of integer digits 0-9"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
        raise ValueError(f"class_labels contains {labels.tolist()}: every label must be a digit 0-9")
    return labels.to(device=device, dtype=torch.long)


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional digit generation with the embedded FLUX transformer.

    Args (of ``__call__``):
        class_labels: ``B`` digits 0-9 (list or int tensor), one per sample.
        num_inference_steps: Euler steps of ``FlowMatchEulerDiscreteScheduler`` (default 50).
        guidance_scale: classifier-free guidance ``v = v_u + s (v_c - v_u)``; 1 turns guidance off (one branch).
        generator: a ``torch.Generator`` or a list of ``B`` of them (per-sample seeds, as diffusers does).
        latents: start noise ``(B, 16, 4)`` instead of drawing it.
        output_type: ``"np"`` or ``"pt"`` for ``(B, 8, 8)`` images in [0, 1], ``"latent"`` for ``(B, 16, 4)``.

    Example::

        >>> pipe = build_pipeline(seed=0)  # untrained; load_pipeline() gives the trained one
        >>> pipe.set_progress_bar_config(disable=True)
        >>> pipe([1, 7], num_inference_steps=2).images.shape
        (2, 8, 8)
    """

    model_cpu_offload_seq = "class_embedding->transformer"

    def __init__(self, transformer: FluxTransformer2DModel, scheduler, class_embedding: ClassEmbedding):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, class_embedding=class_embedding)

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        num_inference_steps: int = 50,
        guidance_scale: float = DEFAULT_GUIDANCE,
        generator=None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ):
        device = self.transformer.device
        dtype = self.transformer.dtype
        labels = _check_labels(class_labels, device)
        b = labels.numel()
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: must be an int >= 1")
        if not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale) or guidance_scale < 1:
            raise ValueError(f"guidance_scale={guidance_scale!r}: must be a finite number >= 1 (1 = no guidance)")
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}: must be 'np', 'pt' or 'latent'")
        if isinstance(generator, list) and len(generator) != b:
            raise ValueError(f"generator is a list of {len(generator)}: must hold one generator per label ({b})")
        shape = (b, TOKENS, CHANNELS)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}: must be {shape} for {b} labels")
        else:
            latents = latents.to(device=device, dtype=dtype)

        guided = guidance_scale != 1
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents, latents]) if guided else latents
            sigma = (t / 1000).expand(model_in.shape[0])
            with self.transformer.cache_context("cond_uncond"):
                v = velocity(self.transformer, self.class_embedding, model_in, sigma, labels)
            if guided:
                v_cond, v_uncond = v.chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

        if output_type == "latent":
            images = latents
        else:
            images = ((unpack(latents.float()) + 1) / 2).clamp(0, 1)
            if output_type == "np":
                images = images.cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return DigitsPipelineOutput(images=images)


def sigma_grid(num_steps: int) -> torch.Tensor:
    """The pipeline's sigma grid for ``num_steps`` steps, ``(num_steps + 1,)`` float32 from 1 down to 0.

    >>> sigma_grid(4).tolist()[0], sigma_grid(4).tolist()[-1], len(sigma_grid(4))
    (1.0, 0.0, 5)
    """
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.float().cpu()


def guided_velocity_fn(pipe: "DigitsPipeline", guidance_scale: float = DEFAULT_GUIDANCE):
    """The pipeline's guided velocity as a ``velocity_fn(x, sigma)`` for :func:`meancache.sample` and
    :func:`meancache.record`: ``x`` ``(B, 16, 4)`` (any float dtype; computed in the model's dtype, returned in
    ``x``'s), sample j of a batch asks for digit ``j % 10`` (the demo's layout).

    Example::

        >>> import meancache
        >>> pipe = build_pipeline()
        >>> x = meancache.sample(guided_velocity_fn(pipe), sample_noise(range(3)), sigma_grid(6),
        ...                      meancache.Schedule.default(3, 6))
        >>> tuple(x.shape)
        (3, 16, 4)
    """

    @torch.no_grad()
    def velocity_fn(x: torch.Tensor, sigma) -> torch.Tensor:
        tf = pipe.transformer
        b = x.shape[0]
        labels = torch.arange(b, device=x.device) % NUM_CLASSES
        labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
        xin = x.to(tf.dtype)
        s = torch.as_tensor(sigma, dtype=tf.dtype, device=x.device).reshape(-1)[:1].expand(2 * b)
        v_cond, v_uncond = velocity(tf, pipe.class_embedding, torch.cat([xin, xin]), s, labels).chunk(2)
        return (v_uncond + guidance_scale * (v_cond - v_uncond)).to(x.dtype)

    return velocity_fn


def build_pipeline(seed: int = 0) -> DigitsPipeline:
    """A freshly initialised (untrained) :class:`DigitsPipeline`, float32 on the CPU.

    >>> sum(p.numel() for p in build_pipeline().transformer.parameters()) > 10**6
    True
    """
    torch.manual_seed(seed)
    return DigitsPipeline(
        transformer=FluxTransformer2DModel(**TRANSFORMER_CONFIG),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        class_embedding=ClassEmbedding(),
    )


def _state(pipe: DigitsPipeline) -> dict[str, torch.Tensor]:
    out = {f"transformer.{k}": v for k, v in pipe.transformer.state_dict().items()}
    out.update({f"class_embedding.{k}": v for k, v in pipe.class_embedding.state_dict().items()})
    return out


def save_weights(pipe: DigitsPipeline, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
    """Write the pipeline's weights to a safetensors file (``dtype``; float16 keeps the packaged file ~2 MB).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "d.safetensors")
    >>> save_weights(build_pipeline(), path); os.path.getsize(path) > 10**6
    True
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in _state(pipe).items()}
    meta = {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "transformer_config": json.dumps(TRANSFORMER_CONFIG),
    }
    save_file(tensors, os.fspath(path), metadata=meta)


def load_pipeline(
    path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> DigitsPipeline:
    """The trained :class:`DigitsPipeline`, from the packaged weights (default) or a file of :func:`save_weights`.

    Raises:
        FileNotFoundError: the weight file does not exist (the message names it).
        ValueError: the file is not a readable safetensors file of this model, misses or adds tensors, has tensors
            of the wrong shape, or holds non-finite values (each message names the file).

    Example::

        >>> pipe = load_pipeline()
        >>> pipe.set_progress_bar_config(disable=True)
        >>> pipe([0, 1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images.shape
        (3, 8, 8)
    """
    from safetensors import SafetensorError
    from safetensors import safe_open

    path = Path(WEIGHTS_PATH if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"digits model weights not found: {path}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors weight file ({e})") from None
    if meta.get("format") != WEIGHTS_FORMAT or meta.get("version") != WEIGHTS_VERSION:
        raise ValueError(
            f"{path}: metadata format={meta.get('format')!r} version={meta.get('version')!r}; expected "
            f"{WEIGHTS_FORMAT!r} version {WEIGHTS_VERSION!r} (a file written by meancache.examples.digits.save_weights)"
        )
    pipe = build_pipeline()
    expected = _state(pipe)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: tensors missing {missing[:5]} / unexpected {extra[:5]} for the digits model")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{path}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"{path}: tensor {k} holds non-finite values")
    for prefix, module in (("transformer.", pipe.transformer), ("class_embedding.", pipe.class_embedding)):
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for module in (pipe.transformer, pipe.class_embedding):
        # nn.Module.to: diffusers' own .to warns about dtype casts that do not apply to this model
        torch.nn.Module.to(module, device=device, dtype=dtype)
    pipe.transformer.eval()
    return pipe
