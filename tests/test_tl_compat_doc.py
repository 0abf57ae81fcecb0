"""docs/tl_compat.md's surface table is kept in sync with the model: every ✓ / "differs" row names a member
the model has, and every public member that TransformerLens's HookedTransformer also has is in the table."""

import re
from pathlib import Path

from av_lens import HookedAVTransformer

DOC = Path(__file__).resolve().parents[1] / "docs" / "tl_compat.md"

#: public members HookedTransformer (TL 3) has, that code touches (the table must list each one it shares)
TL_SURFACE = {
    "forward", "run_with_hooks", "run_with_cache", "hooks", "add_hook", "add_perma_hook", "reset_hooks",
    "remove_all_hook_fns", "to_tokens", "to_string", "to_str_tokens", "to_single_token", "get_token_position",
    "tokens_to_residual_directions", "generate", "set_use_attn_result", "set_use_split_qkv_input", "set_use_attn_in",
    "set_use_hook_mlp_in", "from_pretrained", "from_pretrained_no_processing", "W_E", "W_U", "b_U", "W_Q", "W_K",
    "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_gate", "W_out", "accumulated_bias", "cfg", "tokenizer",
    "hook_dict", "mod_dict", "to", "cuda", "cpu", "W_pos", "set_tokenizer", "sample_datapoint",
    "load_and_process_state_dict", "process_weights_",
}
NOT_MEMBERS = {"start_at_layer", "past_kv_cache", "refactor_factored_attn_matrices", "center_writing_weights",
               "pos_embed"}  # rows about keywords or options, not attributes


def rows():
    out = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `([A-Za-z_]+)` \| (✓|differs[^|]*|n\.a\.) \|", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_every_listed_member_exists(model):
    table = rows()
    assert len(table) >= 45
    for name, status in table.items():
        if name in NOT_MEMBERS or status == "n.a.":
            continue
        assert hasattr(model, name) or hasattr(HookedAVTransformer, name), f"{name} is listed as {status} but missing"
    assert not hasattr(model, "W_pos")  # n.a. rows really are absent


def test_every_shared_tl_member_is_listed(model):
    table = rows()
    shared = {n for n in TL_SURFACE if hasattr(model, n) or hasattr(HookedAVTransformer, n)}
    assert shared - set(table) == set()
    assert TL_SURFACE - set(table) == set()


def test_mirror_counts_match_the_test_file():
    text = (Path(__file__).parent / "test_tl_mirror.py").read_text()
    n_tests = len(re.findall(r"^def test_", text, re.M))
    n_xfail = len(re.findall(r"^@pytest\.mark\.xfail\(strict=True", text, re.M))
    doc = DOC.read_text()
    m = re.search(r"(\d+) tests, (\d+) pass", doc)
    assert m and int(m.group(1)) == n_tests and int(m.group(2)) == n_tests - n_xfail
    assert n_tests >= 40 and (n_tests - n_xfail) / n_tests >= 0.95
