"""Self-supervised pieces of CTA and TTT: SimCLR (NT-Xent, batched augmentations),
cross-encoder alignment, rotation prediction, and the encoder-with-heads network."""
from metatta.ssl.align import alignment_loss, feature_agreement, feature_matching_loss
from metatta.ssl.augment import SimCLRAugment, simclr_augment
from metatta.ssl.networks import MultiHeadNet, build_network, load_network, save_network, split_classifier
from metatta.ssl.rotation import rotate_batch, rotation_loss
from metatta.ssl.simclr import MLPHead, nt_xent

__all__ = ["MLPHead", "MultiHeadNet", "SimCLRAugment", "alignment_loss", "build_network", "feature_agreement",
           "feature_matching_loss",
           "load_network", "nt_xent", "rotate_batch", "rotation_loss", "save_network", "simclr_augment",
           "split_classifier"]
