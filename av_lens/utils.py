"""TransformerLens 3's ``transformer_lens.utils`` helpers that research code imports, for av_lens models.

TransformerLens 4 removed the ``transformer_lens.utils`` module; most of its helpers moved to
``transformer_lens.utilities``. Code written for TL 3 does ``from transformer_lens import utils`` and then
``utils.get_act_name("pattern", 3)``, ``utils.to_numpy(x)``, ``utils.test_prompt(...)``; with av_lens,
``from av_lens import utils`` gives the same names. Where TL 4 still has a helper it is re-exported unchanged;
``lm_cross_entropy_loss`` and ``test_prompt`` also take an :class:`~av_lens.AVInput`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformer_lens.utilities.components_utils import get_act_name
from transformer_lens.utilities.lm_utils import lm_accuracy
from transformer_lens.utilities.logits_utils import sample_logits
from transformer_lens.utilities.matrix import composition_scores, get_matrix_corner
from transformer_lens.utilities.slice import Slice
from transformer_lens.utilities.tensors import (filter_dict_by_prefix, get_corner, get_cumsum_along_dim,
                                                get_offset_position_ids, is_lower_triangular, is_square,
                                                remove_batch_dim, repeat_along_head_dimension, to_numpy,
                                                transpose)
from transformer_lens.utilities.tokenize_utils import (get_input_with_manually_prepended_bos,
                                                       get_tokens_with_bos_removed, tokenize_and_concatenate)
from transformer_lens.utilities.tokenize_utils import get_attention_mask as _tl_get_attention_mask

from av_lens.inputs import AVInput

__all__ = [
    "Slice", "composition_scores", "filter_dict_by_prefix", "get_act_name", "get_attention_mask", "get_corner",
    "get_cumsum_along_dim", "get_input_with_manually_prepended_bos", "get_matrix_corner", "get_offset_position_ids",
    "get_tokens_with_bos_removed", "is_lower_triangular", "is_square", "lm_accuracy", "lm_cross_entropy_loss",
    "remove_batch_dim", "repeat_along_head_dimension", "sample_logits", "test_prompt", "tokenize_and_concatenate",
    "to_numpy", "transpose",
]


def get_attention_mask(tokenizer, tokens: torch.Tensor, prepend_bos: bool, padding_side: str | None = None) -> torch.Tensor:
    """TransformerLens's rule for the pads of a token tensor: leading pad tokens (left padding) or trailing
    ones (right padding) are masked; a prepended BOS that shares the pad id is kept."""
    mask = _tl_get_attention_mask(tokenizer, tokens, prepend_bos, padding_side=padding_side)
    return mask.long()


def lm_cross_entropy_loss(logits: torch.Tensor, tokens: torch.Tensor | AVInput, attention_mask: torch.Tensor | None = None,
                          per_token: bool = False) -> torch.Tensor:
    """TL's ``lm_cross_entropy_loss``. With token ids it is TL's (``attention_mask`` masks pads); with an
    :class:`~av_lens.AVInput` it covers the text targets only, as ``model(inputs, return_type="loss")`` does
    (media placeholder and pad targets excluded; see ``HookedAVTransformer.loss_targets``)."""
    if isinstance(tokens, AVInput):
        from av_lens.model import HookedAVTransformer

        return HookedAVTransformer.loss_fn(logits, tokens, per_token=per_token)
    lp = F.log_softmax(logits.float(), dim=-1)[..., :-1, :].gather(-1, tokens[..., 1:, None].to(logits.device))[..., 0]
    if attention_mask is None:
        return -lp if per_token else -lp.mean()
    m = attention_mask.to(logits.device).bool()
    valid = m[:, :-1] & m[:, 1:]
    lp = lp.masked_fill(~valid, 0.0)
    return -lp if per_token else -lp.sum() / valid.sum()


@torch.no_grad()
def test_prompt(prompt: Any, answer: str | list[str], model, prepend_space_to_answer: bool = True,
                print_details: bool = True, prepend_bos: bool | None = None, top_k: int = 10) -> list:
    """TL's ``test_prompt``: how the model ranks ``answer`` after ``prompt``, printed; also returned as a list
    of ``(answer_str_token, rank)`` per answer position. ``prompt`` may be a string or an
    :class:`~av_lens.AVInput` (one sample: an audio-visual prompt); the answer is appended as text
    (``AVInput.extend``), so the media stay in place. With several answers only the first token of each is
    ranked, as in TL."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    multi = len(answers) > 1
    ans_ids = [model.to_tokens(a, prepend_bos=False)[0] for a in answers]
    if multi:
        ans_ids = [a[:1] for a in ans_ids]
    ans_ids = torch.stack(ans_ids)  # [n_answers, n_answer_tokens]
    if isinstance(prompt, AVInput):
        if len(prompt) != 1:
            from av_lens.errors import InputError

            raise InputError(f"test_prompt takes one prompt, got a batch of {len(prompt)}", "pass inputs[i]")
        prompt_strs = model.to_str_tokens(prompt)
        runs = [prompt.extend(a[None].cpu()) for a in ans_ids]
        logits = torch.cat([model(r) for r in runs])
    else:
        prompt_ids = model.to_tokens(prompt, prepend_bos=prepend_bos)
        prompt_strs = model.to_str_tokens(prompt, prepend_bos=prepend_bos)
        tokens = torch.cat([prompt_ids.expand(len(answers), -1), ans_ids.to(prompt_ids.device)], 1)
        logits = model(tokens)
    n_prompt = len(prompt_strs)
    ans_strs = [model.to_str_tokens(a[None]) if a.numel() > 1 else [model.to_string(a)] for a in ans_ids]
    if print_details:
        print("Tokenized prompt:", prompt_strs)
        print("Tokenized answers:" if multi else "Tokenized answer:", ans_strs if multi else ans_strs[0])
    probs = logits.float().softmax(-1)
    ranks = []
    for j in range(ans_ids.shape[1]):
        index = n_prompt + j
        target = ans_ids[:, j].to(logits.device)
        token_probs = probs[:, index - 1]
        order = token_probs.argsort(-1, descending=True)
        r = order.argsort(-1).gather(-1, target[:, None])[:, 0].tolist()
        ranks.append([(ans_strs[i][j], r[i]) for i in range(len(answers))])
        if print_details:
            for i in range(len(answers)):
                print(f"Rank: {r[i]: <8} Logit: {logits[i, index - 1, target[i]].item():5.2f} "
                      f"Prob: {token_probs[i, target[i]].item():6.2%} Token: |{ans_strs[i][j]}|")
            for k in range(min(top_k, order.shape[-1])):
                t = order[0, k]
                print(f"Top {k}th token. Logit: {logits[0, index - 1, t].item():5.2f} "
                      f"Prob: {token_probs[0, t].item():6.2%} Token: |{model.to_string(t)}|")
    out = [r[0] for r in ranks] if not multi else ranks
    print("Ranks of the answer tokens:", out)
    return out


test_prompt.__test__ = False  # not a pytest test
