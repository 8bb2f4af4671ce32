"""How good a CLIP is: zero-shot attributes and retrieval on held-out shapes renders, and
retrieval among the held-out rows of any captioned folder. Plain PyTorch, no Ray.

Zero-shot attribute classification: every attribute combination (colour x shape x size x
position x background: 1,600 tuples) gets a text embedding, the mean of the embeddings of
``captions_per_combo`` captions drawn from the dataset's own templates; an image's
prediction is the best-scoring tuple, whose colour, shape, size and position are compared
with the image's true attributes ("zero_shot"); "zero_shot_marginal" instead picks each
attribute's value by its softmax mass summed over all tuples with that value. Chance: colour 1/8, shape 1/4, size 1/2, position 1/5.

Caption -> image retrieval: each held-out caption retrieves its best image among all
held-out images; it is right if the oracle's reading of that image (``unclip.shapes.oracle``,
not the renderer's labels) matches the caption's attributes.

Both are also measured on "upsampled" images (64 -> 32 px -> bicubic 64 px), what the
decoder's 32 px output looks like to the CLIP.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.clip_data import normalise, to_unit, tokenize, upsample_degrade
from unclip.shapes.attributes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Attributes

ATTRIBUTES = ("colour", "shape", "size", "position")


@dataclass(frozen=True)
class HeldoutRenders:
    """Freshly rendered shapes items: images (N, 3, S, S) uint8, captions, true attributes,
    and the oracle's reading of each image."""

    images: np.ndarray
    captions: list[str]
    attributes: list[Attributes]
    oracle: list[Attributes]


def render_heldout(n: int, seed: int, size: int) -> HeldoutRenders:
    from unclip.shapes.oracle import analyse
    from unclip.shapes.render import make_item

    items = [make_item(seed, i, size) for i in range(n)]
    images = np.stack([np.asarray(it.image, dtype=np.uint8).transpose(2, 0, 1) for it in items])
    return HeldoutRenders(
        images,
        [it.caption for it in items],
        [it.attributes for it in items],
        [analyse(it.image) for it in items],
    )


def all_combinations() -> list[Attributes]:
    return [
        Attributes(c, s, z, p, b)
        for c, s, z, p, b in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS, BACKGROUNDS)
    ]


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    upsampled: bool = False,
    batch: int = 250,
) -> Tensor:
    """uint8 (N, 3, S, S) -> (N, D) L2-normalised image embeddings."""
    out = []
    for i in range(0, len(images), batch):
        x = to_unit(torch.from_numpy(images[i : i + batch]))
        if upsampled:
            x = upsample_degrade(x)
        out.append(F.normalize(model.encode_image(normalise(x, mean, std)).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model: nn.Module, tokens: np.ndarray, batch: int = 500) -> Tensor:
    """int32 (N, L) ids -> (N, D) L2-normalised text embeddings."""
    out = []
    for i in range(0, len(tokens), batch):
        t = torch.from_numpy(tokens[i : i + batch]).long()
        out.append(F.normalize(model.encode_text(t).float(), dim=-1))
    return torch.cat(out)


def combination_embeddings(
    model: nn.Module, context_length: int, captions_per_combo: int = 4, seed: int = 0
) -> tuple[list[Attributes], Tensor]:
    """Every attribute tuple and its prompt-ensemble text embedding (K, D)."""
    from unclip.shapes.captions import caption

    combos = all_combinations()
    rng = np.random.default_rng(seed)
    texts = [caption(a, rng) for a in combos for _ in range(captions_per_combo)]
    emb = embed_texts(model, tokenize(texts, context_length))
    emb = emb.view(len(combos), captions_per_combo, -1).mean(dim=1)
    return combos, F.normalize(emb, dim=-1)


def attribute_accuracy(predicted: list[Attributes], truth: list[Attributes]) -> dict[str, float]:
    acc = {
        k: float(
            np.mean([getattr(p, k) == getattr(t, k) for p, t in zip(predicted, truth, strict=True)])
        )
        for k in ATTRIBUTES
    }
    acc["all"] = float(
        np.mean(
            [
                all(getattr(p, k) == getattr(t, k) for k in ATTRIBUTES)
                for p, t in zip(predicted, truth, strict=True)
            ]
        )
    )
    return acc


def zero_shot(
    image_emb: Tensor,
    combos: list[Attributes],
    combo_emb: Tensor,
    truth: list[Attributes],
    scale: float = 100.0,
) -> tuple[dict[str, float], dict[str, float]]:
    """(joint, marginal) accuracies. Joint: the attributes of the best-scoring tuple.
    Marginal: per attribute, the value with the largest softmax mass (``scale`` = CLIP's
    logit scale) summed over all tuples with that value."""
    logits = scale * image_emb @ combo_emb.T  # (N, K)
    joint = [combos[i] for i in logits.argmax(dim=1).tolist()]
    log_p = logits.log_softmax(dim=1)
    picked: dict[str, list[str]] = {}
    for kind in ATTRIBUTES:
        values = sorted({getattr(c, kind) for c in combos})
        member = torch.tensor([[getattr(c, kind) == v for c in combos] for v in values])
        mass = torch.logsumexp(log_p[:, None, :].masked_fill(~member[None], -torch.inf), dim=2)
        picked[kind] = [values[i] for i in mass.argmax(dim=1).tolist()]
    marginal = [
        Attributes(*(picked[k][i] for k in ATTRIBUTES), background=t.background)
        for i, t in enumerate(truth)
    ]
    return attribute_accuracy(joint, truth), attribute_accuracy(marginal, truth)


def caption_retrieval(
    image_emb: Tensor,
    caption_emb: Tensor,
    caption_attributes: list[Attributes],
    oracle: list[Attributes],
) -> dict[str, float]:
    best = (caption_emb @ image_emb.T).argmax(dim=1).tolist()  # (N captions,) -> image index
    return attribute_accuracy([oracle[i] for i in best], caption_attributes)


def evaluate_shapes(
    model: nn.Module,
    renders: HeldoutRenders,
    context_length: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    captions_per_combo: int = 4,
) -> dict[str, dict[str, float]]:
    """Zero-shot and retrieval on clean and on upsampled held-out renders."""
    was_training = model.training
    model.eval()
    combos, combo_emb = combination_embeddings(model, context_length, captions_per_combo)
    caption_emb = embed_texts(model, tokenize(renders.captions, context_length))
    out: dict[str, dict[str, float]] = {}
    for upsampled, suffix in ((False, ""), (True, "_upsampled")):
        image_emb = embed_images(model, renders.images, mean, std, upsampled)
        joint, marginal = zero_shot(image_emb, combos, combo_emb, renders.attributes)
        out["zero_shot" + suffix], out["zero_shot_marginal" + suffix] = joint, marginal
        out["retrieval" + suffix] = caption_retrieval(
            image_emb, caption_emb, renders.attributes, renders.oracle
        )
    model.train(was_training)
    return out


@torch.no_grad()
def heldout_recall(
    model: nn.Module,
    images: np.ndarray,
    tokens: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, float]:
    """Recall@1 and @5 of each held-out row's own caption/image among all held-out rows
    (any folder; near-duplicate captions make this a lower bound)."""
    was_training = model.training
    model.eval()
    img, txt = embed_images(model, images, mean, std), embed_texts(model, tokens)
    model.train(was_training)
    sims = img @ txt.T  # (N, N)
    target = torch.arange(len(img))[:, None]
    out = {"n": float(len(img))}
    for k in (1, 5):
        kk = min(k, len(img))
        out[f"image_to_text_r{k}"] = float(
            (sims.topk(kk, dim=1).indices == target).any(1).float().mean()
        )
        out[f"text_to_image_r{k}"] = float(
            (sims.T.topk(kk, dim=1).indices == target).any(1).float().mean()
        )
    return out
