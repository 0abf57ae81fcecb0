"""The study's experiments as composable, modality-aware tools.

Each tool either returns TransformerLens ``(hook_name, fn)`` pairs for ``run_with_hooks`` / ``generate``, or runs
a small loop and returns a tidy result. Positions are chosen with layout selectors ("audio", "video",
"generated", "last_prompt", ``S.video.between(0, 2)``, ...).

==========================  ===============================================================
attention_flow              attention mass per layer x head x key modality (no T^2 kept)
logit_lens                  per-layer top-k / target ranks at a modality's positions
knockout                    block query->key edges in a layer window; window sweeps
patching                    activation patching by modality set; sender->receiver path patching
ablation                    head ablation (zero / mean / resample), per-head effect tables
probes                      linear probes on pooled residuals, with a control task
token_shift                 teacher-forced comparison with a base model (unshifted/marginal/shifted)
pairs                       factual/counterfactual pairs, caption-fidelity scorers
==========================  ===============================================================
"""

from av_lens.analysis.ablation import head_ablation_hooks, head_effect_table
from av_lens.analysis.attention_flow import AttentionFlow, FlowResult, attention_flow
from av_lens.analysis.knockout import (SweepResult, from_layer_windows, knockout_hooks, knockout_sweep,
                                       sliding_windows)
from av_lens.analysis.logit_lens import LensResult, LogitLens, logit_lens
from av_lens.analysis.pairs import (CaptionScorer, KeywordScorer, LLMJudgeScorer, Pair, counterfactual_pair,
                                    fidelity, organism_pairs, require_aligned)
from av_lens.analysis.patching import (PatchResult, patch_by_modality, patch_per_position, path_patch,
                                       path_patch_hooks)
from av_lens.analysis.probes import LinearProbe, ProbeResult, pooled_residuals, probe_layers
from av_lens.analysis.token_shift import TokenShiftResult, pooled_fractions, token_shift, token_shift_batch
