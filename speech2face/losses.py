"""Training losses for both stages, with every weight in one place (:class:`LossConfig`).

Stage 2, the voice encoder (paper eq. 1)::

    L = |f_dec(v_f) - f_dec(v_s)|_1 + l1 |v_f/|v_f| - v_s/|v_s||_2^2
        + l2 L_distill(f_cls(v_f), f_cls(v_s))

Norms and the distillation sum are taken per sample (over feature or class dimensions)
and averaged over the batch; the face feature v_f is the teacher. Public
re-implementations got several of these wrong: ``a / abs(a)`` instead of an L2
normalisation, normalising over the whole batch, a mean-reduced MSE that silently divides
lambda1 by the feature size. Each is covered by a test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# Paper section 3.2, eq. 1.
LAMBDA1 = 0.025  # weight of the normalised-feature L2 term
LAMBDA2 = 200.0  # weight of the distillation term
TEMPERATURE = 2.0  # softmax temperature of the distillation
NORM_EPS = 1e-12  # keeps the normalisation of an all-zero feature finite (it maps to 0)


@dataclass(frozen=True)
class LossConfig:
    """All loss weights of both training stages."""

    # Stage 2, voice encoder (paper eq. 1).
    lambda1: float = LAMBDA1
    lambda2: float = LAMBDA2
    temperature: float = TEMPERATURE
    # Stage 1, face decoder (Cole et al. section 3.3): texture L1, landmark MSE and, for a
    # differentiable face encoder, the negative cosine between the rendered face's
    # embedding and the input feature.
    texture_weight: float = 1.0
    landmark_weight: float = 1.0
    perceptual_weight: float = 1.0


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast) up to float32; float64 (reference checks) kept as it is."""
    return x if x.dtype == torch.float64 else x.float()


def _frozen_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with its parameters and buffers detached: gradients reach ``x`` only.

    Float32 under autocast too: the layer may run in bf16/fp16, but the loss's sums over
    1000 code units or thousands of classes are taken in float32.
    """
    state = {name: t.detach() for name, t in module.state_dict(keep_vars=True).items()}
    return _at_least_float32(functional_call(module, state, (x,)))


def speech2face_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    f_dec: nn.Module,
    f_cls: nn.Module | None,
    lambda1: float = LAMBDA1,
    lambda2: float = LAMBDA2,
    temperature: float = TEMPERATURE,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The voice encoder loss of paper eq. 1.

    Args:
        pred: ``(B, D)`` voice encoder output v_s.
        target: ``(B, D)`` true face feature v_f (the teacher; no gradient flows into it).
        f_dec: the face decoder's first layer (FC + ReLU), used frozen.
        f_cls: the face encoder's identity classifier (logits), used frozen; ``None``
            drops the distillation term.

    Returns:
        ``(total, terms)``: the scalar loss and a dict of its three unweighted terms
        ``"decoder"``, ``"feature"``, ``"distill"`` (detached, for logging), and with a
        classifier ``"teacher_entropy"``: the teacher's mean entropy at ``temperature``
        (nats; not a loss term: the distillation term minus it is the KL divergence).
    """
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(
            f"pred and target must both be (B, D), got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    target = target.detach()
    with torch.no_grad():
        dec_target = _frozen_call(f_dec, target)
    decoder_term = (dec_target - _frozen_call(f_dec, pred)).abs().sum(dim=1).mean()

    # In float32 (or float64) whatever v_s's type: in bf16 the normalisation rounds v_s
    # to 3 significant digits, which near cos 0.999 is the whole of the term.
    unit_pred = F.normalize(_at_least_float32(pred), dim=1, eps=NORM_EPS)
    unit_target = F.normalize(_at_least_float32(target), dim=1, eps=NORM_EPS)
    feature_term = (unit_target - unit_pred).pow(2).sum(dim=1).mean()

    terms = {}
    if f_cls is None:
        distill_term = pred.new_zeros(())
    else:
        with torch.no_grad():
            log_teacher = F.log_softmax(_frozen_call(f_cls, target) / temperature, dim=1)
            teacher = log_teacher.exp()
            # How much the teacher says: ln K is a uniform (useless) teacher, 0 a one-hot.
            terms["teacher_entropy"] = -(teacher * log_teacher).sum(dim=1).mean()
        log_student = F.log_softmax(_frozen_call(f_cls, pred) / temperature, dim=1)
        distill_term = -(teacher * log_student).sum(dim=1).mean()

    total = decoder_term + lambda1 * feature_term + lambda2 * distill_term
    terms = {
        "decoder": decoder_term.detach(),
        "feature": feature_term.detach(),
        "distill": distill_term.detach(),
        **terms,
    }
    return total, terms


# ---------------------------------------------------------------------------- stage 1


def decoder_loss(decoded, texture_target: torch.Tensor, landmarks_target: torch.Tensor,
                 config: LossConfig | None = None, encoder: nn.Module | None = None,
                 features: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The face decoder loss (Cole et al. section 3.3), weighted by ``config``.

    ``texture_weight * L_tex + landmark_weight * L_lm + perceptual_weight * L_cos`` with

    - ``L_tex``: mean absolute error between ``decoded.texture`` and the registered
      texture target (mean over batch, channels and pixels);
    - ``L_lm``: mean squared error of the landmarks **divided by the crop size**
      (``faces.CROP_SIZE`` = 224), i.e. in units of the crop side, so the weights do not
      depend on the pixel scale: a 2.24-pixel error everywhere gives 1e-4;
    - ``L_cos``: ``-cos(encoder.embed(image), features)`` averaged over the batch, only
      when a differentiable ``encoder`` is given (the image is resized to the crop size
      first if the decoder renders smaller); otherwise 0.

    Args:
        decoded: a :class:`speech2face.face_decoder.DecodedFace` (texture/image
            ``(B, 3, S, S)``, landmarks ``(B, 68, 2)`` x, y in the 224 crop frame).
        texture_target: ``(B, 3, S, S)`` registered textures in [0, 1].
        landmarks_target: ``(B, 68, 2)`` true landmarks, (x, y) in the 224 crop frame.
        encoder: a face encoder (``.embed``, ``.differentiable``), used frozen.
        features: ``(B, D)`` the decoder's input features (required with ``encoder``).

    Returns:
        ``(total, terms)``: the scalar loss and the unweighted, detached terms
        ``"texture"``, ``"landmarks"``, ``"perceptual"``.
    """
    from speech2face.faces import CROP_SIZE  # the landmark frame

    config = config or LossConfig()
    if decoded.texture.shape != texture_target.shape:
        raise ValueError(f"texture target {tuple(texture_target.shape)} does not match the "
                         f"decoded texture {tuple(decoded.texture.shape)}")
    if decoded.landmarks.shape != landmarks_target.shape:
        raise ValueError(f"landmark target {tuple(landmarks_target.shape)} does not match the "
                         f"decoded landmarks {tuple(decoded.landmarks.shape)}")
    texture_term = (decoded.texture - texture_target.detach()).abs().mean()
    landmark_term = ((decoded.landmarks - landmarks_target.detach()) / CROP_SIZE).pow(2).mean()

    perceptual_term = texture_term.new_zeros(())
    if encoder is not None and getattr(encoder, "differentiable", False):
        if features is None:
            raise ValueError("decoder_loss: the perceptual term needs the input features")
        image = decoded.image
        if image is None:
            raise ValueError("decoder_loss: the perceptual term needs the rendered image "
                             "(the decoder was called with render_image=False)")
        if image.shape[-1] != CROP_SIZE or image.shape[-2] != CROP_SIZE:
            image = F.interpolate(image, size=(CROP_SIZE, CROP_SIZE), mode="bilinear",
                                  align_corners=False)
        embedding = _at_least_float32(encoder.embed(image))
        perceptual_term = -F.cosine_similarity(embedding, features.detach().to(embedding),
                                               dim=1, eps=NORM_EPS).mean()

    total = (config.texture_weight * texture_term + config.landmark_weight * landmark_term
             + config.perceptual_weight * perceptual_term)
    terms = {"texture": texture_term.detach(), "landmarks": landmark_term.detach(),
             "perceptual": perceptual_term.detach()}
    return total, terms
