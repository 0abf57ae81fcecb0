"""The study's experiments as composable, modality-aware tools.

Each tool either returns TransformerLens ``(hook_name, fn)`` pairs for ``run_with_hooks`` / ``generate``, or runs
a small loop and returns a tidy result. Positions are chosen with layout selectors ("audio", "video",
"generated", "last_prompt", ``S.video.between(0, 2)``, ...).

==========================  ===============================================================
attention_flow              attention mass per layer x head x key modality (no T^2 kept)
logit_lens                  per-layer top-k / target ranks at a modality's positions
knockout                    block query->key edges in a layer window; window sweeps; token-drop curves
patching                    activation patching by modality set; sender->receiver path patching
attribution                 attribution patching (AtP) over every layer x component x set / position
position_map                map positions between inputs whose layouts differ (for patching and AtP)
ablation                    head ablation (zero / mean / resample), per-head effect tables
probes                      linear probes (any selector, e.g. last_prompt) with AUROC and a control task;
                            ridge regression probes
steering                    add a direction at selected positions in prefill and every decoding step; sweeps
similarity                  linear / debiased CKA across layers, position sets or runs, streamed
sinks                       attention sinks and massive activations per modality
token_shift                 teacher-forced comparison with a base model (unshifted/marginal/shifted)
pairs                       factual/counterfactual pairs, caption-fidelity scorers
==========================  ===============================================================
"""

from av_lens.analysis.ablation import head_ablation_hooks, head_effect_table
from av_lens.analysis.attribution import (AttributionResult, EdgeAttributionResult, attribution_patch,
                                          edge_attribution, teacher_forced)
from av_lens.analysis.attention_flow import AttentionFlow, FlowResult, attention_flow
from av_lens.analysis.knockout import (SweepResult, from_layer_windows, knockout_hooks, knockout_sweep,
                                       sliding_windows, token_drop_sweep)
from av_lens.analysis.logit_lens import LensResult, LogitLens, logit_lens
from av_lens.analysis.pairs import (CaptionScorer, KeywordScorer, LLMJudgeScorer, Pair, counterfactual_pair,
                                    fidelity, organism_pairs, require_aligned)
from av_lens.analysis.patching import (PatchResult, patch_by_modality, patch_per_position, path_patch,
                                       path_patch_hooks)
from av_lens.analysis.position_map import PositionMap, position_map
from av_lens.analysis.probes import (LinearProbe, ProbeResult, RegressionProbeResult, auroc, multiclass_auroc,
                                    pooled_residuals, probe_layers, regression_probe_layers)
from av_lens.analysis.similarity import CKAAccumulator, CKAResult, cka_matrix, linear_cka
from av_lens.analysis.sinks import SinkResult, scan_sinks
from av_lens.analysis.steering import (SteeringHooks, SteeringSweep, mean_difference, probe_direction,
                                       random_direction_like, steer, steering_hooks, steering_sweep)
from av_lens.analysis.token_shift import TokenShiftResult, pooled_fractions, token_shift, token_shift_batch
