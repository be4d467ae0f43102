"""Evaluation metrics: sample distances (W2, MMD, Fréchet), flow quality (path energy, NPE,
straightness) and the feature classifier behind the image Fréchet distance."""

from sdfm.metrics.classifier import (
    FeatureNet,
    classifier_features,
    classifier_frechet,
    classifier_path,
    get_classifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from sdfm.metrics.distances import frechet_distance, gaussian_stats, mmd, wasserstein2
from sdfm.metrics.flow import FlowStats, flow_stats, normalized_path_energy, path_energy, straightness

__all__ = [
    "FeatureNet",
    "FlowStats",
    "classifier_features",
    "classifier_frechet",
    "classifier_path",
    "flow_stats",
    "frechet_distance",
    "gaussian_stats",
    "get_classifier",
    "load_classifier",
    "mmd",
    "normalized_path_energy",
    "path_energy",
    "save_classifier",
    "straightness",
    "train_classifier",
    "wasserstein2",
]
