"""Sparse dictionaries (SAEs and transcoders) on modality-tagged positions: train, load (SAELens format), splice
as hook points, and read features by modality. Opt-in: nothing here is imported by ``import av_lens``."""

from av_lens.sae.dictionary import DictionaryConfig, SparseDictionary
from av_lens.sae.features import FeatureActivations, dashboard, feature_activations, logit_effects
from av_lens.sae.splice import Splice, reconstruction_report, splice
from av_lens.sae.training import collect_rows, explained_variance, train_dictionary

__all__ = ["DictionaryConfig", "FeatureActivations", "Splice", "SparseDictionary", "collect_rows", "dashboard",
           "explained_variance", "feature_activations", "logit_effects", "reconstruction_report", "splice",
           "train_dictionary"]
