"""SHOT-IM adaptation (Liang et al. 2020, as the paper's Office-Home setup): one copy of the source model
per target, the classifier head frozen, the feature extractor trained on the target's *unlabeled* images
to make each prediction confident while keeping the batch's predictions diverse; optionally SHOT's
clustering pseudo-labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import generator
from .model import SmallResNet

__all__ = ["information_maximization_loss", "shot_pseudo_labels", "adapt_shot"]


def information_maximization_loss(logits: Tensor, eps: float = 1e-5) -> Tensor:
    """SHOT's IM loss: mean per-sample entropy minus the entropy of the batch-mean prediction.
    The first term makes each prediction confident; the second keeps the classes diverse (without it the
    entropy term alone collapses every image onto one class)."""
    p = logits.softmax(dim=1)
    entropy = -(p * torch.log(p + eps)).sum(dim=1).mean()
    p_mean = p.mean(dim=0)
    diversity = -(p_mean * torch.log(p_mean + eps)).sum()
    return entropy - diversity


@torch.no_grad()
def shot_pseudo_labels(model: SmallResNet, x: Tensor, batch_size: int = 512) -> Tensor:
    """SHOT's self-supervised pseudo-labels: class centroids of the (cosine-normalised) features weighted
    by the predictions, each image labelled by its nearest centroid, then one refinement with hard labels."""
    was_training = model.training
    model.eval()
    feats, probs = [], []
    for i in range(0, x.shape[0], batch_size):
        f = model.features(x[i:i + batch_size])
        feats.append(f)
        probs.append(model.fc(f).softmax(dim=1))
    model.train(was_training)
    f = torch.cat(feats)
    f = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)
    f = f / f.norm(dim=1, keepdim=True)
    p = torch.cat(probs)
    centroids = (p.t() @ f) / (p.sum(dim=0)[:, None] + 1e-8)
    labels = (f @ F.normalize(centroids, dim=1).t()).argmax(dim=1)
    onehot = F.one_hot(labels, p.shape[1]).to(f.dtype)
    centroids = (onehot.t() @ f) / (onehot.sum(dim=0)[:, None] + 1e-8)
    return (f @ F.normalize(centroids, dim=1).t()).argmax(dim=1)


def adapt_shot(model: SmallResNet, x_target: Tensor, *, epochs: int, lr: float, batch_size: int, seed: int,
               device: torch.device, pseudo_label_weight: float = 0.0) -> SmallResNet:
    """SHOT-IM on unlabeled target images: the head ``fc`` frozen, the feature extractor (BatchNorm in
    training mode, so its statistics move to the target) trained with :func:`information_maximization_loss`,
    plus ``pseudo_label_weight`` x cross-entropy on :func:`shot_pseudo_labels` recomputed every epoch.
    Adapts ``model`` in place and returns it in eval mode."""
    g = generator(seed)
    x = x_target.to(device)
    n = x.shape[0]
    for p in model.fc.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
    for _ in range(epochs):
        labels = shot_pseudo_labels(model, x) if pseudo_label_weight > 0 else None
        model.train()
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, batch_size):
            b = perm[i:i + batch_size]
            if b.numel() < 2:  # the diversity term and BatchNorm need a batch
                continue
            logits = model(x[b])
            loss = information_maximization_loss(logits)
            if labels is not None:
                loss = loss + pseudo_label_weight * F.cross_entropy(logits, labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in model.fc.parameters():
        p.requires_grad_(True)
    return model.eval()

